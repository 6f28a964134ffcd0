"""``metergate check CONFIG [--probe]``: validate a settings file offline and say what it configures.

It reports each route (and whether its provider key comes from a ``${NAME}`` reference or sits in the file),
each asset, the price table of the file, and every secret reference (set or not in this environment; never a
value). ``--probe`` also sends each upstream one request and reports whether it answers — any HTTP answer
counts, a refused connection or a timeout does not. Exit codes: 0 valid (and every upstream answers), 2 the
file is invalid, 3 an upstream does not answer.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from metergate.cli_table import table

PROBE_TIMEOUT_S = 5.0
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_KEYS = ("api_key", "admin_keys", "portal_secrets", "secret", "password")


class CheckError(Exception):
    """The file is unusable; the message (one line) names what is wrong."""


def references(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every ``${NAME}`` in the file's string values, as (key path, variable)."""
    if isinstance(value, str):
        return [(path, m.group(1)) for m in _REFERENCE.finditer(value.replace("$${", ""))]
    if isinstance(value, dict):
        return [ref for k, v in value.items() for ref in references(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [ref for i, v in enumerate(value) for ref in references(v, f"{path}.{i}" if path else str(i))]
    return []


def _raw(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckError(f"config file not found: {path}")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(document, dict):
        raise CheckError(f"{path} must be a YAML mapping of settings")
    return document


def _probe(url: str) -> str | None:
    """None when the upstream answers, else why not."""
    import httpx2 as httpx

    try:
        httpx.get(url, timeout=PROBE_TIMEOUT_S)
    except httpx.TransportError as exc:
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def run_check(config: str, *, probe: bool) -> int:
    from metergate.config.settings import SettingsError, load_settings

    path = Path(config)
    raw = _raw(path)
    refs = references(raw)
    try:
        settings = load_settings(path)
    except SettingsError as exc:
        raise CheckError(f"{path}: " + "; ".join(line.strip() for line in str(exc).splitlines())) from None
    ref_keys = {key for key, _ in refs}
    print(f"{path}: valid (role {settings.role}, listening on {settings.host}:{settings.port})")
    print("\nroutes")
    rows = []
    for index, route in enumerate(settings.routes):
        key_path = f"routes.{index}.api_key"
        key = "none" if route.api_key is None else ("reference" if key_path in ref_keys else "IN THE FILE")
        rows.append([route.prefix, route.upstream, route.provider, key])
    table(["prefix", "upstream", "provider", "api_key"], rows)
    print("\nassets")
    table(["code", "scale", "name"], [[a.code, a.scale, a.name] for a in settings.assets])
    print(f"\nprice table (asset {settings.pricing.asset}; per million tokens)")
    table(["model", "input", "cached_input", "output", "request_fee"],
          [[model, rate.input_per_mtok, rate.cached_input_per_mtok if rate.cached_input_per_mtok is not None else "-",
            rate.output_per_mtok, rate.request_fee] for model, rate in settings.pricing.models.items()])
    print("\nsecret references")
    if refs:
        table(["key", "variable", "set"], [[key, name, "yes" if name in os.environ else "NO"] for key, name in refs])
    else:
        print("(none)")
    literal = sorted(key for key in _secret_paths(raw) if key not in ref_keys)
    if literal:
        print(f"\nwarning: secrets written in the file, not referenced: {', '.join(literal)}")
    if not probe:
        return 0
    print("\nprobe")
    failed = 0
    rows = []
    for route in settings.routes:
        why = _probe(route.upstream)
        failed += why is not None
        rows.append([route.prefix, route.upstream, "answers" if why is None else f"DOES NOT ANSWER: {why}"])
    table(["prefix", "upstream", "result"], rows)
    return 3 if failed else 0


def _secret_paths(value: Any, path: str = "") -> list[str]:
    """Key paths of values that are secrets (provider keys, admin keys, signing secrets, passwords)."""
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if any(s in str(k) for s in _SECRET_KEYS) and v not in (None, "", [], {}):
                found.extend(_leaves(v, sub))
            else:
                found.extend(_secret_paths(v, sub))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.extend(_secret_paths(v, f"{path}.{i}" if path else str(i)))
    return found


def _leaves(value: Any, path: str) -> list[str]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}.{i}")]
    return [path] if isinstance(value, str) and value else []
