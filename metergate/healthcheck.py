"""``metergate health``: the container's health check, asking the running ``serve`` on the port it serves.

A health check that reads only ``METERGATE_PORT`` reports a container unhealthy while it serves on the port
its settings file names. This one resolves the settings the way ``serve`` did: the same ``--config`` and
``--default`` arguments, taken from the ``metergate serve`` command line of PID 1 (the image's entry point)
unless given here (``--pid`` names another process), with the same environment; then it asks ``/livez`` on
that address. It exits 0 when the answer is 200, 1 otherwise, and prints one line saying why. With
``--wait-s S`` it waits up to S seconds for ``/readyz`` instead, so that a script can start ``serve`` in the
background and go on once it is ready.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from metergate.config.settings import SettingsError, load_settings

_WAIT_POLL_S = 0.1
# A server listening on every address is asked on loopback.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


def serve_arguments(cmdline: list[str]) -> tuple[str | None, list[str]]:
    """The ``--config`` value and the ``--default`` values of a ``metergate serve`` command line."""
    config: str | None = None
    defaults: list[str] = []
    args = iter(cmdline)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in ("--config", "--default"):
            value = value if eq else next(args, "")
            if name == "--config":
                config = value
            else:
                defaults.append(value)
    return config, defaults


def process_serve_arguments(pid: int) -> tuple[str | None, list[str]]:
    """``serve_arguments`` of process ``pid`` when it is ``metergate serve``; nothing otherwise."""
    try:
        cmdline = [part.decode() for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if part]
    except OSError:
        return None, []
    if "serve" not in cmdline or not any(Path(part).name == "metergate" or part.endswith("metergate")
                                         for part in cmdline[:3]):
        return None, []
    return serve_arguments(cmdline[cmdline.index("serve") + 1:])


def parse_defaults(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs of ``serve --default``; a malformed one raises ``SettingsError``."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.isidentifier():
            raise SettingsError(f"--default takes KEY=VALUE with a top-level setting name, not {pair!r}")
        out[key] = value
    return out


def probe_url(host: str, port: int) -> str:
    host = _WILDCARDS.get(host, host)
    return f"http://[{host}]:{port}/livez" if ":" in host else f"http://{host}:{port}/livez"


def _ask(url: str, timeout_s: float) -> str | None:
    """None when ``url`` answers 200, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:  # noqa: S310 (a URL built from settings)
            status = answer.status
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} did not answer: {exc}"
    return None if status == 200 else f"{url} answered {status}"


def check(config: str | None, defaults: list[str], *, timeout_s: float, pid: int = 1, wait_s: float = 0.0) -> int:
    """Ask ``/livez`` once; with ``wait_s``, ask ``/readyz`` until it answers 200 or ``wait_s`` has passed (for
    a script that has just started ``serve`` in the background and goes on once it is ready)."""
    if config is None and not defaults:
        config, defaults = process_serve_arguments(pid)
    try:
        settings = load_settings(config, defaults=parse_defaults(defaults) or None)
    except SettingsError as exc:
        print(f"metergate health: {exc}", file=sys.stderr)
        return 1
    url = probe_url(settings.host, settings.port)
    if wait_s <= 0:
        why = _ask(url, timeout_s)
    else:
        url = url.removesuffix("/livez") + "/readyz"
        deadline = time.monotonic() + wait_s
        while (why := _ask(url, timeout_s)) is not None and time.monotonic() < deadline:
            time.sleep(_WAIT_POLL_S)
    if why is not None:
        print(f"metergate health: {why}", file=sys.stderr)
        return 1
    return 0
