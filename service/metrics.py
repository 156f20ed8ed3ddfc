"""Prometheus series, all prefixed hmt_, in one registry owned by this process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("hmt_requests", "HTTP requests", ["route", "method", "status"], registry=REGISTRY)
REQUEST_SECONDS = Histogram("hmt_request_seconds", "HTTP request latency (streams: until the response starts)",
                            ["route", "method", "status"], buckets=_LATENCY, registry=REGISTRY)
TTFT_SECONDS = Histogram("hmt_time_to_first_token_seconds", "Generate request start to first token",
                         buckets=_LATENCY, registry=REGISTRY)
INTER_TOKEN_SECONDS = Histogram("hmt_inter_token_seconds", "Time between generated tokens of one request",
                                buckets=_LATENCY, registry=REGISTRY)
TOKENS_IN = Counter("hmt_tokens_in", "Tokens appended by clients (prompts included)", registry=REGISTRY)
TOKENS_OUT = Counter("hmt_tokens_out", "Tokens generated", registry=REGISTRY)
SEGMENTS = Counter("hmt_segments_committed", "Segments committed by batched appends", registry=REGISTRY)
SEGMENT_SECONDS = Histogram("hmt_segment_seconds", "Latency of one batched segment-commit forward",
                            buckets=_LATENCY, registry=REGISTRY)
BATCH_SIZE = Histogram("hmt_batch_size", "Sessions per batched segment commit",
                       buckets=(1, 2, 4, 8, 16, 32, 64), registry=REGISTRY)
DECODE_BATCH_SIZE = Histogram("hmt_decode_batch_size", "Generating sessions advanced by one decode step",
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY)
DECODE_STEP_SECONDS = Histogram("hmt_decode_step_seconds", "Latency of one decode step (a token for every row)",
                                buckets=_LATENCY, registry=REGISTRY)
DECODE_COMPILE_SECONDS = Gauge("hmt_decode_compile_seconds", "Time spent compiling the decode step at start "
                               "(--compile; 0 when off)", registry=REGISTRY)
QUEUE_DEPTH = Gauge("hmt_queue_depth", "Jobs waiting for or running in the model worker", registry=REGISTRY)
STORE_SECONDS = Histogram("hmt_store_seconds", "Redis operation latency", ["op"], buckets=_LATENCY,
                          registry=REGISTRY)
STORE_ERRORS = Counter("hmt_store_errors", "Redis operations that failed", ["op"], registry=REGISTRY)
STORE_OPS = ("ping", "create", "read", "lock", "unlock", "write")  # the op label of the store's operations
for _op in STORE_OPS:  # every series exists from the start, so increase() alerts see the first burst
    STORE_ERRORS.labels(_op)
    STORE_SECONDS.labels(_op)
STATE_BYTES = Histogram("hmt_state_bytes", "Serialized session state size at each write",
                        buckets=(1e3, 1e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7), registry=REGISTRY)
ACTIVE_SESSIONS = Gauge("hmt_active_sessions", "Sessions with a request in progress in this process",
                        registry=REGISTRY)
MODEL_MEMORY_BYTES = Gauge("hmt_model_memory_bytes", "Model weights (CPU) or allocated device memory (GPU)",
                           registry=REGISTRY)
RECALL_DISTANCE = Histogram("hmt_recall_distance", "Segments back to the strongest recall weight (0: no memory)",
                            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=REGISTRY)

CHAT_TURNS = Counter("hmt_chat_turns", "Chat turns (/v1/chat/completions) by how they continued their session: "
                     "new, continued (read only new messages), branched (from a snapshot), restarted (re-read all)",
                     ["continuation"], registry=REGISTRY)
for _continuation in ("new", "continued", "branched", "restarted"):  # every series exists from the start
    CHAT_TURNS.labels(_continuation)


def render() -> bytes:
    return generate_latest(REGISTRY)
