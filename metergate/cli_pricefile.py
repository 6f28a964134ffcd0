"""The price file of ``metergate prices pull|diff|push``: a price version's rules as YAML, and rule-by-rule diffs.

A price file is ``{"rules": [...]}`` as the admin API takes it, written as YAML (or JSON) so that it can live
in a repository and be reviewed like code. Two things keep it exact and reviewable:

* **Nothing is read as a number.** Every scalar but ``null`` is read as its text, so ``0.30`` stays the
  decimal ``"0.30"`` (YAML would make it the float 0.3), ``010`` stays ten (YAML 1.1: octal eight) and
  ``yes`` stays a word (YAML 1.1: true); in a JSON file, numbers are kept as their text. The server then
  validates the text; a duplicated key is refused here, since YAML would silently keep only the last one.
* **Stable output.** :func:`dump` writes the canonical rules the server returns, keys in the rule schema's
  order, amounts as quoted strings, under a comment header naming the version it came from: pulling the same
  version twice writes the same bytes.

:func:`rule_changes` compares two canonical rule sets by rule id, leaf by leaf (``mini.rates.output_tokens``);
decimal texts that are equal as numbers (``1.2`` and ``1.20``) are not a change.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 4 * 1024 * 1024  # a thousand rules of generous size fit many times over
RULE_KEYS = ("id", "match", "asset", "per_units", "event_fee", "rates", "tiers", "markup", "asset_usd_value",
             "minimum")
TIER_KEYS = ("quantity", "mode", "period", "key", "steps")
STEP_KEYS = ("up_to", "rate")


class PriceFileError(ValueError):
    """The file cannot be read as a price file; the message (one line) names the file and what is wrong."""


class _TextLoader(yaml.SafeLoader):
    """YAML where every plain scalar but ``null`` is a string, and a mapping may not repeat a key."""


_TextLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag == "tag:yaml.org,2002:null"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _mapping(loader: _TextLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice",
                                                    key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_TextLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load(path: Path) -> list[Any]:
    """The rules of a price file (YAML, or JSON when it ends in ``.json``), scalars as their text."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PriceFileError(f"{path} is {size} bytes; a price file is at most {MAX_FILE_BYTES}")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PriceFileError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PriceFileError(f"{path} is not UTF-8 text") from None
    if path.suffix == ".json":
        try:
            document = json.loads(text, parse_float=str, parse_int=str)
        except ValueError as exc:
            raise PriceFileError(f"{path} is not valid JSON: {exc}") from None
    else:
        try:
            document = yaml.load(text, Loader=_TextLoader)  # noqa: S506 (a SafeLoader that builds only text)
        except yaml.YAMLError as exc:
            raise PriceFileError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if isinstance(document, list):
        return document  # a bare list of rules, as `prices validate` has always taken
    if not isinstance(document, dict) or "rules" not in document:
        raise PriceFileError(f"{path} must be a mapping with the key 'rules' (a list of price rules)")
    extra = sorted(str(k) for k in document if k != "rules")
    if extra:
        raise PriceFileError(f"{path}: unknown top-level key {extra[0]!r}; a price file has only 'rules'")
    rules = document["rules"]
    if not isinstance(rules, list):
        raise PriceFileError(f"{path}: 'rules' must be a list of price rules")
    return rules


def rule_label(rules: list[Any], param: str) -> str:
    """A server's rule path (``rules[1].rates.x``) with the rule's id, when the file gives one:
    ``rules[1] (id mini).rates.x``."""
    if not param.startswith("rules["):
        return param
    index_text, _, rest = param[len("rules["):].partition("]")
    if not index_text.isdigit() or int(index_text) >= len(rules):
        return param
    rule = rules[int(index_text)]
    rule_id = rule.get("id") if isinstance(rule, dict) else None
    return f"rules[{index_text}] (id {rule_id})" + rest if isinstance(rule_id, str) else param


# ---------------------------------------------------------------------- writing


def _ordered(value: Any, order: tuple[str, ...]) -> dict[str, Any]:
    known = [k for k in order if k in value]
    return {k: value[k] for k in [*known, *sorted(k for k in value if k not in order)]}


def canonical_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """A rule with its keys in the schema's order, and its attribute and rate tables sorted."""
    out = _ordered(rule, RULE_KEYS)
    for table in ("match", "rates"):
        if isinstance(out.get(table), dict):
            out[table] = dict(sorted(out[table].items()))
    if isinstance(out.get("tiers"), list):
        out["tiers"] = [{**_ordered(t, TIER_KEYS), "steps": [_ordered(s, STEP_KEYS) for s in t.get("steps", [])]}
                        for t in out["tiers"]]
    return out


class _Dumper(yaml.SafeDumper):
    """Block style, except the small ``match`` tables on one line; never an alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class _OneLine(dict[str, Any]):
    """A mapping written on one line (``match: {model: gpt-4o, type: request}``)."""


_Dumper.add_representer(_OneLine, lambda dumper, data: dumper.represent_mapping(
    "tag:yaml.org,2002:map", data, flow_style=True))


def iso(ms: int | None) -> str:
    """Epoch milliseconds as ISO 8601 in UTC (``2026-12-07T13:52:26.000Z``), computed without a float."""
    if ms is None:
        return "-"
    moment = dt.datetime.fromtimestamp(ms // 1000, dt.UTC) + dt.timedelta(milliseconds=ms % 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def header(version: dict[str, Any], mode: str, url: str, scheduled: list[dict[str, Any]]) -> list[str]:
    """The comment lines that say where a pulled file came from."""
    if version.get("id") == "config":
        origin = f"version config (the settings file's pricing), in force in {mode} mode: nothing is published"
    else:
        origin = (f"version {version['id']} ({mode} mode), in force since {iso(version.get('effective_at_ms'))} "
                  f"(published {iso(version.get('published_at_ms'))})")
    lines = [f"# metergate prices: {origin}", f"# pulled from {url}"]
    if version.get("note") and version.get("id") != "config":
        lines.append(f"# note: {' '.join(str(version['note']).split())}")
    for later in scheduled:
        lines.append(f"# scheduled, not in this file: {later['id']} takes effect at {iso(later['effective_at_ms'])}")
    lines.append("# Amounts are decimal strings. Edit, then: metergate prices diff FILE; "
                 "metergate prices push FILE --effective-at now")
    return lines


def dump(rules: list[dict[str, Any]], comments: list[str]) -> str:
    rows = [canonical_rule(r) for r in rules]
    for row in rows:
        if isinstance(row.get("match"), dict):
            row["match"] = _OneLine(row["match"])
    body = yaml.dump({"rules": rows}, Dumper=_Dumper, sort_keys=False,
                     default_flow_style=False, allow_unicode=True, width=1000)
    return "\n".join(comments) + "\n" + body


# ---------------------------------------------------------------------- comparing


class _Absent:
    """A leaf one side does not have (distinct from ``null``, an unbounded tier step)."""

    def __repr__(self) -> str:
        return "(none)"


ABSENT: Any = _Absent()


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # added | removed | changed
    rule: str  # the rule id
    path: str = ""  # inside the rule, for a change: rates.output_tokens, tiers[0].steps[1].rate
    old: Any = None
    new: Any = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "rule": self.rule}
        if self.kind == "changed":
            out.update(path=self.path, old=None if self.old is ABSENT else self.old,
                       new=None if self.new is ABSENT else self.new)
        return out


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(value, list):
        out = {}
        for index, item in enumerate(value):
            out.update(_leaves(item, f"{path}[{index}]"))
        return out
    return {path: value}


def _same(old: Any, new: Any) -> bool:
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str):
        try:
            return Decimal(old) == Decimal(new)
        except InvalidOperation:
            return False
    return False


def rule_changes(current: list[dict[str, Any]], draft: list[dict[str, Any]]) -> list[Change]:
    """What ``draft`` changes in ``current``, both canonical (as the server returns rules): rules removed,
    added, and each leaf changed, by rule id. The order of rules is no change (the most specific rule prices,
    wherever it stands)."""
    before = {str(r["id"]): r for r in current}
    after = {str(r["id"]): r for r in draft}
    changes = [Change("removed", rule_id) for rule_id in before if rule_id not in after]
    for rule_id, rule in after.items():
        if rule_id not in before:
            changes.append(Change("added", rule_id))
            continue
        old, new = _leaves(before[rule_id]), _leaves(rule)
        for path in [*old, *(p for p in new if p not in old)]:
            if path == "id" or _same(old.get(path, ABSENT), new.get(path, ABSENT)):
                continue
            changes.append(Change("changed", rule_id, path, old.get(path, ABSENT), new.get(path, ABSENT)))
    return changes


def describe(rule: dict[str, Any]) -> str:
    """A rule in a few words: what it matches and which asset it draws."""
    match = " ".join(f"{k}={v}" for k, v in sorted((rule.get("match") or {}).items())) or "everything"
    return f"matches {match}; asset {rule.get('asset')}"
