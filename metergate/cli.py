"""The ``metergate`` command: ``serve`` runs the proxy, ``health`` asks a running one, ``demo`` shows it working
end to end; the admin commands (customers, credit, keys, ..., check) drive a running control plane
(:mod:`metergate.cli_admin`), ``webhooks listen`` forwards notifications to a local app, and ``mcp`` serves
them to assistants (:mod:`metergate.cli_mcp`)."""

from __future__ import annotations

import argparse
import logging
import sys

from metergate import cli_mcp, cli_webhooks
from metergate.cli_admin import add_admin_commands, run_admin_command

_HANDLER_GRACE_S = 5.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metergate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the metering proxy")
    serve.add_argument("--config", help="YAML settings file (else METERGATE_CONFIG)")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--log-format", choices=("json", "text"), default="json",
                       help="json: one object per line (default); text: for people at a terminal")
    serve.add_argument("--role", choices=("sidecar", "control", "all"),
                       help="what to serve (else the role setting / METERGATE_ROLE; default all)")
    serve.add_argument("--default", action="append", default=[], metavar="KEY=VALUE",
                       help="a default for a top-level setting, below the settings file and METERGATE_* "
                            "variables (the image: --default host=0.0.0.0); repeatable")
    health = sub.add_parser("health", help="ask the running serve's /livez on the address its settings give "
                                           "(the image's HEALTHCHECK)")
    health.add_argument("--config", help="settings file (else that of the `metergate serve` that is PID 1, "
                                         "else METERGATE_CONFIG)")
    health.add_argument("--default", action="append", default=[], metavar="KEY=VALUE",
                        help="as for serve (else taken from PID 1's command line)")
    health.add_argument("--timeout-s", type=float, default=2.0)
    health.add_argument("--pid", type=int, default=1, help="the serve process to follow (default 1, the image's "
                                                           "entry point)")
    health.add_argument("--wait-s", type=float, default=0.0,
                        help="wait up to this long for /readyz to answer 200 (after starting serve in a script)")
    demo = sub.add_parser("demo", help="run a self-contained demo on the embedded default (SQLite)")
    demo.add_argument("--keep", action="store_true", help="keep the demo database directory")
    mock = sub.add_parser("mock-upstream", help="serve the demo's mock OpenAI-compatible upstream (no provider key, "
                                                "no network), to try metergate with")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=9000)
    add_admin_commands(sub)
    cli_webhooks.add_command(sub)  # metergate webhooks listen
    cli_mcp.add_command(sub)  # metergate mcp
    args = parser.parse_args(argv)
    if args.command == "webhooks":
        return cli_webhooks.run(args)
    if args.command == "mcp":
        return cli_mcp.run(args)
    if getattr(args, "admin_handler", None) is not None:
        return run_admin_command(args)

    if args.command == "demo":
        from metergate.demo.run import run_demo

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return run_demo(keep=args.keep)

    if args.command == "mock-upstream":
        from metergate.demo.serve_mock import serve_mock

        return serve_mock(args.host, args.port)

    if args.command == "health":
        from metergate.healthcheck import check

        return check(args.config, args.default, timeout_s=args.timeout_s, pid=args.pid, wait_s=args.wait_s)

    # Imported here, not at the top: the admin and client commands start without loading the settings' validators.
    from metergate.config.settings import SettingsError, load_settings
    from metergate.healthcheck import parse_defaults

    try:
        settings = load_settings(args.config, defaults=parse_defaults(args.default) or None,
                                 **({"role": args.role} if args.role else {}))
    except SettingsError as exc:
        print(f"metergate: {exc}", file=sys.stderr)
        return 2
    from metergate.http import run_app
    from metergate.observability.logs import configure_logging, secrets_of
    from metergate.proxy.app import build_app

    configure_logging(args.log_level, args.log_format, secrets_of(settings))
    logging.getLogger("metergate").info("metergate serving as %s on %s:%d", settings.role, settings.host,
                                        settings.port)
    # Not web.run_app: metergate's runner also answers requests aiohttp cannot parse in the JSON envelope.
    # The shutdown timeout is what handlers get after the drain (drain_deadline_s, in the app's on_shutdown):
    # requests that never reached a hold — admin calls, bodies still arriving — not streams.
    from metergate.wallet.errors import StoreInUse

    try:
        run_app(build_app(settings), host=settings.host, port=settings.port, backlog=settings.listen_backlog,
                shutdown_timeout=_HANDLER_GRACE_S, event_loop=settings.event_loop)
    except StoreInUse as exc:  # another topology's wallet runs on the same store: starting would overspend
        print(f"metergate: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("metergate").info("metergate stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
