"""Structured logs: one JSON object per line, tagged with the request being served, secrets redacted.

Each line carries ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, and ``request_id`` while a
request is being served — the same id a metered response carries as ``X-Metergate-Request-Id``. The id
lives in a context variable, set once per request by the observing middleware; aiohttp runs every
request in a task of its own, so the variable never leaks from one request to another.

metergate never logs a secret on purpose. :class:`RedactionFilter` is the safety net under that rule:
every record passing the handler has the configured secret values (provider keys, admin keys, portal
secrets, the database password) and anything shaped like a credential (``mgk_...`` proxy keys,
``mg_live_...`` admin keys, ``sk-...`` / ``sk_live_...`` provider keys, ``whsec_...``, bearer tokens,
passwords in URLs) replaced, in the message and in any traceback.

The access log never writes a query string: portal and dashboard links carry their signatures there,
and a link is a credential until it expires. :class:`AccessLog` writes aiohttp's usual line (client,
time, request line, status, size, referrer, user agent, duration) with the request's path alone, and
the referrer cut at its ``?`` too; metergate's runner (:class:`metergate.http.JsonErrorAppRunner`) uses
it unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import IO, Literal
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from pydantic import BaseModel, SecretStr

from metergate.config.settings import Settings
from metergate.ids import time_ordered_hex

LogFormat = Literal["json", "text"]
REDACTED = "[REDACTED]"
REQUEST_ID: ContextVar[str | None] = ContextVar("metergate_request_id", default=None)

_CREDENTIAL_SHAPES = re.compile(
    r"\bmgk_(?:test|live)_[A-Za-z0-9_-]{8,}"  # metergate proxy keys
    r"|\bmg_(?:test|live)_[A-Za-z0-9_-]{8,}"  # metergate admin keys
    r"|\b(?:sk|rk)[-_][A-Za-z0-9_-]{16,}"  # provider and Stripe-like secret keys
    r"|\bwhsec_[A-Za-z0-9+/=_-]{16,}"  # webhook signing secrets
    r"|(?i:\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}"  # any bearer token
)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")
_PLAIN = logging.Formatter()


def new_request_id() -> str:
    """Start a request: a fresh id, current for the rest of this task (and the tasks it starts). Time-ordered
    (:mod:`metergate.ids`): the hold id, ledger keys and usage record id derived from it are index keys."""
    request_id = "req_" + time_ordered_hex()
    REQUEST_ID.set(request_id)
    return request_id


def current_request_id() -> str | None:
    return REQUEST_ID.get()


class Redactor:
    """Replaces known secret values and credential-shaped strings in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so that a secret containing another is replaced whole. Very short values are
        # skipped: replacing them would shred ordinary words and protect nothing.
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED + "@", text)
        return _CREDENTIAL_SHAPES.sub(REDACTED, text)


class RedactionFilter(logging.Filter):
    """Rewrites each record's message and traceback through a :class:`Redactor`; never drops a record."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: leave it for the handler's own error reporting
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _PLAIN.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being served (``request_id``, ``request_tag``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and request_id / exc / stack when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


def without_query(target: str) -> str:
    """A URL or request target up to its query string (or fragment)."""
    for mark in ("?", "#"):
        target = target.split(mark, 1)[0]
    return target


class AccessLog(AbstractAccessLogger):
    """One INFO line per request on ``aiohttp.access``, as aiohttp's default format writes it, except that
    no query string reaches it: ``%a %t "%r" %s %b "%{Referer}i" "%{User-Agent}i" %Tf`` with the
    request line's target and the referrer cut at ``?``. (The format argument is ignored on purpose: a
    format with ``%r`` would bring the query string back.)"""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        try:
            target = without_query(request.raw_path)
            version = f"HTTP/{request.version.major}.{request.version.minor}"
            started = (datetime.now(UTC) - timedelta(seconds=time)).strftime("[%d/%b/%Y:%H:%M:%S +0000]")
            referer = without_query(request.headers.get("Referer", "-"))
            agent = request.headers.get("User-Agent", "-")
            self.logger.info('%s %s "%s %s %s" %s %s "%s" "%s" %.6f', request.remote or "-", started,
                             request.method, target, version, response.status, response.body_length, referer,
                             agent, time, extra={"path": target, "response_status": response.status})
        except Exception:
            self.logger.exception("access log line failed")

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


#: Libraries whose lower levels write request and response bodies, kept at this level or above whatever
#: ``log_level`` says. Stripe's SDK logs every request's form body and every response body at DEBUG: a
#: Checkout Session's ``success_url`` is a signed portal link, and the bodies carry customers' data.
_AT_LEAST = {"stripe": logging.INFO}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value the settings hold, for the redaction filter: each ``SecretStr`` anywhere in them
    (provider, admin, portal, Stripe and notification keys, and whatever secret a later setting adds), and
    each password inside a URL (the database's, say)."""
    values: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, SecretStr):
            values.append(value.get_secret_value())
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif isinstance(value, str) and "://" in value:
            try:
                password = urlsplit(value).password
            except ValueError:
                password = None
            if password:
                values.append(password)

    walk(settings)
    return values


def configure_logging(level: str = "INFO", fmt: LogFormat = "json", secrets: Iterable[str] = (),
                      stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in ``fmt``, redacted; replaces a previous call's handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name("metergate")
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactionFilter(Redactor(secrets)))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "metergate"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, floor in _AT_LEAST.items():
        logging.getLogger(name).setLevel(max(root.level, floor))
    logging.captureWarnings(True)
    return handler
