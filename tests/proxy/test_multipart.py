"""The strict multipart reading behind audio uploads and image edits: what it refuses, and its bounds.

Method: :func:`metergate.proxy.multipart.parse_form` on bodies written here byte by byte, each breaking one
rule that two parsers could read differently; each must be refused with a stable code and the field named.
"""

from __future__ import annotations

import pytest

from metergate.errors import BadRequest, PayloadTooLarge
from metergate.proxy.multipart import MAX_PARTS, parse_form

TYPE = "multipart/form-data; boundary=b0"


def body(*parts: tuple[str, str, bytes]) -> bytes:
    """A form of (extra header lines, name/filename disposition, content) parts."""
    out = b""
    for headers, disposition, content in parts:
        out += (f"--b0\r\nContent-Disposition: form-data; {disposition}\r\n{headers}\r\n").encode() + content + b"\r\n"
    return out + b"--b0--\r\n"


async def test_a_good_form_reads_text_and_files() -> None:
    form = await parse_form(body(("", 'name="model"', b"whisper-1"),
                                 ("Content-Type: audio/wav\r\n", 'name="file"; filename="a.wav"', b"RIFF")),
                            TYPE, files={"file": 10})
    assert form.value("model") == "whisper-1"
    [upload] = form.files["file"]
    assert (upload.filename, upload.content_type, upload.data) == ("a.wav", "audio/wav", b"RIFF")


@pytest.mark.parametrize(("raw", "param"), [
    (body(("", 'name="model"', b"a"), ("", 'name="model"', b"b")), "model"),  # named twice
    (body(("", 'filename="x"', b"a"),), None),  # no name
    (body(("Content-Transfer-Encoding: base64\r\n", 'name="file"; filename="a"', b"UklGRg=="),), "file"),
    (body(("", 'name="model"; filename="m.txt"', b"whisper-1"),), "model"),  # text sent as a file
    (body(("", 'name="file"', b"RIFF"),), "file"),  # a file sent as text
    (body(("", 'name="prompt"', b"\xff\xfe"),), "prompt"),  # not UTF-8
    (body(("", 'name="prompt"', b"x" * (64 * 1024 + 1)),), "prompt"),  # a text field past its bound
    (body(*[("", f'name="f{i}"', b"x") for i in range(MAX_PARTS + 1)]), None),
    (body(("", 'name="model"', b"a"))[:-8], None),  # no closing boundary
    (b"no boundary here", None),
])
async def test_ambiguous_or_unbounded_forms_are_refused(raw: bytes, param: str | None) -> None:
    with pytest.raises(BadRequest) as refused:
        await parse_form(raw, TYPE, files={"file": 100})
    assert (refused.value.code, refused.value.param) == ("invalid_multipart", param)


async def test_a_file_past_its_limit_is_a_413_naming_it() -> None:
    with pytest.raises(PayloadTooLarge) as refused:
        await parse_form(body(("", 'name="file"; filename="a.wav"', b"x" * 101),), TYPE, files={"file": 100})
    assert (refused.value.code, refused.value.param) == ("file_too_large", "file")


async def test_a_content_type_without_a_boundary_is_refused() -> None:
    with pytest.raises(BadRequest) as refused:
        await parse_form(body(), "multipart/form-data", files={})
    assert refused.value.code == "invalid_multipart"
