"""AWS Bedrock's Converse and ConverseStream, for the AWS SDKs (boto3's ``bedrock-runtime`` client) unchanged.

Which paths are metered and which model ids a route serves are in :mod:`metergate.config.bedrock`. A request
is priced as the model the route's ``bedrock.models`` maps its model id to. The prompt is estimated from
``system`` and ``messages`` (text blocks counted with tiktoken and inflated as for Claude, tool calls and
results as their JSON, images and PDFs by :mod:`metergate.metering.media`'s Anthropic rules) and marked
inexact: Bedrock's models do not share a public tokenizer. The output bound is ``inferenceConfig.maxTokens``.
A ConverseStream answer is AWS's binary event stream, relayed frame by frame
(:mod:`metergate.proxy.eventstream_relay`); its usage is in the ``metadata`` event, which ends the stream.

Usage is Bedrock's ``usage`` object (:func:`metergate.metering.usage.from_bedrock`). Upstream requests are
signed with SigV4 (:mod:`metergate.proxy.sigv4`) after the client's own ``Authorization`` and ``X-Amz-*``
headers are dropped, and go to the path built from the decoded model id, re-encoded as the AWS SDKs encode
it (``:`` as ``%3A``, an ARN's ``/`` as ``%2F``), so that the signature covers the path AWS receives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

from multidict import CIMultiDict
from yarl import URL

from metergate.config import bedrock
from metergate.config.media import MediaSettings
from metergate.config.routes import RouteMatch
from metergate.errors import BadRequest, NotFound
from metergate.metering.media import MediaTally
from metergate.metering.tokenizer import counter_for
from metergate.metering.usage import Usage, from_bedrock
from metergate.proxy.adapters.base import Prepared, StreamMeter, Verdict, believed, load_json
from metergate.proxy.adapters.schema import check
from metergate.proxy.eventstream import Frame

CLAUDE_TOKEN_FACTOR = 1.3  # as for Anthropic's own API: Bedrock's tokenizers are not public
_PER_MESSAGE_TOKENS = 5
EVENTSTREAM = "application/vnd.amazon.eventstream"
# Image formats Bedrock takes, as media types (for metergate.metering.media's header readers).
_IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "gif": "image/gif",
                "webp": "image/webp"}


class BedrockEndpoint(str):
    """An operation name (``converse``, ``converse-stream``) that also carries the model id it was
    classified from, from :meth:`BedrockAdapter.classify` to :meth:`BedrockAdapter.prepare`."""

    target: bedrock.Target

    def __new__(cls, target: bedrock.Target) -> BedrockEndpoint:
        endpoint = super().__new__(cls, target.operation)
        endpoint.target = target
        return endpoint


def _media_part(block: dict[str, Any]) -> dict[str, Any] | None:
    """A Bedrock image or document block in the Anthropic shape the media rules read, or None."""
    for kind in ("image", "document"):
        inner = block.get(kind)
        if not isinstance(inner, dict):
            continue
        source = inner.get("source")
        data = source.get("bytes") if isinstance(source, dict) else None
        media_type = _IMAGE_TYPES.get(str(inner.get("format"))) if kind == "image" else (
            "application/pdf" if inner.get("format") == "pdf" else None)
        if isinstance(data, str) and media_type is not None:
            return {"type": kind, "source": {"type": "base64", "media_type": media_type, "data": data}}
        return {"type": kind, "source": {"type": "url"}}  # in S3, or a format the rules cannot read: the bound
    return None


def _block_tokens(blocks: list[Any], count: Any, media: MediaTally) -> int:
    tokens = 0
    for block in blocks:
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            tokens += count(block["text"])
        elif (part := _media_part(block)) is not None:
            media.part(part)  # tallied in media.tokens, already in the model's own units
        elif isinstance(block.get("toolResult"), dict) and isinstance(block["toolResult"].get("content"), list):
            result = block["toolResult"]
            tokens += count(json.dumps({k: v for k, v in result.items() if k != "content"}, ensure_ascii=False))
            tokens += _block_tokens(result["content"], count, media)
        else:
            tokens += count(json.dumps(block, ensure_ascii=False))
    return tokens


def prepare(endpoint: str, body: bytes, payload: dict[str, Any], default_max_output: int, model: str,
            media_settings: MediaSettings) -> Prepared:
    check(endpoint, payload, model=model)  # every field read below has its API's type
    count = counter_for(model).count_prompt
    media = MediaTally(media_settings, "anthropic", model)
    tokens = _block_tokens(payload.get("system") or [], count, media)
    for message in payload["messages"]:
        tokens += _PER_MESSAGE_TOKENS + _block_tokens(message["content"], count, media)
    if "toolConfig" in payload:
        tokens += count(json.dumps(payload["toolConfig"], ensure_ascii=False))
    estimate = int(tokens * CLAUDE_TOKEN_FACTOR) + 1 + media.tokens
    config = payload.get("inferenceConfig") or {}
    max_tokens = config.get("maxTokens")
    return Prepared(endpoint, model, endpoint == bedrock.CONVERSE_STREAM, estimate, max_tokens or default_max_output,
                    False, body, output_capped=max_tokens is not None)


def with_max_tokens(prepared: Prepared, tokens: int) -> Prepared:
    """The request with ``inferenceConfig.maxTokens`` set to ``tokens``, so that Bedrock stops where the hold
    ends."""
    payload = json.loads(prepared.body)
    assert isinstance(payload, dict), "the pipeline parsed this body as an object before preparing it"
    config = payload.get("inferenceConfig")
    payload["inferenceConfig"] = {**(config if isinstance(config, dict) else {}), "maxTokens": tokens}
    return replace(prepared, body=json.dumps(payload, ensure_ascii=False).encode(), output_capped=True,
                   max_output_tokens=tokens)


def usage_from_body(prepared: Prepared, body: bytes) -> tuple[Usage | None, str]:
    payload = load_json(body)
    if not isinstance(payload, dict):
        return None, ""
    usage = believed(from_bedrock, payload.get("usage"), prepared.anomalies)
    if usage is not None:
        return usage, ""
    output = payload.get("output")
    message = output.get("message") if isinstance(output, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    texts = [block["text"] for block in content or [] if isinstance(block, dict) and isinstance(block.get("text"), str)]
    return None, "".join(texts)


@dataclass(slots=True)
class BedrockStreamMeter(StreamMeter):
    """Usage and delivered text of one ConverseStream, read frame by frame."""

    upstream_error: bool = False  # the upstream sent an exception frame

    def on_event(self, data: bytes | None) -> Verdict:
        raise NotImplementedError("a ConverseStream is framed, not server-sent events: use on_frame")

    def on_frame(self, frame: Frame) -> Verdict:
        """``forward`` for every frame but ``metadata``, the last, which carries the usage and waits for the
        settlement (``final``)."""
        if frame.is_exception:
            self.upstream_error = True
            return "forward"
        kind = frame.event_type
        event = load_json(frame.payload)
        if not isinstance(event, dict):
            return "forward"
        if kind == "contentBlockDelta":
            self.content_events += 1
            delta = event.get("delta")
            if isinstance(delta, dict):
                self.collect(delta.get("text"))
                tool = delta.get("toolUse")
                if isinstance(tool, dict):
                    self.collect(tool.get("input"))
                reasoning = delta.get("reasoningContent")
                if isinstance(reasoning, dict):
                    self.collect(reasoning.get("text"))
        elif kind == "contentBlockStart":
            self.content_events += 1
        elif kind == "metadata":
            self.usage = self.believed(from_bedrock, event.get("usage"))
            return "final"
        return "forward"


class BedrockAdapter:
    name = "bedrock"

    def __init__(self, settings: bedrock.BedrockSettings, *, media: MediaSettings | None = None) -> None:
        from metergate.proxy.sigv4 import SigV4Signer  # botocore: imported only when a bedrock route exists

        self._models = dict(settings.models)
        self._media = media or MediaSettings()
        self._signer = SigV4Signer(settings)

    def classify(self, path: str) -> str | None:
        found = bedrock.target(path)
        if found is None:
            return None
        self.model_of(found.model_id)  # refused before the body is read
        return BedrockEndpoint(found)

    def model_of(self, model_id: str) -> str:
        """The model ``model_id`` is priced as; 404 ``unknown_model`` when the route does not serve it."""
        model = self._models.get(model_id)
        if model is None:
            raise NotFound(f"The model id {model_id!r} is not served by this route; nothing was charged.",
                           code="unknown_model", param="modelId")
        return model

    def prepare(self, endpoint: str, body: bytes, payload: dict[str, Any], default_max_output: int) -> Prepared:
        if isinstance(endpoint, BedrockEndpoint):
            model_id = endpoint.target.model_id
        else:
            # A price quote names the operation alone: the payload's modelId names the model id (a proxy
            # request's is in its path, and a modelId in its body is ignored).
            if endpoint not in bedrock.OPERATIONS:
                raise BadRequest(f"A bedrock route's endpoints are {' and '.join(bedrock.OPERATIONS)}.",
                                 code="invalid_request", param="endpoint")
            named = payload.get("modelId")
            if not isinstance(named, str) or not bedrock.valid_model_id(named):
                raise BadRequest("'modelId' is required and must be a Bedrock model id.", code="missing_model",
                                 param="modelId")
            model_id = named
        prepared = prepare(str(endpoint), body, payload, default_max_output, self.model_of(model_id), self._media)
        return replace(prepared, deployment=model_id)

    def usage_from_body(self, prepared: Prepared, body: bytes) -> tuple[Usage | None, str]:
        return usage_from_body(prepared, body)

    def stream_meter(self, prepared: Prepared, max_text_chars: int) -> BedrockStreamMeter:
        return BedrockStreamMeter(max_text_chars, anomalies=prepared.anomalies)

    def auth_header(self, key: str) -> tuple[str, str]:
        raise AssertionError("a bedrock route signs its requests; it has no api_key (config.routes refuses one)")

    def upstream_request(self, match: RouteMatch, headers: CIMultiDict[str], prepared: Prepared
                         ) -> tuple[URL, CIMultiDict[str]]:
        """The upstream URL, the model id encoded as the AWS SDKs encode it, and the headers signed for it."""
        found = bedrock.target(match.upstream_path)
        assert found is not None, "classify() metered this path"
        base = match.base
        path = base.raw_path.rstrip("/") + "/model/" + quote(found.model_id, safe="") + "/" + found.operation
        url = URL.build(scheme=base.scheme, authority=base.raw_authority, path=path, query_string=match.query,
                        encoded=True)
        return url, self._signer.sign("POST", url, headers, prepared.body)
