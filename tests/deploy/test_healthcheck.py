"""The image's defaults yield to the settings file and the environment, and ``metergate health`` asks the port
that ``serve``'s own settings give.

Method: ``load_settings`` with the image's ``--default host=0.0.0.0`` against files and variables; then the real
``metergate health`` command against a real ``metergate serve`` whose port is set only in its settings file, and
against a port where nothing listens.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from metergate.config.settings import load_settings
from metergate.healthcheck import serve_arguments
from tests.conftest import free_port

IMAGE_DEFAULTS = {"host": "0.0.0.0"}


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "metergate.yaml"
    path.write_text(f"""{extra}
database_url: sqlite:///{tmp_path / 'metergate.db'}
routes: [{{prefix: /openai, upstream: "http://127.0.0.1:9"}}]
pricing: {{models: {{"*": {{input_per_mtok: "1", output_per_mtok: "2"}}}}}}
""")
    return path


def test_the_image_default_applies_when_neither_file_nor_environment_names_the_host(tmp_path: Path) -> None:
    assert load_settings(_config(tmp_path), defaults=IMAGE_DEFAULTS).host == "0.0.0.0"
    assert load_settings(_config(tmp_path)).host == "127.0.0.1"  # without it, the code's own default


def test_the_settings_file_beats_the_image_default(tmp_path: Path) -> None:
    assert load_settings(_config(tmp_path, "host: 127.0.0.2"), defaults=IMAGE_DEFAULTS).host == "127.0.0.2"


def test_the_environment_beats_the_settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERGATE_HOST", "127.0.0.3")
    assert load_settings(_config(tmp_path, "host: 127.0.0.2"), defaults=IMAGE_DEFAULTS).host == "127.0.0.3"


def test_serve_arguments_are_read_in_both_spellings() -> None:
    assert serve_arguments(["--config", "/etc/m.yaml", "--default", "host=0.0.0.0", "--role", "all"]) == (
        "/etc/m.yaml", ["host=0.0.0.0"])
    assert serve_arguments(["--config=/etc/m.yaml", "--default=port=9000"]) == ("/etc/m.yaml", ["port=9000"])


def _health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "metergate", "health", *args], capture_output=True, text=True,
                          timeout=60)


def test_health_follows_the_port_of_the_serve_process_and_fails_where_nothing_listens(tmp_path: Path) -> None:
    port = free_port()
    config = _config(tmp_path, f"host: 127.0.0.1\nport: {port}")
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "metergate", "serve", "--config", str(config),
                               "--default", "host=0.0.0.0"], stdout=log, stderr=subprocess.STDOUT,
                              cwd=tmp_path)
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/livez", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        followed = _health("--pid", str(server.pid))
        assert followed.returncode == 0, followed.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    # The same settings with the server gone: exit 1 and a line naming the address asked.
    gone = _health("--config", str(config))
    assert gone.returncode == 1
    assert f"http://127.0.0.1:{port}/livez did not answer" in gone.stderr
    assert "Traceback" not in gone.stderr
