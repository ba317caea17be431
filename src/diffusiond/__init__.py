"""diffusiond: a local image-generation server with an async, pollable HTTP API.

`diffusiond.Client` and `diffusiond.AsyncClient` are its Python clients; they are imported
on first use, so the server never loads the client's dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from diffusiond.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name in {"Client", "AsyncClient"}:
        from diffusiond import client

        return getattr(client, name)
    raise AttributeError(f"module 'diffusiond' has no attribute {name!r}")
