"""Each role serves what it should and nothing more: the sidecar proxies, the control plane administers and sweeps.

Method: build the application for each role on a shared SQLite file, serve it on loopback in front of the
mock upstream, and call every kind of path (proxy, admin API, portal, health, metrics); the hold sweeper is
observed through its effect (an expired hold released) and its task.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx2 as httpx
import pytest

from metergate.cli import main
from metergate.proxy.app import STORE
from metergate.wallet.models import now_ms
from tests.conftest import ADMIN_KEY, Gateway, Upstream, start_gateway
from tests.proxy.test_openai_sdk import MESSAGES

CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 10}
SIDECAR_HEADERS = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"}


def sweepers() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "sweep_forever"]


async def test_sidecar_serves_the_proxy_and_health_only(upstream: Upstream, tmp_path: Path) -> None:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'db.sqlite'}", role="sidecar")
    try:
        store = gateway.app[STORE]
        await store.create_customer("test", "acme", "Acme")
        await store.credit("test", "acme", "USD", 1_000_000, idempotency_key="seed")
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            answer = await client.post("/openai/v1/chat/completions", json=CHAT, headers=SIDECAR_HEADERS)
            assert answer.status_code == 200
            assert answer.headers["X-Metergate-Request-Id"].startswith("req_")
            admin = await client.get("/admin/v1/customers", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert (admin.status_code, admin.json()["error"]["code"]) == (404, "unknown_route")
            assert (await client.get("/portal/")).status_code == 404
            assert (await client.get("/livez")).json() == {"status": "ok"}
            ready = await client.get("/readyz")
            assert ready.json() == {"status": "ok", "role": "sidecar", "database": "up", "prices": "loaded"}
            assert "metergate_requests_total" in (await client.get("/metrics")).text
        assert sweepers() == []
    finally:
        await gateway.close()
        await runner.cleanup()


async def test_control_serves_admin_portal_and_sweeper_but_no_proxy(upstream: Upstream, tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'db.sqlite'}"
    gateway, runner = await start_gateway(upstream, database, role="control", sweep_interval_s=0.05)
    try:
        await gateway.customer("acme", funds=1_000)
        # A hold left behind by a sidecar that died: already past its TTL.
        hold, _ = await gateway.store.reserve("test", "acme", "USD", 400, hold_id="hold_orphan", ttl_ms=1)
        assert hold.expires_at_ms <= now_ms() + 1
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            proxied = await client.post("/openai/v1/chat/completions", json=CHAT, headers=SIDECAR_HEADERS)
            assert (proxied.status_code, proxied.json()["error"]["code"]) == (404, "unknown_route")
            assert upstream.requests == []
            ready = await client.get("/readyz")
            assert ready.json() == {"status": "ok", "role": "control", "database": "up"}
            link = await gateway.admin.post("/customers/acme/portal-link")
            assert (await client.get(link.json()["url"])).status_code == 200
            for _ in range(200):  # the sweeper runs every 50 ms; give it up to 10 s
                orphan = await gateway.store.get_hold("hold_orphan")
                if orphan is not None and orphan.state == "expired":
                    break
                await asyncio.sleep(0.05)
            assert orphan is not None and orphan.state == "expired"
            assert (await gateway.balance())["available"] == 1_000
            metrics = (await client.get("/metrics")).text
            assert "metergate_expired_holds_total 1.0" in metrics
        assert len(sweepers()) == 1
        assert await gateway.store.audit() == []
    finally:
        await gateway.close()
        await runner.cleanup()
    assert sweepers() == []  # stopped with the application


async def test_all_serves_proxy_admin_and_sweeper(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    await gateway.openai("acme").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=10)
    assert len(await gateway.usage("acme")) == 1
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        ready = await client.get("/readyz")
    assert ready.json() == {"status": "ok", "role": "all", "database": "up", "prices": "loaded"}
    assert len(sweepers()) == 1


async def test_a_proxy_without_prices_is_not_ready(upstream: Upstream, tmp_path: Path) -> None:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'db.sqlite'}", role="sidecar",
                                          pricing={"asset": "USD", "models": {}})
    try:
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()["status"], ready.json()["prices"]) == (503, "unavailable", "empty")
    finally:
        await gateway.close()
        await runner.cleanup()


@pytest.mark.parametrize("role", ["sidecar", "control", "all"])
def test_role_comes_from_the_flag_the_environment_or_the_file(role: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from metergate.config.settings import load_settings

    config = tmp_path / "metergate.yaml"
    config.write_text(f"role: {role}\n")
    monkeypatch.setenv("METERGATE_CONFIG", str(config))
    assert load_settings(config).role == role
    monkeypatch.setenv("METERGATE_ROLE", "control")
    assert load_settings(config).role == "control"  # the environment beats the file
    assert load_settings(config, role="sidecar").role == "sidecar"  # and --role beats both


def test_serve_refuses_an_unknown_role(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--role", "everything"])
    assert exited.value.code == 2
    assert "invalid choice: 'everything'" in capsys.readouterr().err
