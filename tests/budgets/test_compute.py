"""Compute jobs spend along their budget path too: a node's request limit and spend limit (in the route's own
asset) apply to GPU jobs as to chat requests, so a key cannot step around its node's budget on another route.

Method: the compute gateway of tests/proxy/test_compute.py (jobs priced per call, 2 GPU-seconds each) and the
admin API; the job's node comes from the trusted header.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.conftest import Gateway, Upstream, start_gateway
from tests.proxy.test_compute import HEADERS, fund, route


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway, runner = await start_gateway(
        upstream, f"sqlite:///{tmp_path / 'c.db'}",
        assets=[{"code": "USD", "scale": 6}, {"code": "GPU_SECONDS", "name": "GPU seconds", "scale": 3}],
        routes=[route("/gpu-call", upstream, meter="request", unit_price="2")])
    await gateway.customer("lab", funds=0)
    yield gateway
    await gateway.close()
    await runner.cleanup()


async def test_a_nodes_limits_apply_to_compute_jobs(gw: Gateway) -> None:
    await fund(gw, 100_000)
    r = await gw.admin.post("/customers/lab/budget-nodes", json={"id": "train", "kind": "project"})
    assert r.status_code == 201
    r = await gw.admin.post("/customers/lab/budget-nodes/train/limits", json={
        "id": "train-gpu", "dimension": "spend", "amount": 5_000, "asset": "GPU_SECONDS", "window": {"kind": "day"}})
    assert r.status_code == 201, r.text
    statuses = []
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(4):
            answer = await client.post(f"{gw.url}/gpu-call/compute/run", params={"seconds": "0"}, content=b"job",
                                       headers={**HEADERS, "X-Metergate-Budget-Node": "train"})
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                assert answer.json()["error"]["limit"]["id"] == "train-gpu"
    assert statuses == [200, 200, 429, 429]  # 2 GPU-seconds a job: two fit in 5
    records = await gw.usage("lab")
    assert [r["budget_path"] for r in records] == ["root/train", "root/train"]
    assert sum(r["charged_amount"] for r in records) == 4_000
    assert await gw.store.audit() == []
