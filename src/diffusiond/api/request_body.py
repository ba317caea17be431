"""Reading a request's body within a limit: one rule for every route that takes one (the
native API, the OpenAI and the AUTOMATIC1111 front doors)."""

from __future__ import annotations

from starlette.requests import Request

from diffusiond.api.params import read_uint, shown
from diffusiond.errors import InvalidRequest, PayloadTooLarge


def declared_length(raw: str, limit: int) -> int:
    """The Content-Length header's number; over `limit` for a run of digits too long to
    read; a 400 naming the header for anything that is not ASCII digits."""
    length = read_uint(raw.strip())
    if length is None:
        if raw.strip().isdigit():  # ASCII digits, only too many of them: over any limit
            return limit + 1
        rule = "a whole number of bytes"
        raise InvalidRequest(
            f"Content-Length must be {rule}, got {shown(raw)}", field="Content-Length", rule=rule
        )
    return length


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` bytes: from
    Content-Length before anything is read, else as the chunks arrive."""
    declared = request.headers.get("content-length")
    if declared is not None and declared_length(declared, limit) > limit:
        raise PayloadTooLarge(f"the request body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
