"""Logs are one JSON object per line, tagged with the request being served, and scrubbed of secrets.

Method: install metergate's logging on a string stream, drive real requests through a gateway on loopback
and parse what was written; the redaction safety net is fed planted secrets directly, in messages, in
arguments and in tracebacks.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from metergate.config.settings import load_settings
from metergate.observability.logs import REDACTED, Redactor, configure_logging, secrets_of
from tests.conftest import Gateway
from tests.proxy.test_openai_sdk import MESSAGES


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """metergate's handler on the root logger, writing to a string; the root logger restored afterwards."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging("INFO", "json", ["planted-secret-value-1234"], stream=stream)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def entries(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_each_line_is_a_json_object_tagged_with_its_request(gateway: Gateway, log_stream: io.StringIO) -> None:
    await gateway.customer("acme", funds=1_000_000)
    response = await gateway.openai("acme").chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES)
    request_id = response.headers["X-Metergate-Request-Id"]
    lines = entries(log_stream)  # raises if any line is not JSON
    assert lines
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    assert all(line["ts"].endswith("Z") for line in lines)
    # The access log line of the proxied request carries the id its receipt carries.
    [access] = [line for line in lines if "POST /openai/v1/chat/completions" in line["msg"]]
    assert access["request_id"] == request_id
    assert access["logger"] == "aiohttp.access"


def test_records_outside_a_request_carry_no_request_id(log_stream: io.StringIO) -> None:
    logging.getLogger("metergate.test").warning("starting %s", "up")
    [line] = entries(log_stream)
    assert (line["level"], line["logger"], line["msg"]) == ("WARNING", "metergate.test", "starting up")
    assert "request_id" not in line


def test_a_leaked_secret_is_redacted_in_message_arguments_and_tracebacks(log_stream: io.StringIO) -> None:
    log = logging.getLogger("metergate.test")
    log.info("configured secret %s", "planted-secret-value-1234")
    log.info("proxy key mgk_live_%s, header Bearer abcdefghijkl0123, provider key sk-proj-%s", "Z" * 30, "Y" * 30)
    log.info("database postgresql://metergate:hunter2-password@db:5432/metergate")
    try:
        raise RuntimeError("upstream said: invalid key sk_live_" + "X" * 24)
    except RuntimeError:
        log.exception("call failed")
    text = log_stream.getvalue()
    for secret in ("planted-secret-value-1234", "Z" * 30, "Y" * 30, "abcdefghijkl0123", "hunter2-password",
                   "X" * 24):
        assert secret not in text
    lines = entries(log_stream)
    assert lines[0]["msg"] == f"configured secret {REDACTED}"
    assert lines[2]["msg"] == f"database postgresql://metergate:{REDACTED}@db:5432/metergate"
    assert "RuntimeError" in lines[3]["exc"] and REDACTED in lines[3]["exc"]


def test_text_format_for_people(log_stream: io.StringIO) -> None:
    stream = io.StringIO()
    handler = configure_logging("INFO", "text", stream=stream)  # replaces the JSON handler
    assert handler in logging.getLogger().handlers
    assert len([h for h in logging.getLogger().handlers if h.get_name() == "metergate"]) == 1
    logging.getLogger("metergate.test").info("hello")
    assert stream.getvalue().rstrip().endswith("INFO metergate.test: hello")
    logging.getLogger().removeHandler(handler)


@pytest.mark.parametrize("text, expected", [
    # Values metergate knows, and shapes it recognizes.
    ("key=known-secret-abcdef", f"key={REDACTED}"),
    ("mgk_test_0123456789abcdefghij", REDACTED),
    ("admin mg_live_0123456789abcdef", f"admin {REDACTED}"),
    ("sk-ant-api03-0123456789abcdef", REDACTED),
    ("whsec_0123456789abcdef0123", REDACTED),
    ("authorization: Bearer eyJhbGciOiJIUzI1NiJ9", f"authorization: {REDACTED}"),
    ("redis://:p4ssw0rd@cache:6379/0", f"redis://:{REDACTED}@cache:6379/0"),
    # Ordinary text is left alone.
    ("request req_0123456789abcdef settled", "request req_0123456789abcdef settled"),
    ("postgresql://metergate@db/metergate", "postgresql://metergate@db/metergate"),
    ("task sk-1 done", "task sk-1 done"),
])
def test_redactor(text: str, expected: str) -> None:
    assert Redactor(["known-secret-abcdef", "short"])(text) == expected


def test_secrets_of_settings_lists_every_configured_secret() -> None:
    settings = load_settings(
        database_url="postgresql://metergate:db-password-123@db/metergate",
        routes=[{"prefix": "/openai", "upstream": "https://api.openai.com", "api_key": "sk-route-key-0123456789"}],
        admin_keys=["mg_live_" + "a" * 20], portal_secrets={"k1": "p" * 32}, notify_secret="n" * 24)
    assert sorted(secrets_of(settings)) == sorted(["db-password-123", "sk-route-key-0123456789", "mg_live_" + "a" * 20,
                                                   "p" * 32, "n" * 24])
