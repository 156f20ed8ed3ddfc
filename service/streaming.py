"""Server-sent events: the wire format and a job's token stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from service import metrics
from service.worker import Job, TokenEvent

END = object()  # marks the end of a job's event queue, after the state was saved (or not)


def sse(data: Any, event: str | None = None) -> str:
    body = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "") + f"data: {body}\n\n"


async def token_events(job: Job, start: float) -> AsyncIterator[TokenEvent]:
    """A job's tokens as they come, until it is saved; records time to first token."""
    first = True
    while (event := await job.events.get()) is not END:
        if isinstance(event, TokenEvent):
            if first:
                metrics.TTFT_SECONDS.observe(time.perf_counter() - start)
                first = False
            yield event
