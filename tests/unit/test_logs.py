from __future__ import annotations

import json
import logging

from diffusiond.logs import JsonFormatter


def test_json_lines_carry_the_job_fields() -> None:
    record = logging.LogRecord(
        "diffusiond.jobs.registry",
        logging.INFO,
        __file__,
        1,
        "job %s %s",
        ("gen_1_a", "complete"),
        None,
    )
    record.job = "gen_1_a"
    record.status = "complete"
    record.durationMs = 12
    record.errorCode = None
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "job gen_1_a complete"
    assert entry["level"] == "info"
    assert entry["job"] == "gen_1_a"
    assert entry["durationMs"] == 12
    assert entry["errorCode"] is None
    assert entry["time"].endswith("Z")


def test_plain_records_have_no_job_fields() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello", (), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "hello"
    assert "job" not in entry
