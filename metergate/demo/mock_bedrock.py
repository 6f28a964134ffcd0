"""A fake bedrock-runtime that speaks Bedrock's wire format, for the tests: Converse JSON and ConverseStream's
binary event stream, behind a SigV4 check.

``POST /model/{modelId}/converse`` and ``/converse-stream``, the model id percent-encoded in one segment as
the AWS SDKs send it. Every request must carry a SigV4 ``Authorization`` for the configured key id, region
and service ``bedrock``, and its signature is recomputed here from the request as received (an independent
implementation of the algorithm, not botocore's): like AWS, the fake answers 403
``UnrecognizedClientException`` for another key id and ``InvalidSignatureException`` for a bad signature.
Model ids it does not serve get 404 ``ResourceNotFoundException``; a body that is not a Converse request
gets 400 ``ValidationException``.

Answers are deterministic: the output is the first ``inferenceConfig.maxTokens`` words (default 40) of a
fixed text, one token per word; ``inputTokens`` is the request's text length divided by 4. The stream is
``messageStart``, a ``contentBlockDelta`` per word, ``contentBlockStop``, ``messageStop`` and ``metadata``
with the usage, each frame written in two pieces (so that a reader must reassemble frames). The
``X-Mock-Behavior`` header bends it: ``cache`` (cache read and write tokens in the usage), ``bad-crc``
(the third frame's message CRC is wrong), ``bad-prelude`` (its prelude CRC is wrong), ``oversized`` (a
frame announcing 64 MiB), ``truncated`` (the stream ends inside a frame), ``no-metadata`` (no usage),
``bad-usage`` (a usage count that is a string), ``exception`` (an exception frame after two deltas).

Every request is kept under ``RECEIVED``: raw path, headers, JSON body.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
import zlib
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web

from metergate.proxy.eventstream import event_frame, exception_frame

RECEIVED = web.AppKey("bedrock_received", list)
_CONFIG = web.AppKey("bedrock_config", dict)
_SENTENCE = ("Prepaid wallets meter every token before it is paid for and settle exactly what was delivered "
             "so that nobody spends money they do not have and no answer outgrows its hold in any case at all "
             "while the ledger keeps every entry append only and idempotent for audits later on")
TEXT = _SENTENCE.split(" ")
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request, "
                   r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})")


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status, headers={"x-amzn-ErrorType": kind})


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def verify_sigv4(request: web.Request, body: bytes, key_id: str, secret: str, region: str) -> str | None:
    """Why the request's SigV4 signature is not valid for ``key_id``/``secret`` (None: it is)."""
    found = _AUTH.fullmatch(request.headers.get("Authorization", ""))
    if found is None:
        return "MissingAuthenticationTokenException"
    presented_id, day, signed_region, service, signed_names, signature = found.groups()
    if presented_id != key_id:
        return "UnrecognizedClientException"
    amz_date = request.headers.get("X-Amz-Date", "")
    names = signed_names.split(";")
    if signed_region != region or service != "bedrock" or not amz_date.startswith(day) or "host" not in names:
        return "InvalidSignatureException"
    # The canonical URI of a non-S3 service encodes the path as received once more (%3A becomes %253A).
    canonical_uri = quote(request.rel_url.raw_path, safe="/~")
    pairs = sorted((quote(unquote(k), safe="-_.~"), quote(unquote(v), safe="-_.~"))
                   for k, _, v in (p.partition("=") for p in request.rel_url.raw_query_string.split("&") if p))
    canonical_headers = "".join(f"{name}:{' '.join(request.headers.get(name, '').split())}\n" for name in names)
    canonical = "\n".join(["POST", canonical_uri, "&".join(f"{k}={v}" for k, v in pairs), canonical_headers,
                           signed_names, hashlib.sha256(body).hexdigest()])
    scope = f"{day}/{region}/bedrock/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret).encode(), day), region), "bedrock"), "aws4_request")
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return None if hmac.compare_digest(expected, signature) else "InvalidSignatureException"


def _usage(body: dict[str, Any], output_tokens: int, behavior: str) -> dict[str, Any]:
    text = json.dumps(body.get("messages", [])) + json.dumps(body.get("system", []))
    usage: dict[str, Any] = {"inputTokens": max(1, len(text) // 4), "outputTokens": output_tokens}
    if behavior == "cache":
        usage.update(cacheReadInputTokens=7, cacheWriteInputTokens=3)
    usage["totalTokens"] = sum(usage.values())
    if behavior == "bad-usage":
        usage["outputTokens"] = str(output_tokens)
    return usage


def _words(body: dict[str, Any]) -> list[str]:
    config = body.get("inferenceConfig")
    limit = config.get("maxTokens") if isinstance(config, dict) else None
    return TEXT[:limit if isinstance(limit, int) else 40]


def _corrupt(frame: bytes, behavior: str) -> bytes:
    if behavior == "bad-crc":
        return frame[:-1] + bytes([frame[-1] ^ 0xFF])
    if behavior == "bad-prelude":
        return frame[:8] + bytes([frame[8] ^ 0xFF]) + frame[9:]
    prelude = struct.pack(">II", 64 << 20, 0)  # oversized, with a correct prelude CRC
    return prelude + struct.pack(">I", zlib.crc32(prelude)) + frame[12:]


async def _handle(request: web.Request) -> web.StreamResponse:
    config = request.app[_CONFIG]
    raw = await request.read()
    parts = request.rel_url.raw_path.split("/")
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = None
    request.app[RECEIVED].append({"raw_path": request.rel_url.raw_path, "headers": dict(request.headers),
                                  "body": body})
    problem = verify_sigv4(request, raw, config["key_id"], config["secret"], config["region"])
    if problem is not None:
        return _error(403, problem, "The request signature we calculated does not match the signature you "
                                    "provided." if problem == "InvalidSignatureException" else
                      "The security token included in the request is invalid.")
    if config["session_token"] and request.headers.get("X-Amz-Security-Token") != config["session_token"]:
        return _error(403, "UnrecognizedClientException", "The security token included in the request is invalid.")
    if len(parts) != 4 or parts[1] != "model" or parts[3] not in ("converse", "converse-stream"):
        return _error(404, "UnknownOperationException", "Unknown operation.")
    if unquote(parts[2]) not in config["models"]:
        return _error(404, "ResourceNotFoundException", "The provided model identifier is invalid.")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return _error(400, "ValidationException", "Malformed input request, please reformat your input and retry.")
    behavior = request.headers.get("X-Mock-Behavior", "")
    words = _words(body)
    stop = "max_tokens" if len(words) < len(TEXT) else "end_turn"
    usage = _usage(body, len(words), behavior)
    if parts[3] == "converse":
        return web.json_response({
            "output": {"message": {"role": "assistant", "content": [{"text": " ".join(words)}]}},
            "stopReason": stop, "usage": usage, "metrics": {"latencyMs": 42}},
            headers={"x-amzn-RequestId": "fake-request-id"})
    frames = [event_frame("messageStart", json.dumps({"role": "assistant", "p": "abcd"}).encode())]
    for index, word in enumerate(words):
        text = word if index == 0 else " " + word
        frames.append(event_frame("contentBlockDelta", json.dumps(
            {"contentBlockIndex": 0, "delta": {"text": text}, "p": "abcdefgh"}).encode()))
    frames.append(event_frame("contentBlockStop", json.dumps({"contentBlockIndex": 0, "p": "ab"}).encode()))
    frames.append(event_frame("messageStop", json.dumps({"stopReason": stop, "p": "abc"}).encode()))
    if behavior != "no-metadata":
        frames.append(event_frame("metadata", json.dumps(
            {"usage": usage, "metrics": {"latencyMs": 42}, "p": "abcdef"}).encode()))
    if behavior in ("bad-crc", "bad-prelude", "oversized"):
        frames[3] = _corrupt(frames[3], behavior)
    elif behavior == "exception":
        frames[3:] = [exception_frame("modelStreamErrorException", json.dumps(
            {"message": "The model stopped unexpectedly.", "originalStatusCode": 500}).encode())]
    elif behavior == "truncated":
        frames[-1] = frames[-1][:len(frames[-1]) // 2]
    response = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream",
                                           "x-amzn-RequestId": "fake-request-id"})
    await response.prepare(request)
    for frame in frames:
        await response.write(frame[:7])
        await response.write(frame[7:])
    await response.write_eof()
    return response


def build_mock_bedrock(*, key_id: str, secret: str, region: str, models: list[str],
                       session_token: str | None = None) -> web.Application:
    app = web.Application()
    app[RECEIVED] = []
    app[_CONFIG] = {"key_id": key_id, "secret": secret, "region": region, "models": set(models),
                    "session_token": session_token}
    app.router.add_post("/{tail:.*}", _handle)
    return app
