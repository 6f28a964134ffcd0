"""OpenAI's audio and image endpoints, mocked in their real wire format, for the tests and the demo.

``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` read a multipart upload and answer
``json`` (``{"text", "usage"}``), ``verbose_json`` (with ``duration``), ``text``, ``srt`` or ``vtt``, or, with
``stream=true``, ``transcript.text.delta`` / ``transcript.text.done`` events. whisper-* report
``usage: {"type": "duration", "seconds"}`` (whole seconds, rounded up, of the WAV upload's length as its
header declares it, or ``X-Mock-Behavior: seconds:N``); other models report token usage with
``input_token_details``. ``POST /v1/audio/speech`` answers audio bytes in chunks (``audio/mpeg``) or, with
``stream_format: "sse"``, ``speech.audio.delta`` / ``speech.audio.done`` events, the last one carrying token
usage. ``POST /v1/images/generations`` and ``/v1/images/edits`` (multipart) answer ``n`` images (``images:K``
answers only K), with ``usage`` for gpt-image-* models. ``no-usage`` leaves usage out, ``error:STATUS``
fails, ``usage-field:PATH=JSON`` overrides a usage field, as on the other mock endpoints.

Each request is recorded with its path, headers, fields and the byte size of each uploaded file.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

from aiohttp import BodyPartReader, web

from metergate.demo.mock_upstream import REQUESTS, _behavior, _sse, override_usage
from metergate.metering.tokenizer import counter_for

# The model a front (metergate.demo.mock_azure) says the request runs, whatever its body names.
MODEL = web.RequestKey("mock_media_model", str)
TRANSCRIPT = "Metergate holds a prepaid wallet before the upstream hears a single second of audio."
AUDIO_CHUNK = b"\xff\xfb\x90\x64" + b"\x00" * 412  # an MPEG audio frame's worth of bytes


def _error(b: dict[str, str]) -> web.Response | None:
    if "error" not in b:
        return None
    return web.json_response({"error": {"message": "mock failure", "type": "server_error", "code": None,
                                        "param": None}}, status=int(b["error"] or 500))


async def _form(request: web.Request) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        assert isinstance(part, BodyPartReader)
        data = await part.read()
        if part.filename is not None:
            files.setdefault(part.name or "", []).append(bytes(data))
        else:
            fields[part.name or ""] = bytes(data).decode()
    return fields, files


def _record(request: web.Request, fields: dict[str, Any], files: dict[str, list[bytes]]) -> None:
    request.app[REQUESTS].append({"path": request.path, "headers": dict(request.headers), "body": fields,
                                  "files": {name: [len(f) for f in parts] for name, parts in files.items()}})


def _wav_seconds(raw: bytes) -> int:
    """A WAV upload's length as its header declares it (data size over byte rate), rounded up."""
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        return 0
    byte_rate = struct.unpack("<I", raw[28:32])[0]
    at = 12
    while at + 8 <= len(raw):
        chunk, size = raw[at:at + 4], struct.unpack("<I", raw[at + 4:at + 8])[0]
        if chunk == b"data":
            return -(-size // byte_rate) if byte_rate else 0
        at += 8 + size + (size & 1)
    return 0


async def transcribe(request: web.Request) -> web.StreamResponse:
    b = _behavior(request)
    fields, files = await _form(request)
    _record(request, fields, files)
    if (failed := _error(b)) is not None:
        return failed
    model = request.get(MODEL) or fields.get("model", "")
    raw = (files.get("file") or [b""])[0]
    seconds = int(b["seconds"]) if "seconds" in b else _wav_seconds(raw)
    count = counter_for(model).count
    if model.startswith("whisper"):
        usage: dict[str, Any] = {"type": "duration", "seconds": seconds}
    else:
        audio, text = seconds * 10, count(fields.get("prompt", ""))
        output = count(TRANSCRIPT)
        usage = {"type": "tokens", "input_tokens": audio + text, "output_tokens": output,
                 "total_tokens": audio + text + output,
                 "input_token_details": {"text_tokens": text, "audio_tokens": audio}}
    usage = override_usage(usage, b)
    if fields.get("stream") == "true":
        words = TRANSCRIPT.split(" ")
        events: list[dict[str, Any]] = [{"type": "transcript.text.delta", "delta": word + " ", "logprobs": None}
                                        for word in words]
        events.append({"type": "transcript.text.done", "text": TRANSCRIPT, "logprobs": None,
                       **({} if "no-usage" in b else {"usage": usage})})
        return await _sse(request, events, b, done=False)
    response_format = fields.get("response_format", "json")
    if response_format in ("text", "srt", "vtt"):
        return web.Response(text=TRANSCRIPT + "\n", content_type="text/plain")
    payload: dict[str, Any] = {"text": TRANSCRIPT}
    if response_format == "verbose_json":
        payload = {"task": "transcribe", "language": "english", "duration": float(seconds), "text": TRANSCRIPT,
                   "segments": []}
    if "no-usage" not in b:
        payload["usage"] = usage
    return web.json_response(payload)


async def speech(request: web.Request) -> web.StreamResponse:
    b = _behavior(request)
    body = await request.json()
    _record(request, body, {})
    if (failed := _error(b)) is not None:
        return failed
    body = {**body, "model": request.get(MODEL) or body.get("model", "")}
    chunks = max(1, len(body.get("input", "")) // 16)
    if body.get("stream_format") == "sse":
        text = counter_for(body.get("model", "")).count(body.get("input", "") + body.get("instructions", ""))
        events: list[dict[str, Any]] = [{"type": "speech.audio.delta",
                                         "audio": base64.b64encode(AUDIO_CHUNK).decode()} for _ in range(chunks)]
        usage = override_usage({"input_tokens": text, "output_tokens": chunks * 25,
                                "total_tokens": text + chunks * 25}, b)
        events.append({"type": "speech.audio.done", **({} if "no-usage" in b else {"usage": usage})})
        return await _sse(request, events, b, done=False)
    response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
    await response.prepare(request)
    for _ in range(chunks):
        await response.write(AUDIO_CHUNK)
    await response.write_eof()
    return response


async def images(request: web.Request) -> web.StreamResponse:
    b = _behavior(request)
    files: dict[str, list[bytes]] = {}
    if request.content_type == "multipart/form-data":
        form, files = await _form(request)
        body: dict[str, Any] = {**form, **({"n": int(form["n"])} if "n" in form else {})}
    else:
        body = await request.json()
    _record(request, body, files)
    if (failed := _error(b)) is not None:
        return failed
    model = request.get(MODEL) or body.get("model", "dall-e-2")
    n = int(b["images"]) if "images" in b else int(body.get("n") or 1)
    picture = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()
    data = [{"b64_json": picture} if body.get("response_format") == "b64_json" or model.startswith("gpt-image")
            else {"url": f"https://images.example/{i}.png"} for i in range(n)]
    payload: dict[str, Any] = {"created": int(time.time()), "data": data}
    if model.startswith("gpt-image") and "no-usage" not in b:
        text = counter_for(model).count(body.get("prompt", ""))
        image = 323 * (len(files.get("image", [])) + len(files.get("image[]", [])))
        output = 1056 * n
        payload["usage"] = override_usage({
            "input_tokens": text + image, "output_tokens": output, "total_tokens": text + image + output,
            "input_tokens_details": {"text_tokens": text, "image_tokens": image}}, b)
    return web.json_response(payload)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/audio/transcriptions", transcribe)
    app.router.add_post("/v1/audio/translations", transcribe)
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_post("/v1/images/generations", images)
    app.router.add_post("/v1/images/edits", images)
