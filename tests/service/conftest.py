"""Fixtures: tiny random HMT models saved to disk, real redis-server processes on free
ports, and hmt-serve server processes on loopback (no mocks: the whole stack runs)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_helpers import Fleet, RedisServer, Server, build_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    build_model(directory, seed=0)
    return directory


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fleet(model_dir: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    servers = Fleet(model_dir, redis_server.url, tmp_path_factory.mktemp("fleet"))
    servers.launch_all()
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def server(fleet: Fleet) -> Server:
    return fleet.get("main")


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def local_model(model_dir: Path):
    """The same model in the test process: the reference the server's answers must equal."""
    import torch

    from hmt_core import HMTModel

    torch.set_num_threads(1)
    return HMTModel.from_pretrained(model_dir)
