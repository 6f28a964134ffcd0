"""Who is paying, and what they pay, come only from trusted sources.

Method: gateways in front of the mock upstream, driven by the providers' own SDKs and by a raw socket (to
choose the source address). A proxy key is accepted in every SDK's key header and never reaches the
upstream; a proxy-key client cannot choose its price rule with the feature or attribute headers (the key's
own attributes, set through the admin API, apply); a customer header from a mesh proxy's loopback address is
not the app's. Each refusal is checked for its code, for the upstream having received nothing, and for the
customer's balance, ledger and usage being unchanged.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from metergate.demo.mock_upstream import SEEN
from tests.conftest import DEFAULT_PRICING, PROVIDER_KEY, Gateway, Upstream, start_gateway

MESSAGES = [{"role": "user", "content": "hello"}]
CLAUDE = {"input_per_mtok": "3.00", "output_per_mtok": "15.00"}
BASE = {"id": "mini", "match": {"type": "request", "model": "gpt-4o-mini"}, "asset": "USD",
        "per_units": "1000000", "rates": {"input_tokens": "100", "output_tokens": "100"}}
# Rules a client would love to pick: by feature, and by a configured attribute header (and both, unambiguous).
SEARCH = {**BASE, "id": "mini-search", "match": {**BASE["match"], "feature": "search"},  # type: ignore[dict-item]
          "rates": {"input_tokens": "50", "output_tokens": "50"}}
FREE = {**BASE, "id": "mini-free", "match": {**BASE["match"], "feature": "free"},  # type: ignore[dict-item]
        "rates": {"input_tokens": "0", "output_tokens": "0"}}
PRO = {**BASE, "id": "mini-pro", "match": {**BASE["match"], "plan": "pro"},  # type: ignore[dict-item]
       "rates": {"input_tokens": "1", "output_tokens": "1"}}
RULES = [BASE, SEARCH, FREE, PRO, *({**PRO, "id": f"mini-pro-{f}", "match": {**PRO["match"], "feature": f}}  # type: ignore[dict-item]
                                    for f in ("search", "free"))]


async def _start(upstream: Upstream, tmp_path: Path, **overrides: Any) -> tuple[Gateway, Any]:
    gateway, runner = await start_gateway(
        upstream, f"sqlite:///{tmp_path / 'trust.db'}", key_cache_ttl_s=0,
        pricing={"asset": "USD", "attribute_headers": {"plan": "X-Metergate-Plan"},
                 "models": {**DEFAULT_PRICING["models"], "claude-sonnet-4-6": CLAUDE}},  # type: ignore[dict-item]
        routes=[{"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY},
                {"prefix": "/azure", "upstream": upstream.url, "api_key": PROVIDER_KEY},
                {"prefix": "/anthropic", "upstream": upstream.url, "api_key": PROVIDER_KEY,
                 "provider": "anthropic", "provider_id": "anthropic"}], **overrides)
    await gateway.customer("acme", funds=10_000_000)
    return gateway, runner


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway, runner = await _start(upstream, tmp_path)
    yield gateway
    await gateway.close()
    await runner.cleanup()


async def issue_key(gw: Gateway, attributes: dict[str, str] | None = None) -> dict[str, Any]:
    r = await gw.admin.post("/customers/acme/api-keys", json={"attributes": attributes} if attributes else None)
    assert r.status_code == 201, r.text
    issued: dict[str, Any] = r.json()
    return issued


async def publish(gw: Gateway, rules: list[dict[str, Any]]) -> None:
    r = await gw.admin.post("/price-versions", json={"rules": rules, "note": "trust"})
    assert r.status_code == 201, r.text
    r = await gw.admin.post(f"/price-versions/{r.json()['id']}/publish", json={})
    assert r.status_code == 200, r.text


def sdk(gw: Gateway, key: str, **kwargs: Any) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/openai/v1", api_key=key, max_retries=0, **kwargs)
    gw.clients.append(client)
    return client


async def wallet_state(gw: Gateway) -> tuple[Any, ...]:
    ledger = (await gw.admin.get("/customers/acme/ledger", params={"limit": 1})).json()["data"]
    return await gw.balance(), ledger, await gw.usage()


def assert_no_secret_upstream(gw: Gateway, secret: str) -> None:
    for request in gw.upstream.app[SEEN]:
        assert not any(secret in value for value in request["headers"].values())
        assert secret not in request["raw_path"] + request["query_string"]


# ------------------------------------------------------------------------------- proxy keys in every SDK's header

async def test_anthropic_sdk_with_a_proxy_key_as_its_api_key_is_billed_and_the_key_stays_here(gw: Gateway) -> None:
    secret = (await issue_key(gw))["key"]
    client = anthropic.AsyncAnthropic(base_url=f"{gw.url}/anthropic", api_key=secret, max_retries=0)
    try:
        # Claude Code's requests carry ?beta=true, which must reach Anthropic.
        message = await client.messages.create(model="claude-sonnet-4-6", max_tokens=20,
                                               messages=[{"role": "user", "content": "hello"}],
                                               extra_query={"beta": "true"})
    finally:
        await client.close()
    assert message.usage.output_tokens > 0
    [arrived] = gw.upstream.app[SEEN]
    assert (arrived["raw_path"], arrived["query_string"]) == ("/v1/messages", "beta=true")
    assert arrived["headers"]["x-api-key"] == PROVIDER_KEY
    assert_no_secret_upstream(gw, secret)
    [record] = await gw.usage()
    assert (record["customer_id"], record["endpoint"], record["status_code"]) == ("acme", "messages", 200)
    assert record["charged_amount"] > 0


async def test_azure_sdk_sends_the_proxy_key_as_api_key_and_its_api_version_arrives(gw: Gateway) -> None:
    secret = (await issue_key(gw))["key"]
    client = openai.AsyncAzureOpenAI(azure_endpoint=f"{gw.url}/azure", api_key=secret, api_version="2024-10-21",
                                     max_retries=0)
    gw.clients.append(client)
    # The mock upstream serves no Azure deployment path: it answers 404, which is relayed and costs nothing.
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]
    [arrived] = gw.upstream.app[SEEN]
    assert (arrived["raw_path"], arrived["query_string"]) == (
        "/openai/deployments/gpt-4o-mini/chat/completions", "api-version=2024-10-21")
    assert arrived["headers"]["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert "api-key" not in {name.lower() for name in arrived["headers"]}
    assert_no_secret_upstream(gw, secret)
    [record] = await gw.usage()
    assert (record["customer_id"], record["status_code"], record["charged_amount"]) == ("acme", 404, 0)


@pytest.mark.parametrize("header", ["x-api-key", "api-key", "Authorization"])
async def test_a_proxy_key_in_any_key_header_bills_its_customer(gw: Gateway, header: str) -> None:
    secret = (await issue_key(gw))["key"]
    client = sdk(gw, "unused", default_headers={header: f"Bearer {secret}" if header == "Authorization" else secret})
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]
    [record] = await gw.usage()
    assert (record["customer_id"], record["status_code"]) == ("acme", 200)
    assert_no_secret_upstream(gw, secret)


async def test_two_different_proxy_keys_are_refused_and_change_nothing(gw: Gateway) -> None:
    first, second = (await issue_key(gw))["key"], (await issue_key(gw))["key"]
    before = await wallet_state(gw)
    client = sdk(gw, first, default_headers={"x-api-key": second})
    with pytest.raises(openai.AuthenticationError) as refused:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]
    assert refused.value.code == "invalid_api_key"
    assert gw.upstream.app[SEEN] == []
    assert await wallet_state(gw) == before


# ---------------------------------------------------------------------- the client does not pick its price (item 4)

@pytest.mark.parametrize("headers", [{"X-Metergate-Feature": "free"}, {"X-Metergate-Plan": "pro"},
                                     {"x-metergate-feature": ""}])
async def test_a_proxy_key_client_cannot_choose_its_price_rule(gw: Gateway, headers: dict[str, str]) -> None:
    await publish(gw, RULES)
    secret = (await issue_key(gw, {"feature": "search"}))["key"]
    before = await wallet_state(gw)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await sdk(gw, secret, default_headers=headers).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]
    assert refused.value.code == "untrusted_attribute_header"
    assert gw.upstream.app[SEEN] == []
    assert await wallet_state(gw) == before


async def test_a_proxy_keys_own_attributes_price_its_requests_and_can_be_changed_by_the_admin(gw: Gateway) -> None:
    await publish(gw, RULES)
    issued = await issue_key(gw, {"feature": "search"})
    assert issued["attributes"] == {"feature": "search"}
    client = sdk(gw, issued["key"])
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]
    r = await gw.admin.patch(f"/api-keys/{issued['id']}", json={"attributes": {"plan": "pro"}})
    assert (r.status_code, r.json()["attributes"]) == (200, {"plan": "pro"})
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]
    newest_first = [(u["detail"]["price"]["rule"], u["feature"]) for u in await gw.usage()]
    assert newest_first == [("mini-pro", None), ("mini-search", "search")]


async def test_the_app_on_a_trusted_address_still_chooses_feature_and_attributes(gw: Gateway) -> None:
    await publish(gw, RULES)
    client = gw.openai()  # the sidecar case: the customer header from loopback
    for headers in ({"X-Metergate-Feature": "free"}, {"X-Metergate-Plan": "pro"}, {}):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5,  # type: ignore[arg-type]
                                             extra_headers=headers)
    assert [u["detail"]["price"]["rule"] for u in await gw.usage()] == ["mini", "mini-pro", "mini-free"]


@pytest.mark.parametrize(("attributes", "status"), [
    ({"model": "cheap"}, 400), ({"customer": "other"}, 400), ({"route": "/x"}, 400), ({"9lives": "x"}, 400),
    ({"feature": ""}, 400), ({"feature": "x" * 129}, 400), ({"feature": "a\nb"}, 400), ({"feature": 3}, 400),
    ({f"a{i}": "x" for i in range(17)}, 400), (["feature"], 400),
])
async def test_key_attributes_that_would_shadow_a_requests_own_are_refused(gw: Gateway, attributes: Any,
                                                                           status: int) -> None:
    r = await gw.admin.post("/customers/acme/api-keys", json={"attributes": attributes})
    assert (r.status_code, r.json()["error"]["code"]) == (status, "invalid_request")
    issued = await issue_key(gw)
    r = await gw.admin.patch(f"/api-keys/{issued['id']}", json={"attributes": attributes})
    assert (r.status_code, r.json()["error"]["code"]) == (status, "invalid_request")
    r = await gw.admin.patch("/api-keys/key_nonexistent", json={"attributes": {}})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")


# ------------------------------------------------------------------------------- customer ids (item 9)

@pytest.mark.parametrize("customer_id", ["acme2\n", "acme2\r\n", "\nacme2", "acme2\x00"])
async def test_a_customer_id_with_a_line_break_is_refused_and_creates_nothing(gw: Gateway, customer_id: str) -> None:
    r = await gw.admin.post("/customers", json={"id": customer_id, "name": "Acme"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_customer")
    ids = [c["id"] for c in (await gw.admin.get("/customers")).json()["data"]]
    assert ids == ["acme"]


# ------------------------------------------------------------------------------- mesh loopback (item 12)

def post_from(source: str, port: int, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """A chat request from a chosen loopback source address (as a mesh proxy's would arrive)."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 5}).encode()
    head = ("POST /openai/v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
            "Content-Type: application/json\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    raw_head, _, payload = data.partition(b"\r\n\r\n")
    return int(raw_head.split(b" ", 2)[1]), json.loads(payload)


AS_ACME = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"}


async def test_by_default_a_customer_header_from_a_mesh_proxys_loopback_address_is_refused(gw: Gateway) -> None:
    before = await wallet_state(gw)
    status, body = await asyncio.to_thread(post_from, "127.0.0.6", gw.settings.port, AS_ACME)  # Istio's inbound
    assert (status, body["error"]["code"]) == (403, "untrusted_customer_header")
    assert gw.upstream.app[SEEN] == []
    assert await wallet_state(gw) == before
    status, _ = await asyncio.to_thread(post_from, "127.0.0.1", gw.settings.port, AS_ACME)  # the app itself
    assert status == 200


async def test_trusting_no_network_leaves_proxy_keys_only(upstream: Upstream, tmp_path: Path) -> None:
    gateway, runner = await _start(upstream, tmp_path, trusted_networks=[])
    try:
        before = await wallet_state(gateway)
        status, body = await asyncio.to_thread(post_from, "127.0.0.1", gateway.settings.port, AS_ACME)
        assert (status, body["error"]["code"]) == (403, "untrusted_customer_header")
        assert gateway.upstream.app[SEEN] == []
        assert await wallet_state(gateway) == before
        secret = (await issue_key(gateway))["key"]
        status, _ = await asyncio.to_thread(post_from, "127.0.0.6", gateway.settings.port,
                                            {"Authorization": f"Bearer {secret}"})
        assert status == 200
    finally:
        await gateway.close()
        await runner.cleanup()
