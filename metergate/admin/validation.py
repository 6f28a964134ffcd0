"""One request-validation layer for the admin API: every request is checked against the OpenAPI document
that ``GET /admin/v1/openapi.json`` publishes, before any handler runs, so that the document and what the
server accepts cannot drift apart.

In order, for a path the document declares:

1. a method it does not declare for that path: 405 ``method_not_allowed`` with ``Allow``;
2. a request with an ``Authorization`` header from a remote address past its failed admin-key attempts
   (:class:`AuthThrottle`): 429 ``rate_limited`` with ``Retry-After``; then the admin key itself (401
   ``invalid_admin_key``, counted as a failure when a key was sent);
3. path and query parameters against their schemas, and the JSON body when the handler reads it
   (:func:`body_of`, from :meth:`AdminApi.read_json`: after the handler has looked up what the path names,
   so an unknown object is a 404 first): 400 ``invalid_request`` (or the schema's ``x-error-code``),
   ``unknown_field`` for a field an object does not declare when it says ``additionalProperties: false``,
   with ``param`` naming the top-level field and the message the exact place.

The schema language is the subset of JSON Schema the document uses: ``type`` (one or a list), ``enum``,
``minimum``/``maximum``, ``minLength``/``maxLength``, ``pattern``, ``properties``/``required``/
``additionalProperties``/``maxProperties``, ``items``/``minItems``/``maxItems``, ``allOf``/``anyOf``/
``oneOf``/``not`` (``x-alternatives-code`` and ``-message`` name what a failed ``oneOf`` answers).
An integral number such as ``8.0`` is the integer 8 (JSON Schema's reading); the validated body, with such
numbers as ``int``, is what handlers get from :meth:`AdminApi.read_json`.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from metergate.errors import BadRequest, MethodNotAllowed, TooManyRequests, Unauthorized

BODY_SCHEMA = web.RequestKey("admin_body_schema", dict)
# A body schema that says what its handler enforces itself (with its own error details): not checked here.
HANDLER_VALIDATES = "x-validated-by-handler"  # the operation's body schema, for AdminApi.read_json
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


class Invalid(Exception):
    def __init__(self, where: str, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.where, self.message, self.code = where, message, code

    def error(self) -> BadRequest:
        """The 400: ``param`` names the top-level field (as the handlers do), the message the exact place."""
        field = re.split(r"[.\[]", self.where, maxsplit=1)[0] if self.where else None
        return BadRequest(f"{self.where or 'body'}: {self.message}", code=self.code, param=field or None)


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def validate(schema: dict[str, Any], value: Any, where: str = "") -> Any:
    """``value`` if it satisfies ``schema`` (integral floats turned into ints), else :class:`Invalid`."""
    code = schema.get("x-error-code", "invalid_request")
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        value = int(value)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            raise Invalid(where, f"must be of type {' or '.join(types)}.", code)
    if "enum" in schema and value not in schema["enum"]:
        raise Invalid(where, f"must be one of {schema['enum']}.", code)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise Invalid(where, f"must be at least {schema['minimum']}.", code)
        if "maximum" in schema and value > schema["maximum"]:
            raise Invalid(where, f"must be at most {schema['maximum']}.", code)
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise Invalid(where, f"must be at least {schema['minLength']} characters.", code)
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise Invalid(where, f"must be at most {schema['maxLength']} characters.", code)
        if "pattern" in schema and not _regex(schema["pattern"]).search(value):
            raise Invalid(where, f"must match {schema['pattern']}.", code)
    if isinstance(value, dict):
        value = _object(schema, value, where, code)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise Invalid(where, f"must have at least {schema['minItems']} items.", code)
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise Invalid(where, f"must have at most {schema['maxItems']} items.", code)
        if "items" in schema:
            value = [validate(schema["items"], item, _join(where, i)) for i, item in enumerate(value)]
    for keyword in ("anyOf", "oneOf"):
        if keyword in schema:
            matched = [s for s in schema[keyword] if _passes(s, value, where)]
            if not matched or (keyword == "oneOf" and len(matched) > 1):
                many = "exactly" if keyword == "oneOf" else "at least"
                message = schema.get("x-alternatives-message", f"must match {many} one of the alternatives.")
                raise Invalid(where, message, schema.get("x-alternatives-code", code))
    for sub in schema.get("allOf", ()):
        value = validate(sub, value, where)
    if "not" in schema and _passes(schema["not"], value, where):
        raise Invalid(where, "matches a forbidden combination.", code)
    return value


def _passes(schema: dict[str, Any], value: Any, where: str) -> bool:
    try:
        validate(schema, value, where)
    except Invalid:
        return False
    return True


def _object(schema: dict[str, Any], value: dict[str, Any], where: str, code: str) -> dict[str, Any]:
    properties: dict[str, Any] = schema.get("properties", {})
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        raise Invalid(where, f"must have at most {schema['maxProperties']} fields.", code)
    for name in schema.get("required", ()):
        if name not in value:
            raise Invalid(_join(where, name), "is required.", properties.get(name, {}).get("x-error-code", code))
    extra = schema.get("additionalProperties", True)
    out: dict[str, Any] = {}
    for name, item in value.items():
        if name in properties:
            out[name] = validate(properties[name], item, _join(where, name))
        elif extra is False:
            allowed = ", ".join(sorted(properties)) or "no fields"
            raise Invalid(_join(where, name), f"is not a field of this object (it takes {allowed}).",
                          "unknown_field")
        elif isinstance(extra, dict):
            out[name] = validate(extra, item, _join(where, name))
        else:
            out[name] = item
    return out


def _query_value(schema: dict[str, Any], raw: str, where: str) -> Any:
    """A query parameter's text as the type its schema names (an integer must be written as one; a number is
    decimal digits with at most one point, a duration such as ``wait_s``)."""
    types = schema.get("type", "string")
    if "integer" in (types if isinstance(types, list) else [types]):
        if not re.fullmatch(r"-?[0-9]{1,18}", raw):
            raise Invalid(where, "must be an integer.", schema.get("x-error-code", "invalid_request"))
        return validate(schema, int(raw), where)
    if "number" in (types if isinstance(types, list) else [types]):
        if not re.fullmatch(r"-?[0-9]{1,18}(\.[0-9]{1,9})?", raw):
            raise Invalid(where, "must be a number.", schema.get("x-error-code", "invalid_request"))
        return validate(schema, float(raw) if "." in raw else int(raw), where)
    return validate(schema, raw, where)


class AuthThrottle:
    """Failed admin-key attempts per remote address in fixed windows; an address past ``max_failures`` in
    its window is refused (429, Retry-After) until the window ends, whatever key it sends. At most
    ``max_addresses`` addresses are remembered: the least recently failing is forgotten first."""

    def __init__(self, max_failures: int, window_s: float, max_addresses: int) -> None:
        self._max, self._window_s, self._capacity = max_failures, window_s, max_addresses
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()  # address -> (window start, count)

    def check(self, address: str) -> None:
        entry = self._failures.get(address)
        if entry is None:
            return
        start, count = entry
        left = start + self._window_s - time.monotonic()
        if left <= 0:
            del self._failures[address]
        elif count >= self._max:
            raise TooManyRequests("Too many failed admin-key attempts from this address; retry later.",
                                  retry_after_s=max(1, math.ceil(left)))

    def failed(self, address: str) -> None:
        now = time.monotonic()
        start, count = self._failures.pop(address, (now, 0))
        if now - start >= self._window_s:
            start, count = now, 0
        self._failures[address] = (start, count + 1)
        while len(self._failures) > self._capacity:
            self._failures.popitem(last=False)


class Operations:
    """The document's paths as patterns, most literal first (``/price-versions/validate`` before
    ``/price-versions/{version_id}``)."""

    def __init__(self, document: dict[str, Any]) -> None:
        routes = []
        for template, item in document["paths"].items():
            parts = [re.escape(p) if not p.startswith("{") else f"(?P<{p[1:-1]}>[^/]*)" for p in template.split("/")]
            routes.append((template.count("{"), re.compile("/".join(parts) + "$"), item))
        self._routes = [(regex, item) for _, regex, item in sorted(routes, key=lambda r: r[0])]
        self.security = document.get("security", [])

    def find(self, path: str) -> tuple[dict[str, Any], dict[str, str]] | None:
        for regex, item in self._routes:
            matched = regex.match(path)
            if matched:
                return item, matched.groupdict()
        return None


def middleware(document: dict[str, Any], authenticate: Callable[[web.Request], Any],
               throttle: AuthThrottle) -> Middleware:
    operations = Operations(document)

    @web.middleware
    async def validate_admin(request: web.Request, handler: Handler) -> web.StreamResponse:
        found = operations.find(request.path) if request.path.startswith("/admin/v1/") else None
        if found is None:
            return await handler(request)
        item, path_params = found
        op = item.get(request.method.lower())
        if op is None:
            allow = [m.upper() for m in item if m in ("get", "put", "post", "delete", "patch")]
            raise MethodNotAllowed(f"{request.method} is not allowed on this path; it takes {', '.join(allow)}.",
                                   allow=allow)
        if op.get("security", operations.security):
            address = request.remote or "unknown"
            if "Authorization" in request.headers:  # a request without a key guesses nothing: a plain 401
                throttle.check(address)
            try:
                authenticate(request)
            except Unauthorized:
                if "Authorization" in request.headers:
                    throttle.failed(address)
                raise
        try:
            _check(request, op, path_params)
        except Invalid as invalid:
            raise invalid.error() from None
        return await handler(request)

    return validate_admin


def _check(request: web.Request, op: dict[str, Any], path_params: dict[str, str]) -> None:
    for param in op.get("parameters", []):
        name, where, schema = param["name"], param["in"], param.get("schema", {})
        if where == "path":
            validate(schema, path_params.get(name, ""), name)
        elif where == "query":
            values = request.query.getall(name, [])
            if len(values) > 1:
                raise Invalid(name, "must be given at most once.")
            if values:
                _query_value(schema, values[0], name)
            elif param.get("required"):
                raise Invalid(name, "is required.")
    body = op.get("requestBody")
    if body is not None:
        request[BODY_SCHEMA] = body["content"]["application/json"]["schema"]


def body_of(request: web.Request, payload: dict[str, Any]) -> dict[str, Any]:
    """The request's parsed JSON body checked against its operation's schema (400 otherwise): called when
    the handler reads its body, after it has looked up the objects its path names (404 first)."""
    schema = request.get(BODY_SCHEMA)
    if schema is None or schema.get("additionalProperties") is not False or schema.get(HANDLER_VALIDATES):
        # Only bodies the document declares strictly are checked here; the others' handlers (the pricing
        # API's rule sets, answered 422 with the rule's path; a quote, naming nested fields such as
        # usage.input_tokens) validate their own, to the constraints the document states.
        return payload
    try:
        checked: dict[str, Any] = validate(schema, payload)
    except Invalid as invalid:
        raise invalid.error() from None
    return checked
