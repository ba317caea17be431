"""Reading a job's server-sent events to the end, as tests check them."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from diffusiond.testing.requests import GENERATIONS

if TYPE_CHECKING:
    from diffusiond.testing.requests import HttpClient


class Event:
    """One event of the stream: its id, name, parsed data and the comments before it."""

    def __init__(self, fields: dict[str, str], comments: list[str]) -> None:
        self.id = int(fields["id"]) if "id" in fields else None
        self.name = fields.get("event", "message")
        self.data: dict[str, Any] = json.loads(fields["data"]) if "data" in fields else {}
        self.comments = comments


def read_events(
    http: HttpClient,
    job_id: str,
    last_event_id: int | None = None,
    *,
    timeout_s: float = 120.0,
    **headers: str,
) -> list[Event]:
    """Every event of the stream until the server closes it (`timeout_s` between reads)."""
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    events: list[Event] = []
    url = f"{GENERATIONS}/{job_id}/events"
    with http.stream("GET", url, headers=headers, timeout=timeout_s) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        comments: list[str] = []
        for line in response.iter_lines():
            if line == "":
                if fields:  # a block of only comments (a heartbeat) is not an event
                    events.append(Event(fields, comments))
                    fields, comments = {}, []
            elif line.startswith(":"):
                comments.append(line)
            else:
                name, _, value = line.partition(": ")
                fields[name] = value
    return events
