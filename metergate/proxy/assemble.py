"""One non-stream JSON answer, assembled from the provider's own stream events.

metergate streams a non-streaming request from its upstream when the hold does not cover all the output
the request could produce (see :mod:`metergate.proxy.bounding`): it meters and grows the hold as tokens
arrive, exactly as for a client's stream, and stops where the wallet runs dry. The client asked for one
body, so the events the budget admitted are folded here into the body the provider would have sent:
OpenAI's ``chat.completion`` (content, refusal, tool calls assembled from their deltas, ``finish_reason``,
``usage``) and ``text_completion``, Anthropic's ``message`` (content blocks, ``stop_reason``, ``usage``) and
the Responses API's ``response`` object.

Invariant: the body holds exactly the text of the admitted events, so what the client reads is what the
settlement billed. When metergate stopped the answer, it ends the way a provider ends an answer cut at its
output limit (``finish_reason: "length"``, ``stop_reason: "max_tokens"``, ``status: "incomplete"``), its usage
is the billed usage, and a ``metergate`` object carries the stop notice, as in a stopped stream.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from metergate.metering.usage import Usage
from metergate.proxy.adapters.base import load_json


class Assembler(Protocol):
    def feed(self, data: bytes | None) -> None:
        """Take one admitted event's data (``None``: an event without data)."""

    def body(self, usage: Usage | None, notice: dict[str, Any] | None) -> bytes:
        """The whole answer: ``usage`` is what was billed (``None``: not known), ``notice`` is set when
        metergate stopped the answer early."""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _new_choice() -> dict[str, Any]:
    return {"content": [], "refusal": [], "reasoning": [], "text": [], "tools": {}, "finish_reason": None,
            "logprobs": None, "role": "assistant"}


class ChatAssembler:
    """OpenAI chat completions (``chat.completion.chunk`` → ``chat.completion``) and legacy completions
    (``text_completion`` chunks → ``text_completion``)."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None  # the provider's own usage object, details included
        self.chat = True

    def feed(self, data: bytes | None) -> None:
        chunk = load_json(data) if data is not None and data != b"[DONE]" else None
        if not isinstance(chunk, dict):
            return
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint", "service_tier")
                         if k in chunk}
            self.chat = chunk.get("object") != "text_completion"
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]  # the last non-null usage wins, as in the meter
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict) and isinstance(choice.get("index"), int):
                self._take(choice)

    def _take(self, piece: dict[str, Any]) -> None:
        choice = self.choices.setdefault(piece["index"], _new_choice())
        if piece.get("finish_reason") is not None:
            choice["finish_reason"] = piece["finish_reason"]
        logprobs = piece.get("logprobs")
        if isinstance(logprobs, dict):
            kept = choice["logprobs"] = choice["logprobs"] or {}
            for key, value in logprobs.items():
                if isinstance(value, list):
                    kept.setdefault(key, []).extend(value)
        choice["text"].append(_text(piece.get("text")))
        delta = _dict(piece.get("delta"))
        if isinstance(delta.get("role"), str):
            choice["role"] = delta["role"]
        choice["content"].append(_text(delta.get("content")))
        choice["refusal"].append(_text(delta.get("refusal")))
        choice["reasoning"].append(_text(delta.get("reasoning_content")))
        for call in delta.get("tool_calls") or []:
            if not isinstance(call, dict):
                continue
            index = call.get("index") if isinstance(call.get("index"), int) else len(choice["tools"])
            tool = choice["tools"].setdefault(index, {"id": "", "type": "function", "name": [], "arguments": []})
            if isinstance(call.get("id"), str):
                tool["id"] = call["id"]
            if isinstance(call.get("type"), str):
                tool["type"] = call["type"]
            function = _dict(call.get("function"))
            tool["name"].append(_text(function.get("name")))
            tool["arguments"].append(_text(function.get("arguments")))

    def body(self, usage: Usage | None, notice: dict[str, Any] | None) -> bytes:
        choices = []
        for index, c in sorted((self.choices or {0: _new_choice()}).items()):
            finish = "length" if notice is not None else c["finish_reason"]
            if not self.chat:
                choices.append({"index": index, "text": "".join(c["text"]), "logprobs": c["logprobs"],
                                "finish_reason": finish})
                continue
            message: dict[str, Any] = {"role": c["role"], "content": "".join(c["content"]) or None,
                                       "refusal": "".join(c["refusal"]) or None}
            if any(c["reasoning"]):
                message["reasoning_content"] = "".join(c["reasoning"])
            if c["tools"]:
                message["tool_calls"] = [
                    {"id": t["id"], "type": t["type"],
                     "function": {"name": "".join(t["name"]), "arguments": "".join(t["arguments"])}}
                    for _, t in sorted(c["tools"].items())]
            elif message["content"] is None and message["refusal"] is None:
                message["content"] = ""  # an answer with no text at all is an empty string, as OpenAI sends
            choices.append({"index": index, "message": message, "logprobs": c["logprobs"], "finish_reason": finish})
        out: dict[str, Any] = {"id": "", "created": 0, "model": "", **self.head,
                               "object": "chat.completion" if self.chat else "text_completion",
                               "choices": choices}
        if notice is not None or self.usage is None:
            if usage is not None:
                out["usage"] = {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
                                "total_tokens": usage.input_tokens + usage.output_tokens}
        else:
            out["usage"] = self.usage
        if notice is not None:
            out["metergate"] = notice
        return json.dumps(out, ensure_ascii=False).encode()


class AnthropicAssembler:
    """Anthropic Messages: ``message_start``, content blocks and their deltas, ``message_delta`` →
    one ``message``."""

    def __init__(self) -> None:
        self.message: dict[str, Any] = {}
        self.blocks: dict[int, dict[str, Any]] = {}
        self.parts: dict[int, list[str]] = {}  # a block's streamed text, thinking or tool-input JSON
        self.usage: dict[str, Any] = {}

    def feed(self, data: bytes | None) -> None:
        event = load_json(data) if data is not None else None
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "message_start":
            self.message = {k: v for k, v in _dict(event.get("message")).items() if k not in ("content", "usage")}
            self.usage = dict(_dict(_dict(event.get("message")).get("usage")))
        elif kind == "content_block_start" and isinstance(event.get("index"), int):
            self.blocks[event["index"]] = dict(_dict(event.get("content_block")))
            self.parts[event["index"]] = []
        elif kind == "content_block_delta" and isinstance(event.get("index"), int):
            delta = _dict(event.get("delta"))
            block = self.blocks.setdefault(event["index"], {"type": "text", "text": ""})
            parts = self.parts.setdefault(event["index"], [])
            if delta.get("type") == "signature_delta":
                block["signature"] = _text(block.get("signature")) + _text(delta.get("signature"))
            else:
                parts.append(_text(delta.get("text")) + _text(delta.get("thinking"))
                             + _text(delta.get("partial_json")))
        elif kind == "message_delta":
            for key, value in _dict(event.get("delta")).items():
                self.message[key] = value
            self.usage.update({k: v for k, v in _dict(event.get("usage")).items() if v is not None})

    def body(self, usage: Usage | None, notice: dict[str, Any] | None) -> bytes:
        content = []
        for index in sorted(self.blocks):
            block, streamed = dict(self.blocks[index]), "".join(self.parts.get(index, []))
            if block.get("type") in ("tool_use", "server_tool_use"):
                parsed = load_json(streamed.encode()) if streamed else None
                # A tool call cut mid-arguments has no whole JSON: its input is left empty, never guessed.
                block["input"] = parsed if isinstance(parsed, dict) else _dict(block.get("input"))
            elif block.get("type") == "thinking":
                block["thinking"] = _text(block.get("thinking")) + streamed
            elif "text" in block or block.get("type") == "text":
                block["text"] = _text(block.get("text")) + streamed
            content.append(block)
        out: dict[str, Any] = {"id": "", "type": "message", "role": "assistant", "model": "",
                               "stop_reason": None, "stop_sequence": None, **self.message, "content": content,
                               "usage": self.usage}
        if notice is not None:
            out["stop_reason"], out["stop_sequence"] = "max_tokens", None
            if usage is not None:
                out["usage"] = {**self.usage, "output_tokens": usage.output_tokens}
            out["metergate"] = notice
        return json.dumps(out, ensure_ascii=False).encode()


class ResponsesAssembler:
    """The Responses API: the terminal event carries the whole response object; an answer metergate
    stopped is rebuilt from the announced response, its output items and their deltas."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}
        self.final: dict[str, Any] | None = None
        self.items: dict[int, dict[str, Any]] = {}

    def feed(self, data: bytes | None) -> None:
        event = load_json(data) if data is not None else None
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        response = event.get("response")
        if kind in ("response.created", "response.in_progress") and isinstance(response, dict):
            self.snapshot = response
        elif kind in ("response.completed", "response.incomplete", "response.failed") and isinstance(response, dict):
            self.final = response
        index = event.get("output_index")
        if not isinstance(index, int):
            return
        if kind in ("response.output_item.added", "response.output_item.done") and isinstance(event.get("item"), dict):
            self.items[index] = dict(event["item"])
            return
        item = self.items.setdefault(index, {"type": "message", "role": "assistant", "content": []})
        if kind == "response.content_part.added" and isinstance(event.get("part"), dict):
            parts = item.setdefault("content", [])
            parts.append(dict(event["part"]))
        elif kind == "response.output_text.delta":
            parts = item.setdefault("content", [])
            at = event.get("content_index")
            if not isinstance(at, int) or not 0 <= at < len(parts):
                parts.append({"type": "output_text", "text": "", "annotations": []})
                at = len(parts) - 1
            parts[at]["text"] = _text(parts[at].get("text")) + _text(event.get("delta"))
        elif kind == "response.function_call_arguments.delta":
            item["arguments"] = _text(item.get("arguments")) + _text(event.get("delta"))

    def body(self, usage: Usage | None, notice: dict[str, Any] | None) -> bytes:
        if notice is None and self.final is not None:
            return json.dumps(self.final, ensure_ascii=False).encode()
        out: dict[str, Any] = {"object": "response", **self.snapshot,
                               "output": [self.items[i] for i in sorted(self.items)]}
        out["status"] = "incomplete"
        out["incomplete_details"] = {"reason": "max_output_tokens"}
        if usage is not None:
            out["usage"] = {"input_tokens": usage.input_tokens,
                            "input_tokens_details": {"cached_tokens": usage.cached_input_tokens},
                            "output_tokens": usage.output_tokens,
                            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
                            "total_tokens": usage.input_tokens + usage.output_tokens}
        if notice is not None:
            out["metergate"] = notice
        return json.dumps(out, ensure_ascii=False).encode()


def assembler_for(provider: str, endpoint: str) -> Assembler:
    """The assembler of an endpoint's stream (``endpoint`` as the adapters name it)."""
    if provider == "anthropic":
        return AnthropicAssembler()
    if endpoint == "responses":
        return ResponsesAssembler()
    return ChatAssembler()
