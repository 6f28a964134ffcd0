"""The request fields metergate relies on, checked by type and bound before anything is estimated or held.

One schema per endpoint, for every adapter. A field metergate reads to estimate or hold (the model, whether
the request streams, its output limits, the prompt) has exactly the JSON type its API defines: booleans are
``true`` or ``false`` (never ``1`` or ``"true"``, which an upstream may coerce into a stream metergate would
not meter as one), counts are integers within bounds, strings are bounded. A field that breaks its rule is
refused with 400 and a ``param`` naming it, before the hold and before the upstream sees anything. Fields
metergate does not rely on pass through to the upstream untouched: providers add fields often.

:func:`check` returns the checked values, so that adapters read them from here and never from the raw body.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from metergate.errors import BadRequest
from metergate.metering.usage import MAX_TOKENS

MAX_MODEL_CHARS = 128  # the usage record stores up to 128 (wallet.schema)
MAX_CHOICES = 128  # OpenAI's own bound on n
MAX_TOKEN_ID = 2**32 - 1  # token ids in a prompt given as a token array
# Model names as providers spell them: "gpt-4o-mini", "ft:gpt-4o:org:custom:id", "meta-llama/Llama-3.1-8B",
# "anthropic.claude-3-sonnet-20240229-v1:0", "gemini-1.5-pro@001". No spaces, quotes or control characters.
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]*")

Rule = Callable[[Any, str], None]  # raises BadRequest naming the param when the value breaks the rule


@dataclass(frozen=True, slots=True)
class Checked:
    """The fields of a request that passed its endpoint's schema."""

    model: str
    stream: bool
    include_usage: bool  # stream_options.include_usage as the client sent it
    has_stream_options: bool
    max_output: int | None  # the request's own output limit per choice (the first of ``limits`` it sets)
    choices: int  # how many answers it asks for (the largest of n and best_of)


def _refuse(param: str, message: str) -> BadRequest:
    return BadRequest(f"'{param}' {message}.", code="invalid_request", param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string(value: Any, param: str) -> None:
    if not isinstance(value, str):
        raise _refuse(param, "must be a string")


def _boolean(value: Any, param: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise _refuse(param, "must be a boolean (true or false)")


def _bounded(high: int) -> Rule:
    def rule(value: Any, param: str) -> None:
        if value is not None and (not _is_int(value) or not 1 <= value <= high):
            raise _refuse(param, f"must be an integer from 1 to {high}")
    return rule


def _stream_options(value: Any, param: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _refuse(param, "must be an object")
    _boolean(value.get("include_usage"), f"{param}.include_usage")


def _text_or_parts(value: Any, param: str) -> None:
    """Content as the APIs define it: a string, or an array of typed parts (objects)."""
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise _refuse(param, "must be a string or an array of content parts")
    for index, part in enumerate(value):
        if not isinstance(part, dict):
            raise _refuse(f"{param}[{index}]", "must be an object")


def _messages(*, content_required: bool) -> Rule:
    def rule(value: Any, param: str) -> None:
        if not isinstance(value, list) or not value:
            raise _refuse(param, "must be a non-empty array")
        for index, message in enumerate(value):
            at = f"{param}[{index}]"
            if not isinstance(message, dict):
                raise _refuse(at, "must be an object")
            _string(message.get("role"), f"{at}.role")
            content = message.get("content")
            if content is not None or content_required:
                _text_or_parts(content, f"{at}.content")
    return rule


def _token_array(value: list[Any]) -> bool:
    return all(_is_int(x) and 0 <= x <= MAX_TOKEN_ID for x in value)


def _prompt(value: Any, param: str) -> None:
    """A completions prompt or an embeddings input: a string, or a non-empty array of strings, of token
    ids, or of token-id arrays."""
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise _refuse(param, "must be a string or a non-empty array")
    if _token_array(value):
        return
    for index, item in enumerate(value):
        if not isinstance(item, str) and not (isinstance(item, list) and _token_array(item)):
            raise _refuse(f"{param}[{index}]", f"must be a string or an array of token ids (0 to {MAX_TOKEN_ID})")


def _responses_input(value: Any, param: str) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise _refuse(param, "must be a string or a non-empty array")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise _refuse(f"{param}[{index}]", "must be an object")


def _optional(rule: Rule) -> Rule:
    def optional(value: Any, param: str) -> None:
        if value is not None:
            rule(value, param)
    return optional


def _required(rule: Rule) -> Rule:
    def required(value: Any, param: str) -> None:
        if value is None:
            raise _refuse(param, "is required")
        rule(value, param)
    return required


_COUNT = _bounded(MAX_TOKENS)
_CHOICES = _bounded(MAX_CHOICES)


@dataclass(frozen=True, slots=True)
class Schema:
    fields: dict[str, Rule]
    limits: tuple[str, ...] = ()  # the output-limit fields, in order of precedence
    choices: tuple[str, ...] = ()  # fields that multiply the output (n, best_of)
    streams: bool = True


_STREAMING = {"stream": _boolean, "stream_options": _stream_options}
# Endpoint names as the adapters classify them (openai.CHAT, responses.RESPONSES, anthropic.MESSAGES, ...).
SCHEMAS: dict[str, Schema] = {
    "chat.completions": Schema(
        {**_STREAMING, "messages": _messages(content_required=False), "max_completion_tokens": _COUNT,
         "max_tokens": _COUNT, "n": _CHOICES},
        limits=("max_completion_tokens", "max_tokens"), choices=("n",)),
    "completions": Schema(
        {**_STREAMING, "prompt": _required(_prompt), "max_tokens": _COUNT, "n": _CHOICES, "best_of": _CHOICES},
        limits=("max_tokens",), choices=("n", "best_of")),
    "embeddings": Schema({"input": _required(_prompt)}, streams=False),
    "responses": Schema(
        {**_STREAMING, "input": _required(_responses_input), "instructions": _optional(_string),
         "max_output_tokens": _COUNT},
        limits=("max_output_tokens",)),
    "messages": Schema(
        {**_STREAMING, "messages": _messages(content_required=True), "system": _optional(_text_or_parts),
         "max_tokens": _COUNT},
        limits=("max_tokens",)),
}


def check_model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string.", code="missing_model", param="model")
    if len(model) > MAX_MODEL_CHARS or not _MODEL.fullmatch(model):
        raise BadRequest(f"'model' must be at most {MAX_MODEL_CHARS} characters of letters, digits and . _ : / @ + "
                         "= - (starting with a letter or digit).", code="invalid_model", param="model")
    return model


def check(endpoint: str, payload: dict[str, Any], *, model: str | None = None) -> Checked:
    """Check ``payload`` against ``endpoint``'s schema; 400 naming the first field that breaks its rule.
    ``model``: the model the request is priced as when the upstream decides it, not the body (an Azure
    deployment's); the body's own ``model`` is then optional, and still checked when present."""
    schema = SCHEMAS.get(endpoint)
    if schema is None:  # the proxy's routes name known endpoints; a quote's payload names its own
        raise BadRequest(f"Unknown endpoint {endpoint!r}; known: {', '.join(sorted(SCHEMAS))}.",
                         code="invalid_request", param="endpoint")
    if model is None:
        model = check_model(payload)
    elif "model" in payload:
        check_model(payload)
    for name, rule in schema.fields.items():
        rule(payload.get(name), name)
    options = payload.get("stream_options")
    limit = next((payload[name] for name in schema.limits if payload.get(name) is not None), None)
    return Checked(
        model=model, stream=schema.streams and payload.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        has_stream_options=isinstance(options, dict),
        max_output=limit, choices=max([payload.get(name) or 1 for name in schema.choices], default=1))
