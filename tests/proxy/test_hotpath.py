"""What the proxy works out once and reuses across requests, and what it must never carry from one to the next.

Method: a gateway in front of a small upstream (or the mock upstream), driven over real HTTP, and the memo of
destinations (:class:`metergate.proxy.dispatch.Destinations`) on its own. A path served again is billed again,
a refused path is refused every time (a refusal is never remembered), and the memo keeps a bounded number of
paths, forgetting the oldest first; request ids stay unique and
in their format across the batches they are drawn in; an upstream's cookie set on one customer's answer never
reaches the upstream with another customer's request.
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from metergate.demo.mock_upstream import REQUESTS
from metergate.observability.logs import new_request_id
from metergate.proxy.dispatch import Destinations
from tests.conftest import PROVIDER_KEY, Gateway, Upstream, serve, start_gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}}


@pytest.fixture
async def cookie_upstream() -> AsyncIterator[Upstream]:
    """An upstream that sets a cookie on every answer, as providers behind a CDN do, and keeps each request."""
    app = web.Application()
    app[REQUESTS] = []

    async def chat(request: web.Request) -> web.Response:
        request.app[REQUESTS].append({"path": request.path, "headers": dict(request.headers)})
        response = web.json_response(ANSWER)
        response.set_cookie("__cf_bm", f"visitor-{len(request.app[REQUESTS])}", path="/")
        return response

    app.router.add_post("/v1/chat/completions", chat)
    runner, port = await serve(app)
    # A host name, not an address: aiohttp's default cookie jar keeps no cookies from an IP address.
    yield Upstream(f"http://localhost:{port}", app)
    await runner.cleanup()


async def _gateway(upstream: Upstream, tmp_path: Path) -> tuple[Gateway, Any]:
    gateway, runner = await start_gateway(
        upstream, f"sqlite:///{tmp_path / 'hot.db'}",
        routes=[{"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY}])
    for customer in ("acme", "globex"):
        await gateway.customer(customer, funds=10_000_000)
    return gateway, runner


async def _post(gw: Gateway, path: str, customer: str = "acme", **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(f"{gw.url}{path}", content=json.dumps(CHAT),
                                 headers={"Content-Type": "application/json", "X-Metergate-Customer": customer,
                                          "X-Metergate-Mode": "test", **headers})


async def test_an_upstream_cookie_never_rides_along_on_the_next_customers_request(
        cookie_upstream: Upstream, tmp_path: Path) -> None:
    gw, runner = await _gateway(cookie_upstream, tmp_path)
    try:
        first = await _post(gw, "/openai/v1/chat/completions", "acme")
        second = await _post(gw, "/openai/v1/chat/completions", "globex")
        own = await _post(gw, "/openai/v1/chat/completions", "globex", Cookie="pref=dark")
        assert (first.status_code, second.status_code, own.status_code) == (200, 200, 200)
        assert "set-cookie" not in first.headers  # an upstream's cookies are not the client's either
        seen = [r["headers"] for r in cookie_upstream.requests]
        assert len(seen) == 3
        assert "Cookie" not in seen[0] and "Cookie" not in seen[1], seen
        assert seen[2].get("Cookie") == "pref=dark"  # a client's own cookie is forwarded as it came
    finally:
        await gw.close()
        await runner.cleanup()


async def test_a_path_served_again_is_billed_again_and_a_refused_path_is_refused_each_time(
        upstream: Upstream, tmp_path: Path) -> None:
    gw, runner = await _gateway(upstream, tmp_path)
    try:
        for _ in range(3):
            ok = await _post(gw, "/openai/v1/chat/completions")
            assert ok.status_code == 200, ok.text
            assert float(ok.headers["x-metergate-charged"]) > 0
        for _ in range(2):  # a path no endpoint serves: the same refusal every time, nothing remembered
            refused = await _post(gw, "/openai/v1/no/such/endpoint")
            assert refused.status_code == 404
            assert refused.json()["error"]["code"] == "unknown_route"
            bad = await _post(gw, "/openai/v1/chat/completions?a=%ff")
            assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_query"), bad.text
        again = await _post(gw, "/openai/v1/chat/completions")
        assert again.status_code == 200
    finally:
        await gw.close()
        await runner.cleanup()


def test_destinations_stay_bounded_and_forget_the_oldest_first() -> None:
    calls: list[str] = []

    def resolve(path: str, query: str) -> Any:
        calls.append(path)
        if path == "/refused":
            raise ValueError("refused")
        return None if path == "/nowhere" else (path, query)

    memo = Destinations(resolve, size=3)
    for path in ("/a", "/b", "/c", "/a", "/d"):  # "/d" pushes out "/a", the oldest
        assert memo.find(path, "") == (path, "")
    assert len(memo) == 3
    assert calls == ["/a", "/b", "/c", "/d"]
    memo.find("/a", "")  # forgotten: resolved again
    assert calls[-1] == "/a" and len(memo) == 3
    assert memo.find("/a", "x=1") == ("/a", "x=1")  # the query is part of the key
    for _ in range(2):
        assert memo.find("/nowhere", "") is None
        with pytest.raises(ValueError):
            memo.find("/refused", "")
    assert calls.count("/nowhere") == 2 and calls.count("/refused") == 2
    assert len(memo) == 3


def test_request_ids_are_unique_and_keep_their_format_across_batches() -> None:
    # Several batches of ids drawn from the OS, in a context of their own: an id set here must not leak into
    # the tests that run after this one.
    ids = contextvars.copy_context().run(lambda: [new_request_id() for _ in range(2000)])
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"req_[0-9a-f]{32}", i) for i in ids)
