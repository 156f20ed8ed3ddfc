"""(d) Cost of a chat turn as the conversation grows, through the OpenAI-compatible API.

A live hmt-serve (the demo model unless --model; embedded Redis in a temporary directory) holds
one conversation: every turn the client resends the whole history, as OpenAI clients do, with an
X-Session-Id, so the server reads only the new message. The baseline, measured in the same run at
the same turns: the same request under a fresh session id, so the server reads the whole history
again, which is what a server without session memory pays per turn. Both are timed to the first
streamed token (the reading cost) and to the end of the reply.

    python bench/chat_turns.py                 # 100 turns, baseline at turns 2, 10, 25, 50, 100
    python bench/chat_turns.py --turns 300 --model path/to/model
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
from common import ROOT, median, print_table, start_server
from httpx_sse import connect_sse

QUESTIONS = ["And what did he say unto them?", "Who went up into the mountain?",
             "What was the name of the city?", "How many days did they abide there?"]


def turn(http: httpx.Client, model: str, messages: list[dict[str, str]], session: str,
         max_tokens: int) -> tuple[str, float, float, int]:
    """One streamed turn: (reply, seconds to first token, seconds in all, prompt tokens read)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, reply, read = 0.0, [], 0
    with connect_sse(http, "POST", "/v1/chat/completions", json=body, headers={"X-Session-Id": session}) as source:
        source.response.raise_for_status()
        for event in source.iter_sse():
            if event.data == "[DONE]":
                break
            data = json.loads(event.data)
            for choice in data["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter() - start
                    reply.append(choice["delta"]["content"])
            if data.get("usage"):
                read = data["usage"]["prompt_tokens"]
    total = time.perf_counter() - start
    return "".join(reply), first or total, total, read


def turn_args(doc: str | None) -> tuple[argparse.Namespace, list[int]]:
    """The arguments of a turn benchmark (this one and bench/responses_turns.py), and its checkpoints."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "hmt-demo"))
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--checkpoints", default="2,10,25,50,100", help="turns that also run the baseline")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    return args, sorted({int(t) for t in args.checkpoints.split(",") if 0 < int(t) <= args.turns})


@contextlib.contextmanager
def served(args: argparse.Namespace) -> Iterator[tuple[httpx.Client, str]]:
    """A live hmt-serve on args.model (embedded Redis in a temporary directory): a client and the model's id."""
    with tempfile.TemporaryDirectory() as data_dir:
        process, url = start_server(args.model, data_dir, args.threads)
        try:
            with httpx.Client(base_url=url, timeout=600) as http:
                yield http, http.get("/v1/models").json()["data"][0]["id"]
        finally:
            process.terminate()
            process.wait(timeout=30)


def main() -> None:
    args, checkpoints = turn_args(__doc__)
    with served(args) as (http, model):
        session = f"bench-{uuid.uuid4().hex[:8]}"
        messages: list[dict[str, str]] = [{"role": "system", "content": "Answer from the book."}]
        rows = []
        for n in range(1, args.turns + 1):
            messages.append({"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]})
            if n in checkpoints:  # the baseline first, so both see the same history
                _, base_first, base_total, base_read = turn(http, model, messages, uuid.uuid4().hex, args.max_tokens)
            reply, first, total, read = turn(http, model, messages, session, args.max_tokens)
            messages.append({"role": "assistant", "content": reply})
            if n in checkpoints:
                tokens_seen = http.get(f"/sessions/{session}").json()["tokens_seen"]
                rows.append([n, tokens_seen, read, base_read, f"{first * 1000:.0f}", f"{base_first * 1000:.0f}",
                             f"{base_first / first:.1f}x", f"{base_total / total:.2f}x"])
        state_bytes = http.get(f"/sessions/{session}").json()["state_bytes"]

    print(f"\nmodel {Path(args.model).name}, {args.turns} turns, replies <= {args.max_tokens} tokens, "
          f"{args.threads} thread(s); session state at the end: {state_bytes / 1024:.1f} KiB\n")
    print_table(["turn", "history tokens", "read (session)", "read (re-read)", "first token ms (session)",
                 "first token ms (re-read)", "first token: re-read / session", "whole turn: re-read / session"],
                rows)
    firsts = [float(r[6].rstrip("x")) for r in rows]
    print(f"\nmedian first-token speed-up over re-reading: {median(firsts):.1f}x")


if __name__ == "__main__":
    main()
