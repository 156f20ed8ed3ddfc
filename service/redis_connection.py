"""Where the session store's Redis is: the --redis-url forms, parsed (`parse_redis_url`), and a
client for each topology (`connect`): redis://, rediss://, unix:// one server; redis+cluster:// a
Redis Cluster; redis+sentinel:// the master that Redis Sentinel names, followed across failovers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff

URL_FORMS = ("redis://[[user]:password@]host[:6379][/db], rediss:// (TLS), unix:///path/redis.sock[?db=N], "
             "redis+cluster://[[user]:password@]host:port[,host:port...], "
             "redis+sentinel://[[user]:password@]host:26379[,host:26379...]/<master name>[/db]"
             "[?sentinel_password=...] (rediss+cluster://, rediss+sentinel:// for TLS)")
_DEFAULT_PORT = {"cluster": 6379, "sentinel": 26379}
_HOST_PORT = re.compile(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]/]+)(?::(\d+))?")
TIMEOUT_S = 2.0  # socket connect and read timeout: a dead Redis is a quick 503, not a hung request


@dataclass(frozen=True)
class RedisTarget:
    """A parsed --redis-url: which Redis topology, where, and the credentials."""

    mode: Literal["single", "cluster", "sentinel"]
    url: str  # single: the URL itself, which redis-py parses
    nodes: tuple[tuple[str, int], ...] = ()  # cluster: nodes to discover it from; sentinel: the sentinels
    master: str = ""  # sentinel: the name of the monitored master
    db: int = 0
    username: str | None = None  # of the Redis servers (not the sentinels)
    password: str | None = None
    tls: bool = False
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def parse_redis_url(url: str) -> RedisTarget:
    """The URL forms of URL_FORMS; ValueError (without the password) for anything else."""
    scheme, separator, _ = url.partition("://")
    scheme = scheme.lower()
    if scheme in ("redis", "rediss", "unix") and separator:
        return RedisTarget("single", url)
    base, _, kind = scheme.partition("+")
    if not separator or base not in ("redis", "rediss") or kind not in ("cluster", "sentinel"):
        raise ValueError(f"unknown Redis URL scheme {scheme + separator!r}; the forms are {URL_FORMS}")
    mode: Literal["cluster", "sentinel"] = "cluster" if kind == "cluster" else "sentinel"
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, colon, secret = userinfo.partition(":")
    nodes = []
    for item in hosts.split(","):
        match = _HOST_PORT.fullmatch(item.strip())
        port = int((match[2] or match[4]) or _DEFAULT_PORT[mode]) if match else 0
        if match is None or not 0 < port < 65536:
            raise ValueError(f"{scheme}:// needs host:port[,host:port...]; got {item.strip()!r}")
        nodes.append((match[1] or match[3], port))
    path = [unquote(segment) for segment in parts.path.split("/") if segment]
    options = parse_qs(parts.query, keep_blank_values=True)
    allowed = {"sentinel_username", "sentinel_password"} if mode == "sentinel" else set()
    if set(options) - allowed:
        raise ValueError(f"unknown option(s) {sorted(set(options) - allowed)} in the {scheme}:// URL")
    if mode == "cluster":
        if path not in ([], ["0"]):
            raise ValueError("a Redis Cluster has only database 0: redis+cluster://host:port[,host:port...]")
        master, db = "", "0"
    else:
        if len(path) not in (1, 2):
            raise ValueError("redis+sentinel:// needs the master's name: "
                             "redis+sentinel://host:26379[,host:26379...]/<master name>[/db]")
        master, db = path[0], path[1] if len(path) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"the database in a {scheme}:// URL is a number, not {db!r}")

    def option(name: str) -> str | None:
        values = options.get(name)
        return values[-1] if values else None

    return RedisTarget(mode, url, tuple(nodes), master, int(db), unquote(user) or None,
                       unquote(secret) if colon else None, base == "rediss",
                       option("sentinel_username"), option("sentinel_password"))


def _retry() -> Retry:
    """Two quick retries (a dropped idle connection, a refused connect while a failover is under way)
    with jittered backoff under 0.5 s, then the error: a request never waits long on a dead Redis."""
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2)


def connect(target: RedisTarget, read_timeout_s: float = TIMEOUT_S) -> tuple[aioredis.Redis | RedisCluster,
                                                                              Sentinel | None]:
    """A client for the target (and the Sentinel object behind it, which the caller closes too)."""
    if target.mode == "single":
        return aioredis.Redis.from_url(target.url, socket_timeout=read_timeout_s, socket_connect_timeout=TIMEOUT_S,
                                       health_check_interval=5, retry=_retry()), None
    if target.mode == "cluster":
        # redis-py finds every node and slot from any one of these, and follows MOVED and failovers
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                            username=target.username, password=target.password, ssl=target.tls,
                            socket_timeout=read_timeout_s, socket_connect_timeout=TIMEOUT_S,
                            health_check_interval=5, retry=_retry()), None
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs={
        "socket_timeout": TIMEOUT_S, "socket_connect_timeout": TIMEOUT_S, "retry": _retry(), "ssl": target.tls,
        "username": target.sentinel_username, "password": target.sentinel_password})
    # Every new connection asks the sentinels where the master is now; a connection to a demoted
    # master (READONLY) is dropped: after a failover the client follows the new master by itself.
    master = sentinel.master_for(target.master, db=target.db, username=target.username, password=target.password,
                                 ssl=target.tls, socket_timeout=read_timeout_s, socket_connect_timeout=TIMEOUT_S,
                                 health_check_interval=5, retry=_retry())
    return master, sentinel
