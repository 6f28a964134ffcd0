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
    # Every request checks each of its messages: a field's name (``messages[3].role``) is spelled out only
    # for the refusal that names it.
    def rule(value: Any, param: str) -> None:
        if not isinstance(value, list) or not value:
            raise _refuse(param, "must be a non-empty array")
        for index, message in enumerate(value):
            if not isinstance(message, dict):
                raise _refuse(f"{param}[{index}]", "must be an object")
            if not isinstance(message.get("role"), str):
                raise _refuse(f"{param}[{index}].role", "must be a string")
            content = message.get("content")
            if (content is not None or content_required) and not isinstance(content, str):
                _text_or_parts(content, f"{param}[{index}].content")
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


def _object(fields: dict[str, Rule], *, refused: tuple[str, ...] = ()) -> Rule:
    """An optional JSON object whose ``fields`` follow their rules; ``refused`` fields are spellings the API
    accepts too but that metergate does not read (so that a limit cannot slip past it under another name)."""
    def rule(value: Any, param: str) -> None:
        if value is None:
            return
        if not isinstance(value, dict):
            raise _refuse(param, "must be an object")
        for name in refused:
            if name in value:
                raise _refuse(f"{param}.{name}", "is not accepted here: spell the field in lowerCamelCase")
        for name, field_rule in fields.items():
            field_rule(value.get(name), f"{param}.{name}")
    return rule


def _thinking_budget(value: Any, param: str) -> None:
    if value is not None and (not _is_int(value) or not -1 <= value <= MAX_TOKENS):
        raise _refuse(param, f"must be an integer from -1 (dynamic) to {MAX_TOKENS}")


def _gemini_parts(value: Any, param: str) -> None:
    if not isinstance(value, list):
        raise _refuse(param, "must be an array of parts")
    for index, part in enumerate(value):
        if not isinstance(part, dict):
            raise _refuse(f"{param}[{index}]", "must be an object")
        if "text" in part:
            _string(part["text"], f"{param}[{index}].text")


def _gemini_content(value: Any, param: str) -> None:
    if not isinstance(value, dict):
        raise _refuse(param, "must be an object with 'parts'")
    if value.get("role") is not None:
        _string(value["role"], f"{param}.role")
    _gemini_parts(value.get("parts"), f"{param}.parts")


def _gemini_contents(value: Any, param: str) -> None:
    if not isinstance(value, list) or not value:
        raise _refuse(param, "must be a non-empty array")
    for index, content in enumerate(value):
        _gemini_content(content, f"{param}[{index}]")


def _array(value: Any, param: str) -> None:
    if value is not None and not isinstance(value, list):
        raise _refuse(param, "must be an array")


# Gemini's generationConfig: the output limit and the candidate count bound the hold; thinking settings are
# checked for their types. The API also parses snake_case names, which metergate refuses for the fields it reads.
_GENERATION_CONFIG = _object(
    {"maxOutputTokens": _COUNT, "candidateCount": _CHOICES,
     "thinkingConfig": _object({"thinkingBudget": _thinking_budget, "includeThoughts": _boolean},
                               refused=("thinking_budget", "include_thoughts"))},
    refused=("max_output_tokens", "candidate_count", "thinking_config"))


def _absent(value: Any, param: str) -> None:
    if value is not None:
        raise _refuse(param, "is not accepted here: spell the field in lowerCamelCase")


def _blocks(value: Any, param: str) -> None:
    """Bedrock content: an array of blocks, each an object (``{"text": ...}``, ``{"image": ...}``, ...)."""
    if not isinstance(value, list):
        raise _refuse(param, "must be an array of content blocks")
    for index, block in enumerate(value):
        if not isinstance(block, dict):
            raise _refuse(f"{param}[{index}]", "must be an object")
        if "text" in block:
            _string(block["text"], f"{param}[{index}].text")


def _converse_messages(value: Any, param: str) -> None:
    if not isinstance(value, list) or not value:
        raise _refuse(param, "must be a non-empty array")
    for index, message in enumerate(value):
        at = f"{param}[{index}]"
        if not isinstance(message, dict):
            raise _refuse(at, "must be an object")
        _string(message.get("role"), f"{at}.role")
        _blocks(message.get("content"), f"{at}.content")


def _inference_config(value: Any, param: str) -> None:
    if not isinstance(value, dict):
        raise _refuse(param, "must be an object")
    _COUNT(value.get("maxTokens"), f"{param}.maxTokens")


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
    # Gemini: the model is in the path, a stream is chosen by the method (streamGenerateContent).
    "generate_content": Schema(
        {"contents": _gemini_contents, "systemInstruction": _optional(_gemini_content),
         "generationConfig": _GENERATION_CONFIG, "cachedContent": _optional(_string), "tools": _array,
         "safetySettings": _array, "toolConfig": _object({}),
         **{name: _absent for name in ("generation_config", "system_instruction", "cached_content")}},
        limits=("generationConfig.maxOutputTokens",), choices=("generationConfig.candidateCount",), streams=False),
}
# Bedrock's Converse and ConverseStream (the model is in the path, the stream in the operation; the output
# limit is inferenceConfig.maxTokens, read by the adapter once checked here).
_CONVERSE = {"messages": _required(_converse_messages), "system": _optional(_blocks),
             "inferenceConfig": _optional(_inference_config), "toolConfig": _object({})}
SCHEMAS["converse"] = Schema(_CONVERSE, streams=False)
SCHEMAS["converse-stream"] = Schema(_CONVERSE, streams=False)


def _dotted(payload: dict[str, Any], name: str) -> Any:
    """``payload[a][b]`` for ``name`` "a.b" (a field inside an object, as Gemini nests its limits)."""
    if "." not in name:
        return payload.get(name)
    value: Any = payload
    for key in name.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


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
    limit = None
    for name in schema.limits:
        if (limit := _dotted(payload, name)) is not None:
            break
    choices = max([_dotted(payload, name) or 1 for name in schema.choices], default=1)
    return Checked(
        model=model, stream=schema.streams and payload.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        has_stream_options=isinstance(options, dict), max_output=limit, choices=choices)


# ---------------------------------------------------------------------- media endpoints
# The audio and image endpoints' fields that metergate prices from. A multipart form's text fields are
# typed first (:func:`typed_form`), so that both bodies meet the same rules: ``n`` is an integer either way.

MAX_IMAGES = 10  # OpenAI's bound on n for image generation and edits
MAX_SPEECH_CHARS = 4096  # OpenAI's bound on a speech request's input
MAX_IMAGE_PROMPT_CHARS = 32_000  # gpt-image-1's; DALL-E's are shorter, and the upstream says so
MAX_TEXT_CHARS = 32_000  # any other free-text field metergate reads (a transcription prompt, instructions)
IMAGE_SIZES = {
    "dall-e-2": ("256x256", "512x512", "1024x1024"),
    "dall-e-3": ("1024x1024", "1792x1024", "1024x1792"),
    "gpt-image-1": ("auto", "1024x1024", "1536x1024", "1024x1536"),
}
IMAGE_QUALITIES = {"dall-e-2": ("standard",), "dall-e-3": ("standard", "hd"),
                   "gpt-image-1": ("auto", "low", "medium", "high")}
IMAGE_MAX_N = {"dall-e-2": MAX_IMAGES, "dall-e-3": 1, "gpt-image-1": MAX_IMAGES}
DEFAULT_IMAGE_MODEL = "dall-e-2"  # what OpenAI's API uses when a request names none


def image_family(model: str) -> str:
    """The image-model family whose sizes and qualities apply: ``gpt-image-1-mini`` is a gpt-image-1."""
    for family in ("gpt-image-1", "dall-e-3", "dall-e-2"):
        if model == family or model.startswith(family + "-"):
            return family
    return "gpt-image-1" if model.startswith("gpt-image") else "dall-e-2"


def _one_of(*allowed: str) -> Rule:
    def rule(value: Any, param: str) -> None:
        if value is not None and value not in allowed:
            raise _refuse(param, f"must be one of {', '.join(allowed)}")
    return rule


def _text(high: int, *, required: bool = False) -> Rule:
    def rule(value: Any, param: str) -> None:
        if value is None:
            if required:
                raise _refuse(param, "is required")
            return
        if not isinstance(value, str) or (required and not value) or len(value) > high:
            raise _refuse(param, f"must be a {'non-empty ' if required else ''}string of at most {high} characters")
    return rule


def _number(low: float, high: float) -> Rule:
    def rule(value: Any, param: str) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not low <= value <= high):
            raise _refuse(param, f"must be a number from {low} to {high}")
    return rule


def _voice(value: Any, param: str) -> None:
    if isinstance(value, dict):
        _text(128, required=True)(value.get("id"), f"{param}.id")
    else:
        _text(128, required=True)(value, param)


_TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
MEDIA_SCHEMAS: dict[str, dict[str, Rule]] = {
    "audio.transcriptions": {"response_format": _one_of(*_TRANSCRIPT_FORMATS), "stream": _boolean,
                             "prompt": _text(MAX_TEXT_CHARS), "language": _text(16)},
    "audio.translations": {"response_format": _one_of(*_TRANSCRIPT_FORMATS[:5]), "prompt": _text(MAX_TEXT_CHARS)},
    "audio.speech": {"input": _text(MAX_SPEECH_CHARS, required=True), "voice": _voice,
                     "instructions": _text(MAX_TEXT_CHARS), "speed": _number(0.25, 4.0),
                     "response_format": _one_of("mp3", "opus", "aac", "flac", "wav", "pcm"),
                     "stream_format": _one_of("audio", "sse")},
    "images.generations": {"prompt": _text(MAX_IMAGE_PROMPT_CHARS, required=True), "n": _bounded(MAX_IMAGES),
                           "response_format": _one_of("url", "b64_json"), "stream": _boolean},
    "images.edits": {"prompt": _text(MAX_IMAGE_PROMPT_CHARS, required=True), "n": _bounded(MAX_IMAGES),
                     "response_format": _one_of("url", "b64_json"), "stream": _boolean},
}
_FORM_INTEGERS = frozenset({"n"})
_FORM_BOOLEANS = frozenset({"stream"})


def typed_form(fields: dict[str, str]) -> dict[str, Any]:
    """A multipart form's text fields with the types their JSON twins have: ``n`` an integer (decimal digits
    only), ``stream`` a boolean (``true`` / ``false`` only). Anything else stays a string."""
    typed: dict[str, Any] = dict(fields)
    for name in _FORM_INTEGERS & fields.keys():
        if not re.fullmatch(r"[0-9]{1,4}", fields[name]):
            raise _refuse(name, "must be an integer")
        typed[name] = int(fields[name])
    for name in _FORM_BOOLEANS & fields.keys():
        if fields[name] not in ("true", "false"):
            raise _refuse(name, "must be true or false")
        typed[name] = fields[name] == "true"
    return typed


def check_media(endpoint: str, payload: dict[str, Any], *, model: str | None = None) -> str:
    """Check a media request's fields; returns its model. Image requests are also checked against their
    model's sizes, qualities and ``n`` (dall-e-3 makes one image a request). ``model``: the model the request
    is priced as when the upstream decides it (an Azure deployment's); the body's own is then only checked."""
    if model is not None:
        if "model" in payload:
            check_model(payload)
    elif endpoint.startswith("images.") and "model" not in payload:
        model = DEFAULT_IMAGE_MODEL
    else:
        model = check_model(payload)
    for name, rule in MEDIA_SCHEMAS[endpoint].items():
        rule(payload.get(name), name)
    if endpoint.startswith("images."):
        family = image_family(model)
        _one_of(*IMAGE_SIZES[family])(payload.get("size"), "size")
        _one_of(*IMAGE_QUALITIES[family])(payload.get("quality"), "quality")
        _bounded(IMAGE_MAX_N[family])(payload.get("n"), "n")
    return model
