"""A proxied path reaches exactly the endpoint it was classified as, or nothing; its query arrives intact.

Method: request lines are written to a raw socket as they are (HTTP clients normalise paths), to a gateway
with an OpenAI route at the upstream's root, one whose upstream has a base path, and a compute route. What
counts is what the mock upstream saw: every request line it received, with its raw path and raw query
(``SEEN``), whatever the path. A refused request must leave that list, the customer's balance, ledger and
usage exactly as they were. A property test sends paths built from encoded and plain separators, dot
segments and unicode, and checks each one either reached the upstream at the very path it was classified on,
or was refused.
"""

from __future__ import annotations

import asyncio
import json
import socket
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from metergate.demo.mock_upstream import SEEN
from tests.conftest import ADMIN_KEY, PROVIDER_KEY, Gateway, Upstream, start_gateway

CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
EMBED_BODY = {"model": "text-embedding-3-small", "input": "hello"}
COMPLETION_BODY = {"model": "gpt-4o-mini", "prompt": "hello", "max_tokens": 5}
AS_ACME = {"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"}
METERED_SUFFIXES = ("/chat/completions", "/completions", "/embeddings", "/responses")


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'paths.db'}", routes=[
        {"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY},
        {"prefix": "/based", "upstream": f"{upstream.url}/v1", "api_key": PROVIDER_KEY},
        {"prefix": "/gpu", "upstream": f"{upstream.url}/compute", "provider": "compute", "api_key": PROVIDER_KEY,
         "compute": {"asset": "USD", "meter": "request", "unit_price": "0.001"}}])
    await gateway.customer("acme", funds=10_000_000)
    yield gateway
    await gateway.close()
    await runner.cleanup()


def http(port: int, method: str, target: str, headers: dict[str, str] | None = None,
         body: bytes = b"") -> tuple[int, bytes]:
    """One request written to a socket byte for byte; the status and the (de-chunked) body of the answer."""
    head = f"{method} {target} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n".encode()
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n".encode()
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    raw_head, _, payload = data.partition(b"\r\n\r\n")
    status = int(raw_head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in raw_head.lower():
        out = b""
        while payload:
            size_line, _, payload = payload.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, payload = out + payload[:size], payload[size + 2:]
        payload = out
    return status, payload


def post(gw: Gateway, target: str, body: dict[str, Any] = CHAT_BODY,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    return http(gw.settings.port, "POST", target, {**AS_ACME, "Content-Type": "application/json", **(headers or {})},
                json.dumps(body).encode())


def admin_get(gw: Gateway, path: str) -> Any:
    status, body = http(gw.settings.port, "GET", f"/admin/v1{path}", {"Authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 200, body
    return json.loads(body)


def wallet_state(gw: Gateway) -> tuple[Any, ...]:
    """Balance, newest ledger entry and newest usage record: all three stay put when a request is refused."""
    return (admin_get(gw, "/customers/acme/balance")["balances"],
            admin_get(gw, "/customers/acme/ledger?limit=1")["data"],
            admin_get(gw, "/customers/acme/usage?limit=1")["data"])


def seen(gw: Gateway) -> list[dict[str, Any]]:
    return gw.upstream.app[SEEN]


def assert_refused(gw: Gateway, target: str, status: int, code: str, **kwargs: Any) -> None:
    before, seen_before = wallet_state(gw), len(seen(gw))
    got, body = post(gw, target, **kwargs)
    assert got == status, body
    error = json.loads(body)["error"]
    assert error["code"] == code, error
    assert len(seen(gw)) == seen_before  # the upstream received nothing at all
    assert wallet_state(gw) == before


# ------------------------------------------------------------------------------- refused paths (issue item 1)

REFUSED_PATHS = [
    # --- an encoded separator inside a segment: the reported cases, then each separator
    "/openai/v1/images/generations%3Fx=/completions",
    "/openai/v1/images/generations%3fx=/chat/completions",
    "/openai/v1/images/generations%23/chat/completions",
    "/openai/v1/images%2Fgenerations/chat/completions",
    "/openai/v1/images%2f..%2f..%2fadmin/chat/completions",
    "/openai/v1/images%5Cgenerations/chat/completions",
    "/openai/v1/images\\generations/chat/completions",
    # --- dot segments, plain, encoded, or with a ';' parameter some servers strip
    "/openai/v1/../../admin/v1/chat/completions",
    "/openai/../admin/v1/chat/completions",
    "/openai/v1/./chat/completions",
    "/openai/v1/%2e%2e/admin/chat/completions",
    "/openai/v1/.%2E/admin/chat/completions",
    "/openai/v1/%2e/chat/completions",
    "/openai/v1/..;/admin/chat/completions",
    "/based/../admin/chat/completions",
    "/gpu/%2e%2e/v1/chat/completions",
    "/openai/v1/%EF%BC%8E%EF%BC%8E/admin/chat/completions",  # fullwidth "．．", ".." once NFKC-folded
    "/openai/v1/images%EF%BC%8Fgenerations/chat/completions",  # fullwidth solidus
    # --- segments that do not decode to one plain string
    "/openai//v1/chat/completions",
    "/openai/v1/%ff/chat/completions",
    "/openai/v1/%c0%ae%c0%ae/chat/completions",
    "/openai/v1/%zz/chat/completions",
    "/openai/v1/%/chat/completions",
    "/openai/v1/%00/chat/completions",
    "/openai/v1/%0d%0aX-Injected:%201/chat/completions",
    "/openai/v1/a\"b/chat/completions",
]


@pytest.mark.parametrize("target", REFUSED_PATHS)
async def test_a_path_that_could_mean_another_path_is_refused_and_changes_nothing(gw: Gateway, target: str) -> None:
    await asyncio.to_thread(assert_refused, gw, target, 400, "invalid_path")


async def test_the_reported_path_is_not_charged_as_completions(gw: Gateway) -> None:
    status, body = await asyncio.to_thread(post, gw, "/openai/v1/images/generations%3Fx=/completions",
                                           COMPLETION_BODY)
    assert (status, json.loads(body)["error"]["code"]) == (400, "invalid_path")
    assert not [s for s in seen(gw) if "images" in s["raw_path"]]
    assert await gw.usage() == []


@pytest.mark.parametrize(("target", "upstream_path", "upstream_query"), [
    ("/openai/v1/chat/completions", "/v1/chat/completions", ""),
    ("/based/chat/completions", "/v1/chat/completions", ""),  # the route's base path, then the request's
    ("/openai/v1/%63hat/completions", "/v1/chat/completions", ""),  # an escape of a plain letter is the letter
    ("/gpu/run?units=2", "/compute/run", "units=2"),
])
async def test_a_plain_path_reaches_the_upstream_under_the_routes_base(gw: Gateway, target: str, upstream_path: str,
                                                                       upstream_query: str) -> None:
    status, body = await asyncio.to_thread(post, gw, target)
    assert status == 200, body
    assert (seen(gw)[-1]["method"], seen(gw)[-1]["raw_path"], seen(gw)[-1]["query_string"]) == (
        "POST", upstream_path, upstream_query)
    assert seen(gw)[-1]["headers"]["Authorization"] == f"Bearer {PROVIDER_KEY}"


# ------------------------------------------------------------------------------- the query string

async def test_the_query_string_reaches_the_upstream_on_a_metered_route(gw: Gateway) -> None:
    status, body = await asyncio.to_thread(post, gw, "/openai/v1/chat/completions?api-version=2024-10-21&beta=true")
    assert status == 200, body
    assert (seen(gw)[-1]["raw_path"], seen(gw)[-1]["query_string"]) == (
        "/v1/chat/completions", "api-version=2024-10-21&beta=true")
    [record] = await gw.usage()
    assert (record["endpoint"], record["status_code"]) == ("chat.completions", 200)


async def test_a_hostile_query_is_re_encoded_pair_for_pair_and_injects_nothing(gw: Gateway) -> None:
    query = "a=%0D%0AX-Injected:%201&b=%23frag&c=..%2F..%2Fadmin&d=%C3%BC+x&e&f=/v1/../x?y"
    status, body = await asyncio.to_thread(post, gw, f"/openai/v1/chat/completions?{query}")
    assert status == 200, body
    arrived = seen(gw)[-1]
    assert arrived["raw_path"] == "/v1/chat/completions"
    assert parse_qsl(arrived["query_string"], keep_blank_values=True) == parse_qsl(query, keep_blank_values=True)
    assert not any(c in arrived["query_string"] for c in "#\r\n ")
    assert "X-Injected" not in arrived["headers"]


async def test_a_query_that_does_not_parse_is_refused_and_changes_nothing(gw: Gateway) -> None:
    await asyncio.to_thread(assert_refused, gw, "/openai/v1/chat/completions?a=%ff", 400, "invalid_query")


# ------------------------------------------------------------------------------- the property

JUNK = st.lists(st.sampled_from([
    "v1", "admin", "images", "generations", "chat", "completions", "x", "", ".", "..", "%2e", "%2E%2e", ".%2e",
    "..;", ";", "%2F", "%2f", "%3F", "%3f", "%23", "%5C", "%5c", "\\", "?", "#", "=", "x=1", "&", "%C3%BC",
    "%E2%80%AE", "%EF%BC%8E", "%EF%BC%8F", "é", "%ff", "%", "%0a", "%00", "~", "%7E", "@", ":", "%20", "+",
]), min_size=1, max_size=3).map("".join)
ENDPOINTS = st.sampled_from([("chat", "completions"), ("completions",), ("embeddings",), ("responses",), ()])
BODIES = {("chat", "completions"): CHAT_BODY, ("completions",): COMPLETION_BODY, ("embeddings",): EMBED_BODY,
          ("responses",): {"model": "gpt-4o-mini", "input": "hello", "max_output_tokens": 5}, (): CHAT_BODY}


def _decoded_segments(raw_path: str) -> list[str]:
    return [unquote(segment, errors="strict") for segment in raw_path.split("/")[1:]]


def check_path(gw: Gateway, outcomes: list[str], junk: list[str], endpoint: tuple[str, ...], query: str) -> None:
    target = "/openai/" + "/".join([*junk, *endpoint]) + (f"?{query}" if query else "")
    before, seen_before = wallet_state(gw), len(seen(gw))
    status, body = post(gw, target, BODIES[endpoint])
    arrived = seen(gw)[seen_before:]
    if not arrived:  # refused: an error in the envelope, and nothing changed
        assert status >= 400, (target, body)
        assert isinstance(json.loads(body)["error"]["code"], str)
        assert wallet_state(gw) == before
        outcomes.append("refused")
        return
    [upstream] = arrived
    # What the upstream saw is the request's own path, under the route's base (the root here), decoded alike...
    requested = target.removeprefix("/openai").split("?", 1)[0].split("#", 1)[0]
    assert unquote(upstream["raw_path"]) == unquote(requested), (target, upstream)
    # ...made of plain segments only...
    for segment in _decoded_segments(upstream["raw_path"]):
        for form in (segment, unicodedata.normalize("NFKC", segment)):
            assert not set(form) & set("/?#\\"), (target, upstream)
            assert form.split(";", 1)[0] not in (".", ".."), (target, upstream)
    # ...ending in the metered endpoint it was classified as, with the query's pairs unchanged.
    assert upstream["raw_path"].endswith(METERED_SUFFIXES), (target, upstream)
    sent_query = target.split("?", 1)[1].split("#", 1)[0] if "?" in target.split("#", 1)[0] else ""
    assert parse_qsl(upstream["query_string"], keep_blank_values=True) == parse_qsl(sent_query,
                                                                                    keep_blank_values=True)
    assert upstream["method"] == "POST" and upstream["headers"]["Authorization"] == f"Bearer {PROVIDER_KEY}"
    outcomes.append("reached" if status == 200 else f"upstream {status}")


async def test_random_paths_reach_exactly_their_classified_endpoint_or_are_refused(gw: Gateway) -> None:
    outcomes: list[str] = []

    @settings(max_examples=150, deadline=None, database=None)
    @given(junk=st.lists(JUNK, max_size=4), endpoint=ENDPOINTS,
           query=st.sampled_from(["", "api-version=2024-10-21", "a=%2F..%2F&b", "x=%ff", "q=%23%0a"]))
    @example(junk=[], endpoint=("chat", "completions"), query="")
    @example(junk=["v1"], endpoint=("embeddings",), query="api-version=1")
    @example(junk=["v1", "images", "generations%3Fx="], endpoint=("completions",), query="")
    @example(junk=["v1", "..", ".."], endpoint=("chat", "completions"), query="")
    @example(junk=["v1", "%C3%BC"], endpoint=("chat", "completions"), query="")
    def prop(junk: list[str], endpoint: tuple[str, ...], query: str) -> None:
        check_path(gw, outcomes, junk, endpoint, query)

    await asyncio.to_thread(prop)
    # Both sides of the property were exercised.
    assert "reached" in outcomes and "refused" in outcomes
