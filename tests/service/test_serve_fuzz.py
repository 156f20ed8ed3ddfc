"""Schema-driven fuzzing (schemathesis) of every route of a live server: whatever the generated
request, valid (positive) or not (negative), the answer is never a 5xx and never a traceback."""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
import torch
from hypothesis import strategies as st
from schemathesis import GenerationMode
from serve_helpers import Server

FUZZ_EXAMPLES = 25  # per operation and mode (26 operations): a minute or two here


@pytest.fixture
def subnormal_floats() -> Iterator[None]:
    """Hypothesis draws subnormal floats: lift the test process's flush-to-zero (tests/conftest.py)."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.usefixtures("subnormal_floats")
def test_no_route_answers_5xx_or_a_traceback(server: Server, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 26  # /sessions, /v1 (with /v1/responses and /v1/conversations) and the ops routes
    case_strategy = st.one_of([operation.as_strategy(generation_mode=mode) for operation in operations])
    seen: set[str] = set()

    @hypothesis.given(case=case_strategy)
    @hypothesis.settings(max_examples=FUZZ_EXAMPLES * len(operations), deadline=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck), database=None)
    def call(case) -> None:  # type: ignore[no-untyped-def]
        seen.add(case.operation.label)
        response = case.call(base_url=server.url, timeout=60)
        described = f"{case.operation.label}: {response.status_code} {response.text[:500]}"
        assert response.status_code < 500, described
        assert "Traceback" not in response.text, described

    call()
    if mode == GenerationMode.POSITIVE:
        assert seen == {operation.label for operation in operations}  # every route was called
    else:  # only operations with a body or parameters have invalid forms
        assert {"POST /sessions/{session_id}/append", "POST /v1/chat/completions", "POST /v1/responses",
                "GET /v1/responses/{response_id}/input_items", "POST /v1/conversations",
                "POST /v1/conversations/{conversation_id}/items"} <= seen
