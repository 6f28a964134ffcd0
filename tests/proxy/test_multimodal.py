"""Multimodal holds follow the providers' own rules: image tiles (OpenAI) and pixels (Anthropic), audio
seconds, PDF pages.

Method: the official ``openai`` and ``anthropic`` SDKs against a gateway in front of the mock upstream;
each request is sent twice, with and without its media part, and the difference of the two holds (the
ledger's hold entries) must be the media's hand-computed tokens times the input rate (integer micro-dollars
per token, so no rounding). Images, a WAV clip and a PDF are built here by hand.
"""

from __future__ import annotations

import base64
import io
import struct
import wave
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import PROVIDER_KEY, Gateway, Upstream, start_gateway
from tests.proxy.test_openai_sdk import ledger

RATES = {"gpt-4o": {"input_per_mtok": "5.00", "output_per_mtok": "20.00"},
         "gpt-4o-audio-preview": {"input_per_mtok": "40.00", "output_per_mtok": "80.00"},
         "claude-sonnet-4-6": {"input_per_mtok": "3.00", "output_per_mtok": "15.00"}}
TEXT = {"type": "text", "text": "Describe this."}


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'm.db'}", pricing={
        "asset": "USD", "models": RATES}, routes=[
        {"prefix": "/openai", "upstream": upstream.url, "api_key": PROVIDER_KEY},
        {"prefix": "/anthropic", "upstream": upstream.url, "api_key": PROVIDER_KEY, "provider": "anthropic",
         "provider_id": "anthropic"}])
    await gateway.customer("acme", funds=1_000_000)  # one dollar
    yield gateway
    await gateway.close()
    await runner.cleanup()


def png(width: int, height: int) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = zlib.compress(b"".join(b"\x00" + b"\x00" * width for _ in range(height)))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw)
                            + chunk(b"IEND", b"")).decode()


def wav(seconds: int, rate: int = 8_000) -> str:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * rate * seconds)
    return base64.b64encode(out.getvalue()).decode()


def pdf(pages: int) -> str:
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % (3 + i) for i in range(pages)),
                                                            pages)]
    objects += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"] * pages
    body = b"%PDF-1.4\n" + b"".join(b"%d 0 obj\n%s\nendobj\n" % (i + 1, o) for i, o in enumerate(objects))
    return base64.b64encode(body + b"trailer << /Root 1 0 R >>\n%%EOF\n").decode()


async def held(gw: Gateway) -> int:
    """The amount of the latest hold placed."""
    holds = [e for e in await ledger(gw) if e["kind"] == "hold"]
    return int(holds[0]["pending_delta"])


async def chat_hold(gw: Gateway, model: str, content: list[dict[str, Any]]) -> int:
    client = gw.openai()
    await client.chat.completions.create(model=model, max_tokens=50,
                                         messages=[{"role": "user", "content": content}])  # type: ignore[misc,list-item]
    return await held(gw)


async def claude_hold(gw: Gateway, content: list[dict[str, Any]]) -> int:
    client = anthropic.AsyncAnthropic(base_url=f"{gw.url}/anthropic", api_key="sk-ant-app",
                                      default_headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"},
                                      max_retries=0)
    try:
        await client.messages.create(model="claude-sonnet-4-6", max_tokens=50,
                                     messages=[{"role": "user", "content": content}])  # type: ignore[typeddict-item,list-item]
    finally:
        await client.close()
    return await held(gw)


async def test_openai_image_is_held_by_its_tiles(gw: Gateway) -> None:
    # 2048x4096 high: fit 2048 -> 1024x2048, shortest side 768 -> 768x1536, 2x3 tiles: 85 + 170*6 = 1105.
    base = await chat_hold(gw, "gpt-4o", [TEXT])
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png(2048, 4096), "detail": "high"}}
    assert await chat_hold(gw, "gpt-4o", [TEXT, image]) - base == 1105 * 5
    low = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png(2048, 4096), "detail": "low"}}
    assert await chat_hold(gw, "gpt-4o", [TEXT, low]) - base == 85 * 5


async def test_anthropic_image_is_held_by_its_pixels(gw: Gateway) -> None:
    base = await claude_hold(gw, [TEXT])
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png(600, 400)}}
    assert await claude_hold(gw, [TEXT, image]) - base == 320 * 3  # 600*400/750 = 320


async def test_a_one_dollar_wallet_sends_a_thirty_second_clip(gw: Gateway) -> None:
    base = await chat_hold(gw, "gpt-4o-audio-preview", [TEXT])
    clip = {"type": "input_audio", "input_audio": {"data": wav(30), "format": "wav"}}
    assert await chat_hold(gw, "gpt-4o-audio-preview", [TEXT, clip]) - base == 300 * 40  # 30 s at 10 tokens/s


async def test_anthropic_pdf_is_held_by_its_pages(gw: Gateway) -> None:
    base = await claude_hold(gw, [TEXT])
    document = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf(3)}}
    assert await claude_hold(gw, [TEXT, document]) - base == 3 * 4600 * 3  # 3 pages at 4,600 tokens


async def test_an_image_url_is_held_for_the_largest_image_and_marked_inexact(gw: Gateway) -> None:
    base = await chat_hold(gw, "gpt-4o", [TEXT])
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}
    assert await chat_hold(gw, "gpt-4o", [TEXT, image]) - base == (85 + 170 * 8) * 5
    assert (await gw.usage())[0]["detail"]["tokens_exact"] is False


@pytest.mark.parametrize(("part", "code"), [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}, "invalid_image"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%%"}}, "invalid_image"),
    ({"type": "input_audio", "input_audio": {"data": "UklGRgAAAABXQVZF", "format": "wav"}}, "invalid_audio"),
    ({"type": "input_audio", "input_audio": {"data": wav(1), "format": "flac"}}, "invalid_audio"),
    ({"type": "file", "file": {"file_data": "data:application/pdf;base64,bm90IGEgcGRm"}}, "invalid_document"),
])
async def test_unreadable_media_is_refused_with_a_stable_code(gw: Gateway, part: dict[str, Any], code: str) -> None:
    client = gw.openai()
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="gpt-4o", max_tokens=5,
                                             messages=[{"role": "user", "content": [part]}])  # type: ignore[misc,list-item]
    assert refused.value.code == code
    assert (await gw.balance())["pending"] == 0
