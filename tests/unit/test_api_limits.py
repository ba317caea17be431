"""Bounded state and honest answers (issue 14, item 6): idempotency keys go with their
jobs, /health says little without the key, open streams and waits are capped, and a store
that cannot write is a 503, not a 500."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from diffusiond.api.idempotency import IdempotencyKeys
from diffusiond.errors import StoreError
from diffusiond.jobs.models import GenerationRequest, Job, JobChanged
from diffusiond.jobs.store import MemoryStore
from diffusiond.testing.requests import GENERATIONS, SMALL, poll_until, submit
from diffusiond.testing.sse import read_events
from diffusiond.testing.waits import eventually
from tests.support.fakes import GatedBackend
from tests.support.inprocess import CONFIG, in_process_api

KEY = "limits-key-0123456789"
MINIMAL_HEALTH = {"status", "busy", "pollIntervalMs", "maxBatch", "version"}


# -- idempotency keys ----------------------------------------------------------------------


def test_a_key_is_forgotten_when_its_job_is_deleted_and_posts_never_scan() -> None:
    looked_up: list[str] = []

    def exists(job_id: str) -> bool:
        looked_up.append(job_id)
        return True

    keys = IdempotencyKeys(exists, max_keys=3)
    request = GenerationRequest(prompt="x")
    for number in range(3):
        keys.remember(f"k{number}", request, f"gen_{number}")
    keys.on_change(JobChanged("gen_1", deleted=True))
    keys.on_change(JobChanged("gen_2", status_changed=True))  # a change is not a deletion
    assert keys.replay("k1", request) is None
    assert keys.replay("k2", request) == "gen_2"
    keys.remember("k3", request, "gen_3")
    keys.remember("k4", request, "gen_4")  # full: the oldest key goes, without a scan
    assert keys.replay("k0", request) is None
    assert [keys.replay(k, request) for k in ("k2", "k3", "k4")] == ["gen_2", "gen_3", "gen_4"]
    assert len(keys) == 3
    assert looked_up == ["gen_2", "gen_2", "gen_3", "gen_4"]  # one look-up per replay only


def test_the_app_forgets_the_key_of_a_deleted_job() -> None:
    with in_process_api() as api:
        headers = {"Idempotency-Key": "gone-1"}
        job_id = submit(api.client, SMALL, **headers)
        poll_until(api.client, job_id)
        assert api.registry.delete(job_id)
        again = api.client.post(GENERATIONS, json={**SMALL, "steps": 3}, headers=headers)
        assert again.status_code == 201, again.text  # no 409: the key went with its job
        assert again.json()["id"] != job_id
        poll_until(api.client, again.json()["id"])


# -- /health -------------------------------------------------------------------------------


def test_health_without_the_key_says_only_what_clients_need() -> None:
    with in_process_api(config=dataclasses.replace(CONFIG, api_key=KEY)) as api:
        anonymous = api.client.get("/health")
        assert anonymous.status_code == 200
        assert set(anonymous.json()) == MINIMAL_HEALTH
        wrong = api.client.get("/health", headers={"Authorization": "Bearer not-the-key-000"})
        assert set(wrong.json()) == MINIMAL_HEALTH
        full = api.client.get("/health", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert {"model", "device", "backend", "queueDepth"} <= set(full)
    with in_process_api() as api:  # no key configured: loopback only, /health is full
        assert "model" in api.client.get("/health").json()


# -- open streams and waits ----------------------------------------------------------------


def test_streams_and_waits_past_the_limit_are_503_with_retry_after() -> None:
    backend = GatedBackend()
    config = dataclasses.replace(CONFIG, max_streams=2)
    with in_process_api(backend, config=config) as api:
        job_id = submit(api.client, SMALL)
        events: list[Any] = []
        readers = [
            threading.Thread(
                target=lambda: events.append(read_events(api.client, job_id)), daemon=True
            )
            for _ in range(2)
        ]
        for reader in readers:
            reader.start()
        eventually(lambda: api.client.get("/health").json()["openStreams"] == 2)
        stream = api.client.get(f"{GENERATIONS}/{job_id}/events")
        waited = api.client.post(GENERATIONS, json=SMALL, headers={"Prefer": "wait=5"})
        for refused in (stream, waited):
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "SERVER_BUSY"
            assert int(refused.headers["retry-after"]) >= 1
        assert api.client.get(GENERATIONS).json()["generations"][0]["id"] == job_id  # nothing new
        backend.open()
        for reader in readers:
            reader.join(timeout=30)
        assert len(events) == 2
        eventually(lambda: api.client.get("/health").json()["openStreams"] == 0)
        ok = api.client.post(GENERATIONS, json=SMALL, headers={"Prefer": "wait=5"})
        assert ok.status_code == 200, ok.text


# -- a store that cannot write -------------------------------------------------------------


class FailingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    def put(self, job: Job) -> None:
        if self.failing:
            raise StoreError("the disk is full")
        super().put(job)


def test_a_store_that_cannot_write_is_503_store_unavailable() -> None:
    store = FailingStore()
    with in_process_api(store=store) as api:
        store.failing = True
        response = api.client.post(GENERATIONS, json=SMALL)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "STORE_UNAVAILABLE"
        assert int(response.headers["retry-after"]) >= 1
        assert "Traceback" not in response.text
        store.failing = False
        poll_until(api.client, submit(api.client, SMALL))
