"""Sending a :class:`~metergate_client.calls.Call`: authentication, bounded retries, typed errors.

A call is retried (at most ``max_retries`` times, with exponential backoff capped at ``max_backoff_s``) when
the connection fails or the server answers 429, 502, 503 or 504 — with the same idempotency key, so the
server applies it once. A call marked ``retry=False`` is sent again only when the connection was refused
(the server never saw it). A 429 whose Retry-After exceeds ``max_backoff_s`` is raised at once
(:class:`~metergate_client.errors.RateLimited`) rather than slept through.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TypeVar

import httpx2 as httpx

from metergate_client.calls import Call
from metergate_client.errors import ApiError, ConnectionFailed, ServerError, error_from_response

T = TypeVar("T")
RETRY_STATUS = frozenset({429, 502, 503, 504})
API_PREFIX = "/admin/v1"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 4
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``; None when the call must not be retried."""
        if attempt >= self.max_retries:
            return None
        wait: float = min(self.backoff_s * 2.0**attempt, self.max_backoff_s)
        if response is not None:
            after = response.headers.get("Retry-After", "")
            if after.isdigit():
                if int(after) > self.max_backoff_s:
                    return None
                wait = max(wait, float(after))
        return wait


def _headers(admin_key: str, call: Call[T]) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {admin_key}", "User-Agent": "metergate-client/0.1"}
    if call.idempotency_key is not None:
        headers["Idempotency-Key"] = call.idempotency_key
    return headers


def _outcome(call: Call[T], response: httpx.Response) -> T:
    if response.is_error:
        raise error_from_response(response)
    try:
        return call.parse(response.json())
    except (ValueError, KeyError, TypeError):
        raise ServerError(response.status_code, "invalid_response",
                          f"{call.method} {response.url.path} did not answer as the metergate admin API does: "
                          "is this URL a metergate control plane?") from None


def _unreachable(base_url: str, exc: httpx.TransportError) -> ConnectionFailed:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return ConnectionFailed(f"cannot reach metergate at {base_url}: {reason}")


def _retriable(call: Call[T], exc: httpx.TransportError) -> bool:
    return call.retry or isinstance(exc, httpx.ConnectError)


class SyncTransport:
    def __init__(self, base_url: str, admin_key: str, *, timeout_s: float, policy: RetryPolicy) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = admin_key
        self._policy = policy
        self._http = httpx.Client(base_url=self.base_url + API_PREFIX, timeout=timeout_s)

    def send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, json=call.json, params=dict(call.params),
                                              headers=_headers(self._key, call))
            except httpx.TransportError as exc:
                wait = self._policy.delay(attempt, None) if _retriable(call, exc) else None
                if wait is None:
                    raise _unreachable(self.base_url, exc) from None
            else:
                wait = self._policy.delay(attempt, response) if response.status_code in RETRY_STATUS else None
                if wait is None or not call.retry:
                    return _outcome(call, response)
            time.sleep(wait)
            attempt += 1

    def close(self) -> None:
        self._http.close()


class AsyncTransport:
    def __init__(self, base_url: str, admin_key: str, *, timeout_s: float, policy: RetryPolicy) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = admin_key
        self._policy = policy
        self._http = httpx.AsyncClient(base_url=self.base_url + API_PREFIX, timeout=timeout_s)

    async def send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, json=call.json,
                                                    params=dict(call.params), headers=_headers(self._key, call))
            except httpx.TransportError as exc:
                wait = self._policy.delay(attempt, None) if _retriable(call, exc) else None
                if wait is None:
                    raise _unreachable(self.base_url, exc) from None
            else:
                wait = self._policy.delay(attempt, response) if response.status_code in RETRY_STATUS else None
                if wait is None or not call.retry:
                    return _outcome(call, response)
            await asyncio.sleep(wait)
            attempt += 1

    async def close(self) -> None:
        await self._http.aclose()


__all__ = ["ApiError", "AsyncTransport", "RetryPolicy", "SyncTransport"]
