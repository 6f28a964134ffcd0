"""Check the OpenTelemetry spans of proxied requests: their tree, their GenAI and metergate attributes, the
trace context the upstream receives and the absence of prompt text; the wallet's group commits as batch spans
linked to the requests' spans, on SQLite and PostgreSQL; and that with tracing off metergate serves without
importing OpenTelemetry at all.

Method: the real app, served on loopback in front of the mock upstream, traced through the seam
``build_app(..., tracer_provider=...)`` into an SDK ``TracerProvider`` with an ``InMemorySpanExporter``; the
client is the official ``openai`` SDK sending its own W3C ``traceparent``, as an instrumented app would.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from metergate.config.settings import load_settings
from metergate.observability import ledger_batches
from metergate.observability.tracing import enabled
from metergate.proxy.adapters import openai as oa
from metergate.proxy.app import build_app
from tests.conftest import (
    ADMIN_KEY,
    DEFAULT_PRICING,
    PROVIDER_KEY,
    Gateway,
    Upstream,
    _reset_pg,
    free_port,
    serve,
)

MODEL = "gpt-4o-mini"
PROMPT = "Summarise the quarterly numbers of Project Marmalade-7781 for the board"
SYSTEM = "You are the confidential assistant of Aurelia Quince"
CUSTOMER = "cust-aurelia-quince"
APP_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN_ID = "00f067aa0ba902b7"
APP_TRACEPARENT = f"00-{APP_TRACE_ID}-{APP_SPAN_ID}-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    yield InMemorySpanExporter()


@asynccontextmanager
async def traced_gateway(upstream: Upstream, database_url: str,
                         exporter: InMemorySpanExporter) -> AsyncIterator[Gateway]:
    """metergate traced into ``exporter``, in front of the mock upstream (as conftest's ``gateway``)."""
    import httpx2 as httpx

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    port = free_port()
    settings = load_settings(
        port=port, database_url=database_url,
        routes=[{"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY}],
        pricing=DEFAULT_PRICING, admin_keys=[ADMIN_KEY], portal_secrets={"k1": secrets.token_urlsafe(32)},
        upstream_timeout_s=30)
    url = f"http://127.0.0.1:{port}"
    app = build_app(settings, public_url=url, tracer_provider=provider)
    runner, _ = await serve(app, port)
    admin = httpx.AsyncClient(base_url=f"{url}/admin/v1", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                              timeout=30)
    gateway = Gateway(url, settings, app, upstream, admin, [])
    yield gateway
    await gateway.close()
    await runner.cleanup()
    provider.shutdown()


@pytest.fixture
async def traced(upstream: Upstream, tmp_path: Path, exporter: InMemorySpanExporter) -> AsyncIterator[Gateway]:
    async with traced_gateway(upstream, f"sqlite:///{tmp_path / 'gateway.db'}", exporter) as gateway:
        yield gateway


@pytest.fixture
async def traced_store(upstream: Upstream, store_url: str, exporter: InMemorySpanExporter) -> AsyncIterator[Gateway]:
    """As ``traced``, on each wallet backend (SQLite's writer thread, PostgreSQL's group commit)."""
    if store_url.startswith("postgresql"):
        await _reset_pg(store_url)
    async with traced_gateway(upstream, store_url, exporter) as gateway:
        yield gateway


def in_trace(spans: tuple[ReadableSpan, ...], trace_id: int) -> tuple[ReadableSpan, ...]:
    return tuple(s for s in spans if s.context.trace_id == trace_id)


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    matching = [s for s in spans if s.name == name]
    assert len(matching) == 1, [s.name for s in spans]
    return matching[0]


def every_attribute_value(span: ReadableSpan) -> Iterator[str]:
    sources: list[Any] = [span.attributes or {}, span.resource.attributes]
    sources += [event.attributes or {} for event in span.events]
    sources += [link.attributes or {} for link in span.links]
    for attributes in sources:
        for key, value in attributes.items():
            yield key
            yield from (str(v) for v in value) if isinstance(value, tuple) else (str(value),)


async def test_streamed_request_is_one_server_span_with_hold_upstream_and_settle_children(
        traced: Gateway, exporter: InMemorySpanExporter) -> None:
    await traced.customer(CUSTOMER)
    client = traced.openai(CUSTOMER, headers={"traceparent": APP_TRACEPARENT})
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=50, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        extra_headers={"X-Mock-Behavior": "words:12"}, extra_query={"trace": "query-not-recorded"})
    text = ""
    async for chunk in raw.parse():
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    request_id = raw.headers["X-Metergate-Request-Id"]
    [record] = [r for r in await traced.usage(CUSTOMER) if r["id"] == request_id]

    spans = in_trace(exporter.get_finished_spans(), int(APP_TRACE_ID, 16))  # the ledger's batches have their own
    server = by_name(spans, "POST /openai")
    hold, settle = by_name(spans, "metergate.hold"), by_name(spans, "metergate.settle")
    client_span = by_name(spans, f"chat {MODEL}")
    assert len(spans) == 4, [s.name for s in spans]  # one stream, no mid-stream extension: nothing else

    # The tree: the app's span → metergate's server span → hold, upstream call, settlement; one trace.
    assert server.kind is SpanKind.SERVER and server.parent is not None
    assert (format(server.context.trace_id, "032x"), format(server.parent.span_id, "016x")) == (
        APP_TRACE_ID, APP_SPAN_ID)
    assert server.parent.is_remote
    for child, kind in ((hold, SpanKind.INTERNAL), (client_span, SpanKind.CLIENT), (settle, SpanKind.INTERNAL)):
        assert child.kind is kind
        assert child.parent is not None and child.parent.span_id == server.context.span_id, child.name
        assert child.context.trace_id == server.context.trace_id
    assert hold.end_time <= client_span.start_time <= client_span.end_time <= settle.end_time <= server.end_time

    # The upstream's parent is the CLIENT span, and the app's own traceparent did not get through.
    [sent] = traced.upstream.requests
    assert sent["headers"]["traceparent"] == (
        f"00-{APP_TRACE_ID}-{format(client_span.context.span_id, '016x')}-01")
    assert [k for k, _ in sent["header_list"]].count("traceparent") == 1

    estimate = oa.prepare(oa.CHAT, json.dumps(sent["body"]).encode(), sent["body"], 0)  # what metergate held for
    assert server.attributes is not None
    assert dict(server.attributes) == {
        "http.request.method": "POST", "url.path": "/openai/v1/chat/completions", "url.scheme": "http",
        "http.route": "/openai", "http.response.status_code": 200,
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.system": "openai",
        "gen_ai.request.model": MODEL, "gen_ai.request.max_tokens": 50,
        "gen_ai.response.model": MODEL, "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": record["tokens_input"], "gen_ai.usage.output_tokens": record["tokens_output"],
        "metergate.request_id": request_id, "metergate.endpoint": "chat.completions", "metergate.stream": True,
        "metergate.estimated_input_tokens": estimate.input_tokens, "metergate.mode": "test",
        "metergate.hold.amount": record["detail"]["hold"], "metergate.asset": "USD",
        "metergate.usage_source": "provider", "metergate.settled": True, "metergate.charged": record["price_amount"],
    }
    assert record["tokens_output"] > 0 and record["price_amount"] > 0
    assert client_span.attributes is not None
    assert dict(client_span.attributes) == {
        "http.request.method": "POST", "server.address": "127.0.0.1",
        "server.port": int(traced.upstream.url.rsplit(":", 1)[1]),
        "url.full": f"{traced.upstream.url}/v1/chat/completions", "http.response.status_code": 200,
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.system": "openai",
        "gen_ai.request.model": MODEL, "gen_ai.response.model": MODEL}
    assert dict(settle.attributes or {}) == {"metergate.charged": record["price_amount"]}
    assert all(s.status.status_code is StatusCode.UNSET for s in spans)

    # No prompt, completion, customer or key in any attribute of any span.
    assert text
    for span in spans:
        for value in every_attribute_value(span):
            for secret in (PROMPT, "Marmalade", SYSTEM, "Quince", text, CUSTOMER, PROVIDER_KEY, "query-not-recorded"):
                assert secret not in value, (span.name, value)


async def test_refused_request_is_a_402_server_span_with_a_failed_hold(
        traced: Gateway, exporter: InMemorySpanExporter) -> None:
    await traced.customer(CUSTOMER, funds=1)
    with pytest.raises(openai.APIStatusError) as refused:
        await traced.openai(CUSTOMER).chat.completions.create(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": PROMPT}])
    assert refused.value.status_code == 402
    spans = exporter.get_finished_spans()
    server, hold = by_name(spans, "POST /openai"), by_name(spans, "metergate.hold")
    spans = in_trace(spans, server.context.trace_id)
    assert sorted(s.name for s in spans) == ["POST /openai", "metergate.hold"]  # nothing went upstream
    assert server.parent is None  # no traceparent from the app: metergate's span is the root
    assert server.attributes is not None
    assert (server.attributes["http.response.status_code"], server.attributes["metergate.error_code"]) == (
        402, "insufficient_funds")
    assert server.status.status_code is StatusCode.UNSET  # a refusal is the client's, not a server error
    assert hold.status.status_code is StatusCode.ERROR
    assert hold.parent is not None and hold.parent.span_id == server.context.span_id
    assert traced.upstream.requests == []


async def test_each_ledger_batch_is_a_span_linked_to_the_spans_its_operations_were_submitted_from(
        traced_store: Gateway, exporter: InMemorySpanExporter) -> None:
    await traced_store.customer(CUSTOMER)
    client = traced_store.openai(CUSTOMER)

    async def stream() -> str:
        chunks = await client.chat.completions.create(
            model=MODEL, max_tokens=50, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": PROMPT}], extra_headers={"X-Mock-Behavior": "words:12"})
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    texts = await asyncio.gather(*(stream() for _ in range(4)))  # concurrent: batches may carry several
    assert all(texts)
    spans = exporter.get_finished_spans()
    batches = [s for s in spans if s.name == "metergate.ledger.batch"]
    holds = [s for s in spans if s.name == "metergate.hold"]
    settles = [s for s in spans if s.name == "metergate.settle"]
    assert len(holds) == len(settles) == 4 and batches
    backend = "sqlite" if traced_store.settings.database_url.startswith("sqlite") else "postgresql"

    # Every request's hold and settlement was written by exactly one batch, which links to it; no link
    # points anywhere else.
    linked: dict[int, list[ReadableSpan]] = {}
    for batch in batches:
        for link in batch.links:
            linked.setdefault(link.context.span_id, []).append(batch)
    assert sorted(linked) == sorted(s.context.span_id for s in (*holds, *settles))
    for request_span in (*holds, *settles):
        [batch] = linked[request_span.context.span_id]
        [link] = [lk for lk in batch.links if lk.context.span_id == request_span.context.span_id]
        assert link.context.trace_id == request_span.context.trace_id and not link.attributes
        # The batch was written while its operation's caller waited for it.
        assert request_span.start_time <= batch.start_time <= batch.end_time <= request_span.end_time

    for batch in batches:
        assert batch.parent is None and batch.kind is SpanKind.CLIENT  # a trace of its own
        assert batch.context.trace_id not in {s.context.trace_id for s in holds}
        attributes = dict(batch.attributes or {})
        assert attributes.pop("metergate.ledger.batch.duration_ms") >= 0
        assert attributes["metergate.ledger.batch.size"] >= len(batch.links)
        assert attributes == {"db.system.name": backend, "metergate.ledger.batch.backend": backend,
                              "metergate.ledger.batch.size": attributes["metergate.ledger.batch.size"]}
        assert batch.status.status_code is StatusCode.UNSET


async def test_ledger_batches_are_traced_only_while_a_traced_app_runs(
        upstream: Upstream, tmp_path: Path, exporter: InMemorySpanExporter, gateway: Gateway) -> None:
    assert not ledger_batches.installed()  # the untraced gateway installs nothing
    async with traced_gateway(upstream, f"sqlite:///{tmp_path / 'traced.db'}", exporter):
        assert ledger_batches.installed()
    assert not ledger_batches.installed()
    assert ledger_batches.link() is None


async def test_untraced_gateway_forwards_the_apps_traceparent_untouched(gateway: Gateway) -> None:
    await gateway.customer()
    await gateway.openai(headers={"traceparent": APP_TRACEPARENT}).chat.completions.create(
        model=MODEL, max_tokens=20, messages=[{"role": "user", "content": PROMPT}])
    [sent] = gateway.upstream.requests
    assert sent["headers"]["traceparent"] == APP_TRACEPARENT


@pytest.mark.parametrize(("mode", "environ", "on"), [
    # The setting alone.
    ("off", {}, False),
    ("otlp", {}, True),
    ("auto", {}, False),  # off by default, although the OTel spec's default exporter is otlp
    # auto follows OTEL_TRACES_EXPORTER.
    ("auto", {"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ("auto", {"OTEL_TRACES_EXPORTER": "console, OTLP"}, True),
    ("auto", {"OTEL_TRACES_EXPORTER": "none"}, False),
    ("auto", {"OTEL_TRACES_EXPORTER": "zipkin"}, False),
    ("off", {"OTEL_TRACES_EXPORTER": "otlp"}, False),
    # OTEL_SDK_DISABLED wins over everything.
    ("otlp", {"OTEL_SDK_DISABLED": "true"}, False),
    ("auto", {"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ("otlp", {"OTEL_SDK_DISABLED": "false"}, True),
])
def test_tracing_is_on_only_when_the_setting_or_otel_traces_exporter_says_so(
        mode: Any, environ: dict[str, str], on: bool) -> None:
    assert enabled(mode, environ) is on


_SERVE_WITHOUT_OTEL = textwrap.dedent("""
    import asyncio, importlib.abc, sys

    class NoOpenTelemetry(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "opentelemetry":
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, NoOpenTelemetry())
    from tests.conftest import Upstream, serve, start_gateway
    from metergate.demo.mock_upstream import build_mock_upstream

    async def main():
        app = build_mock_upstream()
        runner, port = await serve(app)
        gateway, gw_runner = await start_gateway(Upstream(f"http://127.0.0.1:{port}", app),
                                                 sys.argv[1], tracing=sys.argv[2])
        await gateway.customer()
        stream = await gateway.openai().chat.completions.create(
            model="gpt-4o-mini", max_tokens=20, stream=True, messages=[{"role": "user", "content": "hi"}])
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await gateway.close()
        await gw_runner.cleanup()
        await runner.cleanup()
        print("served", bool(text), sorted(m for m in sys.modules if m.startswith("opentelemetry")))

    asyncio.run(main())
""")


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_tracing_off_serves_a_stream_with_opentelemetry_not_importable(tmp_path: Path, mode: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _SERVE_WITHOUT_OTEL, f"sqlite:///{tmp_path / 'gw.db'}", mode],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "served True []"


_START_WITHOUT_OTEL = _SERVE_WITHOUT_OTEL.split("from tests.conftest")[0] + textwrap.dedent("""
    from metergate.config.settings import load_settings
    from metergate.proxy.app import build_app
    try:
        build_app(load_settings(database_url=sys.argv[1], tracing=sys.argv[2],
                                routes=[{"prefix": "/openai", "upstream": "http://127.0.0.1:9"}]))
    except RuntimeError as error:
        print(error)
""")


def test_tracing_on_without_the_extra_fails_at_start_naming_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _START_WITHOUT_OTEL, f"sqlite:///{tmp_path / 'gw.db'}", "otlp"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "install metergate[otel]" in done.stdout
