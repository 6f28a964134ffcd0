"""The ``metergate`` command: ``serve`` runs the proxy, ``demo`` shows it working end to end."""

from __future__ import annotations

import argparse
import logging
import sys

from metergate.config.settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metergate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the metering proxy")
    serve.add_argument("--config", help="YAML settings file (else METERGATE_CONFIG)")
    serve.add_argument("--log-level", default="INFO")
    demo = sub.add_parser("demo", help="run a self-contained demo on the embedded default (SQLite)")
    demo.add_argument("--keep", action="store_true", help="keep the demo database directory")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from metergate.demo.run import run_demo

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return run_demo(keep=args.keep)

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"metergate: {exc}", file=sys.stderr)
        return 2
    from metergate.http import run_app
    from metergate.proxy.app import build_app

    # Not web.run_app: metergate's runner also answers requests aiohttp cannot parse in the JSON envelope.
    run_app(build_app(settings), host=settings.host, port=settings.port, backlog=settings.listen_backlog,
            shutdown_timeout=settings.drain_timeout_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
