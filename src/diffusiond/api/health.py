"""The body of GET /health: what every client needs, and with the key, everything.

Without the API key (where one is set) /health says only what a client or the web page
needs to start: that the server is up, whether it is busy, how often to poll, the largest
batch and the version. The model's path, the device, the queue and, in broker mode, the
workers' host names and process ids are for whoever holds the key. A server without a key
listens on loopback only (or was told --insecure), so there it shows everything.
"""

from __future__ import annotations

from diffusiond import __version__
from diffusiond.api.ports import JobRunner
from diffusiond.errors import ServerNotReady


def check_ready(engine: JobRunner, *, full: bool) -> None:
    """`ServerNotReady` while the model loads or after it failed (the reason only when
    `full`: it may name a file)."""
    if engine.ready:
        return
    reason = engine.load_error
    if reason is None:
        raise ServerNotReady("the model is still loading")
    raise ServerNotReady(
        f"the model failed to load: {reason}" if full else "the model failed to load"
    )


def health_body(
    engine: JobRunner,
    *,
    poll_interval_ms: int,
    max_batch: int,
    open_streams: int,
    full: bool,
) -> dict[str, object]:
    stats = engine.stats()
    body: dict[str, object] = {
        "status": "ok",
        "busy": stats.running > 0 or stats.admitted > 0,
        "pollIntervalMs": poll_interval_ms,
        "maxBatch": max_batch,
        "version": __version__,
    }
    if not full:
        return body
    info = engine.info()
    return {
        **body,
        "activeGenerations": stats.running,
        "queueDepth": max(0, stats.admitted - stats.running),
        "maxConcurrent": stats.max_concurrent,
        "maxQueue": engine.max_queue,
        "draining": engine.draining,
        "openStreams": open_streams,
        "backend": info.name,
        "model": info.model,
        "device": info.device,
        "dtype": info.dtype,
        "architecture": info.architecture,
        "offload": info.offload,
        "loadedModels": list(info.models),
        "components": dict(info.components),
        **engine.health_extra(),
    }
