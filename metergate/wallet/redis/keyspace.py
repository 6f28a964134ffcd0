"""What every Redis-backed store shares: the key space (all of a wallet's keys in one hash slot), the client
for one server, a Redis Cluster or a Sentinel-watched master, and how an unreachable Redis is told apart and
answered (503 ``wallet_unavailable``: fail closed). The Redis wallet (:mod:`metergate.wallet.redis.store`) and
the SQL wallet with its rate-limit windows in Redis (:mod:`metergate.wallet.redis.windows`) both build on it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rex

from metergate.errors import MetergateError
from metergate.wallet.models import Mode

REDIS_DOWN = (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, OSError)


class WalletUnavailable(MetergateError):
    """The real-time wallet cannot be reached: fail closed rather than admit unmetered spend."""

    status = 503
    type = "api_error"
    default_code = "wallet_unavailable"


@dataclass(frozen=True, slots=True)
class WalletRef:
    mode: Mode
    customer_id: str
    asset: str


class KeySpace:
    """Key names; see :mod:`metergate.wallet.redis.scripts` for what each holds."""

    def __init__(self, prefix: str, shards: int) -> None:
        self.prefix = prefix
        self.shards = shards

    def shard(self, mode: str, customer_id: str) -> int:
        return zlib.crc32(f"{mode}:{customer_id}".encode()) % self.shards

    def base(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard}}}"

    def wallet(self, w: WalletRef) -> tuple[str, str, str]:
        """(projection, credit key set, unapplied counter)."""
        b, tail = self.base(self.shard(w.mode, w.customer_id)), f"{w.mode}:{w.customer_id}:{w.asset}"
        return f"{b}:w:{tail}", f"{b}:k:{tail}", f"{b}:u:{tail}"

    def hold(self, w: WalletRef, hold_id: str) -> str:
        return f"{self.base(self.shard(w.mode, w.customer_id))}:h:{hold_id}"

    def hold_in(self, shard: int, hold_id: str) -> str:
        return f"{self.base(shard)}:h:{hold_id}"

    def expiry(self, shard: int) -> str:
        return f"{self.base(shard)}:x"

    def stream(self, shard: int) -> str:
        return f"{self.base(shard)}:s"

    def lease(self, shard: int) -> str:
        return f"{self.base(shard)}:lease"

    def unapplied(self, w: WalletRef) -> str:
        return self.wallet(w)[2]

    def index(self, hold_id: str) -> str:
        return f"{self.prefix}:hold:{hold_id}"

    def hot(self, w: WalletRef, hold_id: str) -> list[str]:
        """The five keys of a hot-path script: wallet, hold, expiry, stream, unapplied counter."""
        shard = self.shard(w.mode, w.customer_id)
        wallet, _, unapplied = self.wallet(w)
        return [wallet, self.hold_in(shard, hold_id), self.expiry(shard), self.stream(shard), unapplied]


def connect(url: str) -> Any:
    """A redis-py asyncio client for ``url``: ``redis://`` / ``rediss://`` (one server),
    ``redis+cluster://host:port`` (Redis Cluster) or ``redis+sentinel://host:port/<service>`` (Sentinel)."""
    common: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0, "decode_responses": True}
    if url.startswith("redis+cluster://"):
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url("redis://" + url.removeprefix("redis+cluster://"), **common)
    if url.startswith("redis+sentinel://"):
        from redis.asyncio.sentinel import Sentinel

        rest = url.removeprefix("redis+sentinel://")
        hosts, _, service = rest.partition("/")
        nodes = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in hosts.split(",")]
        return Sentinel(nodes, **common).master_for(service or "mymaster")  # type: ignore[no-untyped-call]
    # A blocking pool: a burst of concurrent requests waits (briefly) for a connection instead of failing.
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=5, **common)
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() disconnects it


__all__ = ["REDIS_DOWN", "KeySpace", "WalletRef", "WalletUnavailable", "connect"]
