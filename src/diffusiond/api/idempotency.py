"""The Idempotency-Key of POST: which job each key started, while that job is kept."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffusiond.errors import IdempotencyConflict, InvalidRequest
from diffusiond.jobs.models import GenerationRequest

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

    A key is answered from here as long as its job exists: the registry deletes terminal
    jobs after the TTL (or evicts them past the byte cap), and the key goes with the job.
    Keys live in memory, so a restart forgets them.
    """

    def __init__(self, exists: Callable[[str], bool], *, max_keys: int = 10_000) -> None:
        self._exists = exists
        self._max_keys = max_keys
        self._seen: dict[str, _Seen] = {}

    def replay(self, key: str, request: GenerationRequest) -> str | None:
        """The id of the job this key started with the same request; None if unseen.

        Raises `IdempotencyConflict` when the key started a job with a different request.
        """
        seen = self._seen.get(key)
        if seen is None:
            return None
        if not self._exists(seen.job_id):
            del self._seen[key]
            return None
        if seen.request != request:
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was already used for generation {seen.job_id} "
                "with a different request body",
                details={"id": seen.job_id},
            )
        return seen.job_id

    def remember(self, key: str, request: GenerationRequest, job_id: str) -> None:
        if len(self._seen) >= self._max_keys:
            self._seen = {k: v for k, v in self._seen.items() if self._exists(v.job_id)}
            while len(self._seen) >= self._max_keys:  # still full: forget the oldest
                del self._seen[next(iter(self._seen))]
        self._seen[key] = _Seen(request, job_id)
