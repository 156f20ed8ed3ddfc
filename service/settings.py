"""Service configuration: `HMT_*` environment variables, overridden by command-line flags."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# served when no model is named: the chat model in the working directory, else the one shipped in
# this repo (HMT on SmolLM2-135M-Instruct; its backbone is fetched with pip on first start)
DEFAULT_MODEL_DIRS = (Path("models/hmt-smollm2"), Path(__file__).resolve().parents[1] / "models" / "hmt-smollm2")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HMT_", extra="ignore")

    model: str | None = Field(None, description="model directory or hub name; default: models/hmt-smollm2")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    device: str = Field("auto", description="torch device: auto (cuda when available), cpu, cuda, cuda:1, mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="model dtype (the whole "
                                                                      "model; --precision is the serving choice)")
    precision: Literal["auto", "fp32", "bf16", "int8", "int4"] = Field(
        "auto", description="the backbone's weights: fp32, bf16, int8 or int4 (int8/int4: CPU only); the HMT "
                            "weights and session states stay fp32, so states move between replicas of any "
                            "precision; auto: int8 on a CPU (fp32 for Temp-LoRA memory), bf16 on a GPU, or what "
                            "--dtype says when it is set")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0: torch's default")
    compile: bool = Field(False, description="compile the decode step with torch.compile at start (rows "
                                             "bucketed by powers of two up to --max-batch; the start waits "
                                             "for it, minutes on a CPU, for 1.1-1.3x per step there: README, "
                                             "'Precision against fp32'); off: the lean eager step")
    redis_url: str | None = Field(None, description="Redis URL: redis://[:password@]host:6379/0, rediss:// (TLS), "
                                                     "unix:///path.sock, redis+cluster://host:port[,host:port...] "
                                                     "(Redis Cluster), redis+sentinel://[:password@]host:26379"
                                                     "[,host:26379...]/<master name>[/db] (Sentinel); default: "
                                                     "start an embedded redis-server")
    redis_wait_replicas: int = Field(0, ge=0, description="after each write of a session (create, save, delete), "
                                                          "wait until this many replicas have it (Redis WAIT); not "
                                                          "confirmed within --redis-wait-s is 503; 0: do not wait "
                                                          "(asynchronous replication)")
    redis_wait_s: float = Field(1.0, gt=0, le=60, description="how long a write waits for --redis-wait-replicas")
    data_dir: Path = Field(Path("hmt-data"), description="where the embedded Redis keeps its append-only file")
    key_prefix: str = Field("hmt:", pattern=r"^[^{}]*$", description="prefix of every Redis key (no braces: they "
                                                                    "mark Redis Cluster hash tags)")
    session_ttl_s: float = Field(0.0, ge=0, description="expire sessions idle this long; 0: never")
    lock_ttl_s: float = Field(5.0, gt=0, description="a writer's lock expires after this unless renewed (every "
                                                     "third of it while the writer lives): a dead writer's "
                                                     "session is free again this soon")
    lock_wait_s: float = Field(2.0, ge=0, description="a second writer waits this long, then gets 409")
    max_append_tokens: int = Field(65536, ge=1, description="tokens per append or prompt; more is 413")
    max_generate_tokens: int = Field(4096, ge=1, description="largest max_tokens; more is 413")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1, description="largest request body; more is 413")
    max_batch: int = Field(32, ge=1, description="sessions per batched segment commit and rows of the decode "
                                                 "batch (each row holds a static KV slot)")
    round_token_budget: int = Field(2048, ge=1, description="while sessions generate, tokens of appends read "
                                                            "per scheduler round (fairness to running streams)")
    api_keys: str = Field("", description="comma-separated API keys; empty: no authentication")
    state_secret: str = Field("", description="signs session states (HMAC-SHA256); an imported state must carry "
                                              "this deployment's signature; empty: unsigned (checksum only)")
    served_model_name: str | None = Field(None, description="model id on /v1/models; default: the name in the "
                                                            "model's model_card.json, else its directory's name")
    default_max_tokens: int = Field(512, ge=1, description="/v1 reply length when a request gives none")
    chat_snapshots: int = Field(16, ge=1, description="state snapshots kept per chat session for edits and "
                                                      "regenerates (the first turn's is always kept)")
    response_ttl_s: float = Field(30 * 86400, ge=0, description="stored /v1/responses (each one's state, input and "
                                                              "output) expire this long after they are made; 0: "
                                                              "never")
    log_level: str = Field("info", description="debug, info, warning, error")

    @property
    def keys(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        directory = Path(self.model_path().rstrip("/"))
        try:
            return str(json.loads((directory / "model_card.json").read_text())["name"])
        except (OSError, ValueError, KeyError, TypeError):  # no card (or a hub name): the directory's name
            return directory.name

    def model_path(self) -> str:
        """The model to serve; raises SystemExit with a clear message when there is none."""
        if self.model:
            return self.model
        for candidate in DEFAULT_MODEL_DIRS:
            if (candidate / "hmt_config.json").is_file():
                return str(candidate)
        raise SystemExit(f"hmt-serve: no --model given and no model in {DEFAULT_MODEL_DIRS[0]}/; "
                         "pass --model DIR_OR_NAME (or set HMT_MODEL)")


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Flags override environment variables; a flag left out keeps the environment's value."""
    parser = argparse.ArgumentParser(prog="hmt-serve", description="Serve HMT sessions over HTTP.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=None,
                            help=f"{field.description} (env HMT_{name.upper()}; default {field.default})")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)
