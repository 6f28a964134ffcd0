"""The sidecar imports only what it serves, and loads each tiktoken encoding when a model of its family first
asks, counting exactly.

Method: a real ``python -X importtime -m metergate serve --role sidecar`` on a free port, in front of the mock
upstream, on a SQLite file funded beforehand. ``-X importtime`` makes the interpreter itself list every module
the process imports, so no debug endpoint is needed. The upstream answers without usage (``no-usage``), so the
usage records hold the sidecar's own prompt counts; they must equal tiktoken's count with the model's encoding
(o200k_base for gpt-4o, cl100k_base for gpt-4), read back from the ledger after the process has stopped.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
import tiktoken

from metergate.metering.tokenizer import seed_cache
from metergate.wallet.sql import SqlWalletStore
from tests.conftest import PROVIDER_KEY, Upstream, free_port

ROOT = Path(__file__).resolve().parents[2]
# Modules only the control plane serves (their imports would cost RSS in every pod).
CONTROL_ONLY = ("stripe", "openai", "metergate.admin", "metergate.billing", "metergate.payments.service",
                "metergate.payments.stripe_api", "metergate.portal.views", "metergate.portal.selfserve",
                "metergate.pricing.admin", "metergate.demo")
# Optional extras, imported only when a route needs them (botocore: a bedrock route's SigV4 signer), and
# PostgreSQL's driver stack (asyncpg, SQLAlchemy's async layer with the ORM it pulls in, the group commit), which
# a store on SQLite never opens.
UNUSED_EXTRAS = ("botocore", "boto3", "metergate.proxy.sigv4", "metergate.proxy.adapters.bedrock",
                 "metergate.proxy.eventstream_relay", "asyncpg", "sqlalchemy.ext.asyncio", "sqlalchemy.orm",
                 "metergate.wallet.pgcommit")
# A text whose counts differ between the two encodings, so a wrong family would show.
PROMPT = "Prepaid wallets, metered tokens: 12345 déjà-vu — 計量された トークン 🎉"
PER_MESSAGE, PRIMING = 4, 3  # metergate/proxy/adapters/openai.py's framing of one chat message


@pytest.fixture
def sidecar(upstream: Upstream, tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    database = tmp_path / "db.sqlite"

    async def fund() -> None:
        store = SqlWalletStore(f"sqlite:///{database}")
        await store.open()
        await store.create_customer("test", "acme", "Acme")
        await store.credit("test", "acme", "USD", 10**9, idempotency_key="seed")
        await store.close()

    asyncio.run(fund())
    port = free_port()
    config = tmp_path / "metergate.yaml"
    config.write_text(
        f"port: {port}\ndatabase_url: sqlite:///{database}\nrole: sidecar\n"
        f"routes: [{{prefix: /openai, upstream: '{upstream.url}', api_key: {PROVIDER_KEY}}}]\n"
        "pricing: {asset: USD, models: {'*': {input_per_mtok: '1', output_per_mtok: '2'}}}\n")
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "metergate", "serve", "--config",
                                 str(config), "--log-level", "WARNING"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=err, env={**os.environ, "TIKTOKEN_CACHE_DIR": str(seed_cache())})
    try:
        yield f"http://127.0.0.1:{port}", stderr, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def imported(stderr: Path) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$",
                                            stderr.read_text(errors="replace"), re.M)}


async def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=url) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "serve exited"
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("serve not ready in 60 s")


async def test_sidecar_imports_no_control_plane_and_counts_both_families_exactly(
        sidecar: tuple[str, Path, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    url, stderr, proc = sidecar
    await wait_ready(url, proc)
    headers = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test", "X-Mock-Behavior": "no-usage"}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for model in ("gpt-4o", "gpt-4"):
            answer = await client.post("/openai/v1/chat/completions", headers=headers, json={
                "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16})
            assert answer.status_code == 200, answer.text
    stop(proc)

    modules = imported(stderr)
    assert "metergate.proxy.pipeline" in modules  # the listing is real
    assert sorted(m for m in modules if m.startswith(CONTROL_ONLY)) == []
    assert sorted(m for m in modules if m.startswith(UNUSED_EXTRAS)) == []

    store = SqlWalletStore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    await store.open()
    try:
        records = {r.model: r for _, r in await store.usage("test", "acme", limit=10)}
    finally:
        await store.close()
    for model, encoding in (("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")):
        expected = PRIMING + PER_MESSAGE + len(tiktoken.get_encoding(encoding).encode_ordinary(PROMPT))
        assert records[model].tokens_input == expected, (model, records[model])
        assert records[model].detail["tokens_exact"] is True
    assert len(tiktoken.get_encoding("o200k_base").encode_ordinary(PROMPT)) != len(
        tiktoken.get_encoding("cl100k_base").encode_ordinary(PROMPT))
