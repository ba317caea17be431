"""The request body, read within a limit, and `multipart/form-data` as the SDKs send it.

Starlette's `request.form()` needs python-multipart, which this project does not depend
on; a form here is small (a few fields and one or two images, all in memory within the
body limit), so it is split with `bytes.split` on its boundary (exact for binary parts,
RFC 7578) and only each part's few header lines go through the standard email parser.
"""

from __future__ import annotations

import email.policy
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import collapse_rfc2231_value

from diffusiond.errors import InvalidRequest

MAX_PARTS = 64
MAX_HEADER_BYTES = 8 * 1024
FORM_TYPE = "multipart/form-data"


@dataclass(frozen=True)
class Form:
    """A form's text fields (the last of a name wins) and its files (every one, in order)."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[bytes]] = field(default_factory=dict)


def _malformed(why: str) -> InvalidRequest:
    rule = f"{FORM_TYPE} (RFC 7578)"
    return InvalidRequest(f"the body must be {rule}: {why}", field="Content-Type", rule=rule)


def _headers(raw: bytes) -> EmailMessage:
    parsed = BytesHeaderParser(policy=email.policy.HTTP).parsebytes(raw + b"\r\n\r\n")
    assert isinstance(parsed, EmailMessage)  # what policy HTTP makes
    return parsed


def _param(headers: EmailMessage, name: str) -> str | None:
    value = headers.get_param(name, header="content-disposition")
    if value is None or isinstance(value, str):
        return value
    return collapse_rfc2231_value(value)


def boundary_of(content_type: str) -> bytes:
    headers = _headers(f"Content-Type: {content_type}".encode("latin-1", "replace"))
    if headers.get_content_type() != FORM_TYPE:
        raise _malformed(f"the Content-Type is {headers.get_content_type()!r}")
    boundary = headers.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise _malformed("the Content-Type has no boundary of 1 to 70 characters")
    return boundary.encode("latin-1", "replace")


def parse_form(content_type: str, body: bytes) -> Form:
    """The form in `body`; a 400 naming what is malformed."""
    delimiter = b"\r\n--" + boundary_of(content_type)
    # The CRLF before each delimiter belongs to it; the first one may open the body.
    chunks = (b"\r\n" + body).split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise _malformed("no parts, or no closing boundary")
    parts = chunks[1:-1]
    if len(parts) > MAX_PARTS:
        raise _malformed(f"more than {MAX_PARTS} parts")
    form = Form()
    for part in parts:
        _read_part(part, form)
    return form


def _read_part(part: bytes, form: Form) -> None:
    line_end = part.find(b"\r\n")
    if line_end < 0 or part[:line_end].strip(b" \t"):
        raise _malformed("a boundary line is followed by more than whitespace")
    head, found, content = part[line_end + 2 :].partition(b"\r\n\r\n")
    if not found or len(head) > MAX_HEADER_BYTES:
        raise _malformed("a part has no header block, or one over 8 KiB")
    headers = _headers(head)
    name = _param(headers, "name")
    if headers.get_content_disposition() != "form-data" or not name:
        raise _malformed("a part lacks 'Content-Disposition: form-data; name=...'")
    if _param(headers, "filename") is not None:
        form.files.setdefault(name, []).append(content)
        return
    try:
        form.fields[name] = content.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{name} must be UTF-8 text", field=name, rule="UTF-8 text") from None
