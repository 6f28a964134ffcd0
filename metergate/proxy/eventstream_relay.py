"""Relaying an AWS event stream (Bedrock's ConverseStream) frame by frame, metered as it passes.

The same rules as the pipeline's server-sent-event relay, for binary frames: each frame goes to the client
unchanged as soon as it is whole and verified (:class:`metergate.proxy.eventstream.FrameBuffer`); the
``metadata`` frame, the last, which carries the usage, is held back until the settlement, so that a client
that saw the end sees a settled ledger. A client that hangs up does not stop the metering: the upstream is
drained (``drain_timeout_s``, ``drain_max_bytes``) for its usage.

A frame the upstream gets wrong (a CRC mismatch, a length out of bounds, a stream that ends inside a frame)
ends the stream there: nothing after it is believed or relayed, the request is billed by the stream rules
(the provider's usage if it already arrived, else the output delivered), the usage record names the
anomaly, and the client gets an exception frame (``internalServerException``), which the AWS SDKs raise, so
it never takes a cut answer for a whole one.

Output never outgrows the hold: a bedrock route sets ``inferenceConfig.maxTokens`` upstream to what the hold
covers (:mod:`metergate.proxy.bounding`), so no mid-stream budget is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from metergate.proxy import headers as hh
from metergate.proxy.adapters.base import MAX_ANOMALIES
from metergate.proxy.adapters.bedrock import BedrockStreamMeter
from metergate.proxy.eventstream import BadFrame, FrameBuffer, exception_frame

if TYPE_CHECKING:
    from metergate.proxy.pipeline import Exchange, Pipeline

log = logging.getLogger(__name__)
_WATCH_S = 1.0
_CLIENT_GONE = (ConnectionResetError, ConnectionError, aiohttp.ClientConnectionResetError)


def _exception(message: str) -> bytes:
    return exception_frame("internalServerException", json.dumps({"message": message}).encode())


_BROKEN_FRAME = _exception("The upstream stream broke off before its end; what was delivered is billed.")
_CUT_FRAME = _exception("metergate is shutting down: this stream was cut at the drain deadline; what was "
                        "delivered is billed.")


async def relay_frames(pipeline: Pipeline, request: web.Request, ex: Exchange,
                       upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    settings = pipeline.settings
    meter = ex.adapter.stream_meter(ex.prepared, settings.drain_max_bytes)
    assert isinstance(meter, BedrockStreamMeter)
    ex.status, ex.meter = upstream.status, meter
    response = web.StreamResponse(status=upstream.status, headers=hh.client_response_headers(upstream.headers))
    response.headers.update(pipeline._receipt(ex, None, None))
    frames = FrameBuffer(settings.sse_max_event_bytes)
    client_gone = broken = False
    held_back: list[bytes] = []
    drain_deadline, drained = 0.0, 0
    watchdog: asyncio.TimerHandle | None = None
    try:
        await response.prepare(request)
        watchdog = asyncio.get_running_loop().call_later(_WATCH_S, pipeline._watch, request, ex, upstream, None)
        async for chunk in upstream.content.iter_any():
            if ex.client_left_at is not None and not client_gone:  # seen by the watchdog, not by a write
                client_gone, drain_deadline = True, ex.client_left_at + settings.drain_timeout_s
            out: list[bytes] = []
            for frame in frames.feed(chunk):  # the good frames before a bad one still reach the client
                verdict = meter.on_frame(frame)
                if verdict == "forward":
                    out.append(frame.raw)
                elif verdict == "final":
                    held_back.append(frame.raw)
            if meter.content_events and not ex.delivered:
                ex.delivered, ex.first_token_s = True, time.monotonic() - ex.started
            if out and not client_gone:
                try:
                    await response.write(b"".join(out))
                except _CLIENT_GONE:
                    client_gone, drain_deadline = True, time.monotonic() + settings.drain_timeout_s
            if frames.error is not None:
                raise frames.error
            if client_gone:
                drained += len(chunk)
                if drained > settings.drain_max_bytes or time.monotonic() > drain_deadline:
                    log.info("%s: stopped draining after client disconnect", ex.request_id)
                    break
        else:
            if frames.pending and not ex.cut:
                raise BadFrame(f"the stream ended {frames.pending} bytes into a frame")
    except BadFrame as bad:
        _anomaly(ex, f"event stream: {bad}")
        broken = True
    except (TimeoutError, aiohttp.ClientError) as exc:
        log.warning("%s: upstream stream ended abnormally: %s", ex.request_id, type(exc).__name__)
        broken = not ex.cut  # a stream cut at shutdown is closed from this side, and says so itself
    finally:
        if watchdog is not None:
            watchdog.cancel()
        upstream.release()
    await pipeline._settle_shielded(ex, pipeline._delivered_usage(ex))
    if not client_gone:
        if ex.cut and not held_back:
            held_back.append(_CUT_FRAME)
        elif broken and not held_back:
            held_back.append(_BROKEN_FRAME)
        with contextlib.suppress(*_CLIENT_GONE):
            if held_back:
                await response.write(b"".join(held_back))
            await response.write_eof()
    return response


def _anomaly(ex: Exchange, reason: str) -> None:
    """A bad frame from the upstream: kept on the usage record (``detail.usage_anomalies``), counted, logged."""
    anomalies = ex.prepared.anomalies
    if len(anomalies) < MAX_ANOMALIES:
        anomalies.append(reason)
    log.warning("%s: bad frame from the upstream (%s); the stream ends here", ex.request_id, reason)
