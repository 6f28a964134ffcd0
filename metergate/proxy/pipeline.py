"""The request pipeline: identify → estimate → authorize → forward → meter → settle.

Data flows one way. The hold is placed before a single byte goes upstream; from then on, every path
out of :meth:`Pipeline.handle` — success, upstream error, timeout, client disconnect, cancellation —
passes through exactly one settlement, which captures what was delivered and releases the rest. A
settlement is shielded from cancellation and retried on storage errors; if it still fails, the hold
expires after ``hold_ttl_s`` and the expiry is written to the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from metergate.budgets.admission import NODE_HEADER, BudgetGuard, Ticket
from metergate.budgets.denials import BudgetExceeded
from metergate.budgets.model import ROOT
from metergate.config.routes import RouteMatch, RouteTable
from metergate.config.settings import Settings
from metergate.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    MetergateError,
    NotFound,
    PayloadTooLarge,
    PaymentRequired,
    UnsupportedMediaType,
)
from metergate.http import ERROR_ENVELOPE, json_response
from metergate.metering.costs import ProviderCosts
from metergate.metering.tokenizer import counter_for
from metergate.metering.usage import Usage
from metergate.money import format_minor
from metergate.observability import tracing
from metergate.observability.logs import current_request_id, new_request_id
from metergate.observability.metrics import Metrics
from metergate.payments.spendcaps import SpendCapGuard, SpendCapReached
from metergate.portal.links import LinkSigner
from metergate.pricing.service import PricingService, Resolved
from metergate.proxy import headers as hh
from metergate.proxy.adapters.base import Adapter, Prepared, SignsUpstream, StreamMeter, adapter_for
from metergate.proxy.assemble import Assembler
from metergate.proxy.bounding import HoldPlan, plan_hold
from metergate.proxy.budget import StreamBudget
from metergate.proxy.dispatch import Destination, Destinations
from metergate.proxy.identify import Identifier, Identity
from metergate.proxy.methods import check_method
from metergate.proxy.passthrough import FreeEndpoints
from metergate.proxy.prompt_size import prepare_bounded
from metergate.proxy.ratelimit import RateLimiter
from metergate.proxy.settlement import Settler
from metergate.proxy.spool import SettlementSpool
from metergate.proxy.sse import EventTooLarge, SSEBuffer, event_data
from metergate.proxy.upstream_body import read_limited
from metergate.wallet.errors import InsufficientFunds
from metergate.wallet.models import Balance, Hold, Mode, Settlement, UsageRecord, stored_text
from metergate.wallet.store import HoldPath, WalletStore

log = logging.getLogger(__name__)
_CLIENT_GONE = (ConnectionResetError, ConnectionError, aiohttp.ClientConnectionResetError)
_WATCH_S = 1.0  # how often a stream's watchdog looks for a client that hung up while the upstream is quiet
_CUT_GRACE_S = 5.0  # after cutting at the drain deadline, how long the cut exchanges get to settle
_ANOMALY_CHARS = 200  # each usage anomaly a record keeps (a field name and a shortened value)


# How a stream that did not end as the provider meant says so, in its provider's error event
# (:meth:`metergate.proxy.adapters.base.StreamMeter.error_event`): the client knows its answer is incomplete.
_CUT = ("shutting_down", "metergate is shutting down: this stream was cut at the drain deadline; what was "
                         "delivered is billed.", 503)
_BROKEN = ("upstream_stream_broken", "The upstream stream broke off before its end; what was delivered is billed.",
           502)


@dataclass(slots=True)
class Exchange:
    """Everything known about one metered request, built up as it moves through the pipeline."""

    request_id: str
    identity: Identity
    match: RouteMatch
    adapter: Adapter
    prepared: Prepared
    rate: Resolved  # the price version and rule in force when the request started
    hold: Hold
    feature: str | None
    started: float
    status: int = 0
    delivered: bool = False  # some upstream output reached (or was meant for) the client
    meter: StreamMeter | None = None  # a stream's meter, so that any way out can bill what it saw
    settlement: asyncio.Task[Settlement | None] | None = None
    upstream: aiohttp.ClientResponse | None = None  # the answer being relayed, so that a shutdown can cut it
    upstream_latency_s: float | None = None  # from forwarding until the upstream's response headers
    first_token_s: float | None = None  # a stream's first content event, counted from the hold
    cut: bool = False  # cut at the shutdown deadline
    stopped: str | None = None  # why metergate ended the answer early (``insufficient_funds``, ``client_left``)
    client_left_at: float | None = None  # when the stream watchdog saw the client's connection close
    covered_tokens: int = 0  # output tokens the hold covered when it was placed
    bounded: bool = True  # the upstream cannot outgrow the hold (or enforcement is off): no budget needed
    output_limit: int | None = None  # the output limit metergate set upstream (an upstream that cannot stream)
    assembler: Assembler | None = None  # a non-streaming request streamed internally: builds its one body
    budget: Ticket | None = None  # the budget path it was admitted along (metergate.budgets)
    budget_refusal: BudgetExceeded | None = None  # a node's limit, not the wallet, stopped the answer
    cap_refusal: SpendCapReached | None = None  # the customer's own spend cap, not the wallet, stopped it
    upstream_url: URL | None = None  # where it is forwarded, when known already (else from ``match``)


class Pipeline:
    def __init__(self, settings: Settings, store: WalletStore, identifier: Identifier, prices: PricingService,
                 costs: ProviderCosts, signer: LinkSigner, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._active: dict[str, tuple[Exchange, asyncio.Future[Any]]] = {}  # exchanges being served, by id
        self.store = store
        self.holds: HoldPath = store  # the hot path: the store, or escrow leases in front of it (app.py)
        spool = SettlementSpool(settings.settlement_spool_dir) if settings.settlement_spool_dir else None
        self.settler = Settler(store, max_backlog=settings.settlement_backlog_max, metrics=self.metrics, spool=spool)
        self.identifier = identifier
        self.prices = prices
        self.costs = costs
        self.signer = signer
        self.routes = RouteTable(settings.routes)
        self._google_errors = any(route.provider == "gemini" for route in settings.routes)
        self._adapters = {route.prefix: adapter_for(route.provider, charge_failed=route.charge_failed_replies,
                                                    media=settings.media, deployments=route.deployments,
                                                    upstream=route.upstream, bedrock=route.bedrock)
                          for route in settings.routes if route.compute is None}
        # Protocol checks at runtime are slow: whether an adapter signs its upstream requests is asked once.
        self._signs = {prefix: isinstance(adapter, SignsUpstream) for prefix, adapter in self._adapters.items()}
        # Routes whose clients are AWS SDKs: their errors are also in AWS's shape (metergate.http).
        self._aws_prefixes = tuple(route.prefix + "/" for route in settings.routes if route.provider == "bedrock")
        from metergate.proxy.compute import ComputeRelay

        self.compute = ComputeRelay(self)
        from metergate.proxy import realtime

        self.realtime, self._realtime_serves = realtime.RealtimeRelay(self), realtime.serves
        self.free = FreeEndpoints(self)
        from metergate.proxy.media import MediaRelay

        self.media = MediaRelay(self)  # audio and image endpoints, billed per second, character or image
        self._destinations = Destinations(self._destination)
        # metergate's own request headers, never forwarded upstream
        self._header_drop = frozenset((settings.customer_header, settings.mode_header, settings.attribution_header))
        # Optional collaborators wired by the app: customer spend caps checked before every hold, and a
        # hook run after every settlement (auto top-up). Neither may fail a request it has not refused.
        self.spend_caps: SpendCapGuard | None = None
        self.on_settled: Callable[[Mode, str, str, Balance], Awaitable[None]] | None = None
        self.on_budget_settled: Callable[[Mode, str], None] | None = None  # budget alerts: no I/O in it
        self.session: aiohttp.ClientSession | None = None
        self._scale = settings.asset(prices.asset).scale
        self._inflight: set[asyncio.Future[Any]] = set()
        self.ratelimiter = RateLimiter(settings.rate_limits, store)
        self.budgets = BudgetGuard(store, cache_ttl_s=settings.key_cache_ttl_s)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        s = self.settings
        self.settler.open()  # bills a stopped process left in the spool join the backlog
        await self.ratelimiter.start()
        await self.budgets.start()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=s.upstream_timeout_s, connect=s.upstream_connect_timeout_s,
                                          sock_read=s.upstream_read_timeout_s),
            auto_decompress=True, trust_env=False, skip_auto_headers=("User-Agent",),
            # One session serves every customer: a cookie an upstream sets on one answer must never ride along
            # on another customer's request (a client's own Cookie header is forwarded as it came).
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def stop(self) -> None:
        await self.ratelimiter.stop()
        await self.budgets.stop()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self.settler.flush(self.settings.drain_deadline_s)  # the bills the store did not take yet
        if self.session is not None:
            await self.session.close()

    async def drain(self, deadline_s: float) -> None:
        """Shutting down: requests and Realtime sessions (:meth:`RealtimeRelay.drain`) drain side by side."""
        await asyncio.gather(self._drain_exchanges(deadline_s), self.realtime.drain(deadline_s))

    async def _drain_exchanges(self, deadline_s: float) -> None:
        """Let the exchanges in flight finish for up to ``deadline_s``, then cut the rest.

        A cut stream stops reading its upstream, settles what it delivered and ends with an ``error`` event
        (code ``shutting_down``) so that its client knows the answer is incomplete; an exchange still
        waiting for its upstream is cancelled, which releases its hold. :meth:`stop` awaits the settlements.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        while self._active and (remaining := deadline - loop.time()) > 0:
            log.info("draining: %d request(s) in flight, %.1fs left", len(self._active), remaining)
            await asyncio.wait([task for _, task in self._active.values()], timeout=remaining)
        if not self._active:
            return
        log.warning("drain deadline reached: cutting %d request(s) still in flight", len(self._active))
        for ex, task in list(self._active.values()):
            ex.cut = True
            if ex.upstream is not None:
                ex.upstream.close()  # the relay sees the upstream end, settles and ends its answer
            else:
                task.cancel()
        await asyncio.wait([task for _, task in self._active.values()], timeout=_CUT_GRACE_S)

    # ------------------------------------------------------------------ the pipeline

    def _destination(self, raw_path: str, raw_query: str) -> Destination | None:
        """Which handler serves a path (:mod:`metergate.proxy.dispatch`); raises the refusal of a path no handler
        serves (400 for a path or query that does not parse, 404 for an endpoint the route does not serve)."""
        match = self.routes.match(raw_path, raw_query)
        if match is None:
            return None
        if match.route.compute is not None:
            return Destination(match, "compute")
        if self._realtime_serves(match):
            return Destination(match, "realtime")
        if (free := self.free.find(match)) is not None:
            return Destination(match, "free", free=free)
        if (media := self.media.find(match)) is not None:
            return Destination(match, "media", media=media)
        endpoint = self._adapters[match.route.prefix].classify(match.upstream_path)
        if endpoint is None:
            raise NotFound(f"{match.upstream_path} is not a metered endpoint on route {match.route.prefix}.",
                           code="unknown_route")
        return Destination(match, "metered", endpoint=endpoint, upstream_url=match.upstream_url)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request_id = current_request_id() or new_request_id()
        if self._google_errors and self.routes.provider_of(request.rel_url.raw_path) == "gemini":
            request[ERROR_ENVELOPE] = "google"  # this request's errors are answered as Google's APIs answer them
        elif self._aws_prefixes and request.rel_url.raw_path.startswith(self._aws_prefixes):
            request[ERROR_ENVELOPE] = "aws"  # the OpenAI envelope, with AWS's fields for the AWS SDKs
        found = self._destinations.find(request.rel_url.raw_path, request.rel_url.raw_query_string)
        if found is None:
            raise NotFound(f"No route for {request.path}; metergate forwards only configured routes.",
                           code="unknown_route")
        match = found.match
        if found.kind == "compute":
            return await self.compute.handle(request, request_id, match)
        if found.kind == "realtime":  # the Realtime API's WebSocket, billed per response
            return await self.realtime.handle(request, request_id, match)
        if found.free is not None:  # models lists, token counting: unmetered
            return await self.free.handle(request, request_id, match, found.free)
        if found.media is not None:
            return await self.media.handle(request, request_id, match, found.media)
        adapter = self._adapters[match.route.prefix]
        endpoint = found.endpoint
        assert endpoint is not None
        if (options := check_method(request, ("POST", "OPTIONS"), endpoint)) is not None:
            return options
        identity = await self.identifier.identify(request, query_key=match.route.provider == "gemini")
        attributes = self.prices.request_attributes(
            request.headers, identity.attributes if identity.via == "api_key" else None)
        body = await self._read_body(request)
        # A large prompt is priced at its upper bound before it is counted, and never counted on the event loop.
        prepared = await prepare_bounded(self, attributes, identity, match, adapter, endpoint, body, _json_object(body))
        rate = await self.prices.resolve_request(
            identity.mode, identity.customer_id, model=prepared.model, endpoint=prepared.endpoint,
            route=match.route.prefix, provider=match.route.provider_id, attributes=attributes)
        # The budget path (a node header from the app, or the key's node) is checked before anything is counted.
        ticket = await self.budgets.resolve(identity.mode, identity.customer_id, key_id=identity.key_id,
                                            header=request.headers.get(NODE_HEADER),
                                            header_trusted=identity.via == "header", model=prepared.model)
        # Rate limits count the admission estimate, before the hold: a refused request holds nothing.
        await self.ratelimiter.admit(identity, prepared.input_tokens + prepared.max_output_tokens)
        plan = await self._place_hold(identity, request_id, prepared, rate, match, ticket)
        self.metrics.hold_opened()
        ex = Exchange(request_id, identity, match, adapter, plan.prepared, rate, plan.hold,
                      attributes.get("feature"), time.monotonic(), covered_tokens=plan.covered_tokens,
                      bounded=plan.bounded, output_limit=plan.output_limit, assembler=plan.assembler,
                      budget=ticket, upstream_url=found.upstream_url)
        task = asyncio.current_task()
        assert task is not None
        self._active[request_id] = (ex, task)
        try:
            if prepared.stream or ex.assembler is not None:
                return await self._stream(request, ex)
            return await self._unary(request, ex)
        except MetergateError as error:
            ex.status = error.status  # the usage record keeps what the client was answered (502, 504, ...)
            raise
        finally:
            self._active.pop(ex.request_id, None)
            if ex.settlement is None:
                # Any path that did not settle (an exception, a cancellation) releases the hold here,
                # capturing what was delivered if anything was.
                await self._settle_shielded(ex, self._delivered_usage(ex))

    async def _read_body(self, request: web.Request, *, json_only: bool = True) -> bytes:
        limit = self.settings.max_body_bytes_for(request.path) if json_only else self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"The request body exceeds {limit} bytes.")
        if json_only and request.content_type != "application/json":
            raise UnsupportedMediaType("Send the request body as application/json.")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body exceeds {limit} bytes.")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _place_hold(self, identity: Identity, request_id: str, prepared: Prepared, rate: Resolved,
                          match: RouteMatch, ticket: Ticket | None = None) -> HoldPlan:
        """The request's first hold and how its output is bounded (:func:`metergate.proxy.bounding.plan_hold`);
        402 when the wallet cannot cover even the smallest hold it may start with."""
        provider = match.route.provider_id

        def price(output_tokens: int) -> int:
            return self.prices.estimate(rate, Usage(prepared.input_tokens, output_tokens, source="estimated"),
                                        provider, prepared.model)

        async def reserve(amount: int) -> Hold:
            if ticket is None:
                return await self._reserve(identity, request_id, amount, rate.asset)
            # Every node on the path admits the request with this hold, or none does; a hold the wallet then
            # refuses gives it all back, so nothing stays counted for a request that is not served.
            await self.budgets.admit(ticket, tokens=prepared.input_tokens + prepared.max_output_tokens,
                                     spend=amount, asset=rate.asset or self.prices.asset)
            try:
                return await self._reserve(identity, request_id, amount, rate.asset)
            except BaseException:
                self.budgets.give_back(ticket)
                raise

        try:
            with tracing.holding(prepared, match):
                return await plan_hold(prepared, match.route, price=price, reserve=reserve,
                                       initial_output_tokens=self.settings.initial_output_tokens,
                                       extend_tokens=self.settings.stream_extend_tokens)
        except InsufficientFunds as short:
            refusal = self.insufficient(identity, short)
            if ticket is not None:  # the wallet refused: the customer's own node, whatever the path
                refusal.extra.update(node=ROOT, node_path=ticket.path_text)
            raise refusal from None

    async def _authorize(self, identity: Identity, request_id: str, amount: int, asset: str | None = None) -> Hold:
        try:
            return await self._reserve(identity, request_id, amount, asset)
        except InsufficientFunds as short:
            raise self.insufficient(identity, short) from None

    async def _reserve(self, identity: Identity, request_id: str, amount: int, asset: str | None = None) -> Hold:
        """Hold ``amount``; raises ``InsufficientFunds`` or ``SpendCapReached`` (a refusal may be retried
        smaller: every attempt has the same hold id, and a refused one wrote nothing)."""
        asset = asset or self.prices.asset
        self.settler.admit()  # bills the store has not taken yet fill the backlog: take no new ones
        if self.spend_caps is not None:
            await self.spend_caps.admit(identity.mode, identity.customer_id, asset, amount)
        hold, _ = await self.holds.reserve(identity.mode, identity.customer_id, asset, amount,
                                           hold_id="hold_" + request_id[4:], ttl_ms=self.settings.hold_ttl_s * 1000)
        return hold

    def insufficient(self, identity: Identity, short: InsufficientFunds) -> PaymentRequired:
        """The 402 a customer gets when the wallet is short: amounts, and the signed portal link — in the
        body's fields and in the message itself, since many clients (litellm, loggers) keep only the message."""
        scale = self.settings.asset(short.asset).scale
        balance, required = format_minor(short.available, scale), format_minor(short.required, scale)
        portal_url = self.signer.url(identity.mode, identity.customer_id)
        return PaymentRequired(
            f"Insufficient funds: this request needs {required} {short.asset} and the wallet has {balance} "
            f"{short.asset}. Top up at {portal_url}",
            code="insufficient_funds", asset=short.asset, balance=balance, required=required, portal_url=portal_url)

    def _upstream_headers(self, request: web.Request, ex: Exchange) -> CIMultiDict[str]:
        key = ex.match.route.api_key
        auth = ex.adapter.auth_header(key.get_secret_value()) if key is not None else None
        out = hh.upstream_request_headers(
            request.headers, auth=auth,
            drop=self._header_drop)
        out.update(ex.match.route.upstream_headers)
        out["Content-Type"] = ex.prepared.content_type
        return out

    async def _send(self, request: web.Request, ex: Exchange) -> aiohttp.ClientResponse:
        assert self.session is not None
        sent = time.monotonic()
        headers = self._upstream_headers(request, ex)
        url = ex.upstream_url if ex.upstream_url is not None else ex.match.upstream_url
        if self._signs[ex.match.route.prefix]:  # Bedrock: its own path encoding, and a SigV4 signature
            url, headers = cast(SignsUpstream, ex.adapter).upstream_request(ex.match, headers, ex.prepared)
        tracing.forwarding(ex, headers)
        try:
            upstream = await self.session.post(url, data=_upstream_body(ex.prepared.body),
                                               headers=headers, allow_redirects=False)
        except TimeoutError:
            raise GatewayTimeout("The upstream did not answer in time; nothing was charged.") from None
        except aiohttp.ClientError as exc:
            log.warning("upstream %s unreachable: %s", ex.match.route.prefix, type(exc).__name__)
            raise BadGateway("The upstream could not be reached; nothing was charged.") from None
        ex.upstream, ex.upstream_latency_s = upstream, time.monotonic() - sent
        tracing.answered(upstream)
        return upstream

    def _check_redirect(self, upstream: aiohttp.ClientResponse) -> None:
        if 300 <= upstream.status < 400:
            upstream.release()
            raise BadGateway("The upstream answered with a redirect, which metergate does not follow.",
                             code="upstream_redirect")

    async def _unary(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        upstream = await self._send(request, ex)
        self._check_redirect(upstream)
        return await self._relay_whole(ex, upstream)

    async def _stream(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        """Relay a stream event by event, metered (and its hold grown) as it goes. A non-streaming request
        streamed internally (``ex.assembler``) is metered the same way, event by event, but the events go to
        its assembler instead of the client, which gets one body at the end (:meth:`_answer_assembled`)."""
        upstream = await self._send(request, ex)
        self._check_redirect(upstream)
        if upstream.status < 400 and "application/vnd.amazon.eventstream" in upstream.headers.get("Content-Type", ""):
            from metergate.proxy.eventstream_relay import relay_frames

            return await relay_frames(self, request, ex, upstream)
        if upstream.status >= 400 or "text/event-stream" not in upstream.headers.get("Content-Type", ""):
            # A stream request answered without a stream (an upstream error, usually): relay it whole.
            return await self._relay_whole(ex, upstream)
        ex.status = upstream.status
        meter = ex.meter = ex.adapter.stream_meter(ex.prepared, self.settings.drain_max_bytes)
        budget = self._budget(ex)
        meter.lazy_text = budget is None  # only a budget reads the delivered text while the stream runs
        assembler = ex.assembler
        response = web.StreamResponse(status=upstream.status, headers=hh.client_response_headers(upstream.headers))
        response.headers.update(self._receipt(ex, None, None))
        sse = SSEBuffer(self.settings.sse_max_event_bytes)
        client_gone = False
        watchdog: asyncio.TimerHandle | None = None
        broken = False
        held_back: list[bytes] = []
        drain_deadline = 0.0
        drained = 0
        traced = tracing.active()
        try:
            if assembler is None:
                await response.prepare(request)
            watchdog = asyncio.get_running_loop().call_later(_WATCH_S, self._watch, request, ex, upstream, None)
            async for chunk in upstream.content.iter_any():
                if ex.client_left_at is not None and not client_gone:  # seen by the watchdog, not by a write
                    client_gone, drain_deadline = True, ex.client_left_at + self.settings.drain_timeout_s
                    if assembler is not None:
                        # Nobody is waiting for the body any more: stop the upstream now rather than let it
                        # produce (and the wallet pay for) the rest; what it produced so far is billed.
                        log.info("%s: client left before its answer was whole; stopping the upstream",
                                 ex.request_id)
                        ex.stopped = "client_left"
                        upstream.close()
                        break
                out: list[bytes] = []
                for event in sse.feed(chunk):
                    first_new = len(meter.text) if budget is not None else 0
                    data = event_data(event)
                    verdict = meter.on_event(data)
                    if traced:
                        tracing.event(data)
                    if verdict == "forward":
                        if (budget is not None and len(meter.text) > first_new
                                and not await budget.admit(meter, first_new)):
                            budget.rewind(meter, first_new)  # never delivered, never billed
                            ex.stopped = "insufficient_funds"
                            break
                        out.append(event)
                    elif verdict == "final":
                        held_back.append(event)  # sent after settlement: a client that saw the end sees it settled
                    if assembler is not None:
                        assembler.feed(data)  # every admitted event, the usage chunk the client never sees too
                if meter.content_events and not ex.delivered:
                    ex.delivered, ex.first_token_s = True, time.monotonic() - ex.started
                if client_gone:
                    drained += len(chunk)
                    if drained > self.settings.drain_max_bytes or time.monotonic() > drain_deadline:
                        log.info("%s: stopped draining after client disconnect", ex.request_id)
                        break
                elif out and assembler is None:
                    try:
                        await response.write(out[0] if len(out) == 1 else b"".join(out))
                    except _CLIENT_GONE:
                        client_gone = True
                        drain_deadline = time.monotonic() + self.settings.drain_timeout_s
                if ex.stopped:
                    log.info("%s: wallet ran dry mid-stream; stopping the stream", ex.request_id)
                    upstream.close()  # stop the upstream generating what nobody will pay for
                    break
            tail = b"" if ex.stopped else sse.rest()
            if tail.strip():
                # The upstream ended without the blank line that closes its last event; a client would
                # discard such an event, so it is closed here. It is metered whether or not the client is
                # still there, and a final event still waits for the settlement.
                event = tail.rstrip(b"\r\n") + b"\n\n"
                verdict = meter.on_event(event_data(event))
                if assembler is not None:
                    assembler.feed(event_data(event))
                elif verdict == "final":
                    held_back.append(event)
                elif verdict == "forward" and not client_gone:
                    await _write_quietly(response, event)
                if meter.content_events and not ex.delivered:
                    ex.delivered, ex.first_token_s = True, time.monotonic() - ex.started
        except (TimeoutError, aiohttp.ClientError, EventTooLarge) as exc:
            # The upstream died or misbehaved mid-stream: bill what was delivered, end the stream saying so.
            log.warning("%s: upstream stream ended abnormally: %s", ex.request_id, type(exc).__name__)
            broken = not ex.cut  # a stream cut at shutdown is closed from this side, and says so itself
        finally:
            if watchdog is not None:
                watchdog.cancel()
            upstream.release()
        if assembler is not None:
            return await self._answer_assembled(ex, upstream, assembler, incomplete=broken or ex.cut)
        delivered = self._delivered_usage(ex)
        settlement = await self._settle_shielded(ex, delivered)
        if not client_gone:
            if ex.stopped:
                held_back = [meter.stop_events(delivered or self._estimated(ex, 0), self._stop_notice(ex, settlement))]
            if ex.cut and not held_back:
                held_back.append(meter.error_event(*_CUT))
            elif broken and not held_back:
                held_back.append(meter.error_event(*_BROKEN))
            # The held-back end and the stream's terminating chunk leave in one write: one packet, and one
            # wake-up for a client waiting for its answer's end.
            await _write_eof_quietly(response, b"".join(held_back))
        return response

    async def _answer_assembled(self, ex: Exchange, upstream: aiohttp.ClientResponse, assembler: Assembler, *,
                                incomplete: bool) -> web.StreamResponse:
        """Settle a non-streaming request that was streamed internally and answer its one body.

        Billed: what the upstream produced and the budget admitted: the provider's usage when the stream
        ended whole, else the delivered text counted with the model's tokenizer (a stop at the wallet, or a
        client that left before the end; the hold covered that text, so nothing is written off). An
        upstream that broke off, or a cut at shutdown, leaves no whole answer: the client gets an error
        and, as for any non-streaming request without an answer, pays nothing."""
        if incomplete:
            ex.status, ex.delivered, ex.meter = 502, False, None
            await self._settle_shielded(ex, None)
            if ex.cut:
                raise BadGateway("metergate is shutting down: the answer was cut before it was whole; nothing "
                                 "was charged.", code="shutting_down")
            raise BadGateway("The upstream stream broke off before the answer was whole; nothing was charged.",
                             code="upstream_stream_broken")
        usage = self._delivered_usage(ex)
        settlement = await self._settle_shielded(ex, usage)
        notice = self._stop_notice(ex, settlement) if ex.stopped == "insufficient_funds" else None
        body = assembler.body(usage or self._estimated(ex, 0), notice)
        headers = hh.client_response_headers(upstream.headers)
        for name in ("Content-Type", "Cache-Control"):  # the upstream's stream headers, not the body's
            headers.popall(name, None)
        headers["Content-Type"] = "application/json"
        headers.update(self._receipt(ex, settlement, usage))
        return web.Response(body=body, status=upstream.status, headers=headers)

    async def _relay_whole(self, ex: Exchange, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """Read a whole (non-stream) upstream answer, settle from its usage, relay it with a receipt."""
        try:
            body = await read_limited(upstream, self.settings.max_response_bytes)
        except TimeoutError:
            raise GatewayTimeout("The upstream stopped answering; nothing was charged.") from None
        except aiohttp.ClientError:
            raise BadGateway("The upstream connection failed mid-response; nothing was charged.") from None
        finally:
            upstream.release()
        ex.status = upstream.status
        tracing.body(body)
        usage: Usage | None = None
        if upstream.status < 400:
            ex.delivered = True
            usage, text = ex.adapter.usage_from_body(ex.prepared, body)
            if usage is None:
                usage = self._estimated(ex, counter_for(ex.prepared.model).count(text))
        settlement = await self._settle_shielded(ex, usage)
        response_headers = hh.client_response_headers(upstream.headers)
        response_headers.update(self._receipt(ex, settlement, usage))
        return web.Response(body=body, status=upstream.status, headers=response_headers)

    # ------------------------------------------------------------------ metering and settlement

    def _watch(self, request: web.Request, ex: Exchange, upstream: aiohttp.ClientResponse,
               deadline: float | None) -> None:
        """Every ``_WATCH_S`` while a stream is relayed: notice a client that hung up while the upstream
        is quiet (a write would notice only at the next event), and stop draining such an upstream at
        ``drain_timeout_s`` by closing it; the relay then settles what was delivered."""
        if ex.settlement is not None:
            return
        transport = request.transport
        if deadline is None and (transport is None or transport.is_closing()):
            ex.client_left_at = time.monotonic()
            deadline = ex.client_left_at + self.settings.drain_timeout_s
        if deadline is not None and time.monotonic() >= deadline:
            log.info("%s: upstream quiet past the drain timeout after client disconnect; closing it", ex.request_id)
            upstream.close()
            return
        delay = _WATCH_S if deadline is None else min(_WATCH_S, max(0.0, deadline - time.monotonic()))
        asyncio.get_running_loop().call_later(delay, self._watch, request, ex, upstream, deadline)

    def _price(self, ex: Exchange, usage: Usage) -> int:
        return self.prices.final(ex.rate, usage, ex.match.route.provider_id, ex.prepared.model,
                                 fallback=ex.hold.amount)

    def _budget(self, ex: Exchange) -> StreamBudget | None:
        """Mid-stream enforcement for this stream (see :mod:`metergate.proxy.budget`), unless turned off."""
        increment = self.settings.stream_extend_tokens
        if increment <= 0 or ex.bounded:
            return None
        input_tokens, ttl_ms = ex.prepared.input_tokens, self.settings.hold_ttl_s * 1000

        def price_of(output_tokens: int) -> int:
            return self._price(ex, Usage(input_tokens, output_tokens, source="estimated"))

        async def extend(amount: int, step: int) -> None:
            if ex.budget is not None:
                # A node's spend limit applies to each step too; a step past it stops the answer like an
                # empty wallet does (what was delivered is billed, the rest returns to the limit).
                try:
                    await self.budgets.extend(ex.budget, amount, ex.hold.asset)
                except BudgetExceeded as refused:
                    ex.budget_refusal = refused
                    raise InsufficientFunds(asset=ex.hold.asset, available=0, required=amount) from None
            if self.spend_caps is not None:
                # A hold that grows is spending as much as one placed whole: the customer's cap applies to
                # each step, and a step past it stops the answer like an empty wallet does.
                try:
                    await self.spend_caps.admit(ex.hold.mode, ex.hold.customer_id, ex.hold.asset, amount)
                except SpendCapReached as capped:
                    ex.cap_refusal = capped
                    raise InsufficientFunds(asset=ex.hold.asset, available=0, required=amount) from None
            with tracing.span("metergate.extend"):
                ex.hold = await self.holds.extend_hold(ex.hold.id, amount, step=step, ttl_ms=ttl_ms)

        return StreamBudget(held=ex.hold.amount, covered_tokens=ex.covered_tokens, price_of=price_of,
                            count=counter_for(ex.prepared.model).count, extend=extend, increment_tokens=increment)

    def _stop_notice(self, ex: Exchange, settlement: Settlement | None) -> dict[str, Any]:
        """What a stream metergate stopped tells its client, inside the provider's own final event."""
        if ex.budget_refusal is not None:  # a node's limit: which one, and no top-up link (paying cannot lift it)
            refused = ex.budget_refusal.extra
            stopped: dict[str, Any] = {"stop_reason": "budget_exceeded", "asset": ex.hold.asset,
                                       "message": "A budget limit was reached: the answer was stopped here and "
                                                  f"what was delivered is billed. {ex.budget_refusal.message}",
                                       "node": refused["node"], "node_path": refused["node_path"],
                                       "limit": refused["limit"]}
            if settlement is not None:
                stopped["charged"] = format_minor(settlement.charged, ex.rate.scale)
            return stopped
        if ex.cap_refusal is not None:  # the customer's own cap: a top-up cannot lift it, changing the cap can
            capped = ex.cap_refusal.extra
            notice = {"stop_reason": "spend_cap_reached", "asset": ex.hold.asset, "period": capped["period"],
                      "cap": format_minor(capped["cap"], ex.rate.scale),
                      "message": f"The {capped['period']} spend cap was reached: the answer was stopped here and "
                                 "what was delivered is billed. The cap is set at portal_url.",
                      "portal_url": self.signer.url(ex.identity.mode, ex.identity.customer_id)}
            if settlement is not None:
                notice["charged"] = format_minor(settlement.charged, ex.rate.scale)
            return notice
        notice = {
            "stop_reason": ex.stopped,
            "message": "The wallet ran out of funds: the answer was stopped here and what was delivered is "
                       "billed. Top up at portal_url.",
            "asset": ex.hold.asset,
            "portal_url": self.signer.url(ex.identity.mode, ex.identity.customer_id),
        }
        if settlement is not None:
            notice["charged"] = format_minor(settlement.charged, ex.rate.scale)
            notice["balance"] = format_minor(settlement.balance.available, ex.rate.scale)
        return notice

    def _estimated(self, ex: Exchange, output_tokens: int) -> Usage:
        return Usage(input_tokens=ex.prepared.input_tokens, output_tokens=output_tokens, source="estimated")

    def _delivered_usage(self, ex: Exchange) -> Usage | None:
        """What to bill when leaving without a whole answer: the provider's usage if the stream carried it,
        else an estimate from the text delivered so far (with the provider's input counts if it sent them
        before the cut), else nothing (nothing was delivered)."""
        meter = ex.meter
        if meter is not None and meter.usage is not None and not ex.stopped:
            return meter.usage
        if not ex.delivered:
            return None
        output = meter.delivered_output_tokens(ex.prepared.model) if meter is not None else 0
        # A stream metergate stopped may have carried a provider count from before the stop (Anthropic's
        # cumulative message_delta): its input counts are kept, its output is what was delivered.
        reported = meter.usage or meter.partial if meter is not None else None
        if reported is not None:
            return replace(reported, output_tokens=max(output, reported.output_tokens) if ex.stopped is None
                           else output, reasoning_tokens=0, source="estimated")
        return self._estimated(ex, output)

    def _record(self, ex: Exchange, usage: Usage | None, price: int) -> UsageRecord:
        used = usage or Usage(source="none")
        cost = self.costs.cost(ex.match.route.provider_id, ex.prepared.model, used) if usage else None
        anomalies = [stored_text(anomaly, _ANOMALY_CHARS) for anomaly in ex.prepared.anomalies] \
            if ex.prepared.anomalies else None
        return UsageRecord(
            id=ex.request_id, mode=ex.identity.mode, customer_id=ex.identity.customer_id, hold_id=ex.hold.id,
            route=ex.match.route.prefix, endpoint=ex.prepared.endpoint, model=ex.prepared.model,
            feature=ex.feature, stream=ex.prepared.stream, status_code=ex.status or 499,
            usage_source=used.source, tokens_input=used.input_tokens,
            tokens_cached_input=used.cached_input_tokens, tokens_output=used.output_tokens,
            tokens_reasoning=used.reasoning_tokens, tokens_cache_write=used.cache_write_tokens,
            asset=ex.hold.asset, price_amount=price,
            cost_nanos=cost.nanos if cost else None,
            detail={"price": ex.rate.as_detail(), "cost": {"source": cost.source, **cost.rates} if cost else None,
                    "hold": ex.hold.amount, "tokens_exact": ex.prepared.tokens_exact,
                    "duration_ms": int((time.monotonic() - ex.started) * 1000),
                    **({"usage_anomalies": anomalies} if anomalies else {}),
                    **({"deployment": ex.prepared.deployment} if ex.prepared.deployment else {}),
                    **({"units": dict(used.units)} if used.units else {})},
            budget_path=ex.budget.path_text if ex.budget is not None else None,
        )

    async def _settle_shielded(self, ex: Exchange, usage: Usage | None) -> Settlement | None:
        """Settle once; if the handler is cancelled meanwhile, the settlement still runs to its end."""
        if ex.settlement is None:
            tracing.upstream_done(ex)
            # usage "none" is a provider's explicit "nothing to charge" (a failed reply): no request fee either.
            price = self._price(ex, usage) if usage is not None and usage.source != "none" else 0
            record = self._record(ex, usage, price)
            ex.settlement = asyncio.ensure_future(
                self.prices.counted(self._settle_with_retries(ex, price, record), ex.rate, record, usage))
            self._inflight.add(ex.settlement)
            ex.settlement.add_done_callback(functools.partial(self._settled, ex, record))
        return await asyncio.shield(ex.settlement)

    def _settled(self, ex: Exchange, record: UsageRecord, task: asyncio.Future[Settlement | None]) -> None:
        """A settlement's one done callback (each callback is a turn of the event loop): no longer in flight,
        counted in the metrics, noted on the trace."""
        self._inflight.discard(task)
        try:
            self.metrics.settled(ex, record, task)
        finally:
            tracing.settled(ex, record, task)

    async def _settle_with_retries(self, ex: Exchange, price: int, record: UsageRecord) -> Settlement | None:
        with tracing.span("metergate.settle") as span:
            settlement = await self.settler.settle(self.holds, ex.hold.id, price, record)
            span.set_attribute("metergate.charged", settlement.charged if settlement is not None else 0)
        if settlement is not None and ex.budget is not None:  # unsettled: the budget keeps the whole hold
            self.budgets.settled(ex.budget, charged=settlement.charged,
                                 tokens_used=record.tokens_input + record.tokens_output)
        if settlement is not None and self.on_budget_settled is not None:
            self.on_budget_settled(ex.hold.mode, ex.hold.customer_id)
        if settlement is not None and self.on_settled is not None:
            self.track(asyncio.ensure_future(self.on_settled(ex.hold.mode, ex.hold.customer_id, ex.hold.asset,
                                                             settlement.balance)))
        return settlement

    def track(self, work: asyncio.Future[Any]) -> None:
        """Work that must finish before the pipeline stops (its store closes), whoever awaits it: a shutdown
        waits for it even if the handler that started it is cancelled."""
        self._inflight.add(work)
        work.add_done_callback(self._inflight.discard)

    def _receipt(self, ex: Exchange, settlement: Settlement | None, usage: Usage | None) -> dict[str, str]:
        receipt = {"X-Metergate-Request-Id": ex.request_id, "X-Metergate-Asset": ex.hold.asset}
        scale = ex.rate.scale  # the scale of the asset the request's price rule draws
        if ex.output_limit is not None:
            receipt["X-Metergate-Output-Limit"] = str(ex.output_limit)  # set upstream by metergate, per answer
        if settlement is None:
            receipt["X-Metergate-Held"] = format_minor(ex.hold.amount, scale)
            receipt["X-Metergate-Usage-Source"] = "pending" if ex.prepared.stream and usage is None else "unknown"
            return receipt
        receipt["X-Metergate-Charged"] = format_minor(settlement.charged, scale)
        balance = settlement.balance
        # The wallet's own money (negative: owed, for an invoiced customer); a credit line shows on its own.
        receipt["X-Metergate-Balance"] = format_minor(balance.available - balance.overdraft_limit, scale)
        if balance.overdraft_limit:
            receipt["X-Metergate-Available"] = format_minor(balance.available, scale)
        receipt["X-Metergate-Usage-Source"] = usage.source if usage is not None else "none"
        return receipt


def _upstream_body(body: bytes) -> bytes | io.BytesIO:
    """The body as aiohttp sends it without a warning: a large one (an inline image or PDF) as a stream of
    known length, since aiohttp warns about copying raw bytes of 1 MiB or more."""
    return io.BytesIO(body) if len(body) >= 1 << 20 else body


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    return payload


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    with contextlib.suppress(*_CLIENT_GONE):
        await response.write(data)


async def _write_eof_quietly(response: web.StreamResponse, data: bytes = b"") -> None:
    with contextlib.suppress(*_CLIENT_GONE):
        await response.write_eof(data)


__all__ = ["Exchange", "Pipeline", "json_response"]
