"""A strict, bounded reading of a buffered multipart/form-data body (audio uploads, image edits).

metergate reads what it needs to price the request (the model, the file's header, ``n``, ``size``...) and
forwards the client's bytes unchanged, so this reading must agree with the upstream's on every field it
relies on. It therefore refuses what two parsers might read differently: a field named twice (unless the
endpoint repeats it, ``image[]``), a part with no name, a nested multipart, a text field holding a file,
a file field holding text, non-UTF-8 text, an encoded part (``Content-Transfer-Encoding``). Everything is
bounded: parts, header sizes (aiohttp's own limits), each text field, each file by its endpoint's limit
(413 ``file_too_large``), and the whole body by the caller before it gets here. A malformed body is 400
``invalid_multipart`` and nothing is held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, MultipartReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from metergate.errors import BadRequest, PayloadTooLarge

MAX_PARTS = 64
MAX_TEXT_BYTES = 64 * 1024  # one text field (a prompt is at most 32,000 characters at OpenAI)
_CHUNK = 65_536


@dataclass(frozen=True, slots=True)
class FilePart:
    name: str
    filename: str
    content_type: str
    data: bytes


@dataclass(slots=True)
class Form:
    """A parsed form: its text fields (repeated ones in order) and its files, by field name."""

    text: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, list[FilePart]] = field(default_factory=dict)

    def value(self, name: str) -> str | None:
        values = self.text.get(name)
        return values[0] if values else None


def invalid(message: str, param: str | None = None) -> BadRequest:
    return BadRequest(f"Malformed multipart/form-data body: {message}.", code="invalid_multipart", param=param)


async def parse_form(body: bytes, content_type: str, *, files: Mapping[str, int],
                     repeated: frozenset[str] = frozenset()) -> Form:
    """Parse ``body``; ``files``: the file fields allowed and each one's byte limit; ``repeated``: the fields
    that may appear more than once (everything else appears at most once)."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type:
        raise invalid("the Content-Type must be multipart/form-data with a boundary")
    reader = MultipartReader(CIMultiDict({"Content-Type": content_type}), _buffered(body),
                             client_max_size=len(body) + 1, max_field_size=8190, max_headers=32)
    form = Form()
    parts = 0
    try:
        while True:
            part = await reader.next()
            if part is None:
                break
            parts += 1
            if parts > MAX_PARTS:
                raise invalid(f"more than {MAX_PARTS} parts")
            if not isinstance(part, BodyPartReader):
                raise invalid("nested multipart bodies are not accepted")
            await _take(part, form, files, repeated)
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:  # aiohttp's refusals
        detail = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
        raise invalid(str(detail)[:200] or "the body does not parse") from None
    return form


async def _take(part: BodyPartReader, form: Form, files: Mapping[str, int], repeated: frozenset[str]) -> None:
    name = part.name
    if not name or len(name) > 128:
        raise invalid("every part needs a form-data name of at most 128 characters")
    if name not in repeated and (name in form.text or name in form.files):
        raise invalid(f"the field {name!r} appears twice", name)
    if "Content-Transfer-Encoding" in part.headers or "Content-Encoding" in part.headers:
        raise invalid(f"the field {name!r} is encoded; send its bytes as they are", name)
    limit = files.get(name)
    if limit is None:
        if part.filename is not None:
            raise invalid(f"the field {name!r} must be text, not a file", name)
        raw = await _read(part, MAX_TEXT_BYTES, name, text=True)
        try:
            form.text.setdefault(name, []).append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise invalid(f"the field {name!r} is not UTF-8 text", name) from None
        return
    if part.filename is None:
        raise invalid(f"the field {name!r} must be a file upload (with a filename)", name)
    data = await _read(part, limit, name, text=False)
    form.files.setdefault(name, []).append(
        FilePart(name, part.filename[:256], part.headers.get("Content-Type", "application/octet-stream")[:128],
                 data))


async def _read(part: BodyPartReader, limit: int, name: str, *, text: bool) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while not part.at_eof():
        chunk = await part.read_chunk(_CHUNK)
        size += len(chunk)
        if size > limit:
            if text:
                raise invalid(f"the field {name!r} exceeds {limit} bytes", name)
            raise PayloadTooLarge(f"The file in {name!r} exceeds {limit} bytes.", code="file_too_large",
                                  param=name)
        chunks.append(chunk)
    return b"".join(chunks)


def _buffered(body: bytes) -> StreamReader:
    """``body`` as the stream aiohttp's reader reads from: fed whole, then closed."""
    loop = asyncio.get_running_loop()
    stream = StreamReader(BaseProtocol(loop), limit=2 ** 20, loop=loop)
    stream.feed_data(body)
    stream.feed_eof()
    return stream
