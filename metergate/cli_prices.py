"""``metergate prices``: price versions as code — pull the version in force to a file, diff a file against it
(rules and simulated amounts), push a file as a new version, validate one.

* ``pull`` prints the version in force (of the admin key's mode) as a price file
  (:mod:`metergate.cli_pricefile`).
* ``diff FILE`` validates the file on the server, lists what it changes rule by rule, and re-prices the
  recorded usage of the last ``--since`` (default 30 days) under the file and under the version in force,
  per customer and asset, in exact decimals. Exit codes as ``diff(1)``'s: 0 no change, 1 changes, 2 an error
  (the file refused, the server unreachable, bad arguments).
* ``push FILE --effective-at TIME|now`` validates the file and publishes it as a new version. A push is
  idempotent: the draft is created under a key derived from the file's canonical rules, the version it was
  diffed against and the effective time, so a push retried after a lost answer (or run twice) publishes
  once. A file that matches the version in force publishes nothing.

The validator is always the server's: a refused file is one line naming the file, the rule path (with the
rule's id) and the server's code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import re
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metergate import cli_pricefile as pricefile
from metergate.cli_admin import EXIT_OK, EXIT_REFUSED, fail
from metergate.cli_table import dump, table

if TYPE_CHECKING:
    from metergate_client import ApiError, Client

EXIT_CHANGES, EXIT_DIFF_ERROR = 1, 2
DIFF_EXIT_CODES = ("exit codes: 0 the file matches the version in force; 1 it changes prices; 2 an error (the "
                   "file refused, the server unreachable, bad arguments)")
DEFAULT_SINCE = "30d"
_DURATION = re.compile(r"^([0-9]{1,6})([mhdw])$")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def add_commands(prices: Any, common: argparse.ArgumentParser) -> None:
    """Register validate, pull, diff and push on the ``prices`` group."""
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode", choices=("test", "live"),
                      help="the mode to act in; the admin key must be of that mode (default: the key's)")

    p = prices.add_parser("validate", parents=[common], help="validate a price file (YAML or JSON) on the server")
    p.add_argument("file")
    p.set_defaults(admin_handler=validate)

    p = prices.add_parser("pull", parents=[common, mode],
                          help="print the version in force as a price file: metergate prices pull > prices.yaml")
    p.set_defaults(admin_handler=pull)

    p = prices.add_parser("diff", parents=[common, mode], epilog=DIFF_EXIT_CODES,
                          help="what a price file changes: rule by rule, and simulated over recorded usage")
    p.add_argument("file")
    p.add_argument("--since", default=DEFAULT_SINCE,
                   help="the period to simulate: a duration (30d, 12h, 2w) or an ISO 8601 time (default 30d)")
    p.set_defaults(admin_handler=diff, error_exit=EXIT_DIFF_ERROR)

    p = prices.add_parser("push", parents=[common, mode], help="publish a price file as a new version (idempotent)")
    p.add_argument("file")
    p.add_argument("--effective-at", required=True, metavar="TIME",
                   help="'now', or an ISO 8601 time (UTC unless it has an offset) at least the refresh interval "
                        "ahead, so that every replica switches at once")
    p.set_defaults(admin_handler=push)


# ---------------------------------------------------------------------- helpers


def _rules_of(client: Client, path: Path) -> tuple[list[Any], list[dict[str, Any]]]:
    """The file's rules as written, and as the server's validator made them canonical; raises
    :class:`Refused` when the server refuses them."""
    from metergate_client import ApiError

    written = pricefile.load(path)
    try:
        answer = client.validate_prices(written)
    except ApiError as exc:
        if (exc.param or "").startswith("rules"):  # the file's fault; anything else is the key's, the server's
            raise Refused(path, written, exc) from None
        raise
    return written, list(answer["rules"])


class Refused(Exception):
    """The server's validator refused a price file: one line naming the file, the rule path and the code."""

    def __init__(self, path: Path, rules: list[Any], error: ApiError) -> None:
        where = f"{pricefile.rule_label(rules, error.param)}: " if error.param else ""
        super().__init__(f"{path}: {where}{error.code}: {error.message}")


def _in_force(client: Client) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The version in force (with its rules) and the published versions scheduled after it."""
    listing = client.list_price_versions(limit=200)
    summary = listing["in_force"]
    version = client.get_price_version(str(summary["id"]))
    start = summary.get("effective_at_ms") or 0
    now = int(time.time() * 1000)
    scheduled = sorted((v for v in listing["data"] if v.get("state") == "published" and v["id"] != summary["id"]
                        and (v.get("effective_at_ms") or 0) > max(start, now)),
                       key=lambda v: int(v["effective_at_ms"]))
    return version, list(version.get("rules") or []), scheduled


def parse_instant(text: str, name: str) -> int:
    """Epoch milliseconds from digits or an ISO 8601 date or time (UTC without an offset), as the server
    reads them; a ``ValueError`` naming the option otherwise."""
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 time (2026-01-31T12:00:00Z) or epoch milliseconds, "
                         f"not {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return (moment - _EPOCH) // dt.timedelta(milliseconds=1)


def since_ms(text: str, now_ms: int) -> int:
    matched = _DURATION.match(text)
    if matched:
        return now_ms - int(matched.group(1)) * _UNIT_S[matched.group(2)] * 1000
    return parse_instant(text, "--since")


def _mode_of(args: argparse.Namespace) -> str:
    return str(getattr(args, "key_mode", "") or "")


def _refused(exc: Refused, args: argparse.Namespace) -> int:
    return fail(str(exc), int(getattr(args, "error_exit", None) or EXIT_REFUSED))


# ---------------------------------------------------------------------- validate and pull


def validate(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        _, rules = _rules_of(client, path)
    except Refused as exc:
        return _refused(exc, args)
    if args.json:
        dump({"valid": True, "rules": rules})
    else:
        print(f"{path}: valid, {len(rules)} rules")
    return EXIT_OK


def pull(client: Client, args: argparse.Namespace) -> int:
    version, rules, scheduled = _in_force(client)
    if args.json:
        print(json.dumps({"rules": [pricefile.canonical_rule(r) for r in rules]}, indent=2))
        return EXIT_OK
    comments = pricefile.header(version, _mode_of(args), str(getattr(args, "server_url", client.url)), scheduled)
    sys.stdout.write(pricefile.dump(rules, comments))
    return EXIT_OK


# ---------------------------------------------------------------------- diff


def _shown(value: Any) -> str:
    if value is pricefile.ABSENT:
        return "(none)"
    return json.dumps(value)


def _print_changes(changes: list[pricefile.Change], current: list[dict[str, Any]],
                   draft: list[dict[str, Any]]) -> None:
    by_id = {str(r["id"]): r for r in [*current, *draft]}
    for change in changes:
        if change.kind == "changed":
            print(f"~ {change.rule}.{change.path}: {_shown(change.old)} -> {_shown(change.new)}")
        else:
            sign = "+" if change.kind == "added" else "-"
            print(f"{sign} {change.rule} ({change.kind}: {pricefile.describe(by_id[change.rule])})")


def compare(now: dict[str, Any], draft: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Per (customer, asset) and per asset: the amount under the version in force and under the draft, and
    the difference, as exact decimal strings (a side with no amount is zero at the other side's scale)."""
    keys = sorted({(r["customer_id"], r["asset"]) for r in [*now["customers"], *draft["customers"]]})
    old = {(r["customer_id"], r["asset"]): Decimal(r["new_total_decimal"]) for r in now["customers"]}
    new = {(r["customer_id"], r["asset"]): Decimal(r["new_total_decimal"]) for r in draft["customers"]}
    rows: list[dict[str, str]] = []
    totals: dict[str, tuple[Decimal, Decimal]] = {}
    for key in keys:
        # A side without an amount is zero, written at the other side's scale (0 x 0.000150 = 0.000000).
        a = old.get(key, new.get(key, Decimal(0)) * 0)
        b = new.get(key, a * 0)
        rows.append({"customer_id": key[0], "asset": key[1], "now": format(a, "f"), "draft": format(b, "f"),
                     "difference": _signed(b - a)})
        ta, tb = totals.get(key[1], (a * 0, b * 0))
        totals[key[1]] = (ta + a, tb + b)
    total_rows = [{"asset": asset, "now": format(a, "f"), "draft": format(b, "f"), "difference": _signed(b - a)}
                  for asset, (a, b) in sorted(totals.items())]
    return rows, total_rows


def _signed(value: Decimal) -> str:
    text = format(value, "f")
    return f"+{text}" if value > 0 else text


def diff(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    now_ms = int(time.time() * 1000)
    from_ms = since_ms(args.since, now_ms)
    if from_ms >= now_ms:
        raise ValueError(f"--since {args.since} is not in the past")
    try:
        _, draft = _rules_of(client, path)
    except Refused as exc:
        return _refused(exc, args)
    version, current, _ = _in_force(client)
    changes = pricefile.rule_changes(current, draft)
    against = f"{version['id']} ({_mode_of(args)} mode)"
    report: dict[str, Any] = {"file": str(path), "mode": _mode_of(args), "in_force": version["id"],
                              "changes": [c.as_json() for c in changes], "simulation": None}
    if not changes:
        if args.json:
            dump(report)
        else:
            print(f"{path}: no changes against the version in force, {against}")
        return EXIT_OK
    sim_now = client.simulate_price_version(str(version["id"]), from_ms, now_ms)
    sim_draft = client.simulate_prices(draft, from_ms, now_ms)
    rows, totals = compare(sim_now, sim_draft)
    report["simulation"] = {"from_ms": from_ms, "to_ms": now_ms, "customers": rows, "totals": totals,
                            "counts": {"now": sim_now["counts"], "draft": sim_draft["counts"]}}
    if args.json:
        dump(report)
        return EXIT_CHANGES
    print(f"{path} against the version in force, {against}: {len(changes)} change(s)")
    _print_changes(changes, current, draft)
    counts = sim_draft["counts"]
    print(f"\nrecorded usage {pricefile.iso(from_ms)} .. {pricefile.iso(now_ms)} re-priced: {counts['records']} "
          "records; amounts in each asset's major unit")
    if rows:
        table(["customer", "asset", "now", "draft", "difference"],
              [[r["customer_id"], r["asset"], r["now"], r["draft"], r["difference"]] for r in rows]
              + [["total", t["asset"], t["now"], t["draft"], t["difference"]] for t in totals])
    else:
        print("(no usage recorded in the period)")
    for name, sim in (("the version in force", sim_now), ("the file", sim_draft)):
        if sim["counts"]["unpriced"]:
            print(f"warning: {sim['counts']['unpriced']} records that {name} cannot price (no rule matches: such "
                  "requests would be refused) are left out of its totals")
    return EXIT_CHANGES


# ---------------------------------------------------------------------- push


def push_key(rules: list[dict[str, Any]], base_version: str, effective_at: str) -> str:
    """The idempotency key of a push: the same canonical rules pushed onto the same version in force for the
    same moment are one push, however often it is retried."""
    material = json.dumps({"rules": rules, "base": base_version, "effective_at": effective_at}, sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False)
    return "prices-push:" + hashlib.sha256(material.encode("utf-8")).hexdigest()[:48]


def push(client: Client, args: argparse.Namespace) -> int:
    path = Path(args.file)
    when = args.effective_at.strip()
    effective: str | None = None if when == "now" else when
    effective_key = "now" if effective is None else str(parse_instant(when, "--effective-at"))
    try:
        _, draft = _rules_of(client, path)
    except Refused as exc:
        return _refused(exc, args)
    version, current, _ = _in_force(client)
    changes = pricefile.rule_changes(current, draft)
    mode = _mode_of(args)
    if not changes:
        message = f"{path} matches the version in force, {version['id']} ({mode} mode); nothing published"
        if args.json:
            dump({"published": None, "in_force": version["id"], "message": message})
        else:
            print(message)
        return EXIT_OK
    key = push_key(draft, str(version["id"]), effective_key)
    stored = client.create_price_version(draft, note=f"metergate prices push {path.name}", idempotency_key=key)
    if stored["state"] == "published":
        message = (f"{path} was pushed already: {stored['id']} ({mode} mode), effective at "
                   f"{pricefile.iso(stored['effective_at_ms'])}; nothing new published")
    else:
        stored = client.publish_price_version(str(stored["id"]), effective)
        message = (f"published {stored['id']} ({mode} mode), effective at {pricefile.iso(stored['effective_at_ms'])}:"
                   f" {len(changes)} change(s) to {version['id']}")
    if args.json:
        dump({"published": stored["id"], "effective_at_ms": stored["effective_at_ms"], "replaces": version["id"],
              "changes": [c.as_json() for c in changes], "message": message})
    else:
        print(message)
    return EXIT_OK

