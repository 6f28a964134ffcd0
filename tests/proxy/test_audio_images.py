"""OpenAI's audio and image endpoints through metergate: held before forwarding, billed once, by the unit.

Method: the official ``openai`` SDK (``audio.transcriptions``, ``audio.speech``, ``images.generate``,
``images.edit``) against a gateway in front of the mock upstream's media endpoints
(:mod:`metergate.demo.mock_media`), which speak OpenAI's wire format: whisper's ``usage.seconds``,
gpt-4o-transcribe's and gpt-image-1's token usage, speech as audio bytes or ``speech.audio.*`` events. Each
test checks the usage record (units, tokens, hold, charge) and the balance against numbers computed by hand
from the price table below; a refused or malformed request must reach nothing upstream and charge nothing.
"""

from __future__ import annotations

import io
import struct
from collections.abc import AsyncIterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from metergate.demo.mock_media import TRANSCRIPT
from metergate.metering.tokenizer import counter_for
from tests.conftest import Gateway, Upstream, start_gateway

FUNDS = 1_000_000  # one dollar
PRICING: dict[str, Any] = {"asset": "USD", "models": {
    "whisper-1": {"per_audio_second": "0.0001"},  # $0.006 a minute
    "gpt-4o-transcribe": {"input_per_mtok": "2.5", "audio_input_per_mtok": "6", "output_per_mtok": "10"},
    "tts-1": {"per_mchar": "15"},
    "gpt-4o-mini-tts": {"input_per_mtok": "0.6", "output_per_mtok": "12"},
    "dall-e-3": {"per_image": {"1024x1024": "0.04", "1024x1024/hd": "0.08", "1792x1024/hd": "0.12"}},
    "dall-e-2": {"per_image": {"1024x1024": "0.02", "512x512": "0.018"}, "request_fee": "0.001"},
    "gpt-image-1": {"input_per_mtok": "5", "image_input_per_mtok": "10", "output_per_mtok": "40"},
    "*": {"input_per_mtok": "5", "output_per_mtok": "20"},
}}


def wav(seconds: int, rate: int = 16_000) -> bytes:
    """A mono 16-bit PCM WAV file of ``seconds`` of silence."""
    data = b"\x00\x00" * rate * seconds
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE" + b"fmt "
            + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def micros(amount: Decimal) -> int:
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def _gateway(upstream: Upstream, tmp_path: Path, funds: int, **overrides: Any) -> AsyncIterator[Gateway]:
    gw, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'media.db'}", pricing=PRICING, **overrides)
    await gw.customer("acme", funds=funds)
    yield gw
    await gw.close()
    await runner.cleanup()


@pytest.fixture
async def gw(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    async for gateway in _gateway(upstream, tmp_path, FUNDS):
        yield gateway


@pytest.fixture
async def broke(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    async for gateway in _gateway(upstream, tmp_path, 0):
        yield gateway


async def only_record(gw: Gateway) -> dict[str, Any]:
    [record] = await gw.usage()
    return record


async def assert_nothing_charged(gw: Gateway) -> None:
    assert await gw.usage() == []
    balance = await gw.balance()
    assert (balance["available"], balance["pending"]) == (FUNDS, 0)
    assert gw.upstream.requests == []


# --- transcriptions and translations


async def test_a_dollar_wallet_transcribes_a_30_second_clip_billed_per_second_once(gw: Gateway) -> None:
    client = gw.openai()
    raw = await client.audio.transcriptions.with_raw_response.create(file=("clip.wav", wav(30)), model="whisper-1")
    transcript = raw.parse()
    assert transcript.text == TRANSCRIPT
    record = await only_record(gw)
    # 30 s x $0.0001 = $0.003: held from the WAV header, charged from whisper's usage.seconds.
    assert (record["detail"]["hold"], record["charged_amount"]) == (3000, 3000)
    assert record["detail"]["units"] == {"audio_seconds": 30}
    assert record["usage_source"] == "provider" and record["detail"]["tokens_exact"] is True
    assert record["endpoint"] == "audio.transcriptions" and record["model"] == "whisper-1"
    assert raw.headers["X-Metergate-Charged"] == "0.003000"
    assert (await gw.balance())["available"] == FUNDS - 3000
    [sent] = gw.upstream.requests
    assert sent["files"] == {"file": [len(wav(30))]} and sent["body"]["model"] == "whisper-1"
    assert "sk-app" not in sent["headers"].get("Authorization", "")


async def test_whisper_is_billed_the_seconds_it_reports_not_the_header(gw: Gateway) -> None:
    client = gw.openai(headers={"X-Mock-Behavior": "seconds:12"})
    with pytest.warns(DeprecationWarning):  # this SDK marks translations deprecated; the API still serves them
        await client.audio.translations.create(file=("clip.wav", wav(30)), model="whisper-1")
    record = await only_record(gw)
    assert (record["detail"]["hold"], record["charged_amount"]) == (3000, 1200)
    assert record["endpoint"] == "audio.translations"


async def test_verbose_json_without_usage_is_billed_its_duration(gw: Gateway) -> None:
    client = gw.openai(headers={"X-Mock-Behavior": "no-usage,seconds:7"})
    result = await client.audio.transcriptions.create(file=("clip.wav", wav(30)), model="whisper-1",
                                                      response_format="verbose_json")
    assert result.duration == 7.0
    record = await only_record(gw)
    assert (record["charged_amount"], record["usage_source"]) == (700, "provider")


async def test_a_text_transcript_without_usage_is_billed_the_measured_duration(gw: Gateway) -> None:
    client = gw.openai(headers={"X-Mock-Behavior": "no-usage"})
    text = await client.audio.transcriptions.create(file=("clip.wav", wav(9)), model="whisper-1",
                                                    response_format="text")
    assert TRANSCRIPT in text
    record = await only_record(gw)
    assert (record["charged_amount"], record["usage_source"]) == (900, "measured")


async def test_an_unmeasurable_upload_is_held_at_the_bound_and_marked_inexact(gw: Gateway) -> None:
    client = gw.openai(headers={"X-Mock-Behavior": "seconds:40"})
    await client.audio.transcriptions.create(file=("clip.webm", b"\x00not a container I know" * 50),
                                             model="whisper-1")
    record = await only_record(gw)
    # upload_audio_max_s (1,500 s) x $0.0001 = $0.15 held; the 40 s whisper reports are charged.
    assert (record["detail"]["hold"], record["charged_amount"]) == (150_000, 4000)
    assert record["detail"]["tokens_exact"] is False


async def test_gpt_4o_transcribe_is_billed_its_token_usage(gw: Gateway) -> None:
    client = gw.openai()
    await client.audio.transcriptions.create(file=("clip.wav", wav(30)), model="gpt-4o-transcribe",
                                             prompt="Prepaid wallets.")
    record = await only_record(gw)
    prompt = counter_for("gpt-4o-transcribe").count_prompt("Prepaid wallets.")
    # Held: 30 s x 10 audio tokens at $6/M, the prompt at $2.50/M, 30 s x 8 output tokens at $10/M.
    assert record["detail"]["hold"] == micros(Decimal(300 * 6) + Decimal(prompt) * Decimal("2.5") + 240 * 10)
    # Charged: what the upstream reported (300 audio tokens, its prompt tokens, the transcript's tokens).
    text = counter_for("gpt-4o-transcribe").count("Prepaid wallets.")
    output = counter_for("gpt-4o-transcribe").count(TRANSCRIPT)
    assert record["charged_amount"] == micros(Decimal(300 * 6) + Decimal(text) * Decimal("2.5") + output * 10)
    assert (record["tokens_input"], record["tokens_output"]) == (300 + text, output)
    assert record["usage_source"] == "provider"


async def test_a_streamed_transcript_is_billed_from_its_done_event(gw: Gateway) -> None:
    client = gw.openai()
    stream = await client.audio.transcriptions.create(file=("clip.wav", wav(5)), model="gpt-4o-transcribe",
                                                      stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "transcript.text.done" and kinds.count("transcript.text.delta") > 3
    record = await only_record(gw)
    output = counter_for("gpt-4o-transcribe").count(TRANSCRIPT)
    assert record["charged_amount"] == micros(Decimal(50 * 6) + output * 10)
    assert record["stream"] is True


# --- speech


async def test_tts_1_is_held_and_billed_per_character(gw: Gateway) -> None:
    text = "A prepaid wallet, drawn down one character at a time."
    client = gw.openai()
    audio = await client.audio.speech.create(model="tts-1", voice="alloy", input=text)
    assert audio.content.startswith(b"\xff\xfb")
    record = await only_record(gw)
    # $15 per million characters is 15 micro-dollars a character.
    assert (record["detail"]["hold"], record["charged_amount"]) == (15 * len(text), 15 * len(text))
    assert record["detail"]["units"] == {"characters": len(text)}
    assert record["usage_source"] == "measured"


async def test_gpt_4o_mini_tts_streamed_events_are_billed_their_usage(gw: Gateway) -> None:
    text = "Sixteen characters times four."  # 30 characters: the mock answers 1 chunk per 16
    client = gw.openai()
    audio = await client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input=text,
                                             stream_format="sse")
    assert b"speech.audio.done" in audio.content
    record = await only_record(gw)
    prompt = counter_for("gpt-4o-mini-tts").count(text)
    # Held: the input's tokens at $0.60/M and 2 output tokens a character at $12/M.
    assert record["detail"]["hold"] == micros(Decimal(prompt) * Decimal("0.6") + 2 * len(text) * 12)
    assert record["charged_amount"] == micros(Decimal(prompt) * Decimal("0.6") + 25 * 12)
    assert (record["tokens_output"], record["usage_source"]) == (25, "provider")


# --- images


async def test_dall_e_3_is_held_and_billed_per_image_by_size_and_quality(gw: Gateway) -> None:
    client = gw.openai()
    result = await client.images.generate(model="dall-e-3", prompt="a wallet", size="1024x1024", quality="hd")
    assert result.data is not None and len(result.data) == 1
    record = await only_record(gw)
    assert (record["detail"]["hold"], record["charged_amount"]) == (80_000, 80_000)
    assert record["detail"]["units"] == {"images_1024x1024_hd": 1}
    assert record["cost_nanos"] == 80_000_000  # OpenAI's list price, from the default image table


async def test_images_not_delivered_are_not_charged(gw: Gateway) -> None:
    client = gw.openai(headers={"X-Mock-Behavior": "images:2"})
    result = await client.images.generate(model="dall-e-2", prompt="three wallets", n=3, size="512x512")
    assert result.data is not None and len(result.data) == 2
    record = await only_record(gw)
    # Held: 3 x $0.018 + the $0.001 request fee; charged: the 2 images delivered + the fee.
    assert (record["detail"]["hold"], record["charged_amount"]) == (55_000, 37_000)


async def test_gpt_image_1_is_held_by_its_output_table_and_billed_its_usage(gw: Gateway) -> None:
    client = gw.openai()
    await client.images.generate(model="gpt-image-1", prompt="a ledger", n=2, size="1024x1024", quality="medium")
    record = await only_record(gw)
    prompt = counter_for("gpt-image-1").count_prompt("a ledger")
    text = counter_for("gpt-image-1").count("a ledger")
    assert record["detail"]["hold"] == micros(Decimal(prompt) * 5 + 2 * 1056 * 40)
    assert record["charged_amount"] == micros(Decimal(text) * 5 + 2 * 1056 * 40)


async def test_an_image_edit_is_a_multipart_upload_billed_with_its_image_tokens(gw: Gateway) -> None:
    client = gw.openai()
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
    await client.images.edit(model="gpt-image-1", image=("in.png", png, "image/png"), prompt="add a coin")
    record = await only_record(gw)
    text = counter_for("gpt-image-1").count("add a coin")
    # The mock reports 323 image tokens for the upload ($10/M), the prompt's tokens ($5/M) and 1,056 output.
    assert record["charged_amount"] == micros(Decimal(text) * 5 + 323 * 10 + 1056 * 40)
    assert record["endpoint"] == "images.edits"
    [sent] = gw.upstream.requests
    assert sent["files"] == {"image": [len(png)]}


async def test_a_dall_e_2_edit_is_billed_per_image(gw: Gateway) -> None:
    client = gw.openai()
    await client.images.edit(image=("in.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "image/png"), prompt="x", n=2)
    record = await only_record(gw)
    assert (record["detail"]["hold"], record["charged_amount"]) == (41_000, 41_000)


# --- refusals: the 402, bad input, unpriced units; nothing charged


async def test_a_broke_wallet_gets_a_402_with_the_portal_link_and_nothing_is_sent(broke: Gateway) -> None:
    client = broke.openai()
    with pytest.raises(openai.APIStatusError) as refused:
        await client.audio.transcriptions.create(file=("clip.wav", wav(30)), model="whisper-1")
    assert refused.value.status_code == 402
    assert f"Top up at {broke.url}/portal/" in refused.value.message
    assert "needs 0.003000 USD" in refused.value.message
    with pytest.raises(openai.APIStatusError) as refused:
        await client.images.generate(model="dall-e-3", prompt="x")
    assert refused.value.status_code == 402
    assert broke.upstream.requests == [] and await broke.usage() == []


def raw_client(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"{gw.url}/openai/v1", timeout=30,
                             headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"})


async def refusal(response: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"] and error["type"]


@pytest.mark.parametrize(("files", "data", "code", "param"), [
    # no file, two files, the model twice, a text field sent as a file
    ([("model", (None, "whisper-1"))], {}, "invalid_multipart", "file"),
    ([("file", ("a.wav", b"RIFF")), ("file", ("b.wav", b"RIFF"))], {"model": "whisper-1"}, "invalid_multipart",
     "file"),
    ({"file": ("a.wav", b"RIFF"), "model": ("m.txt", b"whisper-1")}, {}, "invalid_multipart", "model"),
    # an empty file, a model that is not one, a response format that does not exist
    ({"file": ("a.wav", b"")}, {"model": "whisper-1"}, "invalid_audio", "file"),
    ({"file": ("a.wav", b"RIFF")}, {"model": "whisper 1; drop"}, "invalid_model", "model"),
    ({"file": ("a.wav", b"RIFF")}, {"model": "whisper-1", "response_format": "mp3"}, "invalid_request",
     "response_format"),
])
async def test_bad_uploads_are_refused_in_the_openai_envelope(gw: Gateway, files: Any, data: dict[str, str],
                                                              code: str, param: str) -> None:
    async with raw_client(gw) as client:
        response = await client.post("/audio/transcriptions", files=files, data=data)
        await refusal(response, 400, code, param)
    await assert_nothing_charged(gw)


async def test_a_body_that_is_not_multipart_is_refused(gw: Gateway) -> None:
    async with raw_client(gw) as client:
        broken = await client.post("/audio/transcriptions", content=b"--x\r\nnonsense",
                                   headers={"Content-Type": "multipart/form-data; boundary=x"})
        await refusal(broken, 400, "invalid_multipart")
        json_body = await client.post("/audio/transcriptions", json={"model": "whisper-1"})
        await refusal(json_body, 415, "unsupported_media_type")
    await assert_nothing_charged(gw)


async def test_an_oversized_audio_file_is_a_413(upstream: Upstream, tmp_path: Path) -> None:
    async for gw in _gateway(upstream, tmp_path, FUNDS, media={"upload_audio_max_bytes": 4096}):
        with pytest.raises(openai.APIStatusError) as refused:
            await gw.openai().audio.transcriptions.create(file=("clip.wav", wav(1)), model="whisper-1")
        assert (refused.value.status_code, refused.value.code) == (413, "file_too_large")
        await assert_nothing_charged(gw)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "dall-e-2", "prompt": "x", "n": "2"}, "n"),  # n is an integer, never a string
    ({"model": "dall-e-2", "prompt": "x", "n": 11}, "n"),
    ({"model": "dall-e-2", "prompt": "x", "n": True}, "n"),
    ({"model": "dall-e-3", "prompt": "x", "n": 2}, "n"),  # dall-e-3 makes one image a request
    ({"model": "dall-e-2", "prompt": "x", "size": "999x999"}, "size"),
    ({"model": "dall-e-3", "prompt": "x", "size": 1024}, "size"),
    ({"model": "dall-e-3", "prompt": "x", "quality": "ultra"}, "quality"),
    ({"model": "dall-e-3"}, "prompt"),
    ({"model": "gpt-image-1", "prompt": "x", "stream": True}, "stream"),
])
async def test_bad_image_requests_are_refused_naming_the_field(gw: Gateway, body: dict[str, Any], param: str) -> None:
    async with raw_client(gw) as client:
        await refusal(await client.post("/images/generations", json=body), 400, "invalid_request", param)
    await assert_nothing_charged(gw)


async def test_bad_edit_fields_are_refused_as_the_json_ones_are(gw: Gateway) -> None:
    async with raw_client(gw) as client:
        response = await client.post("/images/edits", files={"image": ("a.png", b"\x89PNG")},
                                     data={"prompt": "x", "n": "two"})
        await refusal(response, 400, "invalid_request", "n")
        response = await client.post("/images/edits", data={"prompt": "x", "model": "dall-e-2"},
                                     files={"mask": ("m.png", b"\x89PNG")})
        await refusal(response, 400, "invalid_multipart", "image")
    await assert_nothing_charged(gw)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tts-1", "voice": "alloy", "input": "x" * 4097}, "input"),
    ({"model": "tts-1", "voice": "alloy", "input": ""}, "input"),
    ({"model": "tts-1", "voice": "alloy", "input": "hi", "speed": 9}, "speed"),
    ({"model": "tts-1", "input": "hi"}, "voice"),
])
async def test_bad_speech_requests_are_refused(gw: Gateway, body: dict[str, Any], param: str) -> None:
    async with raw_client(gw) as client:
        await refusal(await client.post("/audio/speech", json=body), 400, "invalid_request", param)
    await assert_nothing_charged(gw)


async def test_a_unit_model_without_a_unit_rate_is_refused_not_given_away(gw: Gateway) -> None:
    """dall-e-2 at 256x256 has no rate in the table: the catch-all token rule must not price it at zero."""
    with pytest.raises(openai.BadRequestError) as refused:
        await gw.openai().images.generate(model="dall-e-2", prompt="x", size="256x256")
    assert refused.value.code == "unpriced_unit"
    with pytest.raises(openai.BadRequestError) as refused:
        await gw.openai().audio.speech.create(model="tts-1-hd", voice="alloy", input="hello")
    assert refused.value.code == "unpriced_unit"
    await assert_nothing_charged(gw)


async def test_an_unknown_media_path_is_an_unknown_route(gw: Gateway) -> None:
    async with raw_client(gw) as client:
        await refusal(await client.post("/audio/voices", json={}), 404, "unknown_route")
        await refusal(await client.post("/images/variations", files={"image": ("a.png", b"x")}), 404,
                      "unknown_route")
    await assert_nothing_charged(gw)


async def test_an_upstream_error_charges_nothing(gw: Gateway) -> None:
    client = gw.openai(headers={"X-Mock-Behavior": "error:500"})
    with pytest.raises(openai.APIStatusError) as failed:
        await client.images.generate(model="dall-e-3", prompt="x")
    assert failed.value.status_code == 500
    [record] = await gw.usage()
    assert record["charged_amount"] == 0
    assert (await gw.balance())["available"] == FUNDS


# --- files and batches are refused by name


async def test_files_and_batches_are_refused_as_not_metered(gw: Gateway) -> None:
    client = gw.openai()
    with pytest.raises(openai.NotFoundError) as refused:
        await client.files.create(file=("batch.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    assert refused.value.code == "endpoint_not_metered"
    with pytest.raises(openai.NotFoundError) as refused:
        await client.batches.create(input_file_id="file-1", endpoint="/v1/chat/completions",
                                    completion_window="24h")
    assert refused.value.code == "endpoint_not_metered"
    await assert_nothing_charged(gw)


# --- the margin report knows the media costs


async def test_the_margin_report_shows_media_cost_beside_revenue(gw: Gateway) -> None:
    client = gw.openai()
    await client.audio.transcriptions.create(file=("clip.wav", wav(30)), model="whisper-1")
    await client.audio.speech.create(model="tts-1", voice="alloy", input="x" * 1000)
    r = await gw.admin.get("/reports/margin", params={"group_by": "model"})
    assert r.status_code == 200, r.text
    rows = {row["key"]: row for row in r.json()["data"]}
    # whisper-1: genai-prices' $0.36 an hour is $0.003 for 30 s; tts-1: $15/M characters, $0.015 for 1,000.
    assert (rows["whisper-1"]["cost_nanos"], rows["whisper-1"]["revenue_nanos"]) == (3_000_000, 3_000_000)
    assert (rows["tts-1"]["cost_nanos"], rows["tts-1"]["revenue_nanos"]) == (15_000_000, 15_000_000)
    assert rows["tts-1"]["unknown_cost"]["requests"] == 0 and rows["tts-1"]["margin_nanos"] == 0


# --- implausible usage is not believed


async def test_whisper_seconds_it_cannot_believe_are_billed_as_measured(gw: Gateway) -> None:
    client = gw.openai(headers={"X-Mock-Behavior": 'usage-field:seconds="30000000"'})
    await client.audio.transcriptions.create(file=("clip.wav", wav(6)), model="whisper-1")
    record = await only_record(gw)
    assert (record["charged_amount"], record["usage_source"]) == (600, "measured")
    assert "seconds" in record["detail"]["usage_anomalies"][0]


async def test_token_usage_it_cannot_believe_is_billed_from_the_estimate(gw: Gateway) -> None:
    client = gw.openai(headers={"X-Mock-Behavior": "usage-field:input_token_details.audio_tokens=999999"})
    await client.audio.transcriptions.create(file=("clip.wav", wav(3)), model="gpt-4o-transcribe")
    record = await only_record(gw)
    output = counter_for("gpt-4o-transcribe").count(TRANSCRIPT)
    # 3 s held as 30 audio tokens; the output counted from the transcript itself.
    assert record["charged_amount"] == micros(Decimal(30 * 6) + output * 10)
    assert record["usage_source"] == "estimated" and record["detail"]["usage_anomalies"]


# --- Azure OpenAI: the same endpoints under a deployment, priced as the deployment's model


@pytest.fixture
async def azure_gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    from metergate.demo.mock_azure import build_mock_azure
    from tests.conftest import PROVIDER_KEY, serve

    resource = build_mock_azure({"listen": "whisper-1", "draw": "dall-e-3"}, PROVIDER_KEY)
    runner, port = await serve(resource)
    upstream = Upstream(f"http://127.0.0.1:{port}", resource)
    async for gateway in _gateway(upstream, tmp_path, FUNDS, routes=[
            {"prefix": "/azure", "upstream": upstream.url, "provider": "azure", "api_key": PROVIDER_KEY,
             "deployments": {"listen": "whisper-1", "draw": "dall-e-3"}}]):
        yield gateway
    await runner.cleanup()


def azure(gw: Gateway) -> openai.AsyncAzureOpenAI:
    client = openai.AsyncAzureOpenAI(azure_endpoint=f"{gw.url}/azure", api_version="2025-04-01-preview",
                                     api_key="azure-key-the-app-holds", max_retries=0,
                                     default_headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"})
    gw.clients.append(client)  # type: ignore[arg-type]
    return client


async def test_azure_deployments_are_billed_as_the_model_they_map_to(azure_gw: Gateway) -> None:
    from metergate.demo.mock_azure import RECEIVED
    from tests.conftest import PROVIDER_KEY

    client = azure(azure_gw)
    await client.audio.transcriptions.create(file=("clip.wav", wav(30)), model="listen")
    # 1792x1024 is a dall-e-3 size, not a dall-e-2 one: the deployment's model decides what is valid.
    await client.images.generate(model="draw", prompt="a wallet", size="1792x1024", quality="hd")
    records = sorted(await azure_gw.usage(), key=lambda r: r["endpoint"])
    assert [(r["model"], r["detail"]["deployment"], r["charged_amount"]) for r in records] == [
        ("whisper-1", "listen", 3000), ("dall-e-3", "draw", 120_000)]
    received = azure_gw.upstream.app[RECEIVED]
    assert [r["raw_path"] for r in received] == ["/openai/deployments/listen/audio/transcriptions",
                                                 "/openai/deployments/draw/images/generations"]
    assert all(r["headers"]["api-key"] == PROVIDER_KEY for r in received)
    assert all(r["query_string"] == "api-version=2025-04-01-preview" for r in received)


async def test_an_azure_deployment_the_route_does_not_serve_is_refused_unread(azure_gw: Gateway) -> None:
    from metergate.demo.mock_azure import RECEIVED

    with pytest.raises(openai.NotFoundError) as refused:
        await azure(azure_gw).audio.transcriptions.create(file=("clip.wav", wav(1)), model="elsewhere")
    assert refused.value.code == "unknown_deployment"
    assert azure_gw.upstream.app[RECEIVED] == [] and await azure_gw.usage() == []


# --- a client that hangs up mid-stream


async def test_a_client_that_leaves_a_speech_stream_is_billed_the_usage_metergate_drains(gw: Gateway) -> None:
    import asyncio

    text = "x" * 160  # ten audio events, 0.1 s apart
    body = {"model": "gpt-4o-mini-tts", "voice": "alloy", "input": text, "stream_format": "sse"}
    async with raw_client(gw) as client, client.stream(
            "POST", "/audio/speech", headers={"X-Mock-Behavior": "chunk-delay:0.1"}, json=body) as response:
        assert response.status_code == 200
        async for _ in response.aiter_bytes():
            break  # the first event, then hang up
    for _ in range(200):  # the settlement lands once metergate has drained the upstream's last event
        if records := await gw.usage():
            break
        await asyncio.sleep(0.05)
    [record] = records
    prompt = counter_for("gpt-4o-mini-tts").count(text)
    assert (record["tokens_output"], record["usage_source"]) == (250, "provider")  # 10 events x 25 tokens
    assert record["charged_amount"] == micros(Decimal(prompt) * Decimal("0.6") + 250 * 12)
    assert (await gw.balance())["pending"] == 0
