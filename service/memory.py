"""A session's recall history: the top recall weights of its last committed segments, kept in a
field of the session's hash beside the state and written in the same atomic save (store.SideWrites).

Stored as compact JSON, [[segment, [slots], [weights]], ...], oldest first, at most
RECALL_HISTORY entries, so it stays a few kilobytes whatever the session's length."""

from __future__ import annotations

import json
from collections.abc import Sequence

from hmt_core import SegmentRecall
from service.protocol import RecallEntry

RECALL_FIELD = "recall"
RECALL_HISTORY = 64  # segments whose recall a session keeps (and GET /sessions/{id}/memory returns at most)


def entry(recall: SegmentRecall) -> RecallEntry:
    return RecallEntry(segment=recall.segment, slots=list(recall.slots), weights=list(recall.weights),
                       distance=recall.distance)


def read_history(raw: bytes | None, segments_committed: int) -> list[SegmentRecall]:
    """The stored history, less entries past the state's segments (left by a branch back to an
    earlier snapshot, or read just after a newer save). A damaged field reads as empty: it is a
    view of the state, never needed to use it."""
    if not raw:
        return []
    try:
        rows = json.loads(raw)
        history = [SegmentRecall(int(s), tuple(int(i) for i in slots), tuple(float(w) for w in weights))
                   for s, slots, weights in rows]
    except (ValueError, TypeError):
        return []
    return [r for r in history if r.segment < segments_committed]


def merge_history(raw: bytes | None, base_segments: int, new: Sequence[SegmentRecall]) -> bytes:
    """The field after a job that started from a state with `base_segments` segments committed
    `new`: what the base had, then the new ones, the last RECALL_HISTORY of them."""
    history = [*read_history(raw, base_segments), *new][-RECALL_HISTORY:]
    rows = [[r.segment, list(r.slots), [round(w, 6) for w in r.weights]] for r in history]
    return json.dumps(rows, separators=(",", ":")).encode()
