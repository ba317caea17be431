"""The Idempotency-Key of POST: which job each key started, while that job is kept."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from diffusiond.errors import IdempotencyConflict, InvalidRequest
from diffusiond.jobs.models import GenerationRequest, JobChanged

MAX_KEY_LENGTH = 255


def check_idempotency_key(raw: str) -> str:
    """1-255 visible ASCII characters, as the header's rule says."""
    rule = f"1 to {MAX_KEY_LENGTH} visible ASCII characters"
    if not 1 <= len(raw) <= MAX_KEY_LENGTH or not all("!" <= c <= "~" for c in raw):
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise InvalidRequest(
            f"the Idempotency-Key header must be {rule}, got {shown!r} ({len(raw)} characters)",
            field="Idempotency-Key",
            rule=rule,
        )
    return raw


@dataclass(frozen=True)
class _Seen:
    request: GenerationRequest
    job_id: str


class IdempotencyKeys:
    """Which job each Idempotency-Key started, while that job is still kept.

    A key goes with its job: the registry tells `on_change` when a job is deleted (TTL
    sweep, eviction, the job cap), and its key is forgotten then. At most `max_keys` are
    held; past it the oldest key goes first. Every call is O(1): no POST walks the keys.
    Keys live in memory, so a restart forgets them.
    """

    def __init__(self, exists: Callable[[str], bool], *, max_keys: int = 10_000) -> None:
        self._exists = exists  # a store whose deletions go unannounced (broker mode's expiry)
        self._max_keys = max_keys
        self._lock = threading.Lock()  # on_change runs on the registry's threads
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        self._key_of: dict[str, str] = {}  # job id -> the key that started it

    def __len__(self) -> int:
        return len(self._seen)

    def replay(self, key: str, request: GenerationRequest) -> str | None:
        """The id of the job this key started with the same request; None if unseen.

        Raises `IdempotencyConflict` when the key started a job with a different request.
        """
        with self._lock:
            seen = self._seen.get(key)
        if seen is None:
            return None
        if not self._exists(seen.job_id):
            self._forget_job(seen.job_id)
            return None
        if seen.request != request:
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was already used for generation {seen.job_id} "
                "with a different request body",
                details={"id": seen.job_id},
            )
        return seen.job_id

    def remember(self, key: str, request: GenerationRequest, job_id: str) -> None:
        with self._lock:
            replaced = self._seen.pop(key, None)  # two POSTs raced with one key: the last wins
            if replaced is not None:
                self._key_of.pop(replaced.job_id, None)
            while len(self._seen) >= self._max_keys:  # full: forget the oldest
                _, oldest = self._seen.popitem(last=False)
                self._key_of.pop(oldest.job_id, None)
            self._seen[key] = _Seen(request, job_id)
            self._key_of[job_id] = key

    def on_change(self, change: JobChanged) -> None:
        """The registry's listener: a deleted job takes its key with it."""
        if change.deleted:
            self._forget_job(change.job_id)

    def _forget_job(self, job_id: str) -> None:
        with self._lock:
            key = self._key_of.pop(job_id, None)
            if key is not None:
                self._seen.pop(key, None)
