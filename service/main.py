"""`hmt-serve` entry point: settings, embedded Redis if needed, model load, uvicorn."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from service.settings import Settings, parse_args

if TYPE_CHECKING:
    from hmt_core import HMTModel

log = logging.getLogger("hmt-serve")

T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T]) -> T:
    """fn() on a thread that ends when it returns, so the OpenMP team it starts ends with it."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # SystemExit too: re-raised on the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="hmt-model-load")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def load_model(settings: Settings) -> HMTModel:
    import torch

    from hmt_core import CheckpointError, HMTModel, InvalidInputError, apply_precision
    from hmt_core.precision import default_precision

    if settings.threads:
        torch.set_num_threads(settings.threads)

    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    if dtype is not None and settings.precision != "auto":
        raise SystemExit("hmt-serve: give --dtype or --precision, not both (--precision is the serving choice)")
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = settings.model_path()
    try:
        model = HMTModel.from_pretrained(path, dtype=dtype, device=device)
        if dtype is None:
            precision = settings.precision
            if precision == "auto":
                precision = default_precision(model)
            apply_precision(model, precision)
    except (CheckpointError, InvalidInputError) as exc:
        raise SystemExit(f"hmt-serve: cannot load model {path}: {exc}") from None
    model.eval()
    return model


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.model_path()  # fail fast, before the slow imports and Redis, when there is no model
    from service.embedded_redis import EmbeddedRedis
    from service.redis_connection import parse_redis_url
    from service.store import SessionStore

    if settings.redis_url is not None:
        try:
            parse_redis_url(settings.redis_url)
        except ValueError as exc:
            raise SystemExit(f"hmt-serve: --redis-url: {exc}") from None

    import torch
    import uvicorn

    from hmt_core.precision import precision_of
    from service.app import Service, create_app

    # The model worker thread runs the model with these threads. The loading runs on a passing
    # thread and the event loop's own torch ops (state checks) on one thread, so that only the
    # worker keeps an OpenMP team (see service/worker.py).
    settings = settings.model_copy(update={"threads": settings.threads or torch.get_num_threads()})
    torch.set_num_threads(1)
    embedded: EmbeddedRedis | None = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        embedded.start()
        url = embedded.url
        log.info("embedded redis-server at %s (AOF in %s)", url, embedded.data_dir)
    try:
        model = in_passing_thread(lambda: load_model(settings))
        log.info("model %s loaded: fingerprint %s, precision %s", settings.model_path(), model.fingerprint,
                 precision_of(model))
        store = SessionStore(url, settings.key_prefix, settings.session_ttl_s, settings.lock_ttl_s,
                             settings.lock_wait_s, settings.redis_wait_replicas, settings.redis_wait_s)
        app = create_app(Service(settings, model, store))
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                    timeout_graceful_shutdown=5)
    finally:
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    main()
