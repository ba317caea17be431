"""The Python clients against the real server with the built-in model."""

from __future__ import annotations

import asyncio
import io
import itertools
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

import diffusiond
from diffusiond.client import (
    AlreadyTerminalError,
    AsyncClient,
    Client,
    ConnectionError,
    GenerationCancelledError,
    GenerationFailedError,
    GenerationTimeoutError,
    InvalidRequestError,
    NotFoundError,
    Progress,
    ServerBusyError,
)
from tests.support.server import ServerProcess, poll_until, wait_idle

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 2}
LONG: dict[str, Any] = {"width": 2048, "height": 2048, "steps": 150}


@pytest.fixture
def sdk(server: ServerProcess, client: httpx.Client) -> Iterator[Client]:
    """A diffusiond.Client of the shared (idle) server; `client` is the raw HTTP view."""
    with Client(server.url) as opened:
        yield opened


def test_the_package_exports_the_clients() -> None:
    assert diffusiond.Client is Client
    assert diffusiond.AsyncClient is AsyncClient


def test_generate_returns_typed_images_and_reports_progress(sdk: Client, tmp_path: Path) -> None:
    seen: list[Progress] = []
    images = sdk.generate(
        "a harbour", width=128, height=96, steps=12, seed=42, count=2, on_progress=seen.append
    )
    assert [image.seed for image in images] == [42, 43]
    for image in images:
        assert (image.width, image.height) == (128, 96)
        assert image.to_pil().size == (128, 96)
        path = image.save(tmp_path / f"{image.seed}.png")
        with Image.open(path) as saved:
            assert saved.format == "PNG"
    assert seen, "no progress callback arrived"
    percentages = [progress.percentage for progress in seen]
    assert percentages == sorted(percentages)
    assert all(a != b for a, b in itertools.pairwise(seen)), "a repeated callback"
    assert {progress.total_images for progress in seen} == {2}


def test_generate_polls_at_the_advised_interval(server: ServerProcess, sdk: Client) -> None:
    calls: list[tuple[float, str]] = []

    def record(request: httpx.Request) -> None:
        calls.append((time.monotonic(), request.url.path))

    http = httpx.Client(base_url=server.url, event_hooks={"request": [record]})
    with Client(server.url, http=http) as counted:
        counted.generate("x", width=512, height=512, steps=20, seed=1)
    polls = [when for when, path in calls if path.startswith("/v1/images/generations/")]
    assert len(polls) >= 2
    # /health advises 500 ms, asked once; the client never polls sooner than that.
    assert [path for _, path in calls].count("/health") == 1
    assert min(b - a for a, b in itertools.pairwise(polls)) >= 0.45


def test_low_level_calls(sdk: Client, client: httpx.Client) -> None:
    started = sdk.start("x", seed=5, **SMALL)
    assert started.status == "pending"
    assert started.id.startswith("gen_")
    done = sdk.wait(started.id)
    assert done.status == "complete"
    assert [image.seed for image in done.images] == [5]
    assert sdk.get(started.id).status == "complete"
    assert started.id in [g.id for g in sdk.list()]
    assert [g.id for g in sdk.list(status=["complete", "error"], limit=1)] == [started.id]
    # The filter is seen to work on both sides: the job is in its status, not in another.
    complete = sdk.list(status="complete")
    assert started.id in [g.id for g in complete]
    assert {g.status for g in complete} == {"complete"}
    assert started.id not in [g.id for g in sdk.list(status="pending")]
    with pytest.raises(InvalidRequestError, match="limit"):
        sdk.list(limit=0)
    health = sdk.health()
    assert health.status == "ok"
    assert health.poll_interval_ms == 500


def test_typed_errors_mirror_the_api_codes(sdk: Client, client: httpx.Client) -> None:
    with pytest.raises(InvalidRequestError) as invalid:
        sdk.start("x", width=100)
    assert invalid.value.field == "width"
    assert invalid.value.status == 400
    with pytest.raises(NotFoundError):
        sdk.get("gen_0_missing")
    with pytest.raises(NotFoundError):
        sdk.cancel("gen_0_missing")

    done = sdk.start("x", **SMALL)
    sdk.wait(done.id)
    with pytest.raises(AlreadyTerminalError):
        sdk.cancel(done.id)

    long = sdk.start("x", **LONG)
    try:
        poll_until(client, long.id, lambda body: body["status"] == "in_progress")
        with pytest.raises(ServerBusyError) as busy:
            sdk.start("y", **SMALL)
        assert busy.value.retry_after >= 1
    finally:
        sdk.cancel(long.id)
    with pytest.raises(GenerationCancelledError):
        sdk.wait(long.id)


def test_a_failed_generation_raises_with_the_stored_code(faulty_server: ServerProcess) -> None:
    with Client(faulty_server.url) as sdk, pytest.raises(GenerationFailedError) as failed:
        sdk.generate("x [fail-seed=8]", seed=7, count=2, **SMALL)
    assert failed.value.code == "BACKEND_ERROR"
    assert failed.value.message.startswith("Generation failed on image 2 of 2")


def test_no_server_is_a_connection_error_with_a_hint() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    with Client(f"http://127.0.0.1:{port}") as sdk, pytest.raises(ConnectionError) as caught:
        sdk.health()
    assert "diffusiond serve" in caught.value.message
    assert isinstance(caught.value, OSError)  # also a builtins.ConnectionError


def test_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFUSIOND_URL", "http://127.0.0.1:9999/")
    assert Client().url == "http://127.0.0.1:9999"
    monkeypatch.delenv("DIFFUSIOND_URL")
    assert Client().url == "http://127.0.0.1:8081"


def test_timeout_cancels_the_job_on_the_server(sdk: Client, client: httpx.Client) -> None:
    with pytest.raises(GenerationTimeoutError):
        sdk.generate("slow", timeout=1.0, **LONG)
    jobs = sdk.list()
    assert jobs[0].status == "cancelled"
    wait_idle(client)


def test_retry_busy_waits_for_the_worker(server: ServerProcess, client: httpx.Client) -> None:
    blocker = client.post(
        "/v1/images/generations", json={"prompt": "x", "width": 512, "height": 512, "steps": 20}
    )
    blocker_id = blocker.json()["id"]
    with Client(server.url, retry_busy=60) as patient:
        images = patient.generate("after the blocker", seed=3, **SMALL)
    assert [image.seed for image in images] == [3]
    assert client.get(f"/v1/images/generations/{blocker_id}").json()["status"] == "complete"


def test_async_client_generates(server: ServerProcess, client: httpx.Client) -> None:
    async def scenario() -> list[int]:
        async with AsyncClient(server.url) as sdk:
            seen: list[Progress] = []
            images = await sdk.generate("x", seed=9, count=2, on_progress=seen.append, **SMALL)
            health = await sdk.health()
            assert health.busy is False
            return [image.seed for image in images]

    assert asyncio.run(scenario()) == [9, 10]


def test_async_cancellation_cancels_the_job_on_the_server(
    server: ServerProcess, client: httpx.Client
) -> None:
    async def scenario() -> str:
        started = asyncio.Event()
        async with AsyncClient(server.url) as sdk:
            generation = await sdk.start("slow", **LONG)

            def mark(progress: Progress) -> None:
                started.set()

            task = asyncio.create_task(sdk.wait(generation.id, on_progress=mark))
            await asyncio.wait_for(started.wait(), timeout=60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return generation.id

    job_id = asyncio.run(scenario())
    assert client.get(f"/v1/images/generations/{job_id}").json()["status"] == "cancelled"
    wait_idle(client)


def test_generated_image_round_trips_through_pil(sdk: Client) -> None:
    image = sdk.generate("x", seed=1, **SMALL)[0]
    again = io.BytesIO()
    image.to_pil().save(again, format="PNG")
    assert Image.open(again).size == (64, 64)
