from __future__ import annotations

import pytest

from diffusiond.jobs.ids import new_generation_id
from diffusiond.jobs.models import JobStatus

TERMINAL = {JobStatus.COMPLETE, JobStatus.ERROR, JobStatus.CANCELLED}


def test_exactly_three_states_are_terminal() -> None:
    assert {status for status in JobStatus if status.is_terminal()} == TERMINAL


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_a_terminal_state_goes_nowhere(status: JobStatus) -> None:
    assert not any(status.can_become(target) for target in JobStatus)


def test_the_lifecycle_edges() -> None:
    assert JobStatus.PENDING.can_become(JobStatus.IN_PROGRESS)
    assert JobStatus.PENDING.can_become(JobStatus.CANCELLED)
    assert not JobStatus.PENDING.can_become(JobStatus.COMPLETE)
    assert JobStatus.IN_PROGRESS.can_become(JobStatus.COMPLETE)
    assert JobStatus.IN_PROGRESS.can_become(JobStatus.ERROR)
    assert JobStatus.IN_PROGRESS.can_become(JobStatus.CANCELLED)
    assert not JobStatus.IN_PROGRESS.can_become(JobStatus.PENDING)


def test_status_values_are_the_wire_strings() -> None:
    assert [s.value for s in JobStatus] == [
        "pending",
        "in_progress",
        "complete",
        "error",
        "cancelled",
    ]


def test_ids_are_url_safe_unique_and_carry_the_time() -> None:
    ids = {new_generation_id(1729612345678) for _ in range(2000)}
    assert len(ids) == 2000
    for job_id in ids:
        prefix, millis, suffix = job_id.split("_")
        assert prefix == "gen"
        assert millis == "1729612345678"
        assert len(suffix) == 20
        assert suffix.isalnum()
        assert suffix == suffix.lower()
