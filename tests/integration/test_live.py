"""Live and reproducible: server-sent events, previews, raw PNGs with their recipe,
idempotent submits, `Prefer: wait`, ETA and stage timings. Real server, built-in model."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from diffusiond.client import Client, png_parameters
from diffusiond.testing.requests import LONG, SMALL, submit
from diffusiond.testing.sse import read_events
from tests.support.server import REPO_ROOT, ServerProcess, poll_until, start_server, wait_idle

HEARTBEAT_MS = 300
DIFFUSIOND = (sys.executable, "-m", "diffusiond")


@pytest.fixture(scope="module")
def live(model_home: Path) -> Iterator[ServerProcess]:
    """A server whose idle event streams get a heartbeat every 300 ms (15 s by default)."""
    server = start_server(model_home, env={"DIFFUSIOND_SSE_HEARTBEAT_MS": str(HEARTBEAT_MS)})
    yield server
    assert server.stop() == 0, server.text()


@pytest.fixture
def http(live: ServerProcess) -> Iterator[httpx.Client]:
    with live.client() as client:
        wait_idle(client)
        yield client
        wait_idle(client)


def test_events_stream_progress_then_the_final_state(http: httpx.Client) -> None:
    job_id = submit(
        http, {**SMALL, "width": 512, "height": 512, "count": 2, "steps": 8, "seed": 11}
    )
    events = read_events(http, job_id)
    names = [event.name for event in events]
    assert names[-1] == "complete"
    assert set(names[:-1]) == {"progress"}
    ids = [event.id or 0 for event in events]
    assert all(event.id is not None for event in events)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    running = [e.data for e in events if e.data["status"] == "in_progress"]
    # Pushed as it moves: at most one progress event per 100 ms, the newest state each time.
    assert len(running) >= 3
    percentages = [body["progress"]["percentage"] for body in running]
    assert percentages == sorted(percentages)
    assert len(set(percentages)) == len(percentages)  # every event says something new
    assert 2 in {body["progress"]["currentImage"] for body in running}
    # The final event carries exactly what a GET returns.
    assert events[-1].data == http.get(f"/v1/images/generations/{job_id}").json()


def test_reconnecting_with_last_event_id_still_gets_the_final_event(http: httpx.Client) -> None:
    job_id = submit(http, {**SMALL, "steps": 4})
    first = read_events(http, job_id)
    final = first[-1]
    early = first[0].id
    assert early is not None
    again = read_events(http, job_id, last_event_id=early)
    assert [(e.id, e.name) for e in again] == [(final.id, "complete")]
    assert again[0].data == final.data
    # A job already terminal: its final event at once, with or without Last-Event-ID.
    assert [e.name for e in read_events(http, job_id)] == ["complete"]


def test_resuming_a_running_job_skips_what_was_seen(http: httpx.Client) -> None:
    job_id = submit(http, LONG)
    url = f"/v1/images/generations/{job_id}/events"
    seen: list[int] = []
    with http.stream("GET", url, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("id: "):
                seen.append(int(line.removeprefix("id: ")))
            if len(seen) == 3:
                break
    try:
        with http.stream("GET", url, headers={"Last-Event-ID": str(seen[-1])}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("id: "):
                    assert int(line.removeprefix("id: ")) > seen[-1]
                    break
    finally:
        http.delete(f"/v1/images/generations/{job_id}")


def test_idle_streams_get_heartbeats_and_a_cancel_ends_them(http: httpx.Client) -> None:
    job_id = submit(http, LONG)  # one diffusion step takes longer than the heartbeat
    url = f"/v1/images/generations/{job_id}/events"
    heartbeats = 0
    final: str | None = None
    with http.stream("GET", url, timeout=120) as response:
        for line in response.iter_lines():
            if line == ": heartbeat":
                heartbeats += 1
                if heartbeats == 2:
                    assert http.delete(f"/v1/images/generations/{job_id}").status_code == 200
            if line.startswith("event: ") and line != "event: progress":
                final = line.removeprefix("event: ")
    assert heartbeats >= 2
    assert final == "cancelled"


def test_events_of_an_unknown_id_is_the_404_envelope(http: httpx.Client) -> None:
    response = http.get("/v1/images/generations/gen_0_unknown/events")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize(
    ("width", "height", "preview_size"), [(256, 192, (32, 24)), (2048, 1024, (128, 64))]
)
def test_previews_are_small_images_of_the_latents(
    http: httpx.Client, width: int, height: int, preview_size: tuple[int, int]
) -> None:
    body = {**SMALL, "width": width, "height": height, "steps": 4, "previewEvery": 2}
    job_id = submit(http, body)
    events = read_events(http, job_id)
    previews = [
        e.data["progress"]["preview"]
        for e in events
        if e.data["status"] == "in_progress" and "preview" in e.data["progress"]
    ]
    assert previews, "no preview was pushed"
    # Every second step (events may skip a state: at most one per 100 ms).
    assert {preview["step"] for preview in previews} <= {2, 4}
    for preview in previews:
        assert preview["format"] == "jpeg"
        picture = Image.open(io.BytesIO(base64.b64decode(preview["image"])))
        assert picture.format == "JPEG"
        assert picture.size == preview_size == (preview["width"], preview["height"])
        assert max(picture.size) <= 128
    # Without asking, no previews.
    plain = read_events(http, submit(http, SMALL))
    assert not any("preview" in e.data.get("progress", {}) for e in plain)


def test_preview_fields_are_validated(http: httpx.Client) -> None:
    for body, field in (({"preview": "yes"}, "preview"), ({"previewEvery": 0}, "previewEvery")):
        response = http.post("/v1/images/generations", json={**SMALL, **body})
        assert response.status_code == 400
        assert response.json()["error"]["details"]["field"] == field


def test_raw_png_matches_and_its_recipe_makes_it_again(
    live: ServerProcess, http: httpx.Client, tmp_path: Path
) -> None:
    body = {
        "prompt": "ünïcode prompt, with a comma",
        "negativePrompt": "blur",
        "width": 96,
        "height": 64,
        "steps": 3,
        "cfgScale": 5.5,
        "seed": 4242,
        "sampler": "ddim",
        "count": 2,
    }
    job_id = submit(http, body)
    done = poll_until(http, job_id)[-1]
    for index, entry in enumerate(done["result"]["images"]):
        raw = http.get(f"/v1/images/generations/{job_id}/images/{index}")
        assert raw.status_code == 200
        assert raw.headers["content-type"] == "image/png"
        assert raw.content == base64.b64decode(entry["image"])
    assert http.get(f"/v1/images/generations/{job_id}/images/2").status_code == 404
    assert http.get(f"/v1/images/generations/{job_id}/images/x").status_code == 404

    second = http.get(f"/v1/images/generations/{job_id}/images/1").content
    picture = Image.open(io.BytesIO(second))
    assert "Seed: 4243" in picture.text["parameters"]  # type: ignore[attr-defined]
    recipe = png_parameters(second)
    assert recipe == {
        "prompt": body["prompt"],
        "negative_prompt": "blur",
        "width": 96,
        "height": 64,
        "steps": 3,
        "cfg_scale": 5.5,
        "seed": 4243,
        "sampler": "ddim",
        "model": "builtin",
        "scheduler": "discrete",
    }
    with Client(live.url) as sdk:
        again = sdk.generate(**recipe)
    assert again[0].png == second  # the same pixels and the same text: the same bytes

    path = tmp_path / "original.png"
    path.write_bytes(second)
    out = tmp_path / "out"
    cli = subprocess.run(
        [*DIFFUSIOND, "generate", "--from-png", str(path), "-o", str(out), "--server", live.url],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    (made,) = out.glob("*.png")
    assert made.read_bytes() == second

    not_ours = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(not_ours)
    refused = subprocess.run(
        [*DIFFUSIOND, "generate", "--from-png", str(not_ours), "--server", live.url],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "no 'diffusiond' text chunk" in refused.stderr


def test_raw_png_is_404_before_completion(http: httpx.Client) -> None:
    job_id = submit(http, LONG)
    try:
        response = http.get(f"/v1/images/generations/{job_id}/images/0")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "NOT_FOUND"
        assert "complete" in response.json()["error"]["message"]
    finally:
        http.delete(f"/v1/images/generations/{job_id}")


def test_idempotency_key_replays_and_conflicts(http: httpx.Client) -> None:
    key = f"order-{time.time_ns()}"
    first = http.post("/v1/images/generations", json=SMALL, headers={"Idempotency-Key": key})
    assert first.status_code == 201
    job_id = first.json()["id"]
    replay = http.post("/v1/images/generations", json=SMALL, headers={"Idempotency-Key": key})
    assert replay.status_code == 200
    assert replay.json()["id"] == job_id
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["location"] == f"/v1/images/generations/{job_id}"
    conflict = http.post(
        "/v1/images/generations", json={**SMALL, "steps": 3}, headers={"Idempotency-Key": key}
    )
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    poll_until(http, job_id)
    listed = http.get("/v1/images/generations").json()["generations"]
    assert sum(entry["id"] == job_id for entry in listed) == 1
    # Without a key, the same body is new work.
    assert submit(http, SMALL) != job_id
    for bad in ("has space", "x" * 256, "é"):
        refused = http.post(
            "/v1/images/generations",
            json=SMALL,
            headers={b"Idempotency-Key": bad.encode()},
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["details"]["field"] == "Idempotency-Key"


def test_prefer_wait_returns_the_finished_job(http: httpx.Client) -> None:
    response = http.post(
        "/v1/images/generations", json={**SMALL, "seed": 3}, headers={"Prefer": "wait=999"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "complete"
    assert len(body["result"]["images"]) == 1
    assert response.headers["preference-applied"] == "wait=60"  # held to 60 s
    assert response.headers["location"] == f"/v1/images/generations/{body['id']}"


def test_prefer_wait_times_out_into_the_usual_201(http: httpx.Client) -> None:
    started = time.monotonic()
    response = http.post("/v1/images/generations", json=LONG, headers={"Prefer": "wait=1"})
    elapsed = time.monotonic() - started
    job_id = response.json()["id"]
    try:
        assert response.status_code == 201
        assert response.json()["status"] in {"pending", "in_progress"}
        assert set(response.json()) == {"id", "status", "createdAt"}
        assert 1.0 <= elapsed < 5
    finally:
        http.delete(f"/v1/images/generations/{job_id}")
    # Without the header nothing changes.
    assert http.post("/v1/images/generations", json=SMALL).status_code == 201


def test_eta_and_stage_timings(http: httpx.Client) -> None:
    job_id = submit(http, {**SMALL, "width": 256, "height": 256, "steps": 10, "count": 2})
    seen = poll_until(http, job_id, interval_s=0.01)
    etas = [b["progress"]["etaMs"] for b in seen if b["status"] == "in_progress"]
    assert etas, "no progress was seen"
    assert all(isinstance(eta, int) and eta >= 0 for eta in etas)
    result = seen[-1]["result"]
    timings = result["timings"]
    assert set(timings) == {"loadingMs", "diffusionMs", "decodingMs", "encodingMs"}
    assert timings["diffusionMs"] > 0
    assert sum(timings.values()) <= result["timeTaken"] + 5
