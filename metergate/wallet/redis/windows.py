"""The SQL wallet with its rate-limit windows in Redis: the ``redis_wallet: false`` topology.

Why: once a hot wallet is served from escrow leases (:mod:`metergate.wallet.escrow`), PostgreSQL alone carries
many replicas on one wallet at the batch engine's speed, with every wallet feature (grants, subscriptions, the
hold API, invoiced mode) served by the one engine. What replicas still share request by request is their
rate-limit windows: short-lived counters that Redis keeps better than SQL rows. So this store is the SQL store
in every respect but those windows, which it claims and gives back with the Redis wallet's own scripts
(:mod:`metergate.wallet.redis.quota`: one script per chunk of requests, keys that expire by themselves).

Switching from the Redis wallet (``redis_wallet: true``) on the same Redis and prefix is refused while that wallet
is alive or undrained (:meth:`SqlWalletWithRedisWindows.refuse_a_live_redis_wallet`): its replicas would admit
against Redis balances while this store admits against SQL ones (overspend), and events still in its streams
would be missing from the ledger this store reads.

Failure policy: Redis unreachable makes a claim a 503 ``wallet_unavailable`` (rate limits fail closed, as the
Redis wallet does), and ``/readyz`` follows Redis as well as the database. A flushed or restarted Redis
forgets the open windows' counts: at most one more window's allowance, never money (the wallet is in SQL).
"""

from __future__ import annotations

import asyncio
from typing import Any

from metergate.wallet.errors import StoreInUse
from metergate.wallet.redis import quota as redis_quota
from metergate.wallet.redis.keyspace import REDIS_DOWN, KeySpace, WalletUnavailable, connect
from metergate.wallet.sql import SqlWalletStore


class SqlWalletWithRedisWindows(redis_quota.WindowsInRedis, SqlWalletStore):
    """A :class:`SqlWalletStore` whose rate-limit windows live in Redis (``redis_url``, ``redis_key_prefix``)."""

    def __init__(self, url: str, redis_url: str, *, prefix: str = "mg", shards: int = 16, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.redis_url = redis_url
        self.keys = KeySpace(prefix, shards)  # the Redis wallet's key space: its rate-limit keys are the same
        self._client: Any = None
        self._scripts: dict[str, Any] = {}

    @property
    def redis(self) -> Any:
        assert self._client is not None, "store is not open"
        return self._client

    async def open(self) -> None:
        await super().open()
        if self._client is None:
            self._client = connect(self.redis_url)
        self._scripts["RL_CLAIM"] = self._client.register_script(redis_quota.CLAIM)
        self._scripts["RL_RELEASE"] = self._client.register_script(redis_quota.RELEASE)
        await self.refuse_a_live_redis_wallet()

    async def refuse_a_live_redis_wallet(self) -> None:
        """Raise :class:`StoreInUse` while the Redis wallet runs on this key space (a ledger sink holds a shard's
        lease) or has events its sink has not yet written to SQL (a shard's stream is not empty). One read of
        each shard's two keys at start-up. The check runs one way only: a replica started later with
        ``redis_wallet: true`` beside running SQL-wallet replicas is not refused (it has no such check)."""
        shards = range(self.keys.shards)
        lengths, leases = await asyncio.gather(
            asyncio.gather(*(self.script_call(self.redis.xlen(self.keys.stream(s))) for s in shards)),
            asyncio.gather(*(self.script_call(self.redis.exists(self.keys.lease(s))) for s in shards)))
        pending, sinks = sum(int(n) for n in lengths), sum(int(n) for n in leases)
        if pending or sinks:
            raise StoreInUse(
                f"Redis key prefix {self.keys.prefix!r} is in use by the Redis wallet (redis_wallet: true): "
                f"{pending} ledger events not yet written to SQL, a ledger sink alive on {sinks} shard(s). "
                "Wallets in SQL beside it would admit against balances it is still spending. Keep "
                "redis_wallet: true, or stop every replica, run one with redis_wallet: true until this store "
                "reports no events left (its sink drains them), stop it, wait 5 s (its lease) and start again.")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        await super().close()

    async def ping(self) -> None:
        """Ready means the database and Redis both answer: a request needs its wallet and its windows."""
        await super().ping()
        await self.script_call(self.redis.ping())

    async def script_call(self, call: Any) -> Any:
        try:
            return await call
        except REDIS_DOWN as exc:
            raise WalletUnavailable("The rate-limit store is unreachable; nothing was charged. Retry shortly.",
                                    code="wallet_unavailable") from exc

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self.script_call(self._scripts[name](keys=keys, args=args))


__all__ = ["SqlWalletWithRedisWindows"]
