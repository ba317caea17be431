"""The live parts of the app in-process: `Prefer: wait`, the event stream, its pacing."""

from __future__ import annotations

import dataclasses
import threading
import time

from diffusiond.testing.requests import GENERATIONS, SMALL, poll_until, submit
from diffusiond.testing.sse import Event, read_events
from diffusiond.testing.waits import eventually
from tests.support.fakes import FakeBackend, GatedBackend
from tests.support.inprocess import CONFIG, in_process_api

STEPS = 50


def progress_events(events: list[Event]) -> list[Event]:
    return [event for event in events if event.name == "progress"]


def test_prefer_wait_answers_200_with_the_finished_job() -> None:
    with in_process_api() as api:
        response = api.client.post(GENERATIONS, json=SMALL, headers={"Prefer": "wait=999"})
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "complete"
        assert response.headers["preference-applied"] == "wait=60"  # held to 60 s
        assert response.headers["location"] == f"{GENERATIONS}/{body['id']}"
        assert body == api.client.get(f"{GENERATIONS}/{body['id']}").json()


def test_prefer_wait_times_out_into_the_usual_201() -> None:
    backend = GatedBackend()
    with in_process_api(backend) as api:
        started = time.monotonic()
        response = api.client.post(GENERATIONS, json=SMALL, headers={"Prefer": "wait=1"})
        elapsed = time.monotonic() - started
        assert response.status_code == 201
        assert set(response.json()) == {"id", "status", "createdAt"}
        assert response.headers["preference-applied"] == "wait=1"
        assert 1.0 <= elapsed < 3
        backend.open()
        poll_until(api.client, response.json()["id"])


def test_a_replayed_key_with_prefer_wait_waits_for_the_first_job() -> None:
    backend = GatedBackend()
    with in_process_api(backend) as api:
        headers = {"Idempotency-Key": "k-1"}
        job_id = submit(api.client, SMALL, **headers)
        threading.Timer(0.2, backend.open).start()
        replay = api.client.post(GENERATIONS, json=SMALL, headers={**headers, "Prefer": "wait=5"})
        assert replay.status_code == 200
        assert replay.json()["id"] == job_id
        assert replay.json()["status"] == "complete"


def test_events_are_ordered_and_the_last_one_is_what_get_returns() -> None:
    config = dataclasses.replace(CONFIG, event_interval_s=0.0)
    with in_process_api(FakeBackend(step_seconds=0.002), config=config) as api:
        job_id = submit(api.client, {**SMALL, "steps": 20, "count": 2})
        events = read_events(api.client, job_id)
        assert events[-1].name == "complete"
        assert {event.name for event in events[:-1]} == {"progress"}
        assert all(event.id is not None for event in events)
        ids = [event.id or 0 for event in events]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
        running = [e.data for e in events if e.data["status"] == "in_progress"]
        percentages = [body["progress"]["percentage"] for body in running]
        assert percentages == sorted(percentages)
        assert events[-1].data == api.client.get(f"{GENERATIONS}/{job_id}").json()
        # A terminal job's stream is its final event alone, resumed or not.
        assert [(e.id, e.name) for e in read_events(api.client, job_id, events[0].id)] == [
            (events[-1].id, "complete")
        ]
        assert [e.name for e in read_events(api.client, job_id)] == ["complete"]


def test_resuming_a_running_job_sends_only_newer_states() -> None:
    backend = GatedBackend()
    config = dataclasses.replace(CONFIG, event_interval_s=0.0)
    with in_process_api(backend, config=config) as api:
        job_id = submit(api.client, {**SMALL, "steps": 6})
        backend.allow(2)
        eventually(lambda: backend.steps_done == 2, timeout=10)
        seen = api.registry.get(job_id).version
        threading.Timer(0.2, backend.open).start()
        resumed = read_events(api.client, job_id, seen)
        assert resumed, "the resumed stream said nothing"
        assert all(event.id is not None and event.id > seen for event in resumed)
        assert resumed[-1].name == "complete"


def test_progress_events_are_paced_to_the_event_interval() -> None:
    """50 steps in about 0.3 s: with a 60 s interval the stream sends its first state, then
    holds every later progress event back, and the final event does not wait."""
    paced = dataclasses.replace(CONFIG, event_interval_s=60.0)
    with in_process_api(FakeBackend(step_seconds=0.005), config=paced) as api:
        job_id = submit(api.client, {**SMALL, "steps": STEPS})
        started = time.monotonic()
        events = read_events(api.client, job_id)
        assert time.monotonic() - started < 30  # the final event was not held back
        assert events[-1].name == "complete"
        assert len(progress_events(events)) == 1
        assert api.registry.get(job_id).version > STEPS  # the job did change that often


def test_without_an_interval_every_change_can_be_an_event() -> None:
    """The pacing test's yardstick: the same job unpaced yields many progress events."""
    unpaced = dataclasses.replace(CONFIG, event_interval_s=0.0)
    with in_process_api(FakeBackend(step_seconds=0.005), config=unpaced) as api:
        job_id = submit(api.client, {**SMALL, "steps": STEPS})
        events = read_events(api.client, job_id)
        assert len(progress_events(events)) > 10
