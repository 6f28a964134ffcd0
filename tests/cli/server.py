"""``metergate serve`` as a real subprocess for the client's and the CLI's tests (SQLite in a temp dir).

The server keeps its port and database across :meth:`MeterServer.restart`, so a client sees the same server
go away and come back. No upstream answers on the proxy route (its port is closed): the tests that reach the
proxy only need its refusals (429 before forwarding, 502 upstream_unreachable).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import yaml

from tests.conftest import ADMIN_KEY, DEFAULT_PRICING, LIVE_ADMIN_KEY, free_port

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0  # a limit on waiting for start-up on a loaded machine, not an assertion on speed

ASSETS = [{"code": "USD", "name": "US dollar credits", "scale": 6},
          {"code": "GPU_SECONDS", "name": "GPU seconds", "scale": 3},
          {"code": "CALLS", "name": "API calls", "scale": 0}]


def config(tmp: Path, port: int, **overrides: Any) -> dict[str, Any]:
    return {"port": port, "database_url": f"sqlite:///{tmp / 'metergate.db'}", "public_url": f"http://127.0.0.1:{port}",
            "routes": [{"prefix": "/openai", "upstream": f"http://127.0.0.1:{free_port()}",
                        "api_key": "${METERGATE_TEST_UPSTREAM_KEY}"}],
            "assets": ASSETS, "pricing": DEFAULT_PRICING, "admin_keys": [ADMIN_KEY, LIVE_ADMIN_KEY],
            "portal_secrets": {"k1": "s" * 40}, "sweep_interval_s": 1, **overrides}


class MeterServer:
    def __init__(self, tmp: Path, **overrides: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_file = tmp / "metergate.yaml"
        self.config_file.write_text(yaml.safe_dump(config(tmp, self.port, **overrides)))
        self.log = tmp / "metergate.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "METERGATE_TEST_UPSTREAM_KEY": "sk-upstream-" + "u" * 20}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "metergate", "serve", "--config", str(self.config_file), "--log-level",
                 "WARNING"], stdout=out, stderr=out, cwd=ROOT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"metergate did not start: {self.log.read_text()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self, sig: signal.Signals = signal.SIGKILL) -> None:
        self.stop(sig)
        self.start()
