"""What every provider adapter answers, and the pieces they share.

An adapter is a small plug-in for one upstream API. For a request: which endpoint is it, what model,
is it a stream, how many input tokens and at most how many output tokens, and what body goes upstream
(:class:`Prepared`). For a whole response: the usage, or the text to estimate it from. For a stream: a
:class:`StreamMeter` that reads each event's data and says whether the client gets it now, never, or
only after settlement (the stream's final event, so that a client that saw the end sees a settled
ledger).

What a provider reports is believed only within bounds (:mod:`metergate.metering.usage`): a report it
does not believe is an *anomaly*, noted in the request's ``Prepared.anomalies`` (which the usage record
keeps) and logged once, and the request is billed from metergate's own estimate. A stream meter that saw an
anomaly believes none of that stream's later reports either.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from metergate.config.media import MediaSettings
from metergate.metering.media import MediaTally
from metergate.metering.tokenizer import counter_for
from metergate.metering.usage import Usage, UsageAnomaly
from metergate.observability.logs import current_request_id
from metergate.proxy.sse import SSEBuffer, event_data

if TYPE_CHECKING:
    from multidict import CIMultiDict
    from yarl import URL

    from metergate.config.bedrock import BedrockSettings
    from metergate.config.routes import RouteMatch

log = logging.getLogger(__name__)
Verdict = Literal["forward", "drop", "final"]
T = TypeVar("T")
MAX_ANOMALIES = 4  # anomalies kept per request (the first one decides; the rest only explain)
_SSE_FIELDS = (b"data:", b"event:", b"id:", b"retry:", b":")


@dataclass(slots=True)
class Prepared:
    endpoint: str
    model: str
    stream: bool
    input_tokens: int
    max_output_tokens: int
    tokens_exact: bool
    body: bytes
    injected_usage: bool = False
    # The request names its own output limit, which the upstream enforces: its output cannot outgrow the
    # hold (reasoning tokens included), so a stream needs no mid-stream enforcement.
    output_capped: bool = False
    # What the provider reported that metergate did not believe (the usage record keeps it): the request
    # is billed from the estimate instead.
    anomalies: list[str] = field(default_factory=list)
    # The deployment the request named when the upstream is Azure's, or its model id when it is Bedrock's
    # (``model`` is what it is priced as).
    deployment: str | None = None
    # How ``body`` is encoded upstream: a multipart upload (audio, image edits) keeps the client's boundary.
    content_type: str = "application/json"


@dataclass(slots=True)
class StreamMeter:
    """Usage and delivered text of one stream; subclasses parse their provider's events."""

    max_text_chars: int
    usage: Usage | None = None
    partial: Usage | None = None  # what the provider reported before the stream was cut (input counts)
    text: list[str] = field(default_factory=list)
    text_chars: int = 0
    content_events: int = 0  # how many events carried output (only "none yet" or "some" is relied on)
    # Set by the relay when nothing reads ``text`` while the stream runs (no mid-stream budget): a meter may
    # then keep the bytes of events that carry only text and read them only if ``delivered_output_tokens``
    # is ever asked for (a stream that ended without the provider's usage).
    lazy_text: bool = False
    anomalies: list[str] = field(default_factory=list)  # the exchange's ``Prepared.anomalies``

    def believed(self, read: Callable[[Any], Usage | None], reported: Any) -> Usage | None:
        """The usage this event reports, if the meter believes it. After an anomaly, no report of this
        stream is believed, and what it reported before is dropped: the stream is billed from the estimate."""
        if self.anomalies:
            return None
        usage = believed(read, reported, self.anomalies)
        if self.anomalies:
            self.usage = self.partial = None
        return usage

    def on_event(self, data: bytes | None) -> Verdict:
        raise NotImplementedError

    def collect(self, piece: Any) -> None:
        if isinstance(piece, str) and piece and self.text_chars < self.max_text_chars:
            self.text.append(piece)
            self.text_chars += len(piece)

    def delivered_text(self) -> str:
        return "".join(self.text)

    def delivered_output_tokens(self, model: str) -> int:
        return counter_for(model).count(self.delivered_text())

    def stop_events(self, usage: Usage, notice: dict[str, Any]) -> bytes:
        """The events that end a stream metergate stopped early (the wallet ran dry), in this provider's
        format, so that the client's SDK sees a complete stream: ``usage`` is what was delivered and
        billed, ``notice`` says why (``{"stop_reason": "insufficient_funds", ...}``). Providers without a
        clean way to say "stopped at a limit" end with an ``error`` event carrying the notice."""
        error = {"type": "error", "error": {"message": notice.get("message", ""), "type": "insufficient_funds",
                                            "code": notice.get("stop_reason", "stopped"), "param": None},
                 "metergate": notice}
        return b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"

    def error_event(self, code: str, message: str, status: int) -> bytes:
        """The event that ends a stream which did not end as the provider meant (cut at shutdown, broken
        upstream), so that the client knows its answer is incomplete: by default an ``error`` event, which both
        the OpenAI and the Anthropic SDKs raise as an API error; ``status`` is the HTTP status it stands for."""
        error = {"type": "error", "error": {"message": message, "type": "server_error", "code": code, "param": None}}
        return b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"


class Adapter(Protocol):
    name: str

    def classify(self, path: str) -> str | None: ...

    def prepare(self, endpoint: str, body: bytes, payload: dict[str, Any], default_max_output: int) -> Prepared: ...

    def usage_from_body(self, prepared: Prepared, body: bytes) -> tuple[Usage | None, str]:
        """The usage in a whole answer (``source="none"``: explicitly nothing to charge), else the
        generated text to estimate it from."""

    def stream_meter(self, prepared: Prepared, max_text_chars: int) -> StreamMeter: ...

    def auth_header(self, key: str) -> tuple[str, str]: ...


@runtime_checkable
class SignsUpstream(Protocol):
    """An adapter that builds its upstream URL and signs each request itself (Bedrock's SigV4)."""

    def upstream_request(self, match: RouteMatch, headers: CIMultiDict[str], prepared: Prepared
                         ) -> tuple[URL, CIMultiDict[str]]: ...


def believed(read: Callable[[Any], T | None], reported: Any, anomalies: list[str]) -> T | None:
    """``read(reported)``, or ``None`` (no usage: bill from the estimate) when it is an anomaly, which is
    noted in ``anomalies`` and logged."""
    try:
        return read(reported)
    except UsageAnomaly as anomaly:
        if len(anomalies) < MAX_ANOMALIES:
            anomalies.append(str(anomaly))
        if len(anomalies) == 1:
            log.warning("%s: implausible usage from the upstream (%s); billing from the estimate",
                        current_request_id() or "-", anomaly)
        return None


def looks_like_sse(body: bytes) -> bool:
    """True when a whole response body is an event stream (an upstream that streamed a non-stream
    request, or labelled a stream as something else); JSON starts with ``{`` or ``[``."""
    return body.lstrip()[:7].startswith(_SSE_FIELDS)


def meter_whole_stream(meter: StreamMeter, body: bytes) -> tuple[Usage | None, str]:
    """Meter an event stream that arrived as one body, event by event as a relayed stream would be: its
    usage, else the text it delivered (to estimate from)."""
    sse = SSEBuffer(len(body) + 1)
    events = sse.feed(body)
    if (rest := sse.rest()).strip():
        events.append(rest)
    for event in events:
        meter.on_event(event_data(event))
    if meter.usage is not None:
        return meter.usage, ""
    return None, meter.delivered_text()


def content_tokens(content: Any, count: Callable[[str], int], media: MediaTally | None = None) -> int:
    """Tokens of a message's content: a string, or a list of typed parts (text, images, audio, documents,
    tool calls...). Media parts are estimated by the provider's rules (:mod:`metergate.metering.media`) and
    tallied in ``media`` as well; without ``media`` every non-text part counts as its JSON."""
    if content is None:
        return 0
    if isinstance(content, str):
        return count(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                kind = part.get("type")
                source = part.get("source")
                if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                    total += count(part["text"])
                elif kind == "document" and isinstance(source, dict) and source.get("type") == "text" \
                        and isinstance(source.get("data"), str):
                    total += count(source["data"])  # a plain-text document is prompt text
                elif kind == "tool_result" and isinstance(part.get("content"), list):
                    total += count(json.dumps({k: v for k, v in part.items() if k != "content"}))
                    total += content_tokens(part["content"], count, media)  # may carry images
                elif media is not None and (tokens := media.part(part)) is not None:
                    total += tokens
                else:
                    total += count(json.dumps(part, ensure_ascii=False))
            elif isinstance(part, str):
                total += count(part)
        return total
    return count(json.dumps(content, ensure_ascii=False))


def load_json(data: bytes) -> Any:
    """Parse upstream JSON; anything unparseable (including absurd nesting) is None, never an error."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def adapter_for(provider: str, *, charge_failed: bool = False, media: MediaSettings | None = None,
                deployments: dict[str, str] | None = None, upstream: str | None = None,
                bedrock: BedrockSettings | None = None) -> Adapter:
    """The adapter of a route's provider; ``deployments``: an azure route's deployment-to-model map;
    ``upstream``: the route's upstream URL (a gemini route's paths carry the API version unless it does);
    ``bedrock``: a bedrock route's settings (its adapter, and botocore, are imported only for one)."""
    if provider == "bedrock":
        from metergate.proxy.adapters.bedrock import BedrockAdapter

        assert bedrock is not None, "config.routes requires bedrock settings on a bedrock route"
        return BedrockAdapter(bedrock, media=media)
    from metergate.proxy.adapters.anthropic import AnthropicAdapter
    from metergate.proxy.adapters.azure import AzureAdapter
    from metergate.proxy.adapters.gemini import GeminiAdapter
    from metergate.proxy.adapters.openai import OpenAIAdapter

    if provider == "gemini":
        return GeminiAdapter(upstream=upstream)

    if provider == "anthropic":
        return AnthropicAdapter(media=media)
    if provider == "azure":
        return AzureAdapter(deployments or {}, charge_failed=charge_failed, media=media)
    return OpenAIAdapter(charge_failed=charge_failed, media=media)
