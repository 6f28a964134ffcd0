"""What every provider adapter answers, and the pieces they share.

An adapter is a small plug-in for one upstream API. For a request: which endpoint is it, what model,
is it a stream, how many input tokens and at most how many output tokens, and what body goes upstream
(:class:`Prepared`). For a whole response: the usage, or the text to estimate it from. For a stream: a
:class:`StreamMeter` that reads each event's data and says whether the client gets it now, never, or
only after settlement (the stream's final event, so that a client that saw the end sees a settled
ledger).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from metergate.errors import BadRequest
from metergate.metering.tokenizer import counter_for
from metergate.metering.usage import Usage

Verdict = Literal["forward", "drop", "final"]
IMAGE_TOKENS = 1105  # a high-detail 1024x1024 image; images are estimated, never decoded


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

    def on_event(self, data: bytes | None) -> Verdict:
        raise NotImplementedError

    def collect(self, piece: Any) -> None:
        if isinstance(piece, str) and piece and self.text_chars < self.max_text_chars:
            self.text.append(piece)
            self.text_chars += len(piece)

    def delivered_output_tokens(self, model: str) -> int:
        return counter_for(model).count("".join(self.text))

    def stop_events(self, usage: Usage, notice: dict[str, Any]) -> bytes:
        """The events that end a stream metergate stopped early (the wallet ran dry), in this provider's
        format, so that the client's SDK sees a complete stream: ``usage`` is what was delivered and
        billed, ``notice`` says why (``{"stop_reason": "insufficient_funds", ...}``). Providers without a
        clean way to say "stopped at a limit" end with an ``error`` event carrying the notice."""
        error = {"type": "error", "error": {"message": notice.get("message", ""), "type": "insufficient_funds",
                                            "code": notice.get("stop_reason", "stopped"), "param": None},
                 "metergate": notice}
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


def positive_int(payload: dict[str, Any], key: str) -> int | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"'{key}' must be a positive integer.", code="invalid_request", param=key)
    return value


def require_model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string.", code="missing_model", param="model")
    return model


def content_tokens(content: Any, count: Callable[[str], int]) -> int:
    """Tokens of a message's content: a string, or a list of typed parts (text, images, tool calls...)."""
    if content is None:
        return 0
    if isinstance(content, str):
        return count(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                kind = part.get("type")
                if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                    total += count(part["text"])
                elif kind in ("image_url", "input_image", "image"):
                    total += IMAGE_TOKENS
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


def adapter_for(provider: str, *, charge_failed: bool = False) -> Adapter:
    from metergate.proxy.adapters.anthropic import AnthropicAdapter
    from metergate.proxy.adapters.openai import OpenAIAdapter

    if provider == "anthropic":
        return AnthropicAdapter()
    return OpenAIAdapter(charge_failed=charge_failed)
