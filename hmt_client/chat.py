"""`hmt chat`: a terminal chat client of a running hmt-serve, over the Responses API.

The chat is a conversation (`POST /v1/conversations`); each turn is a streamed response in it
(`POST /v1/responses` with `conversation`) that sends only the new message: the server holds the
conversation's state, so it resumes by id from any machine (`--conversation conv_...`), and a turn
costs the same at message 1,000 as at message 2. After each reply it prints the turn's latency
(first token, total, tokens/s), what it read, and the conversation's memory size
(`GET /v1/conversations/{id}/memory`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import httpx
from httpx_sse import connect_sse

EXIT_WORDS = {"/exit", "/quit"}


@dataclass
class TurnStats:
    first_token_s: float
    total_s: float
    completion_tokens: int
    prompt_tokens: int  # read by this turn
    cached_tokens: int  # held in memory already, not read again


class ChatClient:
    def __init__(self, url: str, conversation: str | None, model: str | None, api_key: str | None,
                 max_tokens: int | None, temperature: float, timeout: float = 600) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.model = model or self.http.get("/v1/models").raise_for_status().json()["data"][0]["id"]
        self.resumed = conversation is not None
        if conversation is None:
            created = self.http.post("/v1/conversations", json={"metadata": {"client": "hmt chat"}})
            if created.status_code != 200:
                raise ChatError(_error_message(created))
            conversation = str(created.json()["id"])
        elif (found := self.http.get(f"/v1/conversations/{conversation}")).status_code != 200:
            raise ChatError(_error_message(found))
        self.conversation = conversation
        self.max_tokens = max_tokens
        self.temperature = temperature

    def close(self) -> None:
        self.http.close()

    def send(self, text: str, out: TextIO, instructions: str | None = None) -> TurnStats:
        """One turn (its new message only): stream the reply to `out` as it comes. `store: false`:
        the conversation advances, and no copy of its state is kept as a response of its own."""
        body: dict[str, object] = {"model": self.model, "input": text, "conversation": self.conversation,
                                   "stream": True, "store": False, "temperature": self.temperature}
        if instructions:
            body["instructions"] = instructions
        if self.max_tokens:
            body["max_output_tokens"] = self.max_tokens
        start = time.perf_counter()
        first = 0.0
        usage: dict[str, object] = {}
        with connect_sse(self.http, "POST", "/v1/responses", json=body) as source:
            if source.response.status_code != 200:
                source.response.read()
                raise ChatError(_error_message(source.response))
            for event in source.iter_sse():
                data = json.loads(event.data)
                kind = data.get("type")
                if kind == "response.output_text.delta":
                    first = first or time.perf_counter() - start
                    out.write(data["delta"])
                    out.flush()
                elif kind in ("response.completed", "response.incomplete"):
                    usage = data["response"]["usage"]
                elif kind == "response.failed":
                    raise ChatError((data["response"].get("error") or {}).get("message", "the response failed"))
                elif kind == "error":
                    raise ChatError(str(data.get("message") or data))
        total = int(str(usage.get("input_tokens", 0)))
        details = usage.get("input_tokens_details")
        cached = int(details.get("cached_tokens", 0)) if isinstance(details, dict) else 0
        return TurnStats(first, time.perf_counter() - start, int(str(usage.get("output_tokens", 0))), total - cached,
                         cached)

    def memory(self) -> dict[str, object]:
        response = self.http.get(f"/v1/conversations/{self.conversation}/memory")
        if response.status_code != 200:
            raise ChatError(_error_message(response))
        return dict(response.json())


class ChatError(Exception):
    pass


def _error_message(response: httpx.Response) -> str:
    try:
        return f"{response.status_code}: {response.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:200]}"


def describe(stats: TurnStats, memory: dict[str, object]) -> str:
    rate = stats.completion_tokens / max(stats.total_s - stats.first_token_s, 1e-9) if stats.completion_tokens > 1 \
        else 0.0
    return (f"[{stats.first_token_s * 1000:.0f} ms to first token, {stats.total_s:.2f} s total, {rate:.1f} tok/s; "
            f"read {stats.prompt_tokens} new tokens, {stats.cached_tokens} held in memory | {describe_memory(memory)}]")


def describe_memory(memory: dict[str, object]) -> str:
    return (f"conversation {memory['id']}: {memory['tokens_seen']} tokens seen, "
            f"memory {_size(int(str(memory['state_bytes'])))}")


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    try:
        client = ChatClient(args.url, args.conversation, args.model, args.api_key, args.max_tokens, args.temperature)
    except (httpx.HTTPError, ChatError, KeyError, IndexError) as exc:
        print(f"hmt chat: cannot start on {args.url}: {exc}", file=sys.stderr)
        return 1
    interactive = stdin.isatty()
    conversation = client.conversation
    out.write(f"hmt chat: conversation {conversation} on {args.url} ({client.model}); /exit to leave\n")
    # the system message opens a new conversation; a resumed one already has its own
    instructions = args.system if not client.resumed else None
    if client.resumed:
        out.write(f"resuming {describe_memory(client.memory())}\n")
    try:
        while True:
            if interactive:
                out.write("you> ")
                out.flush()
            line = stdin.readline()
            if not line or line.strip() in EXIT_WORDS:
                break
            if not line.strip():
                continue
            out.write("hmt> ")
            try:
                stats = client.send(line.rstrip("\n"), out, instructions)
                instructions = None
                out.write("\n" + describe(stats, client.memory()) + "\n")
            except (ChatError, httpx.HTTPError) as exc:
                out.write(f"\nerror: {exc}\n")
            out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    out.write(f"conversation {conversation} kept; resume with: hmt chat --conversation {conversation}\n")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    chat = commands.add_parser("chat", help="chat with a running hmt-serve in the terminal")
    chat.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    chat.add_argument("--conversation", "--session", dest="conversation", metavar="CONV_ID",
                      help="a conversation to resume, by its id (default: a new one)")
    chat.add_argument("--model", help="model id (default: the server's)")
    chat.add_argument("--api-key", help="API key, if the server asks for one")
    chat.add_argument("--system", help="instructions to start a new conversation with")
    chat.add_argument("--max-tokens", type=int, help="reply length limit, max_output_tokens (default: the server's)")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.set_defaults(run=run)
