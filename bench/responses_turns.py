"""Turn n of a conversation through the Responses API: `previous_response_id` against re-sending
the whole history.

A live hmt-serve (the demo model unless --model; embedded Redis in a temporary directory) holds one
conversation of `--turns` responses, each naming the one before with `previous_response_id`, so the
server reads only the new question. The baseline, measured in the same run at the same turns: the
same turn with the whole history sent as input items and no previous response (`store: false`), so
the server reads it all again, which is what a stateless `/v1/responses` (a translation to chat
completions) pays per turn. Both are streamed and timed to the first output_text delta and to the end.

    python bench/responses_turns.py                  # 100 turns, baseline at turns 2, 10, 25, 50, 100
    python bench/responses_turns.py --turns 300 --model path/to/model
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
from chat_turns import QUESTIONS, served, turn_args
from common import median, print_table
from httpx_sse import connect_sse


def respond(http: httpx.Client, body: dict[str, Any]) -> tuple[dict[str, Any], float, float]:
    """One streamed response: (the final response object, seconds to first delta, seconds in all)."""
    start = time.perf_counter()
    first, final = 0.0, {}
    with connect_sse(http, "POST", "/v1/responses", json={**body, "stream": True}) as source:
        source.response.raise_for_status()
        for event in source.iter_sse():
            data = json.loads(event.data)
            if data["type"] == "response.output_text.delta":
                first = first or time.perf_counter() - start
            elif data["type"] in ("response.completed", "response.incomplete", "response.failed"):
                final = data["response"]
    total = time.perf_counter() - start
    if final.get("status") == "failed":
        raise SystemExit(f"a response failed: {final.get('error')}")
    return final, first or total, total


def read(response: dict[str, Any]) -> int:
    usage = response["usage"]
    return int(usage["input_tokens"] - usage["input_tokens_details"]["cached_tokens"])


def main() -> None:
    args, checkpoints = turn_args(__doc__)
    with served(args) as (http, model):
        common = {"model": model, "max_output_tokens": args.max_tokens, "temperature": 0}
        instructions = "Answer from the book."
        history: list[dict[str, str]] = []  # what a client without server state sends every turn
        previous: str | None = None
        rows = []
        for n in range(1, args.turns + 1):
            question = QUESTIONS[n % len(QUESTIONS)]
            history.append({"role": "user", "content": question})
            if n in checkpoints:  # the baseline first, so both see the same history
                base, base_first, base_total = respond(http, {**common, "instructions": instructions,
                                                              "input": history, "store": False})
            body = {**common, "input": question, "previous_response_id": previous}
            if previous is None:
                body["instructions"] = instructions
            response, first, total = respond(http, body)
            previous = response["id"]
            history.append({"role": "assistant", "content": response["output"][0]["content"][0]["text"]})
            if n in checkpoints:
                cached = response["usage"]["input_tokens_details"]["cached_tokens"]
                rows.append([n, cached, read(response), read(base), f"{first * 1000:.0f}",
                             f"{base_first * 1000:.0f}", f"{base_first / first:.1f}x", f"{base_total / total:.2f}x"])

    print(f"\nmodel {Path(args.model).name}, {args.turns} turns, replies <= {args.max_tokens} tokens, "
          f"{args.threads} thread(s)\n")
    print_table(["turn", "cached tokens", "read (previous_response_id)", "read (re-send)",
                 "first token ms (previous_response_id)", "first token ms (re-send)",
                 "first token: re-send / previous", "whole turn: re-send / previous"], rows)
    print(f"\nmedian first-token speed-up over re-sending: {median([float(r[6].rstrip('x')) for r in rows]):.1f}x")


if __name__ == "__main__":
    main()
