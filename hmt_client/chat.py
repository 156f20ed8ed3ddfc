"""`hmt chat`: a terminal chat client of a running hmt-serve.

It streams replies from /v1/chat/completions and sends only each turn's new message
(`X-HMT-Messages: new`): the server holds the conversation, so a session resumes by id from any
machine, and a turn costs the same at message 1,000 as at message 2. After each reply it prints
the turn's latency (first token, total, tokens/s) and the session's memory size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
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
    prompt_tokens: int


class ChatClient:
    def __init__(self, url: str, session_id: str, model: str | None, api_key: str | None,
                 max_tokens: int | None, temperature: float, timeout: float = 600) -> None:
        headers = {"X-Session-Id": session_id, "X-HMT-Messages": "new"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.session_id = session_id
        self.model = model or self.http.get("/v1/models").raise_for_status().json()["data"][0]["id"]
        self.max_tokens = max_tokens
        self.temperature = temperature

    def close(self) -> None:
        self.http.close()

    def send(self, messages: list[dict[str, str]], out: TextIO) -> TurnStats:
        """One turn (its new messages only): stream the reply to `out` as it comes."""
        body: dict[str, object] = {"model": self.model, "messages": messages,
                                   "stream": True, "stream_options": {"include_usage": True},
                                   "temperature": self.temperature}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        start = time.perf_counter()
        first = 0.0
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        with connect_sse(self.http, "POST", "/v1/chat/completions", json=body) as source:
            if source.response.status_code != 200:
                source.response.read()
                raise ChatError(_error_message(source.response))
            for event in source.iter_sse():
                if event.data == "[DONE]":
                    break
                data = json.loads(event.data)
                if "error" in data:
                    raise ChatError(data["error"]["message"])
                for choice in data.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        first = first or time.perf_counter() - start
                        out.write(text)
                        out.flush()
                usage = data.get("usage") or usage
        return TurnStats(first, time.perf_counter() - start, usage["completion_tokens"], usage["prompt_tokens"])

    def exists(self) -> bool:
        return self.http.get(f"/sessions/{self.session_id}").status_code == 200

    def session_info(self) -> dict[str, object]:
        response = self.http.get(f"/sessions/{self.session_id}")
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


def describe(stats: TurnStats, info: dict[str, object]) -> str:
    rate = stats.completion_tokens / max(stats.total_s - stats.first_token_s, 1e-9) if stats.completion_tokens > 1 \
        else 0.0
    return (f"[{stats.first_token_s * 1000:.0f} ms to first token, {stats.total_s:.2f} s total, {rate:.1f} tok/s; "
            f"read {stats.prompt_tokens} new tokens | {describe_session(info)}]")


def describe_session(info: dict[str, object]) -> str:
    return f"session {info['id']}: {info['tokens_seen']} tokens seen, memory {_size(int(str(info['state_bytes'])))}"


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    session_id = args.session or uuid.uuid4().hex[:12]
    try:
        client = ChatClient(args.url, session_id, args.model, args.api_key, args.max_tokens, args.temperature)
    except (httpx.HTTPError, ChatError, KeyError, IndexError) as exc:
        print(f"hmt chat: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    interactive = stdin.isatty()
    out.write(f"hmt chat: session {session_id} on {args.url} ({client.model}); /exit to leave\n")
    resumed = client.exists()
    # the system message opens a new session; a resumed one already has its own
    first: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system and not resumed else []
    if resumed:
        out.write(f"resuming session {session_id}: {describe_session(client.session_info())}\n")
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
                stats = client.send([*first, {"role": "user", "content": line.rstrip("\n")}], out)
                first = []
                out.write("\n" + describe(stats, client.session_info()) + "\n")
            except (ChatError, httpx.HTTPError) as exc:
                out.write(f"\nerror: {exc}\n")
            out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    out.write(f"session {session_id} kept; resume with: hmt chat --session {session_id}\n")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    chat = commands.add_parser("chat", help="chat with a running hmt-serve in the terminal")
    chat.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    chat.add_argument("--session", help="session id to resume or create (default: a new random one)")
    chat.add_argument("--model", help="model id (default: the server's)")
    chat.add_argument("--api-key", help="API key, if the server asks for one")
    chat.add_argument("--system", help="a system message to start a new session with")
    chat.add_argument("--max-tokens", type=int, help="reply length limit (default: the server's)")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.set_defaults(run=run)
