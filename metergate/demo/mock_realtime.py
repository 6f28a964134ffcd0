"""A mock of the OpenAI Realtime API (``GET /v1/realtime?model=...`` upgraded to a WebSocket), speaking its
event format: ``session.created``, ``session.updated``, ``conversation.item.created``,
``input_audio_buffer.committed``, ``response.created``, output items and content parts,
``response.output_audio.delta`` with its transcript (or ``response.output_text.delta`` for text-only
responses), and ``response.done`` with ``usage`` (text and audio tokens apart, cached tokens as a subset).

The conversation's context grows like the real one: every item added, every appended second of audio and
every response's output become input of the next response, half of the earlier context counted as cached.
Every ``response.done`` it sends is recorded in ``app[SENT_USAGE]`` (what a test adds up), and every
connection's headers in ``app[CONNECTIONS]``. It accepts only ``Authorization: Bearer <api_key>``.

A ``response.create`` steers a response through its ``response.metadata`` (strings, as the API takes them):
``mock_deltas`` (audio or text deltas, default 3), ``mock_delay_s`` (between deltas), ``mock_usage`` (a JSON
usage object sent as is: anomalies), ``mock_no_done`` (``"1"``: never finish), ``mock_status`` (the status
``response.done`` reports, e.g. ``failed``), ``mock_repeat_done`` (``"1"``: send ``response.done`` twice),
``mock_die`` (``"1"``: drop the connection after the first delta). ``response.cancel`` ends the response in
progress with ``status: "cancelled"`` and the usage of what it produced. With server VAD turned on by
``session.update``, ``input_audio_buffer.commit`` starts a response by itself (20 deltas, 20 ms apart), as the
real API's turn detection does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

SENT_USAGE = web.AppKey("sent_usage", list)
CONNECTIONS = web.AppKey("connections", list)
_AUDIO_CHUNK = base64.b64encode(bytes(4800)).decode()  # 0.1 s of 24 kHz 16-bit silence
_PCM16_BYTES_PER_S = 48_000


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass
class _Conversation:
    text: int = 0  # context tokens so far
    audio: int = 0
    buffered_audio_bytes: int = 0
    server_vad: bool = False
    session: dict[str, Any] = field(default_factory=dict)
    current: asyncio.Task[None] | None = None
    cancelled: set[str] = field(default_factory=set)


class _Connection:
    def __init__(self, app: web.Application, ws: web.WebSocketResponse, model: str) -> None:
        self.app, self.ws, self.model = app, ws, model
        self.c = _Conversation(session={"type": "realtime", "object": "realtime.session", "id": _id("sess"),
                                        "model": model, "output_modalities": ["audio"]})

    async def send(self, event: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_str(json.dumps({"event_id": _id("event"), **event}))

    async def run(self) -> None:
        await self.send({"type": "session.created", "session": self.c.session})
        async for message in self.ws:
            if message.type != WSMsgType.TEXT:
                break
            try:
                event = json.loads(message.data)
            except ValueError:
                await self.send({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_json",
                                                            "message": "Invalid JSON", "param": None}})
                continue
            await self.on_event(event)
        if self.c.current is not None:
            self.c.current.cancel()

    async def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "session.update":
            session = event.get("session") or {}
            self.c.session.update(session)
            vad = ((session.get("audio") or {}).get("input") or {}).get("turn_detection") or session.get(
                "turn_detection") or {}
            self.c.server_vad = isinstance(vad, dict) and vad.get("type") == "server_vad"
            await self.send({"type": "session.updated", "session": self.c.session})
        elif kind == "conversation.item.create":
            item = {"id": _id("item"), **(event.get("item") or {})}
            for part in item.get("content") or []:
                self.c.text += 1 + len(str(part.get("text", ""))) // 4
            await self.send({"type": "conversation.item.created", "previous_item_id": None, "item": item})
        elif kind == "input_audio_buffer.append":
            self.c.buffered_audio_bytes += len(base64.b64decode(event.get("audio", "")))
        elif kind == "input_audio_buffer.commit":
            self.c.audio += self.c.buffered_audio_bytes * 10 // _PCM16_BYTES_PER_S  # one token per 100 ms
            self.c.buffered_audio_bytes = 0
            await self.send({"type": "input_audio_buffer.committed", "previous_item_id": None,
                             "item_id": _id("item")})
            if self.c.server_vad:  # a turn detected: a response of 20 deltas, 20 ms apart
                self.start({"metadata": {"mock_deltas": "20", "mock_delay_s": "0.02"}})
        elif kind == "response.create":
            if self.c.current is not None and not self.c.current.done():
                await self.send({"type": "error", "error": {
                    "type": "invalid_request_error", "code": "conversation_already_has_active_response",
                    "message": "Conversation already has an active response in progress", "param": None}})
                return
            self.start(event.get("response") or {})
        elif kind == "response.cancel":
            rid = event.get("response_id")
            if isinstance(rid, str):
                self.c.cancelled.add(rid)
        else:
            await self.send({"type": "error", "error": {"type": "invalid_request_error", "code": "unknown_event",
                                                        "message": f"Unknown event {kind!r}", "param": None}})

    def start(self, options: dict[str, Any]) -> None:
        self.c.current = asyncio.create_task(self.respond(options))

    async def respond(self, options: dict[str, Any]) -> None:
        meta = options.get("metadata") or {}
        rid, item_id = _id("resp"), _id("item")
        audio = "audio" in (options.get("output_modalities") or self.c.session.get("output_modalities") or ["audio"])
        deltas, delay = int(meta.get("mock_deltas", 3)), float(meta.get("mock_delay_s", 0))
        await self.send({"type": "response.created", "response": {
            "id": rid, "object": "realtime.response", "status": "in_progress", "output": [], "usage": None}})
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        await self.send({"type": "response.output_item.added", "response_id": rid, "output_index": 0, "item": item})
        await self.send({"type": "response.content_part.added", "response_id": rid, "item_id": item_id,
                         "output_index": 0, "content_index": 0,
                         "part": {"type": "audio" if audio else "text", "transcript": "" if audio else None}})
        produced, words = 0, []
        for index in range(deltas):
            if rid in self.c.cancelled:
                break
            where = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
            if audio:
                await self.send({"type": "response.output_audio.delta", **where, "delta": _AUDIO_CHUNK})
                await self.send({"type": "response.output_audio_transcript.delta", **where, "delta": f"word{index} "})
            else:
                await self.send({"type": "response.output_text.delta", **where, "delta": f"word{index} "})
            words.append(f"word{index}")
            produced += 1
            if meta.get("mock_die") == "1":
                await self.ws.close()
                return
            if delay:
                await asyncio.sleep(delay)
        if meta.get("mock_no_done") == "1" and rid not in self.c.cancelled:
            await asyncio.sleep(3600)
        status = "cancelled" if rid in self.c.cancelled else meta.get("mock_status", "completed")
        usage: Any = self.usage(produced, audio)
        if "mock_usage" in meta:
            usage = json.loads(meta["mock_usage"])
        self.app[SENT_USAGE].append({"response_id": rid, "status": status, "usage": usage})
        content = [{"type": "output_audio", "transcript": " ".join(words)} if audio else
                   {"type": "output_text", "text": " ".join(words)}]
        done = {"type": "response.done", "response": {
            "id": rid, "object": "realtime.response", "status": status,
            "status_details": {"type": status, "reason": "client_cancelled" if status == "cancelled" else None},
            "output": [{**item, "status": "completed", "content": content}], "usage": usage}}
        for _ in range(2 if meta.get("mock_repeat_done") == "1" else 1):
            await self.send(done)

    def usage(self, produced: int, audio: bool) -> dict[str, Any]:
        """This response's usage; its output joins the context of the next one."""
        text_in, audio_in = self.c.text + 8, self.c.audio
        cached_text, cached_audio = text_in // 2, audio_in // 2
        text_out = produced * 2
        audio_out = produced * 2 if audio else 0  # 0.1 s of audio a delta, at one token per 50 ms
        self.c.text += text_out
        self.c.audio += audio_out
        return {"total_tokens": text_in + audio_in + text_out + audio_out,
                "input_tokens": text_in + audio_in, "output_tokens": text_out + audio_out,
                "input_token_details": {"text_tokens": text_in, "audio_tokens": audio_in, "image_tokens": 0,
                                        "cached_tokens": cached_text + cached_audio,
                                        "cached_tokens_details": {"text_tokens": cached_text,
                                                                  "audio_tokens": cached_audio, "image_tokens": 0}},
                "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out}}


def build_mock_realtime(api_key: str) -> web.Application:
    app = web.Application()
    app[SENT_USAGE] = []
    app[CONNECTIONS] = []

    async def realtime(request: web.Request) -> web.StreamResponse:
        app[CONNECTIONS].append({"headers": dict(request.headers), "query": dict(request.query)})
        if request.headers.get("Authorization") != f"Bearer {api_key}":
            return web.json_response({"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                                                "message": "Incorrect API key provided", "param": None}}, status=401)
        model = request.query.get("model")
        if not model:
            return web.json_response({"error": {"type": "invalid_request_error", "code": "missing_model",
                                                "message": "Missing model", "param": "model"}}, status=400)
        ws = web.WebSocketResponse(protocols=("realtime",), max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        await _Connection(app, ws, model).run()
        return ws

    app.router.add_get("/v1/realtime", realtime)
    return app


__all__ = ["CONNECTIONS", "SENT_USAGE", "build_mock_realtime"]
