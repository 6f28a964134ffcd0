"""Proxy API keys and attribution: who pays when the application does not send the customer header.

Method: keys are issued and revoked through the admin API and used by the official openai SDK as its
``api_key``; what each request did is read back from the admin API (balances, usage records), from the
mock upstream's request log, and, for key storage, from the bytes of the SQLite files themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from metergate.proxy.identify import Identifier
from tests.conftest import PROVIDER_KEY, Gateway, Upstream, start_gateway

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def no_cache_gateway(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway that looks every proxy key up afresh (key_cache_ttl_s=0)."""
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'gateway.db'}",
                                     key_cache_ttl_s=0)
    yield gw
    await gw.close()
    await runner.cleanup()


async def _issue_key(gw: Gateway, customer_id: str = "acme") -> dict[str, Any]:
    r = await gw.admin.post(f"/customers/{customer_id}/api-keys")
    assert r.status_code == 201, r.text
    issued: dict[str, Any] = r.json()
    return issued


def _sdk(gw: Gateway, key: str, **kwargs: Any) -> openai.AsyncOpenAI:
    """The official SDK as a customer's own code would hold it: a proxy key, no metergate headers."""
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/openai/v1", api_key=key, max_retries=0, **kwargs)
    gw.clients.append(client)
    return client


async def _live_balance(gw: Gateway, customer_id: str) -> int:
    r = await gw.admin.get(f"/customers/{customer_id}/balance",
                           headers={"Authorization": f"Bearer {_live_admin_key(gw)}"})
    assert r.status_code == 200, r.text
    available: int = r.json()["balances"][0]["available"]
    return available


def _database_bytes(directory: Path) -> bytes:
    """Every byte SQLite wrote: the database file, its write-ahead log and shared memory."""
    return b"".join(p.read_bytes() for p in sorted(directory.glob("gateway.db*")))


def _live_admin_key(gw: Gateway) -> str:
    return next(k.get_secret_value() for k in gw.settings.admin_keys if k.get_secret_value().startswith("mg_live_"))


async def test_issued_key_is_shown_once_and_only_its_hash_is_stored(gateway: Gateway, tmp_path: Path) -> None:
    await gateway.customer("acme")
    issued = await _issue_key(gateway)
    secret = issued["key"]
    assert secret.startswith("mgk_test_") and len(secret) > 30
    assert issued["customer_id"] == "acme" and issued["mode"] == "test"
    assert secret.startswith(issued["prefix"]) and len(issued["prefix"]) < len(secret)
    assert "key_hash" not in issued
    # The customer's record never shows the secret again.
    shown = await gateway.admin.get("/customers/acme")
    assert secret not in shown.text
    # On disk (database and write-ahead log): the hash, never the secret.
    stored = await asyncio.to_thread(_database_bytes, tmp_path)
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored
    assert secret.encode() not in stored
    assert secret[len(issued["prefix"]):].encode() not in stored


async def test_key_used_as_the_sdk_api_key_bills_its_customer(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    await gateway.customer("globex", funds=1_000_000)
    secret = (await _issue_key(gateway, "acme"))["key"]

    raw = await _sdk(gateway, secret).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)

    charged = int(raw.headers["X-Metergate-Charged"].replace(".", ""))
    assert charged > 0
    assert (await gateway.balance("acme"))["available"] == 1_000_000 - charged
    assert (await gateway.balance("globex"))["available"] == 1_000_000
    records = await gateway.usage("acme")
    assert [r["id"] for r in records] == [raw.headers["X-Metergate-Request-Id"]]
    assert records[0]["charged_amount"] == charged
    # The upstream sees the provider's key, never the customer's proxy key.
    forwarded = gateway.upstream.requests[-1]["headers"]
    assert forwarded["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert secret not in str(forwarded)


async def test_revoked_key_is_refused_and_charges_nothing(no_cache_gateway: Gateway) -> None:
    gw = no_cache_gateway
    await gw.customer("acme", funds=1_000_000)
    issued = await _issue_key(gw)
    client = _sdk(gw, issued["key"])
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)  # works, is cached
    revoked = await gw.admin.delete(f"/api-keys/{issued['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at_ms"] is not None
    balance, forwarded = await gw.balance(), len(gw.upstream.requests)

    with pytest.raises(openai.AuthenticationError) as refused:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)

    assert refused.value.status_code == 401
    assert refused.value.code == "invalid_api_key"
    assert await gw.balance() == balance
    assert len(gw.upstream.requests) == forwarded
    assert len(await gw.usage()) == 1


async def test_revoking_is_idempotent_and_scoped_to_the_admin_keys_mode(gateway: Gateway) -> None:
    await gateway.customer("acme")
    issued = await _issue_key(gateway)
    live = {"Authorization": f"Bearer {_live_admin_key(gateway)}"}
    other_mode = await gateway.admin.delete(f"/api-keys/{issued['id']}", headers=live)
    assert other_mode.status_code == 404 and other_mode.json()["error"]["code"] == "not_found"
    first = await gateway.admin.delete(f"/api-keys/{issued['id']}")
    again = await gateway.admin.delete(f"/api-keys/{issued['id']}")
    assert first.status_code == again.status_code == 200
    assert first.json()["revoked_at_ms"] == again.json()["revoked_at_ms"] is not None
    unknown = await gateway.admin.delete("/api-keys/key_doesnotexist")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


async def test_feature_header_is_recorded_on_the_usage_record_and_not_forwarded(gateway: Gateway) -> None:
    await gateway.customer("acme")
    client = gateway.openai()
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5,
                                         extra_headers={"X-Metergate-Feature": "summarise-inbox"})
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5,
                                         extra_headers={"X-Metergate-Feature": "x" * 500})
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)

    newest_first = [r["feature"] for r in await gateway.usage()]
    assert newest_first == [None, "x" * 128, "summarise-inbox"]
    for forwarded in gateway.upstream.requests:
        assert not any(name.lower().startswith("x-metergate-") for name in forwarded["headers"])


async def test_a_keys_own_feature_is_recorded_for_key_identified_requests(gateway: Gateway) -> None:
    # The key's client cannot send the feature header (tests/proxy/test_trust.py); the key carries it.
    await gateway.customer("acme")
    r = await gateway.admin.post("/customers/acme/api-keys", json={"attributes": {"feature": "search"}})
    assert r.status_code == 201, r.text
    client = _sdk(gateway, r.json()["key"])
    await client.embeddings.create(model="text-embedding-3-small", input="find me")
    [record] = await gateway.usage()
    assert (record["feature"], record["endpoint"]) == ("search", "embeddings")


async def test_test_mode_key_bills_its_customer_in_test_mode_only(gateway: Gateway) -> None:
    # The same customer id exists in both modes, each with its own wallet.
    await gateway.customer("acme", funds=1_000_000, mode="test")
    await gateway.customer("acme", funds=1_000_000, mode="live")
    test_key = (await _issue_key(gateway))["key"]
    assert test_key.startswith("mgk_test_")

    raw = await _sdk(gateway, test_key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)

    charged = int(raw.headers["X-Metergate-Charged"].replace(".", ""))
    assert charged > 0
    assert (await gateway.balance("acme"))["available"] == 1_000_000 - charged
    assert await _live_balance(gateway, "acme") == 1_000_000
    live_usage = await gateway.admin.get("/customers/acme/usage",
                                         headers={"Authorization": f"Bearer {_live_admin_key(gateway)}"})
    assert live_usage.status_code == 200 and live_usage.json()["data"] == []
    # A mode header cannot move a key-identified request to the other mode.
    await _sdk(gateway, test_key, default_headers={"X-Metergate-Mode": "live"}).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    assert await _live_balance(gateway, "acme") == 1_000_000
    assert len(await gateway.usage("acme")) == 2


async def test_key_for_a_customer_in_the_other_mode_cannot_be_issued(gateway: Gateway) -> None:
    await gateway.customer("globex", mode="live")
    r = await gateway.admin.post("/customers/globex/api-keys")  # the test-mode admin key
    assert r.status_code == 404 and r.json()["error"]["code"] == "customer_not_found"


@pytest.mark.parametrize(("remote", "trusted"), [
    ("127.0.0.1", True),
    ("::1", True),
    ("::ffff:127.0.0.1", True),  # loopback IPv4 as a dual-stack listener reports it
    ("fe80::1%eth0", False),
    ("10.0.0.5", False),
    ("::ffff:10.0.0.5", False),
    ("not-an-address", False),
    (None, False),
])
async def test_customer_header_is_trusted_only_from_configured_networks(
        gateway: Gateway, remote: str | None, trusted: bool) -> None:
    assert Identifier(gateway.settings, gateway.store).trusted(remote) is trusted
