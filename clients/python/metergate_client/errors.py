"""What the client raises: one class per answer a caller handles differently.

Tree::

    MetergateError
    ├── ConnectionFailed            the server could not be reached (after the retries)
    └── ApiError                    the server answered with an error envelope (status, code, message, param)
        ├── InvalidRequest          400 (code: invalid_request, invalid_amount, unknown_field, ...)
        ├── AuthenticationFailed    401 (invalid_admin_key, ...)
        ├── InsufficientFunds       402, with portal_url where the customer can top up
        ├── PermissionDenied        403
        ├── NotFound                404 (customer_not_found, hold_not_found, grant_not_found, ...)
        ├── Conflict                409 (already_exists, hold_not_pending, ...)
        │   └── IdempotencyConflict 409 idempotency_conflict: the key was used with other content
        ├── RateLimited             429, with retry_after_s
        └── ServerError             5xx

The mapping from an HTTP answer to a class is in one place, :func:`error_from_response`; it also serves an
application that reads the proxy's answers itself (a 402 from the proxy carries ``portal_url``).
"""

from __future__ import annotations

from typing import Any

import httpx2 as httpx


class MetergateError(Exception):
    """Every error this client raises."""


class ConnectionFailed(MetergateError):
    """The server could not be reached, or the connection broke before an answer."""


class ApiError(MetergateError):
    status: int
    code: str
    message: str
    param: str | None
    body: dict[str, Any]

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (param: {param})" if param else ""))
        self.status, self.code, self.message, self.param = status, code, message, param
        self.body = body or {}


class InvalidRequest(ApiError):
    pass


class AuthenticationFailed(ApiError):
    pass


class InsufficientFunds(ApiError):
    @property
    def portal_url(self) -> str | None:
        """The customer's top-up page: from the answer (the proxy's 402), else looked up by the client."""
        value = self.body.get("portal_url")
        return value if isinstance(value, str) else None


class PermissionDenied(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class IdempotencyConflict(Conflict):
    pass


class RateLimited(ApiError):
    @property
    def retry_after_s(self) -> int | None:
        value = self.body.get("retry_after_s")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


class ServerError(ApiError):
    pass


_BY_STATUS: dict[int, type[ApiError]] = {400: InvalidRequest, 401: AuthenticationFailed, 402: InsufficientFunds,
                                         403: PermissionDenied, 404: NotFound, 409: Conflict, 422: InvalidRequest,
                                         429: RateLimited}


def error_from_response(response: httpx.Response) -> ApiError:
    """The typed error for a non-2xx answer of metergate (admin API or proxy)."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        error = {"message": response.text[:200].strip() or response.reason_phrase,
                 "code": f"http_{response.status_code}"}
    else:
        error = dict(error)
    # The envelope's extras sit in "error"; the proxy's 402 puts portal_url beside it at the top level.
    if isinstance(payload, dict) and isinstance(payload.get("portal_url"), str):
        error.setdefault("portal_url", payload["portal_url"])
    retry_after = response.headers.get("Retry-After", "")
    if "retry_after_s" not in error and retry_after.isdigit():
        error["retry_after_s"] = int(retry_after)
    code = str(error.get("code") or f"http_{response.status_code}")
    param = error.get("param") if isinstance(error.get("param"), str) else None
    message = " ".join(str(error.get("message", "")).split())  # one line
    cls: type[ApiError]
    if code == "idempotency_conflict":
        cls = IdempotencyConflict
    elif response.status_code >= 500:
        cls = ServerError
    else:
        cls = _BY_STATUS.get(response.status_code, ApiError)
    return cls(response.status_code, code, message, param, error)


__all__ = ["ApiError", "AuthenticationFailed", "Conflict", "ConnectionFailed", "IdempotencyConflict",
           "InsufficientFunds", "InvalidRequest", "MetergateError", "NotFound", "PermissionDenied", "RateLimited",
           "ServerError", "error_from_response"]
