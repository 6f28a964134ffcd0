"""No secret ever reaches a log line, a response a client sees, or /metrics — on normal, error and debug paths.

Method: plant unique canary values in every place a secret lives (the provider key of a route, both admin
keys, the portal secret, the notification secret, an issued proxy key, and credentials a client sends that
metergate must refuse), log everything at DEBUG — captured raw, as emitted, and as metergate's JSON handler
writes it — and drive successes, upstream errors, refusals (402, 401, 403), malformed bodies, malformed HTTP,
a stream cut by its upstream and a client that hangs up. Then search every log line, every response body
and header the clients received, and the /metrics text for every canary: there must be no hit, and none
that only redaction hid.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from metergate.observability.logs import configure_logging, secrets_of
from tests.conftest import DEFAULT_PRICING, Gateway, Upstream, start_gateway
from tests.proxy.test_openai_sdk import MESSAGES

TAG = secrets.token_hex(6)
ROUTE_KEY = f"sk-canaryroute{TAG}" + "r" * 20
ADMIN_TEST = f"mg_test_canaryadmin{TAG}"
ADMIN_LIVE = f"mg_live_canaryadmin{TAG}"
PORTAL_SECRET = f"canary-portal-{TAG}-" + "p" * 32
NOTIFY_SECRET = f"canary-notify-{TAG}-" + "n" * 20
WRONG_ADMIN = f"mg_test_canarywrongadmin{TAG}"  # a client's guess: refused, never echoed
UNKNOWN_PROXY_KEY = f"mgk_test_canaryunknown{TAG}" + "u" * 10
CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 12}


class Snapshot(logging.Handler):
    """Keeps each record as emitted, before any handler (redaction included) can rewrite it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        record.exc_text = None  # leave the record as found for the handlers after this one
        self.lines.append(text)


@pytest.fixture
def logs() -> Iterator[tuple[Snapshot, io.StringIO]]:
    root = logging.getLogger()
    level = root.level
    snapshot, stream = Snapshot(), io.StringIO()
    root.addHandler(snapshot)  # first, so that it sees records before metergate's redaction
    yield snapshot, stream
    for handler in [h for h in root.handlers if h is snapshot or h.get_name() == "metergate"]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


class Seen:
    """Everything the clients received: status lines, headers and bodies."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.metrics = ""

    async def hook(self, response: httpx.Response) -> None:
        await response.aread()
        self.texts.append(f"{response.status_code} {dict(response.headers)} {response.text}")


async def raw_http(url: str, payload: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    answer = await reader.read(65536)
    writer.close()
    await writer.wait_closed()
    return answer


async def test_canaries_never_leak(upstream: Upstream, tmp_path: Path, logs: tuple[Snapshot, io.StringIO]) -> None:
    snapshot, stream = logs
    gateway, runner = await start_gateway(
        upstream, f"sqlite:///{tmp_path / 'canary.db'}",
        routes=[{"prefix": "/openai", "upstream": upstream.url, "api_key": ROUTE_KEY}],
        admin_keys=[ADMIN_TEST, ADMIN_LIVE], portal_secrets={"k1": PORTAL_SECRET}, notify_secret=NOTIFY_SECRET,
        pricing=DEFAULT_PRICING)
    configure_logging("DEBUG", "json", secrets_of(gateway.settings), stream=stream)
    seen = Seen()
    try:
        proxy_key = await exercise(gateway, seen)
    finally:
        await gateway.close()
        await runner.cleanup()
    # The one response meant to show a secret: the proxy key, shown once to the admin who issued it.
    issued = [t for t in seen.texts if proxy_key in t]
    assert len(issued) == 1 and issued[0].startswith("201 ")
    seen.texts.remove(issued[0])

    canaries = [ROUTE_KEY, ADMIN_TEST, ADMIN_LIVE, PORTAL_SECRET, NOTIFY_SECRET, WRONG_ADMIN, UNKNOWN_PROXY_KEY,
                proxy_key]
    places = {"log records as emitted": "\n".join(snapshot.lines),
              "metergate's JSON log": stream.getvalue(),
              "responses to clients": "\n".join(seen.texts),
              "/metrics": seen.metrics}
    assert len(snapshot.lines) > 50 and any(" DEBUG " in f" {line}" for line in snapshot.lines)
    leaks = [(place, canary) for place, text in places.items() for canary in canaries if canary in text]
    assert leaks == []
    # Not even a fragment long enough to matter: no 16-character piece of the route key or proxy key.
    for secret in (ROUTE_KEY, proxy_key):
        pieces = {secret[i:i + 16] for i in range(4, len(secret) - 16)}
        assert not [p for p in pieces for text in places.values() if p in text]
    # What reached the upstream is the route key, and only there.
    assert all(r["headers"]["Authorization"] == f"Bearer {ROUTE_KEY}" for r in upstream.requests)


async def exercise(gateway: Gateway, seen: Seen) -> str:
    """Drive every path once; return the proxy key the admin API issued."""
    admin = httpx.AsyncClient(base_url=f"{gateway.url}/admin/v1", headers={"Authorization": f"Bearer {ADMIN_TEST}"},
                              event_hooks={"response": [seen.hook]}, timeout=30)
    client = httpx.AsyncClient(base_url=gateway.url, event_hooks={"response": [seen.hook]}, timeout=30)
    sidecar = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"}
    chat = "/openai/v1/chat/completions"
    async with admin, client:
        # Admin: customers, credit, a proxy key, a portal link; a refused admin key.
        assert (await admin.post("/customers", json={"id": "acme", "name": "Acme"})).status_code == 201
        assert (await admin.post("/customers", json={"id": "poor", "name": "Poor"})).status_code == 201
        await admin.post("/customers/acme/credits", json={"amount": 1_000_000, "idempotency_key": "seed"})
        issued = await admin.post("/customers/acme/api-keys")
        proxy_key: str = issued.json()["key"]
        link = (await admin.post("/customers/acme/portal-link")).json()["url"]
        await admin.get("/customers/acme/usage")
        await admin.get("/customers", headers={"Authorization": f"Bearer {WRONG_ADMIN}"})
        await admin.get("/customers", headers={"Authorization": f"Bearer {proxy_key}"})  # wrong kind of key

        by_key = {"Authorization": f"Bearer {proxy_key}"}
        # Normal: unary and streaming, by header and by proxy key.
        assert (await client.post(chat, json=CHAT, headers=sidecar)).status_code == 200
        assert (await client.post(chat, json={**CHAT, "stream": True}, headers=by_key)).status_code == 200
        # Errors: the upstream fails, dies mid-stream, redirects; refusals 402, 401, 403; bad input.
        statuses = [
            (await client.post(chat, json=CHAT, headers={**sidecar, "X-Mock-Behavior": "error:500"})).status_code,
            (await client.post(chat, json={**CHAT, "stream": True},
                               headers={**by_key, "X-Mock-Behavior": "die-after:2"})).status_code,
            (await client.post(chat, json=CHAT, headers={**by_key, "X-Mock-Behavior": "redirect"})).status_code,
            (await client.post(chat, json=CHAT, headers={"X-Metergate-Customer": "poor",
                                                         "X-Metergate-Mode": "test"})).status_code,
            (await client.post(chat, json=CHAT, headers={"Authorization": f"Bearer {UNKNOWN_PROXY_KEY}"})).status_code,
            (await client.post(chat, json=CHAT, headers={"Authorization": f"Bearer {proxy_key}x"})).status_code,
            (await client.post(chat, json=CHAT, headers={"X-Metergate-Customer": "ghost"})).status_code,
            (await client.post(chat, content=b'{"model": "gpt-4o-mini", "messages": [', headers={
                **by_key, "Content-Type": "application/json"})).status_code,
            (await client.post(chat, json={**CHAT, "model": "no-such-model"}, headers=by_key)).status_code,
            (await client.post("/openai/v1/files", json={}, headers=by_key)).status_code,
            (await client.get(link + "tampered")).status_code,
            (await client.get(link)).status_code,
        ]
        assert statuses == [500, 200, 502, 402, 401, 401, 403, 400, 400, 404, 403, 200]
        # A client that hangs up mid-stream (metergate keeps draining the upstream for its usage).
        async with client.stream("POST", chat, json={**CHAT, "stream": True},
                                 headers={**by_key, "X-Mock-Behavior": "chunk-delay:0.05"}) as response:
            async for _ in response.aiter_bytes():
                break
        # Malformed HTTP, which aiohttp's parser answers itself (a control character inside the key's header).
        answer = await raw_http(gateway.url, b"POST " + chat.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                b"Authorization: Bearer " + proxy_key.encode() + b"\x01\r\n"
                                b"Content-Length: 2\r\n\r\n{}")
        seen.texts.append(answer.decode(errors="replace"))
        assert answer.split(b" ")[1] == b"400"
        for _ in range(100):  # let the drained stream settle before the scrape
            if (await admin.get("/customers/acme/balance")).json()["balances"][0]["pending"] == 0:
                break
            await asyncio.sleep(0.05)
        metrics = await client.get("/metrics")
        seen.metrics = metrics.text
    return proxy_key


def test_canaries_are_unique_and_look_like_what_they_stand_for() -> None:
    assert ROUTE_KEY.startswith("sk-") and ADMIN_LIVE.startswith("mg_live_") and len(PORTAL_SECRET) >= 32
    assert len({ROUTE_KEY, ADMIN_TEST, ADMIN_LIVE, PORTAL_SECRET, NOTIFY_SECRET, WRONG_ADMIN, UNKNOWN_PROXY_KEY}) == 7
