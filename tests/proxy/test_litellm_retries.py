"""litellm's ``completion(num_retries=N)`` against a 402: what metergate can and cannot make it do.

litellm's completion wrapper (``litellm/utils.py``, the ``except`` branches of ``client``'s ``wrapper`` and
``wrapper_async``) hands any ``openai.APIError`` to ``completion_with_retries`` / ``acompletion_with_retries``
(``litellm/main.py``), a tenacity loop with
``stop_after_attempt(num_retries)`` whose only retry predicate is litellm's own internal "resent failure" mark.
It never reads the status, ``x-should-retry`` or ``Retry-After``, and litellm maps metergate's 402 to its
generic ``APIError``: nothing in an answer can stop it, so the refusal is sent ``num_retries + 1`` times. What
metergate guarantees is that each attempt is refused whole and costs nothing. On the client side a
``retry_policy`` whose ``DefaultRetries`` is 0 (``APIError`` has no entry of its own) sends it once.

Method: litellm's ``acompletion`` (the async twin of ``completion``, same wrapper logic; the sync one leaks
its HTTP connections into the test run) with an offline model table, against the real gateway with an empty
wallet, counting the attempts in the gateway's access log, as tests/proxy/test_client_errors.py does for the
SDKs and litellm's Router.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from tests.conftest import Gateway
from tests.proxy.test_client_errors import AS_ACME, MESSAGES, access_lines, broke, litellm_offline, log_stream

__all__ = ["broke", "litellm_offline", "log_stream"]


async def _completion(litellm: Any, gw: Gateway, **options: Any) -> Exception:
    try:
        await litellm.acompletion(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=5,
                           api_base=f"{gw.url}/openai/v1", api_key="sk-app-holds-no-key", extra_headers=AS_ACME,
                           **options)
    except Exception as refused:
        return refused
    raise AssertionError("the request was not refused")


async def test_litellm_num_retries_resends_a_402_whatever_the_answer_says_and_it_costs_nothing(
        broke: Gateway, log_stream: io.StringIO, litellm_offline: Any) -> None:
    refused = await _completion(litellm_offline, broke, num_retries=3)
    assert isinstance(refused, litellm_offline.exceptions.APIError)
    assert f"Top up at {broke.url}/portal/" in str(refused)
    attempts = access_lines(log_stream, "/openai/v1/chat/completions")
    assert len(attempts) == 4  # the first try and 3 retries, though each answer said x-should-retry: false
    assert len({line["request_id"] for line in attempts}) == 4
    assert broke.upstream.requests == [] and await broke.usage() == []
    assert (await broke.balance())["pending"] == 0


async def test_a_retry_policy_without_default_retries_sends_a_402_once(
        broke: Gateway, log_stream: io.StringIO, litellm_offline: Any) -> None:
    refused = await _completion(litellm_offline, broke, num_retries=3,
                                retry_policy={"DefaultRetries": 0, "RateLimitErrorRetries": 3})
    assert "Insufficient funds" in str(refused)
    assert len(access_lines(log_stream, "/openai/v1/chat/completions")) == 1


@pytest.fixture(autouse=True)
def _quiet_litellm_retry_state(litellm_offline: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """litellm sets its global ``num_retries`` to None inside the wrapper; keep it from leaking between tests."""
    monkeypatch.setattr(litellm_offline, "num_retries", None)
