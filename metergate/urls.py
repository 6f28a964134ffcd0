"""Request-target hygiene: a proxied path and query, parsed into parts and re-encoded from them.

A path is decided on once, as a tuple of decoded segments, and everything downstream (the route, the
metered endpoint, the upstream URL) is derived from that tuple. A segment can therefore never hide a
separator: a percent-encoded ``/``, ``?``, ``#`` or ``\\`` (and control characters) inside a segment is
refused, as is a dot segment (``.``, ``..``, also percent-encoded or followed by ``;``, which some servers
strip), an empty segment inside the path, a malformed escape or a byte sequence that is not UTF-8. What
the upstream receives is the re-encoding of the segments, so it sees exactly the path that was classified.
Segments are also checked in Unicode compatibility form (NFKC), which some servers apply: a fullwidth dot or
solidus is refused like its ASCII original.

The query is parsed into name/value pairs and re-encoded the same way: what reaches the upstream is a
well-formed query with the same pairs, never raw client bytes.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlencode

from metergate.errors import BadRequest

# RFC 3986 pchar: unreserved, sub-delims, ":" and "@", plus "%" for escapes checked below.
_RAW_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%]*")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")  # a "%" not followed by two hex digits
_SEPARATORS = re.compile(r"[/?#\\\x00-\x1f\x7f]")
_SEGMENT_SAFE = "!$&'()*+,;=:@"  # kept as is by re-encoding (with letters, digits and "-._~")
_QUERY_FIELDS_MAX = 100


def invalid_path(reason: str) -> BadRequest:
    return BadRequest(f"The request path is not accepted: {reason}. metergate forwards only plain paths.",
                      code="invalid_path")


def path_segments(raw_path: str) -> tuple[str, ...]:
    """The decoded segments of a raw (still percent-encoded) absolute path; 400 ``invalid_path`` for anything
    that could mean another path to another parser. ``/`` is ``()``; a trailing slash is a last ``""``."""
    if not raw_path.startswith("/"):
        raise invalid_path("it must start with '/'")
    if raw_path == "/":
        return ()
    parts = raw_path[1:].split("/")
    segments: list[str] = []
    for index, part in enumerate(parts):
        if not part:
            if index == len(parts) - 1:
                segments.append("")  # a trailing slash
                continue
            raise invalid_path("empty path segment ('//')")
        if not _RAW_SEGMENT.fullmatch(part) or _ESCAPE.search(part):
            raise invalid_path("a character that must be percent-encoded, or a malformed escape")
        try:
            decoded = unquote_to_bytes(part).decode("utf-8")
        except UnicodeDecodeError:
            raise invalid_path("an escape that is not UTF-8") from None
        # Also as a server that folds compatibility characters would read it: fullwidth "．．" is "..".
        folded = unicodedata.normalize("NFKC", decoded)
        if _SEPARATORS.search(decoded) or _SEPARATORS.search(folded):
            raise invalid_path("an encoded separator (%2F, %3F, %23, %5C) or control character")
        if decoded.split(";", 1)[0] in (".", "..") or folded.split(";", 1)[0] in (".", ".."):
            raise invalid_path("a dot segment ('.' or '..')")
        segments.append(decoded)
    return tuple(segments)


def encode_path(segments: tuple[str, ...]) -> str:
    """The percent-encoded absolute path of ``segments`` (the inverse of :func:`path_segments`)."""
    return "/" + "/".join(quote(segment, safe=_SEGMENT_SAFE) for segment in segments)


def decoded_path(segments: tuple[str, ...]) -> str:
    """The segments joined by ``/``: unambiguous, since no segment contains one."""
    return "/" + "/".join(segments)


def clean_query(raw_query: str) -> str:
    """The query re-encoded from its parsed name/value pairs (``""`` for none); 400 ``invalid_query`` when it
    does not parse (an escape that is not UTF-8, more than 100 fields)."""
    if not raw_query:
        return ""
    try:
        pairs = parse_qsl(raw_query, keep_blank_values=True, errors="strict",
                          max_num_fields=_QUERY_FIELDS_MAX, separator="&")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(f"The query string does not parse (UTF-8 escapes, at most {_QUERY_FIELDS_MAX} fields).",
                         code="invalid_query") from None
    return urlencode(pairs, quote_via=quote, safe="")
