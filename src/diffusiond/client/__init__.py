"""The Python client of a diffusiond server, built only on its public HTTP API."""

from diffusiond.client._protocol import DEFAULT_URL
from diffusiond.client.aio import AsyncClient
from diffusiond.client.errors import (
    AlreadyTerminalError,
    ConnectionError,
    DiffusiondClientError,
    GenerationCancelledError,
    GenerationFailedError,
    GenerationTimeoutError,
    InvalidRequestError,
    NotFoundError,
    ServerBusyError,
    ServerError,
    ServerNotReadyError,
    UnauthorizedError,
    UnsafeAnswerError,
)
from diffusiond.client.models import (
    GeneratedImage,
    Generation,
    Health,
    LoraInfo,
    ModelInfo,
    Progress,
    Samplers,
    safe_id,
)
from diffusiond.client.png import png_input_hashes, png_parameters
from diffusiond.client.sync import Client

__all__ = [
    "DEFAULT_URL",
    "AlreadyTerminalError",
    "AsyncClient",
    "Client",
    "ConnectionError",
    "DiffusiondClientError",
    "GeneratedImage",
    "Generation",
    "GenerationCancelledError",
    "GenerationFailedError",
    "GenerationTimeoutError",
    "Health",
    "InvalidRequestError",
    "LoraInfo",
    "ModelInfo",
    "NotFoundError",
    "Progress",
    "Samplers",
    "ServerBusyError",
    "ServerError",
    "ServerNotReadyError",
    "UnauthorizedError",
    "UnsafeAnswerError",
    "png_input_hashes",
    "png_parameters",
    "safe_id",
]
