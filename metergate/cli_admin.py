"""The admin commands of ``metergate``: a running control plane driven over the admin API.

They use :mod:`metergate_client` (and never import the server's modules), with the server URL and admin key
from ``--url`` / ``METERGATE_URL`` and ``METERGATE_ADMIN_KEY``, or a profile of
``~/.config/metergate/profiles.toml`` (``--profile`` / ``METERGATE_PROFILE``). Tables for people, ``--json``
for scripts. Every error is one line on stderr naming what is wrong, never a traceback.

Exit codes: 0 done; 1 the server refused (its error code is printed); 2 a usage or configuration error
(arguments, profile, an invalid settings file for ``check``); 3 the server (or, for ``check --probe``, an
upstream) cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, NoReturn

from metergate.cli_table import dump, fields, table, when

if TYPE_CHECKING:
    from metergate_client import ApiKey, Balance, Client, Grant, UsageRecord

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_CODES = ("exit codes: 0 done; 1 the server refused (its error code is printed); 2 usage or configuration "
              "error; 3 the server (for check --probe: an upstream) cannot be reached")
Handler = Callable[["Client", argparse.Namespace], int]


def _amount(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a decimal amount: {text!r}") from None
    if not value.is_finite() or value <= 0:
        raise argparse.ArgumentTypeError(f"the amount must be a positive decimal: {text!r}")
    return value


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="control plane URL (else METERGATE_URL, the profile, http://127.0.0.1:8080)")
    common.add_argument("--profile", help="profile in ~/.config/metergate/profiles.toml (else METERGATE_PROFILE)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    return common


class _OneLineErrors:
    """A usage error as one line on stderr (naming the command and what is wrong), exit code 2."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._prog = parser.prog

    def __call__(self, message: str) -> NoReturn:
        print(f"{self._prog}: {' '.join(message.split())} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _one_line(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.error = _OneLineErrors(parser)  # type: ignore[method-assign]
    return parser


def add_admin_commands(sub: Any) -> None:
    """Register the admin commands on ``metergate``'s subparsers; each sets ``admin_handler``."""
    c = _common()
    plain_add = sub.add_parser

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return _one_line(plain_add(name, epilog=EXIT_CODES, **kwargs))

    sub.add_parser = add  # every parser below reports usage errors in one line

    def group(name: str, help: str) -> Any:
        nested = add(name, help=help).add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
        nested_add = nested.add_parser
        nested.add_parser = lambda n, **kw: _one_line(nested_add(n, **{"epilog": EXIT_CODES, **kw}))  # type: ignore[method-assign]
        return nested

    customers = group("customers", "create, list and show customers")
    p = customers.add_parser("create", parents=[c], help="create a customer")
    p.add_argument("customer")
    p.add_argument("--name", default="")
    p.set_defaults(admin_handler=_customers_create)
    p = customers.add_parser("list", parents=[c], help="list customers")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--cursor")
    p.set_defaults(admin_handler=_customers_list)
    p = customers.add_parser("show", parents=[c], help="a customer with its balances")
    p.add_argument("customer")
    p.set_defaults(admin_handler=_customers_show)

    p = sub.add_parser("credit", parents=[c], help="credit a customer, once per idempotency key")
    p.add_argument("customer")
    p.add_argument("amount", type=_amount, help="decimal, in the asset's major unit (12.50 USD)")
    p.add_argument("--asset", help="asset code (default: the pricing asset)")
    p.add_argument("--idempotency-key", required=True,
                   help="the credit happens once per key: an invoice number, a payment id")
    p.add_argument("--memo", default="")
    p.set_defaults(admin_handler=_credit)

    keys = group("keys", "issue, list and revoke proxy API keys")
    p = keys.add_parser("issue", parents=[c], help="issue a proxy API key (the secret is shown once)")
    p.add_argument("customer")
    p.set_defaults(admin_handler=_keys_issue)
    p = keys.add_parser("list", parents=[c], help="a customer's proxy API keys")
    p.add_argument("customer")
    p.set_defaults(admin_handler=_keys_list)
    p = keys.add_parser("revoke", parents=[c], help="revoke a proxy API key")
    p.add_argument("key_id")
    p.set_defaults(admin_handler=_keys_revoke)

    grants = group("grants", "list, create and void grants")
    p = grants.add_parser("list", parents=[c], help="a customer's grants")
    p.add_argument("customer")
    p.add_argument("--asset")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(admin_handler=_grants_list)
    p = grants.add_parser("create", parents=[c], help="grant credit (trial, promotional, ...)")
    p.add_argument("customer")
    p.add_argument("amount", type=_amount)
    p.add_argument("--asset")
    p.add_argument("--purpose", default="paid",
                   choices=("paid", "promotional", "trial", "entitlement", "adjustment"))
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--expires-at-ms", type=int)
    p.add_argument("--idempotency-key", required=True)
    p.add_argument("--memo", default="")
    p.set_defaults(admin_handler=_grants_create)
    p = grants.add_parser("void", parents=[c], help="void a grant")
    p.add_argument("grant_id")
    p.set_defaults(admin_handler=_grants_void)

    usage = group("usage", "usage records")
    p = usage.add_parser("tail", parents=[c], help="the latest usage records; --follow prints new ones live")
    p.add_argument("customer")
    p.add_argument("-n", "--lines", type=int, default=10, help="how many of the latest to print first")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records (Ctrl-C stops)")
    p.add_argument("--count", type=int, help="stop after printing this many records")
    p.add_argument("--interval-s", type=float, default=1.0, help="how often to look for new records")
    p.set_defaults(admin_handler=_usage_tail)

    p = sub.add_parser("ledger", parents=[c], help="a customer's ledger entries, newest first")
    p.add_argument("customer")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--cursor")
    p.set_defaults(admin_handler=_ledger)

    p = sub.add_parser("portal-link", parents=[c], help="a signed link to the customer's billing page")
    p.add_argument("customer")
    p.add_argument("--access", choices=("billing_admin", "view_topup"))
    p.set_defaults(admin_handler=_portal_link)
    p = sub.add_parser("dashboard-link", parents=[c], help="a short-lived link to the operator dashboard")
    p.set_defaults(admin_handler=_dashboard_link)

    holds = group("holds", "holds of GPU jobs and agents")
    p = holds.add_parser("list", parents=[c], help="open holds")
    p.add_argument("--customer")
    p.set_defaults(admin_handler=_holds_list)
    p = holds.add_parser("void", parents=[c], help="void a hold (what it captured stays captured)")
    p.add_argument("hold_id")
    p.set_defaults(admin_handler=_holds_void)

    from metergate import cli_prices

    cli_prices.add_commands(group("prices", "price versions as code: validate, pull, diff, push"), c)

    from metergate import cli_budgets

    cli_budgets.add_commands(group("budgets", "budget trees: nodes, limits, keys attached to nodes"), c)

    p = sub.add_parser("check", help="validate a settings file offline; --probe also asks each upstream")
    p.add_argument("config")
    p.add_argument("--probe", action="store_true")
    p.set_defaults(admin_handler=_check)
    sub.add_parser = plain_add


def _check(client: Client, args: argparse.Namespace) -> int:
    raise AssertionError("check runs offline, in run_admin_command")


def fail(message: str, code: int) -> int:
    """Print ``message`` as one line on stderr; the exit code."""
    print(f"metergate: {' '.join(message.split())}", file=sys.stderr)
    return code


def run_admin_command(args: argparse.Namespace) -> int:
    """Run the parsed admin command; the exit code (see the module docstring)."""
    from metergate_client import ApiError, Client, ConnectionFailed, ProfileError, load_profile

    if args.admin_handler is _check:  # offline: no server, no profile
        from metergate.cli_check import CheckError, run_check

        try:
            return run_check(args.config, probe=args.probe)
        except CheckError as exc:
            return fail(str(exc), EXIT_USAGE)
    # A command may answer every error with one code of its own (``prices diff``: 2, as diff(1) does).
    error_exit: int | None = getattr(args, "error_exit", None)
    try:
        profile = load_profile(args.profile, url=args.url)
        args.key_mode, args.server_url = profile.admin_key[3:7], profile.url  # mg_test_... / mg_live_...
        wanted = getattr(args, "mode", None)
        if wanted is not None and wanted != args.key_mode:
            return fail(f"--mode {wanted} needs a {wanted} admin key (mg_{wanted}_...); the key given is a "
                        f"{args.key_mode} key", error_exit or EXIT_USAGE)
        with Client(profile.url, profile.admin_key) as client:
            handler: Handler = args.admin_handler
            return handler(client, args)
    except ProfileError as exc:
        return fail(str(exc), error_exit or EXIT_USAGE)
    except ConnectionFailed as exc:
        return fail(str(exc), error_exit or EXIT_UNREACHABLE)
    except ApiError as exc:
        if exc.code == f"http_{exc.status}":  # an answer without metergate's error envelope
            return fail(f"{args.server_url} answered HTTP {exc.status} ({exc.message[:80]}), not as a metergate "
                        "control plane does: check --url / METERGATE_URL", error_exit or EXIT_REFUSED)
        where = f" ({exc.param})" if exc.param else ""
        return fail(f"{exc.code}{where}: {exc.message}", error_exit or EXIT_REFUSED)
    except (ValueError, TypeError) as exc:
        return fail(str(exc), error_exit or EXIT_USAGE)
    except KeyboardInterrupt:
        return EXIT_OK  # the way to end ``usage tail --follow``
    except BrokenPipeError:
        return EXIT_OK  # piped into head
    except Exception as exc:  # a bug: still one line, never a traceback
        return fail(f"unexpected error ({type(exc).__name__}: {exc}); please report it", error_exit or EXIT_REFUSED)


# ---------------------------------------------------------------------- customers


def _balances_table(balances: list[Balance]) -> None:
    table(["asset", "available", "pending (smallest unit)"],
          [[b.asset, b.available, b.pending_minor] for b in balances])


def _customers_create(client: Client, args: argparse.Namespace) -> int:
    customer = client.create_customer(args.customer, args.name)
    if args.json:
        dump(customer.raw)
    else:
        print(f"created customer {customer.id} ({customer.mode} mode)")
    return EXIT_OK


def _customers_list(client: Client, args: argparse.Namespace) -> int:
    page = client.list_customers(args.limit, args.cursor)
    if args.json:
        dump({"data": [c.raw for c in page.data], "next_cursor": page.next_cursor})
        return EXIT_OK
    table(["id", "name", "created (UTC)"], [[c.id, c.name, when(c.created_at_ms)] for c in page.data])
    if page.next_cursor:
        print(f"more: --cursor {page.next_cursor}")
    return EXIT_OK


def _customers_show(client: Client, args: argparse.Namespace) -> int:
    customer = client.get_customer(args.customer)
    if args.json:
        dump(customer.raw)
        return EXIT_OK
    fields([("id", customer.id), ("name", customer.name), ("mode", customer.mode),
            ("created (UTC)", when(customer.created_at_ms))])
    print()
    _balances_table(customer.balances)
    return EXIT_OK


def _credit(client: Client, args: argparse.Namespace) -> int:
    done = client.credit(args.customer, args.amount, asset=args.asset, idempotency_key=args.idempotency_key,
                         memo=args.memo)
    if args.json:
        dump({"entry": done.entry.raw, "balance": done.balance.raw})
    else:
        print(f"credited {done.entry.amount} {done.entry.asset} to {args.customer} (entry {done.entry.seq}); "
              f"available {done.balance.available} {done.balance.asset}")
    return EXIT_OK


# ---------------------------------------------------------------------- keys


def _key_row(k: ApiKey) -> list[object]:
    return [k.id, k.prefix + "...", k.customer_id, when(k.created_at_ms), when(k.revoked_at_ms)]


_KEY_HEADERS = ["id", "prefix", "customer", "created (UTC)", "revoked (UTC)"]


def _keys_issue(client: Client, args: argparse.Namespace) -> int:
    key = client.issue_key(args.customer)
    if args.json:
        dump(key.raw)
    else:
        print(f"issued {key.id} for {key.customer_id}; the secret is shown only now:\n{key.secret}")
    return EXIT_OK


def _keys_list(client: Client, args: argparse.Namespace) -> int:
    keys = client.list_keys(args.customer)
    if args.json:
        dump({"data": [k.raw for k in keys]})
    else:
        table(_KEY_HEADERS, [_key_row(k) for k in keys])
    return EXIT_OK


def _keys_revoke(client: Client, args: argparse.Namespace) -> int:
    key = client.revoke_key(args.key_id)
    if args.json:
        dump(key.raw)
    else:
        print(f"revoked {key.id} of {key.customer_id} at {when(key.revoked_at_ms)} UTC")
    return EXIT_OK


# ---------------------------------------------------------------------- grants


def _grant_row(g: Grant) -> list[object]:
    return [g.id, g.asset, g.purpose, g.state, g.amount, g.free, g.priority, when(g.effective_at_ms),
            when(g.expires_at_ms)]


_GRANT_HEADERS = ["id", "asset", "purpose", "state", "amount", "free", "priority", "effective (UTC)",
                  "expires (UTC)"]


def _grants_list(client: Client, args: argparse.Namespace) -> int:
    page = client.list_grants(args.customer, asset=args.asset, limit=args.limit)
    if args.json:
        dump({"data": [g.raw for g in page.data], "next_cursor": page.next_cursor})
    else:
        table(_GRANT_HEADERS, [_grant_row(g) for g in page.data])
    return EXIT_OK


def _grants_create(client: Client, args: argparse.Namespace) -> int:
    grant = client.create_grant(args.customer, args.amount, asset=args.asset, purpose=args.purpose,
                                priority=args.priority, expires_at_ms=args.expires_at_ms, memo=args.memo,
                                idempotency_key=args.idempotency_key)
    if args.json:
        dump(grant.raw)
    else:
        table(_GRANT_HEADERS, [_grant_row(grant)])
    return EXIT_OK


def _grants_void(client: Client, args: argparse.Namespace) -> int:
    grant = client.void_grant(args.grant_id)
    if args.json:
        dump(grant.raw)
    else:
        print(f"voided grant {grant.id}: {grant.state}")
    return EXIT_OK


# ---------------------------------------------------------------------- usage and ledger


_USAGE_HEADERS = ["time (UTC)", "id", "route", "model", "in", "out", "charged", "asset"]


_TAIL_MAX_PAGES = 10  # per poll: beyond 2,000 new records between two polls, the oldest are skipped


def _new_usage(client: Client, customer: str, seen: set[str]) -> list[UsageRecord]:
    """The records not seen yet, oldest first: newest pages until one holds a record already seen."""
    found: list[UsageRecord] = []
    cursor = None
    for _ in range(_TAIL_MAX_PAGES):
        page = client.usage(customer, limit=200, cursor=cursor)
        fresh = [u for u in page.data if u.id not in seen]
        found.extend(fresh)
        if len(fresh) < len(page.data) or page.next_cursor is None or not seen:
            break  # reached what was printed before (or, on the first poll, the latest page is enough)
        cursor = page.next_cursor
    return found[::-1]


def _usage_tail(client: Client, args: argparse.Namespace) -> int:
    """Print the latest ``--lines`` records oldest first; with ``--follow``, keep polling and print each record
    not seen yet, until ``--count`` records are printed or Ctrl-C."""
    seen: set[str] = set()
    printed = 0
    first = True
    if not args.json:
        table(_USAGE_HEADERS, [])
    while True:
        fresh = _new_usage(client, args.customer, seen)
        seen.update(u.id for u in fresh)
        if first:
            fresh = fresh[-args.lines:] if args.lines > 0 else []
            first = False
        for u in fresh:
            if args.json:
                dump(u.raw)
            else:
                print("  ".join(str(v) for v in [when(u.created_at_ms), u.id, u.route, u.model, u.tokens_input,
                                                  u.tokens_output, u.charged, u.asset]), flush=True)
            printed += 1
            if args.count is not None and printed >= args.count:
                return EXIT_OK
        if not args.follow:
            return EXIT_OK
        time.sleep(args.interval_s)


def _ledger(client: Client, args: argparse.Namespace) -> int:
    page = client.ledger(args.customer, args.limit, args.cursor)
    if args.json:
        dump({"data": [e.raw for e in page.data], "next_cursor": page.next_cursor})
        return EXIT_OK
    table(["seq", "time (UTC)", "kind", "amount", "asset", "hold", "memo"],
          [[e.seq, when(e.created_at_ms), e.kind, e.amount, e.asset, e.hold_id or "-", e.memo] for e in page.data])
    if page.next_cursor:
        print(f"more: --cursor {page.next_cursor}")
    return EXIT_OK


# ---------------------------------------------------------------------- links, holds, prices


def _portal_link(client: Client, args: argparse.Namespace) -> int:
    link = client.portal_link(args.customer, args.access)
    if args.json:
        dump(link.raw)
    else:
        print(link.url)
    return EXIT_OK


def _dashboard_link(client: Client, args: argparse.Namespace) -> int:
    link = client.dashboard_link()
    if args.json:
        dump(link.raw)
    else:
        print(f"{link.url}\n(opens once, within {link.expires_in_s} s)")
    return EXIT_OK


def _holds_list(client: Client, args: argparse.Namespace) -> int:
    holds = client.list_holds(customer_id=args.customer)
    if args.json:
        dump({"data": [h.raw for h in holds]})
    else:
        table(["id", "customer", "asset", "held", "captured", "pending", "expires (UTC)"],
              [[h.id, h.customer_id, h.asset, h.amount_minor, h.captured_minor, h.pending_minor,
                when(h.expires_at_ms)] for h in holds])
    return EXIT_OK


def _holds_void(client: Client, args: argparse.Namespace) -> int:
    hold = client.void_hold(args.hold_id)
    if args.json:
        dump(hold.raw)
    else:
        print(f"hold {hold.id}: {hold.state}; captured {hold.captured_minor}, released the rest "
              f"(smallest unit of {hold.asset})")
    return EXIT_OK
