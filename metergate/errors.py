"""The errors metergate answers with, each with a stable machine-readable code.

Tree::

    MetergateError                      (500 internal_error; 504 timeout when aiohttp times a handler out)
    ├── BadRequest                      400: invalid_json, invalid_request (param names the field),
    │                                        missing_model, invalid_model, unknown_model,
    │                                        invalid_customer, invalid_amount,
    │                                        malformed_request (HTTP framing aiohttp could not parse, or
    │                                        Transfer-Encoding on HTTP/1.0), unsupported_transfer_encoding,
    │                                        unknown_field, invalid_path, invalid_query (metergate.urls),
    │                                        missing_api_version, invalid_api_version (Azure routes),
    │                                        invalid_multipart, invalid_audio, unpriced_unit (media)
    │                                        unknown_budget_node, invalid_budget_node
    ├── Unauthorized                    401: missing_customer, invalid_api_key, invalid_admin_key
    ├── PaymentRequired                 402: insufficient_funds
    ├── Forbidden                       403: unknown_customer, untrusted_customer_header,
    │                                        untrusted_attribute_header, untrusted_budget_node_header,
    │                                        model_not_allowed (a budget node's allowed_models),
    │                                        invalid_portal_link, expired_portal_link,
    │                                        invalid_dashboard_link, expired_dashboard_link
    ├── NotFound                        404: unknown_route, endpoint_not_metered, unknown_deployment,
    │                                        unknown_method (Gemini routes), unknown_model (a model id a
    │                                        Bedrock route does not serve), not_found
    ├── MethodNotAllowed                405: method_not_allowed (with an Allow header)
    ├── RequestTimeout                  408: request_timeout (headers or body sent too slowly)
    ├── Conflict                        409: idempotency_conflict, already_exists, node_has_children
    ├── PayloadTooLarge                 413: body_too_large, file_too_large (an upload over its limit)
    ├── UnsupportedMediaType            415: unsupported_media_type, unsupported_content_encoding
    ├── TooManyRequests                 429: rate_limited (with a Retry-After header; also failed
    │                                        admin-key attempts from one address), budget_exceeded
    │                                        (a budget node's limit: metergate.budgets.denials)
    ├── BadGateway                      502: upstream_unreachable, upstream_redirect, upstream_invalid
    ├── ServiceUnavailable              503: storage_unavailable, ledger_backlog
    └── GatewayTimeout                  504: upstream_timeout

The classes carry their HTTP status as data; turning one into a response happens in exactly
one place, :mod:`metergate.http`. Bodies use the OpenAI error envelope so that client SDKs
surface ``message`` and ``code`` (the Anthropic SDK reads it too); on Gemini routes they use Google's,
``{"error": {"code": <HTTP status>, "message", "status": <google.rpc.Code name>, "details": [ErrorInfo]}}``,
where the ``ErrorInfo``'s ``reason`` is metergate's code and its ``metadata`` the error's other fields
(:meth:`MetergateError.google_body`), so that the ``google-genai`` SDK raises its own error types with them;
on a Bedrock route the OpenAI envelope also carries AWS's ``message`` and ``__type``.

Each error also says whether the same request, sent again unchanged, can succeed
(:attr:`MetergateError.should_retry`); :mod:`metergate.http` sends it as ``x-should-retry``, which
the OpenAI and Anthropic SDKs obey over their own status-based rules (they would otherwise retry a
409 or any 5xx). Refusals are final (``false``): a 402 stays a 402 until someone tops up. A 429 and
the transient 5xx (unreachable upstream or storage, upstream timeout; nothing was charged) are
``true``. A 500 says nothing and leaves the choice to the client.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

# Google's canonical status names (google.rpc.Code) by HTTP status, for the envelope of Gemini routes.
_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 402: "FAILED_PRECONDITION",
                  403: "PERMISSION_DENIED", 404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 408: "DEADLINE_EXCEEDED",
                  409: "ABORTED", 413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                  499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
                  504: "DEADLINE_EXCEEDED"}


def google_error(code: str, message: str, status: int, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """An error in Google's envelope: ``status`` is the HTTP status, ``code`` metergate's stable code (the
    ``ErrorInfo`` reason), ``metadata`` its other fields (as strings, which ``ErrorInfo`` requires)."""
    info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": code, "domain": "metergate",
            "metadata": {key: str(value) for key, value in (metadata or {}).items() if value is not None}}
    return {"error": {"code": status, "message": message, "status": _GOOGLE_STATUS.get(status, "UNKNOWN"),
                      "details": [info]}}


# Codes whose verdict differs from their class's: a redirect or an oversized answer from the upstream
# comes back the same however often it is asked for.
_RETRY_BY_CODE: dict[str, bool] = {"upstream_redirect": False, "upstream_invalid": False}


class MetergateError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    default_code: ClassVar[str] = "internal_error"
    retry: ClassVar[bool | None] = None  # the class's x-should-retry verdict; None: no header

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.extra = extra
        self.headers: dict[str, str] = {}  # response headers that go with the error (Retry-After)

    @property
    def should_retry(self) -> bool | None:
        """Whether sending the same request again can succeed: ``x-should-retry`` (None: not sent)."""
        return _RETRY_BY_CODE.get(self.code, self.retry)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "code": self.code,
                                 "param": self.param}
        error.update(self.extra)
        return {"error": error}

    def google_body(self, status: int | None = None) -> dict[str, Any]:
        """The error in Google's envelope (Gemini routes), answered with ``status`` (default: the class's)."""
        return google_error(self.code, self.message, status or self.status, {"param": self.param, **self.extra})


class BadRequest(MetergateError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"
    retry = False


class Unauthorized(MetergateError):
    status = 401
    type = "authentication_error"
    default_code = "missing_customer"
    retry = False


class PaymentRequired(MetergateError):
    status = 402
    type = "insufficient_funds"
    default_code = "insufficient_funds"
    retry = False


class Forbidden(MetergateError):
    status = 403
    type = "permission_error"
    default_code = "forbidden"
    retry = False


class NotFound(MetergateError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"
    retry = False


class MethodNotAllowed(MetergateError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"
    retry = False

    def __init__(self, message: str, *, allow: Iterable[str], **extra: Any) -> None:
        super().__init__(message, **extra)
        self.headers["Allow"] = ", ".join(allow)  # RFC 9110 §15.5.6: a 405 lists the methods the path takes


class RequestTimeout(MetergateError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"


class Conflict(MetergateError):
    status = 409
    type = "conflict_error"
    default_code = "idempotency_conflict"
    retry = False


class PayloadTooLarge(MetergateError):
    status = 413
    type = "invalid_request_error"
    default_code = "body_too_large"
    retry = False


class UnsupportedMediaType(MetergateError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"
    retry = False


class TooManyRequests(MetergateError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limited"
    retry = True  # after Retry-After

    def __init__(self, message: str, *, retry_after_s: int, **extra: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **extra)
        self.headers["Retry-After"] = str(retry_after_s)


class BadGateway(MetergateError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_unreachable"
    retry = True


class GatewayTimeout(MetergateError):
    status = 504
    type = "upstream_error"
    default_code = "upstream_timeout"
    retry = True


class ServiceUnavailable(MetergateError):
    """Storage metergate needs is unreachable: refuse (nothing charged) rather than guess."""

    status = 503
    type = "api_error"
    default_code = "storage_unavailable"
    retry = True
