"""The container image, built from the Dockerfile by ``.ci/image``, runs as promised.

Method: podman runs the image named by ``METERGATE_TEST_IMAGE`` as an operator would, with a read-only root,
every capability dropped and the host's network (loopback only: the mock upstream runs in this test). The
settings file mounted into it sets the host and the port, so the health check has to follow the file. Then
the official ``openai`` SDK sends a metered unary and a streaming request through it and the receipts and the
ledger are read back over the admin API; the container's uid, capabilities and root file system are checked
from inside it; and SIGTERM during a stream must let the stream finish and the process exit 0.

Without the variable the test is skipped (a developer machine with no podman); under ``CI=true`` it fails,
since ``.ci/run`` builds the image first.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, IN_CI, PROVIDER_KEY, Upstream, free_port

IMAGE = os.environ.get("METERGATE_TEST_IMAGE")
CONTAINER_UID = 10001

if not IMAGE:
    if IN_CI:
        pytest.fail("CI=true but METERGATE_TEST_IMAGE is unset: .ci/run builds the image before the tests",
                    pytrace=False)
    pytest.skip("METERGATE_TEST_IMAGE is unset (build it with .ci/image); container smoke test skipped",
                allow_module_level=True)


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


@dataclass
class Container:
    name: str
    url: str
    data: Path

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *command, check=False)

    def logs(self) -> str:
        return podman("logs", self.name, check=False).stdout + podman("logs", self.name, check=False).stderr


@pytest.fixture
def container(upstream: Upstream, tmp_path: Path) -> Iterator[Container]:
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, CONTAINER_UID, CONTAINER_UID)
    config = tmp_path / "metergate.yaml"
    config.write_text(json.dumps({
        "host": "127.0.0.1", "port": port,  # from the file only: the image's own default is 0.0.0.0:8080
        "database_url": "sqlite:////var/lib/metergate/metergate.db",
        "routes": [{"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY}],
        "pricing": {"asset": "USD", "models": {"gpt-4o-mini": {"input_per_mtok": "0.30",
                                                               "output_per_mtok": "1.20"}}},
        "admin_keys": [ADMIN_KEY], "portal_secrets": {"k1": secrets.token_urlsafe(32)},
        "drain_deadline_s": 20,
    }))
    config.chmod(0o644)
    name = f"mg-smoke-{uuid.uuid4().hex[:8]}"
    podman("run", "--detach", "--name", name, "--network", "host", "--read-only", "--cap-drop", "all",
           "--security-opt", "no-new-privileges", "-v", f"{config}:/etc/metergate/metergate.yaml:ro",
           "-v", f"{data}:/var/lib/metergate", IMAGE or "", "--config", "/etc/metergate/metergate.yaml")
    box = Container(name, f"http://127.0.0.1:{port}", data)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{box.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            state = podman("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip()
            assert state == "true" and time.monotonic() < deadline, f"container did not come up:\n{box.logs()}"
            time.sleep(0.3)
        yield box
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture
async def admin(container: Container) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"{container.url}/admin/v1",
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as client:
        r = await client.post("/customers", json={"id": "acme", "name": "Acme"})
        assert r.status_code == 201, r.text
        r = await client.post("/customers/acme/credits", json={"amount": 1_000_000, "idempotency_key": "seed"})
        assert r.status_code == 201, r.text
        yield client


def sdk(container: Container) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{container.url}/openai/v1", api_key="sk-app-holds-no-key", max_retries=0,
                              default_headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"})


async def test_the_image_meters_unary_and_streaming_requests_offline(container: Container,
                                                                      admin: httpx.AsyncClient) -> None:
    client = sdk(container)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello from the container"}], max_tokens=16)
        completion = raw.parse()
        assert completion.usage is not None
        expected = (Decimal(completion.usage.prompt_tokens) * Decimal("0.30")
                    + Decimal(completion.usage.completion_tokens) * Decimal("1.20")) / Decimal(10**6)
        assert Decimal(raw.headers["X-Metergate-Charged"]) == expected.quantize(Decimal("0.000001"))
        assert raw.headers["X-Metergate-Usage-Source"] == "provider"

        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "stream, please"}], max_tokens=16,
            stream=True, stream_options={"include_usage": True})
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text
    finally:
        await client.close()
    r = await admin.get("/customers/acme/usage", params={"limit": 10})
    records = r.json()["data"]
    assert [rec["stream"] for rec in records] == [True, False]
    # The encodings were baked in at build time: prompt counts are tiktoken's, not the bytes/4 fallback.
    assert all(rec["detail"]["tokens_exact"] is True for rec in records), records
    balance = (await admin.get("/customers/acme/balance")).json()["balances"][0]
    charged = sum(int(rec["price_amount"]) for rec in records)
    assert int(balance["available"]) == 1_000_000 - charged
    assert int(balance["pending"]) == 0


def test_the_container_runs_unprivileged_on_a_read_only_root_and_is_healthy(container: Container) -> None:
    assert container.exec("id", "-u").stdout.strip() == str(CONTAINER_UID)
    status = container.exec("cat", "/proc/1/status").stdout
    effective = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
    assert int(effective, 16) == 0
    assert container.exec("touch", "/opt/metergate/written").returncode != 0  # read-only root
    assert container.exec("touch", "/var/lib/metergate/written").returncode == 0  # the data volume is not
    # The image's HEALTHCHECK, run once: it must follow the port set in the file, not 8080.
    health = podman("healthcheck", "run", container.name, check=False)
    assert health.returncode == 0, health.stdout + health.stderr + container.logs()


async def test_sigterm_lets_a_stream_finish_and_exits_zero(container: Container, admin: httpx.AsyncClient) -> None:
    client = sdk(container)
    try:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "a slow answer"}], max_tokens=200,
            stream=True, stream_options={"include_usage": True},
            extra_headers={"X-Mock-Behavior": "words:20,chunk-delay:0.15"})
        chunks = aiter(stream)
        first = await anext(chunks)
        assert first is not None
        podman("kill", "--signal", "TERM", container.name)
        rest = [c async for c in chunks]
        assert any(c.usage is not None for c in rest), "the stream was cut instead of drained"
    finally:
        await client.close()
    exit_code = await asyncio.to_thread(podman, "wait", container.name, timeout=60)
    assert exit_code.stdout.strip() == "0", container.logs()
    assert "metergate stopped" in container.logs()


def test_podman_is_the_one_that_ran(container: Container) -> None:
    """The smoke test talks to the container, not to a server left on the port by something else."""
    assert shutil.which("podman")
    inspect = json.loads(podman("inspect", container.name).stdout)[0]
    assert inspect["Config"]["User"] == f"{CONTAINER_UID}:{CONTAINER_UID}"
    assert inspect["Config"]["Healthcheck"]["Test"] == ["CMD", "metergate", "health"]
