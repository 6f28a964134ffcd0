"""The OpenAI Realtime API over WebSocket, prepaid: ``GET /v1/realtime?model=...`` upgraded and relayed.

Before the upgrade, as for every metered request: the customer is identified (customer header, proxy key in
``Authorization: Bearer``, or, for browsers, which cannot set headers on a WebSocket, the
``openai-insecure-api-key.<key>`` subprotocol), the model is priced, and the first response is held
(:class:`metergate.proxy.realtime_billing.SessionMeter`). Then the upstream WebSocket is opened with the
route's key, and only then is the client's connection upgraded: every refusal (401, 402, 400, 502) is a
plain JSON answer in the OpenAI envelope that the client's handshake reports.

While the session lives, frames are relayed both ways as they come, with these exceptions:

* a client ``response.create`` is forwarded only once the next response is held; when the wallet cannot
  cover it, the client gets a Realtime ``error`` event with code ``insufficient_funds`` (message and
  ``portal_url`` as in a 402) and the session is closed with code 1008 (policy violation);
* a client frame that is not a JSON object with a ``type`` (or a binary frame) is answered with an ``error``
  event (``invalid_event``) and never forwarded: nothing is charged for it;
* an output delta the response's hold cannot cover, nor the wallet grow it for, is not delivered: the
  response is cancelled upstream (``response.cancel``) and its ``response.done`` says why;
* the upstream's ``response.done`` is settled before it is forwarded, and carries a ``metergate`` receipt
  (charged, balance, asset), so a client that saw it reads a settled balance.

Frames larger than ``realtime.max_frame_bytes`` close the session with code 1009, either way. When the client
leaves mid-response, metergate sends ``response.cancel`` upstream and waits up to ``realtime.done_grace_s``
for the ``response.done`` that bills it; when the upstream breaks off, the client gets an ``error`` event
(``upstream_stream_broken``) and the session closes with 1011. Either way what was not reported is billed by
estimate (see the billing module).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict

from metergate.config.routes import RouteMatch
from metergate.errors import BadGateway, BadRequest, Forbidden, MetergateError, TooManyRequests, Unauthorized
from metergate.metering.realtime import from_response_done
from metergate.metering.usage import UsageAnomaly
from metergate.money import format_minor
from metergate.proxy import headers as hh
from metergate.proxy.adapters.schema import MAX_MODEL_CHARS
from metergate.proxy.methods import check_method
from metergate.proxy.realtime_billing import Refused, SessionMeter
from metergate.wallet.models import Settlement

if TYPE_CHECKING:
    from metergate.proxy.pipeline import Pipeline

log = logging.getLogger(__name__)
PATHS = ("/v1/realtime", "/realtime")  # the second when the route's upstream ends in /v1
_KEY_PROTOCOL = "openai-insecure-api-key."
_CLIENT_PROTOCOLS = ("realtime",)  # the subprotocol a browser asks for and must hear back
_FORWARDED_PROTOCOL_PREFIXES = ("realtime", "openai-beta.")  # never the key one
_TEXT_DELTAS = ("response.output_text.delta", "response.text.delta")
_AUDIO_DELTAS = ("response.output_audio.delta", "response.audio.delta")
_TRANSCRIPT_DELTAS = ("response.output_audio_transcript.delta", "response.audio_transcript.delta")
_MODEL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/@+=-")
CLOSE_POLICY = 1008  # RFC 6455 §7.4.1: the client's session broke a policy (here: it is out of funds)


def serves(match: RouteMatch) -> bool:
    return match.route.realtime and match.upstream_path in PATHS


def _model(query: str) -> str:
    """The ``model`` query parameter, the only one taken (joining calls and transcription sessions are
    billed otherwise and not served)."""
    params = parse_qsl(query, keep_blank_values=True)
    names = {name for name, _ in params}
    if names - {"model"}:
        raise BadRequest("The Realtime API is served with ?model=... only.", code="invalid_query",
                         param=sorted(names - {"model"})[0][:64])
    models = [value for name, value in params if name == "model"]
    if len(models) != 1:
        raise BadRequest("Name the model once: /v1/realtime?model=...", code="missing_model", param="model")
    model = models[0]
    if not model or len(model) > MAX_MODEL_CHARS or not set(model) <= _MODEL_CHARS or not model[0].isalnum():
        raise BadRequest(f"'model' must be at most {MAX_MODEL_CHARS} characters of letters, digits and "
                         ". _ : / @ + = -.", code="invalid_model", param="model")
    return model


def _offered_protocols(request: web.Request) -> list[str]:
    return [p.strip() for value in request.headers.getall("Sec-WebSocket-Protocol", [])
            for p in value.split(",") if p.strip()]


def _identifying(request: web.Request, allowed_origins: list[str]) -> web.Request:
    """The request as identification sees it: a key a browser sent as a subprotocol becomes a bearer token
    (only when no Authorization header is there; two credentials then meet the usual rules). Such a key is
    taken only from a page on an origin of ``cors_allow_origins``, as for the browser's HTTP calls (CORS does
    not guard WebSockets: metergate does)."""
    keys = [p[len(_KEY_PROTOCOL):] for p in _offered_protocols(request) if p.startswith(_KEY_PROTOCOL)]
    if not keys or "Authorization" in request.headers:
        return request
    origin = request.headers.get("Origin")
    if origin is not None and allowed_origins != ["*"] and origin not in allowed_origins:
        raise Forbidden("This origin may not open Realtime sessions with a proxy key; the operator allows "
                        "browser origins in cors_allow_origins.", code="origin_not_allowed")
    if len(set(keys)) > 1:
        raise Unauthorized("The request presents more than one proxy API key.", code="invalid_api_key")
    headers = CIMultiDict(request.headers)
    headers["Authorization"] = f"Bearer {keys[0]}"
    return request.clone(headers=headers)


def error_event(code: str, message: str, *, kind: str = "invalid_request_error", event_id: str | None = None,
                **extra: Any) -> str:
    """A Realtime ``error`` server event (the SDKs surface it as such)."""
    error: dict[str, Any] = {"type": kind, "code": code, "message": message, "param": None, "event_id": event_id}
    error.update(extra)
    return json.dumps({"type": "error", "event_id": "event_mg_" + uuid.uuid4().hex[:20], "error": error})


def _refusal_event(refused: Refused, event_id: str | None) -> str:
    error = refused.error
    if isinstance(error, MetergateError):
        extra = {k: v for k, v in error.extra.items() if k in ("asset", "balance", "required", "portal_url",
                                                                "period", "cap", "spent")}
        return error_event(error.code, error.message, event_id=event_id, **extra)
    return error_event("insufficient_funds", str(error), event_id=event_id)


class RealtimeRelay:
    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline
        self._sessions: set[_Session] = set()

    async def drain(self, deadline_s: float) -> None:
        """Shutting down: each session takes no new response, lets the one in flight finish for up to
        ``deadline_s``, then gets an ``error`` event (``shutting_down``) and is closed with code 1001 (going
        away); what was not reported by then is billed by estimate. The handlers settle before they return."""
        if self._sessions:
            log.info("draining: %d realtime session(s)", len(self._sessions))
            await asyncio.gather(*(session.shut_down(deadline_s) for session in list(self._sessions)))

    async def handle(self, request: web.Request, request_id: str, match: RouteMatch) -> web.StreamResponse:
        p = self._p
        if (options := check_method(request, ("GET", "OPTIONS"), "The Realtime API")) is not None:
            return options
        identity = await p.identifier.identify(_identifying(request, p.settings.cors_allow_origins))
        model = _model(match.query)
        settings = p.settings.realtime
        client = web.WebSocketResponse(protocols=_CLIENT_PROTOCOLS, max_msg_size=settings.max_frame_bytes,
                                       autoping=True, compress=False)
        if not client.can_prepare(request).ok:
            raise BadRequest("The Realtime API is a WebSocket: send GET with 'Upgrade: websocket'.",
                             code="websocket_required")
        attributes = p.prices.request_attributes(request.headers,
                                                 identity.attributes if identity.via == "api_key" else None)
        rate = await p.prices.resolve_request(identity.mode, identity.customer_id, model=model,
                                              endpoint="realtime", route=match.route.prefix,
                                              provider=match.route.provider_id, attributes=attributes)
        meter = SessionMeter(p, identity, match, model, rate, request_id, attributes.get("feature"))
        await p.ratelimiter.admit(identity, meter.hold_tokens())  # the session, at its upgrade
        await meter.authorize()  # 402 before anything goes upstream
        try:
            upstream = await self._connect(request, match)
            try:
                await client.prepare(request)
                session = _Session(p, meter, client, upstream)
                self._sessions.add(session)
                try:
                    await session.run()
                finally:
                    self._sessions.discard(session)
            finally:
                await upstream.close()
        finally:
            # Tracked by the pipeline, so that a shutdown waits for it even if this handler is cancelled.
            closing = asyncio.ensure_future(meter.close())
            p.track(closing)
            await asyncio.shield(closing)
        return client

    async def _connect(self, request: web.Request, match: RouteMatch) -> aiohttp.ClientWebSocketResponse:
        p = self._p
        assert p.session is not None
        key = match.route.api_key
        headers = hh.upstream_request_headers(
            request.headers, auth=("Authorization", f"Bearer {key.get_secret_value()}") if key else None,
            drop=(p.settings.customer_header, p.settings.mode_header, p.settings.attribution_header,
                  "sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol",
                  "sec-websocket-extensions", "origin", "cookie"))
        headers.update(match.route.upstream_headers)
        headers.popall("Accept-Encoding", None)
        protocols = [proto for proto in _offered_protocols(request)
                     if proto.startswith(_FORWARDED_PROTOCOL_PREFIXES) and not proto.startswith(_KEY_PROTOCOL)]
        try:
            return await p.session.ws_connect(
                match.upstream_url, headers=headers, protocols=protocols, autoping=True, compress=0,
                max_msg_size=p.settings.realtime.max_frame_bytes,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0))
        except aiohttp.WSServerHandshakeError as refused:
            log.warning("realtime upstream %s refused the upgrade: %s", match.route.prefix, refused.status)
            raise BadGateway(f"The upstream refused the Realtime session ({refused.status}); nothing was charged.",
                             code="upstream_refused") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("realtime upstream %s unreachable: %s", match.route.prefix, type(exc).__name__)
            raise BadGateway("The upstream could not be reached; nothing was charged.") from None


class _Session:
    """One relayed session: two directions, one meter, one end."""

    def __init__(self, pipeline: Pipeline, meter: SessionMeter, client: web.WebSocketResponse,
                 upstream: aiohttp.ClientWebSocketResponse) -> None:
        self._p = pipeline
        self.meter = meter
        self.client = client
        self.upstream = upstream
        self._settings = pipeline.settings.realtime
        self.closing: tuple[int, str] | None = None  # metergate ends the session: (close code, reason)
        self.upstream_broken = False
        self.draining = False
        self._stopped: set[str] = set()  # responses metergate cancelled for funds
        self.pending_creates = 0  # response.create forwarded, its response.created not yet seen
        self.client_left = False
        self._idle = asyncio.Event()  # no response in flight or asked for (set when the last one is billed)
        self._idle.set()

    async def run(self) -> None:
        to_upstream = asyncio.create_task(self._from_client())
        to_client = asyncio.create_task(self._from_upstream())
        refresher = asyncio.create_task(self._refresh())
        try:
            done, _ = await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED,
                                         timeout=self._settings.max_session_s)
            if not done:
                await self._send(error_event("session_expired", "The session reached its longest duration.",
                                             kind="server_error"))
                self.closing = (WSCloseCode.OK, "session expired")
            if to_upstream in done and not to_client.done() and not self._idle.is_set():
                if self.closing is None:  # the client left mid-response: stop the upstream, wait for its bill
                    self.client_left = True  # a response asked for and not yet started is cancelled as it starts
                    for response_id in list(self.meter.active):
                        await self._to_upstream(json.dumps({"type": "response.cancel", "response_id": response_id}))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), self._settings.done_grace_s)
            elif to_client in done and self.upstream_broken and self.closing is None:
                await self._send(error_event("upstream_stream_broken", "The upstream session broke off; what was "
                                             "delivered is billed.", kind="server_error"))
                self.closing = (WSCloseCode.INTERNAL_ERROR, "upstream broke off")
        finally:
            refresher.cancel()
            to_client.cancel()
            code, reason = self.closing or (WSCloseCode.OK, "")
            # Closed while the client's reader still waits (aiohttp hands it the close): a reader cancelled
            # mid-receive would leave close() waiting out its timeout for the client's answer.
            with contextlib.suppress(Exception):
                await self.client.close(code=code, message=reason.encode())
            to_upstream.cancel()
            await asyncio.gather(to_upstream, to_client, refresher, return_exceptions=True)

    async def shut_down(self, deadline_s: float) -> None:
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), deadline_s)
        if self.closing is None:
            await self._send(error_event("shutting_down", "metergate is shutting down: connect again to go on; "
                                         "every response delivered is billed.", kind="server_error"))
            self.closing = (WSCloseCode.GOING_AWAY, "shutting down")
        await self.upstream.close()  # the relay sees the upstream end and closes the session

    def _update_idle(self) -> None:
        if self.meter.active or self.pending_creates:
            self._idle.clear()
        else:
            self._idle.set()

    async def _send(self, text: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientConnectionResetError):
            await self.client.send_str(text)

    async def _to_upstream(self, text: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientConnectionResetError):
            await self.upstream.send_str(text)

    async def _refresh(self) -> None:
        interval = max(1.0, self._p.settings.hold_ttl_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.meter.refresh()
            except Exception:
                log.exception("%s: refreshing the session's holds failed", self.meter.session_id)

    # ------------------------------------------------------------------ client -> upstream

    async def _from_client(self) -> None:
        async for message in self.client:
            if message.type == WSMsgType.TEXT:
                if not await self._client_event(message.data):
                    return
            elif message.type == WSMsgType.BINARY:
                await self._send(error_event("invalid_event", "The Realtime API takes JSON text frames; a binary "
                                             "frame was dropped."))
            else:  # ERROR (a frame over max_frame_bytes: aiohttp closes with 1009), CLOSE
                return

    async def _client_event(self, data: str) -> bool:
        """Forward one client event (or refuse it); ``False`` ends the session."""
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self._send(error_event("invalid_event", "A client event must be a JSON object with a 'type'; it "
                                         "was dropped and nothing was charged."))
            return True
        event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        kind = event["type"]
        if kind == "response.create" and self.draining:
            await self._send(error_event("shutting_down", "metergate is shutting down: this response was not "
                                         "started; connect again.", kind="server_error", event_id=event_id))
            return True
        if kind == "response.create":
            try:
                # Each response a client asks for counts against its rate limits, as a request would.
                await self._p.ratelimiter.admit(self.meter.identity, self.meter.hold_tokens())
            except TooManyRequests as limited:
                await self._send(error_event(limited.code, limited.message, kind="rate_limit_error",
                                             event_id=event_id, **limited.extra))
                return True
            try:
                await self.meter.admit_response()
            except Refused as refused:
                await self._send(_refusal_event(refused, event_id))
                self.closing = (CLOSE_POLICY, "insufficient funds")
                return False
            except MetergateError as error:  # the wallet store is unreachable: nothing can be held
                log.warning("%s: cannot hold the next response: %s", self.meter.session_id, error.code)
                await self._send(error_event(error.code, error.message, kind="server_error", event_id=event_id))
                self.closing = (WSCloseCode.TRY_AGAIN_LATER, "wallet unavailable")
                return False
            self.pending_creates += 1
            self._update_idle()
        elif kind == "input_audio_buffer.append" and isinstance(event.get("audio"), str):
            self.meter.client_input(audio_b64_chars=len(event["audio"]))
        elif kind == "conversation.item.create":
            self.meter.client_input(texts=_item_text(event.get("item")))
        await self._to_upstream(data)
        return True

    # ------------------------------------------------------------------ upstream -> client

    async def _from_upstream(self) -> None:
        async for message in self.upstream:
            if message.type == WSMsgType.TEXT:
                await self._upstream_event(message.data)
                if self.closing is not None and not self.meter.active:
                    return
            elif message.type == WSMsgType.BINARY:
                log.warning("%s: the upstream sent a binary frame; dropped", self.meter.session_id)
            elif message.type == WSMsgType.ERROR:
                self.upstream_broken = True
                return
            else:
                break
        if self.meter.active:
            self.upstream_broken = True  # closed with a response in flight

    async def _upstream_event(self, data: str) -> None:
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            log.warning("%s: the upstream sent a frame that is not an event; dropped", self.meter.session_id)
            return
        kind = event["type"]
        found = event.get("response")
        response: dict[str, Any] = found if isinstance(found, dict) else {}
        response_id = event.get("response_id") if isinstance(event.get("response_id"), str) else None
        if kind == "response.created":
            rid = response.get("id")
            self.pending_creates = max(0, self.pending_creates - 1)
            if isinstance(rid, str) and rid:
                refused = await self.meter.started(rid)
                if refused is not None:
                    await self._cut_off(rid, refused)
                elif self.client_left:
                    await self._to_upstream(json.dumps({"type": "response.cancel", "response_id": rid}))
            self._update_idle()
        elif kind == "error":  # most likely a response.create the upstream refused (one in flight already)
            self.pending_creates = max(0, self.pending_creates - 1)
            self._update_idle()
        elif kind in _TEXT_DELTAS + _AUDIO_DELTAS + _TRANSCRIPT_DELTAS and response_id:
            found_delta = event.get("delta")
            delta = found_delta if isinstance(found_delta, str) else ""
            if kind in _TEXT_DELTAS or kind in _TRANSCRIPT_DELTAS:  # an audio's transcript is billed as text
                self.meter.delta(response_id, text=delta)
            elif kind in _AUDIO_DELTAS:
                self.meter.delta(response_id, audio_b64_chars=len(delta))
            if not await self.meter.admit_output(response_id):
                if response_id not in self._stopped:  # the wallet is dry: stop the response where it is
                    self._stopped.add(response_id)
                    await self._to_upstream(json.dumps({"type": "response.cancel", "response_id": response_id}))
                return  # not delivered
        elif kind == "response.done":
            data = await self._bill(event, response)
        await self._send(data)

    async def _bill(self, event: dict[str, Any], response: dict[str, Any]) -> str:
        """Settle the response and return the event to forward, with metergate's receipt in it."""
        rid = response.get("id")
        if not isinstance(rid, str) or not rid:
            rid = "unidentified_" + uuid.uuid4().hex[:12]
        status = response.get("status") if isinstance(response.get("status"), str) else "unknown"
        anomaly = None
        try:
            usage = from_response_done(response.get("usage"))
        except UsageAnomaly as bad:
            usage, anomaly = None, str(bad)
            log.warning("%s: usage anomaly in response.done (%s); billed by estimate", self.meter.session_id, bad)
        settlement = await asyncio.shield(self.meter.done(rid, usage, status=str(status)[:32], anomaly=anomaly))
        self._update_idle()
        event["metergate"] = receipt = self._receipt(settlement, "provider" if usage is not None else "estimated")
        if rid in self._stopped:
            self._stopped.discard(rid)
            receipt.update(stop_reason="insufficient_funds", portal_url=self._p.signer.url(
                self.meter.identity.mode, self.meter.identity.customer_id),
                message="The wallet ran out of funds: the response was stopped here and what was produced is "
                        "billed. Top up at portal_url.")
        return json.dumps(event)

    def _receipt(self, settlement: Settlement | None, source: str) -> dict[str, Any]:
        scale = self.meter.rate.scale
        receipt: dict[str, Any] = {"asset": self.meter.rate.asset, "usage_source": source}
        if settlement is not None:
            receipt["charged"] = format_minor(settlement.charged, scale)
            balance = settlement.balance
            receipt["balance"] = format_minor(balance.available - balance.overdraft_limit, scale)
        return receipt

    async def _cut_off(self, response_id: str, refused: Refused) -> None:
        """A response the upstream started by itself (server VAD), with nothing to hold it: cancel it, say
        why, and end the session once its response.done is billed."""
        await self._to_upstream(json.dumps({"type": "response.cancel", "response_id": response_id}))
        await self._send(_refusal_event(refused, None))
        self.closing = (CLOSE_POLICY, "insufficient funds")


def _item_text(item: Any) -> list[str]:
    """The text of a conversation item the client adds (what the next response will read)."""
    if not isinstance(item, dict) or not isinstance(item.get("content"), list):
        return []
    texts: list[str] = []
    for part in item["content"][:64]:
        if isinstance(part, dict):
            for key in ("text", "transcript"):
                if isinstance(part.get(key), str):
                    texts.append(part[key][:100_000])
    return texts


__all__ = ["CLOSE_POLICY", "PATHS", "RealtimeRelay", "error_event", "serves"]
