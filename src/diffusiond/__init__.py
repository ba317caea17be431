"""diffusiond: a local image-generation server with an async, pollable HTTP API."""

__version__ = "0.1.0"

__all__ = ["__version__"]
