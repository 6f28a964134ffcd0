"""A Redis real-time wallet over the SQL ledger, for many sidecar replicas sharing the same wallets.

Why: a hot wallet on one SQL row serialises every replica on one lock; in Redis a hold is one Lua script
(well under a millisecond) and the SQL ledger is written behind it, still exactly once.

Design (the scripts are in :mod:`metergate.wallet.redis.scripts`):

* **Hot path in Redis.** ``reserve``, ``extend_hold``, ``settle`` and ``expire_holds`` are each one Lua
  script on the wallet's keys, keyed by the hold id (plus the step for extensions): a retried or
  timed-out call finds its hold and returns the first result; different content raises
  ``IdempotencyConflict``. Availability is checked and taken in the same script: no overspend, whatever
  the number of replicas.
* **Hash slots.** A wallet lives on shard ``crc32(mode:customer) % shards``; every key of the shard carries
  the ``{shard}`` hash tag, so a script's keys share one Redis Cluster slot. A hold id is found through a
  per-process cache, else an index key ``P:hold:<id>``: on one server (or Sentinel's master) written by the
  reserve script itself, in the same atomic step; on Redis Cluster, where it lives in another slot, written
  just before the script (a crash between the two leaves only an index pointing at no hold).
* **The ledger stays the system of record.** Each script appends its event to the shard's stream in the
  same atomic step; :class:`~metergate.wallet.redis.sink.LedgerSink` drains the streams into the SQL store
  with ``overdraw=True`` (Redis already decided admission) and acknowledges only after the SQL commit.
  Usage records ride with the settle event.
* **Credits** are durable in SQL first (idempotent by key), then added to the projection, idempotent by the
  same key (the projection keeps the keys of the credits it contains). If Redis is unreachable after the
  SQL commit, the credit stands and the projection under-counts it until the next reconciliation: the
  safe direction.
* **Projection.** A wallet's keys appear only through :meth:`RedisWalletStore.rebuild`: the SQL account,
  its pending holds and its recent credit keys, loaded by a script that creates the projection only if it
  does not exist (of many replicas rebuilding at once, the first wins; the others' loads are no-ops).
  A mutation on a missing projection (cold start, FLUSHALL, restart without persistence) rebuilds first.
  Drift repair drops a projection only when none of its events is still waiting for SQL (a per-wallet
  counter the scripts increment and the sink decrements atomically with its XACK), then rebuilds.
* **Holds lost with a flush.** A settle whose hold the projection no longer knows looks it up in SQL
  (resolved there: the SQL result is returned; pending there: re-adopted) or in this process's cache (the
  hold never reached SQL: re-adopted and written to the stream again), so delivered usage is still billed.
* **Failure policy.** Redis unreachable: :class:`WalletUnavailable` (503 ``wallet_unavailable``), i.e. fail
  closed; ``/readyz`` follows Redis. With ``fail_open_requests`` > 0, up to that many holds per customer (per
  process) are admitted by the SQL ledger instead, settled there while Redis stays down or adopted by the
  projection once it is back; the reconciliation rebuilds the projection around them and ``fail_open``
  counts them (the report). A full stream (SQL down for long) refuses new holds with 503 ``ledger_backlog``
  while settles still go through: Redis memory stays bounded by ``max_backlog`` events per shard plus the
  settles of admitted holds.
* **Settlements Redis lost.** Each process watches its own settlements until SQL shows them
  (:meth:`RedisWalletStore.confirm_settlements`) and applies to SQL directly the ones Redis lost.
* **Multi-replica safety, checked:** expiry sweeps are one idempotent script per hold (any number of
  replicas sweep at once); the ledger sink is leased per shard; reconciliation runs on the replica holding
  shard 0's lease; rate-limit windows live in Redis (quota leases claimed by one script per chunk,
  :mod:`metergate.wallet.redis.quota`; the overrides stay in SQL); payments (auto top-up,
  spend caps), pricing, events and billing run over this store (credits through :meth:`credit`, a credit line
  set in SQL through :meth:`refresh_overdraft`); the grants, plans and hold-API admin routes are served only over the
  SQL store (a grant change made in SQL directly shows as drift and is rebuilt by the reconciliation).
* **Cluster and Sentinel** (clients built in :func:`connect`): tested on a throwaway 3-master cluster (every
  script's keys share a slot; the shards' slots sit on different masters) and on a sentinel-managed master,
  through a planned and a crash failover (``tests/redis/test_topologies.py``). Sentinel has no fencing: writes
  the old master accepts before its demotion are lost with it, like a flush (see "Settlements Redis lost"),
  and the ledger still gets them exactly once. A settle lost that way leaves its hold *pending* in Redis while
  the ledger has it captured; the rebuild stamps the wallet and the holds the ledger lists as pending with a
  new epoch, so such a hold is *stale* (scripts.py): it never moves the wallet again, its expiry only tells
  the ledger, its settle and ``get_hold`` are answered by the ledger. A cluster URL names one seed node; a
  sentinel URL ``host:port[,host:port...]/service``.
* **Everything else** (customers, keys, history, reports, rate-limit overrides) is the SQL store's, by
  delegation.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from sqlalchemy import Connection, select

from metergate.budgets.delegate import BudgetsInSql
from metergate.wallet import schema as t
from metergate.wallet.errors import HoldNotFound, IdempotencyConflict, InsufficientFunds
from metergate.wallet.models import (
    ApiKey,
    Balance,
    Customer,
    Hold,
    HoldState,
    LedgerEntry,
    Mode,
    RateLimitOverride,
    Settlement,
    UsageAggregate,
    UsageGrouping,
    UsageRecord,
    now_ms,
)
from metergate.wallet.redis import quota as redis_quota
from metergate.wallet.redis import scripts
from metergate.wallet.redis.keyspace import REDIS_DOWN, KeySpace, WalletRef, WalletUnavailable, connect
from metergate.wallet.sql import SqlWalletStore

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_AMOUNT = 2**53 - 1  # Lua numbers are doubles: exact integers up to here
CREDIT_KEY_WINDOW_MS = 7 * 86_400_000  # a rebuilt projection remembers the credits of the last week


@dataclass(slots=True)
class _Known:
    """What this process knows of a hold it placed: enough to re-adopt it if a flush loses it."""

    wallet: WalletRef
    amount: int
    expires_at_ms: int
    created_at_ms: int


@dataclass(slots=True)
class _Unconfirmed:
    """A settlement this process made that the ledger has not shown yet (see ``confirm_settlements``)."""

    at: float
    wallet: WalletRef
    known: _Known | None
    charged: int
    written_off: int
    usage: UsageRecord | None


_USAGE_FIELDS = tuple(f.name for f in fields(UsageRecord))


def _usage_json(usage: UsageRecord) -> str:
    """The usage record as the settle event carries it: its fields as a JSON object. Not ``asdict``, which
    deep-copies every value first (a twelfth of a hold's CPU on the hot path)."""
    return json.dumps({name: getattr(usage, name) for name in _USAGE_FIELDS}, separators=(",", ":"), default=str)


def _hash(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]


class RedisWalletStore(redis_quota.WindowsInRedis, BudgetsInSql):
    """See the module docstring. ``run_sink=False`` leaves draining to other processes (tests, tools)."""

    def __init__(self, sql: SqlWalletStore, redis_url: str, *, prefix: str = "mg", shards: int = 16,
                 max_backlog: int = 200_000, retention_ms: int = 86_400_000, run_sink: bool = True,
                 fail_open_requests: int = 0,
                 sink_batch: int = 256, lease_ms: int = 5_000, reconcile_interval_s: float = 30.0,
                 client: Any | None = None) -> None:
        self.sql = sql
        self.keys = KeySpace(prefix, shards)
        self._url = redis_url
        self._client = client
        self._max_backlog = max_backlog
        self._retention_ms = retention_ms
        self._run_sink = run_sink
        self._sink_batch = sink_batch
        self._lease_ms = lease_ms
        self._reconcile_interval_s = reconcile_interval_s
        self._known: OrderedDict[str, _Known] = OrderedDict()
        self._known_max = 200_000
        self._unconfirmed: OrderedDict[str, _Unconfirmed] = OrderedDict()
        self._customers: dict[tuple[str, str], tuple[float, Customer]] = {}
        self._fail_open_requests = fail_open_requests
        self.fail_open: dict[tuple[str, str], int] = {}  # holds admitted by SQL while Redis was down, per customer
        self._fail_open_holds: set[str] = set()
        self._sink_task: asyncio.Task[None] | None = None
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.sink: Any = None  # LedgerSink, set in open()
        self._scripts: dict[str, Any] = {}
        self._index_in_script = False
        # The cluster client's per-node pools raise MaxConnectionsError (a ConnectionError, so a 503) once a
        # burst exceeds them, and the sentinel's pool is unbounded: bound the commands in flight instead, as
        # the single-server BlockingConnectionPool does (a burst waits briefly rather than failing).
        self._gate = asyncio.Semaphore(64) if redis_url.startswith(("redis+cluster://", "redis+sentinel://")) \
            else None

    # ------------------------------------------------------------------ lifecycle

    @property
    def redis(self) -> Any:
        assert self._client is not None, "store is not open"
        return self._client

    async def open(self) -> None:
        from metergate.wallet.redis.sink import LedgerSink

        await self.sql.open()
        if self._client is None:
            self._client = connect(self._url)
        from redis.asyncio.cluster import RedisCluster

        # One server (Sentinel's master included): the reserve script writes the hold index itself.
        self._index_in_script = not isinstance(self._client, RedisCluster)
        for name in ("RESERVE", "EXTEND", "SETTLE", "EXPIRE", "CREDIT", "LOAD", "INVALIDATE", "SET_OVERDRAFT",
                     "ADOPT", "ACK", "LEASE"):
            self._scripts[name] = self._client.register_script(getattr(scripts, name))
        self._scripts["RL_CLAIM"] = self._client.register_script(redis_quota.CLAIM)
        self._scripts["RL_RELEASE"] = self._client.register_script(redis_quota.RELEASE)
        self.sink = LedgerSink(self, batch=self._sink_batch, lease_ms=self._lease_ms,
                               reconcile_interval_s=self._reconcile_interval_s)
        if self._run_sink:
            self._sink_task = asyncio.create_task(self.sink.run(), name="metergate-ledger-sink")

    async def close(self) -> None:
        if self._sink_task is not None:
            # Let the sink finish its batch (its SQL writes and XACK), then stop it; never wait forever.
            self.sink.stopping = True
            done, _ = await asyncio.wait({self._sink_task}, timeout=5)
            if not done:
                self._sink_task.cancel()
                await asyncio.wait({self._sink_task}, timeout=2)
            if self._sink_task.done() and not self._sink_task.cancelled() and self._sink_task.exception():
                log.error("ledger sink ended with %r", self._sink_task.exception())
            self._sink_task = None
        if self._client is not None:
            # A sentinel client's pool keeps the Sentinel, whose own connections (to the sentinels) the master
            # client does not close: close them too, or every store leaks one socket per sentinel.
            manager = getattr(getattr(self._client, "connection_pool", None), "sentinel_manager", None)
            await self._client.aclose()
            if manager is not None:
                await manager.aclose()
            self._client = None
        await self.sql.close()

    async def ping(self) -> None:
        """Ready means Redis answers: requests are admitted and settled there. The SQL ledger may be briefly
        unreachable without making a replica unready (the streams buffer, see ``redis_max_backlog``)."""
        await self.redis_call(self.redis.ping())

    async def redis_call(self, call: Awaitable[T]) -> T:
        """Await a Redis command, turning "Redis unreachable" into a 503 (fail closed)."""
        try:
            if self._gate is None:
                return await call
            async with self._gate:
                return await call
        except REDIS_DOWN as exc:
            raise WalletUnavailable("The real-time wallet is unreachable; nothing was charged. Retry shortly.",
                                    code="wallet_unavailable") from exc

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self.redis_call(self._scripts[name](keys=keys, args=args))

    # ------------------------------------------------------------------ customers and keys (SQL)

    async def create_customer(self, mode: Mode, customer_id: str, name: str) -> Customer:
        return await self.sql.create_customer(mode, customer_id, name)

    async def get_customer(self, mode: Mode, customer_id: str) -> Customer | None:
        """Found customers are cached for a minute (customers are never deleted): a sidecar keeps identifying
        header customers, and so keeps serving from Redis, while the SQL database is briefly unreachable."""
        cached = self._customers.get((mode, customer_id))
        if cached is not None and time.monotonic() - cached[0] < 60:
            return cached[1]
        customer = await self.sql.get_customer(mode, customer_id)
        if customer is not None:
            if len(self._customers) > 100_000:
                self._customers.clear()
            self._customers[(mode, customer_id)] = (time.monotonic(), customer)
        return customer

    async def list_customers(self, mode: Mode, *, limit: int, after: str | None = None) -> list[Customer]:
        return await self.sql.list_customers(mode, limit=limit, after=after)

    async def create_api_key(self, mode: Mode, customer_id: str, *, key_id: str, key_hash: str,
                             prefix: str, attributes: dict[str, str] | None = None) -> ApiKey:
        return await self.sql.create_api_key(mode, customer_id, key_id=key_id, key_hash=key_hash, prefix=prefix,
                                             attributes=attributes)

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        return await self.sql.find_api_key(key_hash)

    async def revoke_api_key(self, mode: Mode, key_id: str) -> ApiKey | None:
        return await self.sql.revoke_api_key(mode, key_id)

    async def set_api_key_attributes(self, mode: Mode, key_id: str, attributes: dict[str, str]) -> ApiKey | None:
        return await self.sql.set_api_key_attributes(mode, key_id, attributes)

    # ------------------------------------------------------------------ projection

    async def rebuild(self, w: WalletRef) -> bool:
        """Load the wallet's projection from the SQL ledger unless it exists; ``False`` when SQL has no
        account for it (nothing to load: such a wallet cannot hold anything)."""
        since = now_ms() - CREDIT_KEY_WINDOW_MS

        def snapshot(conn: Connection) -> tuple[Any, list[Any], list[str]] | None:
            a, h, e = t.accounts.c, t.holds.c, t.ledger_entries.c
            account = conn.execute(select(t.accounts).where(
                a.mode == w.mode, a.customer_id == w.customer_id, a.asset == w.asset)).first()
            if account is None:
                return None
            holds = conn.execute(select(h.id, h.amount, h.expires_at_ms, h.created_at_ms).where(
                h.mode == w.mode, h.customer_id == w.customer_id, h.asset == w.asset, h.state == "pending")).all()
            credits = conn.execute(select(e.idempotency_key).where(
                e.mode == w.mode, e.customer_id == w.customer_id, e.asset == w.asset, e.kind == "credit",
                e.created_at_ms >= since)).scalars().all()
            return account, list(holds), list(credits)

        snap = await self.sql.read(snapshot)
        if snap is None:
            return False
        account, holds, credits = snap
        wallet, credit_set, _ = self.keys.wallet(w)
        shard = self.keys.shard(w.mode, w.customer_id)
        args: list[Any] = [int(account.credits_posted), int(account.debits_posted), int(account.debits_pending),
                           int(account.overdraft_limit), len(credits), *credits]
        keys = [wallet, credit_set, self.keys.expiry(shard)]
        for h in holds:
            keys.append(self.keys.hold_in(shard, h.id))
            args += [h.id, w.mode, w.customer_id, w.asset, int(h.amount), int(h.expires_at_ms), int(h.created_at_ms)]
        args.append(uuid.uuid4().hex[:16])  # this rebuild's epoch (see scripts.py: stale holds)
        loaded = await self.script("LOAD", keys, args)
        if loaded == "loaded":
            log.info("rebuilt the wallet projection %s:%s:%s from the ledger (%d pending holds)",
                     w.mode, w.customer_id, w.asset, len(holds))
        return True

    @property
    def system_of_record(self) -> SqlWalletStore:
        return self.sql

    def lease_of(self, hold_id: str) -> tuple[str, int] | None:
        return None  # every hold of this store is a Redis hash of its own

    async def expire_entitlements(self, *, now_ms: int) -> None:
        """The SQL ledger's grants and subscriptions (wallet administration is not served over this store, so
        there are normally none; their sweep is the SQL store's)."""
        await self.sql.expire_entitlements(now_ms=now_ms)

    async def refresh_overdraft(self, mode: Mode, customer_id: str, asset: str) -> None:
        """After billing changed a credit line in SQL: set the projection's overdraft limit to the ledger's.
        The limit is absolute, so this applies at once even under traffic (unlike :meth:`reload`); two
        changes racing may leave the older limit until the next reconciliation."""
        limit = (await self.sql.balance(mode, customer_id, asset)).overdraft_limit
        await self.script("SET_OVERDRAFT", [self.keys.wallet(WalletRef(mode, customer_id, asset))[0]], [limit])

    async def reload(self, mode: Mode, customer_id: str, asset: str) -> None:
        """After a change made in SQL alone (a credit line set by billing), drop the wallet's projection so
        that the next operation rebuilds it from the ledger. A wallet whose events have not all reached SQL
        yet cannot be dropped safely; it is retried for a moment, then left to the periodic reconciliation,
        which rebuilds any wallet whose projection differs from the ledger."""
        w = WalletRef(mode, customer_id, asset)
        for _ in range(20):
            if await self.invalidate(w):
                return
            await asyncio.sleep(0.05)
        log.warning("wallet %s:%s:%s changed in SQL while its events were still draining; the next "
                    "reconciliation reloads it", mode, customer_id, asset)

    async def invalidate(self, w: WalletRef) -> bool:
        """Drop the projection if every event of the wallet has reached SQL; ``False`` if some have not."""
        wallet, _, unapplied = self.keys.wallet(w)
        return bool(await self.script("INVALIDATE", [wallet, unapplied], []) == "dropped")

    async def projection(self, w: WalletRef) -> Balance | None:
        wallet = self.keys.wallet(w)[0]
        c, p, q, o = await self.redis_call(self.redis.hmget(wallet, "c", "p", "q", "o"))
        if c is None:
            return None
        return Balance(w.mode, w.customer_id, w.asset, int(c), int(p), int(q), int(o or 0))

    # ------------------------------------------------------------------ money

    async def credit(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                     idempotency_key: str, memo: str = "") -> LedgerEntry:
        if amount > MAX_AMOUNT:
            raise ValueError("a credit must be below 2**53 smallest units")
        entry = await self.sql.credit(mode, customer_id, asset, amount, idempotency_key=idempotency_key, memo=memo)
        w = WalletRef(mode, customer_id, asset)
        wallet, credit_set, _ = self.keys.wallet(w)
        try:
            for _ in range(3):
                done = await self.script("CREDIT", [wallet, credit_set], [entry.idempotency_key, amount])
                if done != "not_loaded":
                    break
                await self.rebuild(w)  # the snapshot contains this credit; the retry replays
        except WalletUnavailable:
            log.warning("credit %s is in the ledger but not yet in the real-time wallet (Redis unreachable); "
                        "the next reconciliation adds it", entry.idempotency_key)
        return entry

    async def reserve(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                      hold_id: str, ttl_ms: int) -> tuple[Hold, Balance]:
        try:
            return await self._reserve(mode, customer_id, asset, amount, hold_id=hold_id, ttl_ms=ttl_ms)
        except WalletUnavailable as down:
            if down.code != "wallet_unavailable" or self.fail_open.get((mode, customer_id), 0) >= \
                    self._fail_open_requests:
                raise
        # Fail open, bounded: while Redis is unreachable, up to ``fail_open_requests`` holds per customer (per
        # process) are placed in the SQL ledger itself, checked against its balance. Redis adopts them when it
        # is back (a settle finds the SQL hold pending) and the reconciliation rebuilds the projection around
        # what was settled meanwhile; ``fail_open`` is the report.
        self.fail_open[(mode, customer_id)] = self.fail_open.get((mode, customer_id), 0) + 1
        hold, balance = await self.sql.reserve(mode, customer_id, asset, amount, hold_id=hold_id, ttl_ms=ttl_ms)
        self._fail_open_holds.add(hold_id)
        log.warning("Redis unreachable: hold %s of %s:%s admitted by the ledger (fail-open %d of %d)", hold_id, mode,
                    customer_id, self.fail_open[(mode, customer_id)], self._fail_open_requests)
        return hold, balance

    async def _reserve(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                       hold_id: str, ttl_ms: int) -> tuple[Hold, Balance]:
        assert 0 <= amount <= MAX_AMOUNT, "a hold must be between 0 and 2**53"
        w = WalletRef(mode, customer_id, asset)
        ref = f"{mode}\x1f{customer_id}\x1f{asset}"
        index = self.keys.index(hold_id)
        keys = self.keys.hot(w, hold_id)
        tail: list[Any] = []
        if self._index_in_script:
            keys.append(index)
            tail = [ref, ttl_ms + self._retention_ms]
        else:
            fresh = await self.redis_call(self.redis.set(index, ref, nx=True, px=ttl_ms + self._retention_ms))
            if not fresh and await self.redis_call(self.redis.get(index)) not in (ref, None):
                raise IdempotencyConflict(f"hold:{hold_id}")
        content = _hash("hold", mode, customer_id, asset, amount)
        for _ in range(20):
            r = await self.script("RESERVE", keys, [hold_id, mode, customer_id, asset, amount, ttl_ms, now_ms(),
                                                    content, self._max_backlog, self._retention_ms, *tail])
            status = r[0]
            if status == "not_loaded":
                if not await self.rebuild(w):
                    raise InsufficientFunds(asset=asset, available=0, required=amount)
                continue
            if status == "conflict":
                raise IdempotencyConflict(f"hold:{hold_id}")
            if status == "insufficient":
                raise InsufficientFunds(asset=asset, available=int(r[1]), required=amount)
            if status == "backlog":
                raise WalletUnavailable("The ledger is behind (its database is unreachable); no new holds "
                                        "until it catches up. Retry shortly.", code="ledger_backlog")
            state: HoldState = r[2]
            hold = Hold(hold_id, mode, customer_id, asset, int(r[1]), state, int(r[3]), int(r[4]), int(r[5]))
            self._remember(hold_id, _Known(w, hold.amount, hold.expires_at_ms, hold.created_at_ms))
            return hold, Balance(mode, customer_id, asset, int(r[6]), int(r[7]), int(r[8]), int(r[9]))
        raise WalletUnavailable("The wallet is being rebuilt; retry shortly.", code="wallet_unavailable")

    def _remember(self, hold_id: str, known: _Known) -> None:
        self._known[hold_id] = known
        self._known.move_to_end(hold_id)
        while len(self._known) > self._known_max:
            self._known.popitem(last=False)

    async def _locate(self, hold_id: str) -> WalletRef | None:
        known = self._known.get(hold_id)
        if known is not None:
            return known.wallet
        ref = await self.redis_call(self.redis.get(self.keys.index(hold_id)))
        if ref:
            mode, customer_id, asset = ref.split("\x1f")
            return WalletRef(mode, customer_id, asset)
        hold = await self.sql.get_hold(hold_id)
        return WalletRef(hold.mode, hold.customer_id, hold.asset) if hold else None

    async def _adopt(self, w: WalletRef, hold_id: str) -> bool:
        """Re-admit a hold the projection lost; ``False`` if neither SQL nor this process knows it pending."""
        sql_hold = await self.sql.get_hold(hold_id)
        if sql_hold is not None and sql_hold.state != "pending":
            return False
        if sql_hold is not None:
            args = [hold_id, w.mode, w.customer_id, w.asset, sql_hold.amount, sql_hold.expires_at_ms,
                    sql_hold.created_at_ms, "0"]
        else:
            known = self._known.get(hold_id)
            if known is None:
                return False
            args = [hold_id, w.mode, w.customer_id, w.asset, known.amount, known.expires_at_ms, known.created_at_ms,
                    "1"]
        for _ in range(3):
            done = await self.script("ADOPT", self.keys.hot(w, hold_id), args)
            if done != "not_loaded":
                log.warning("hold %s was missing from the real-time wallet (flushed?): %s", hold_id, done)
                return True
            await self.rebuild(w)
        return False

    async def settle(self, hold_id: str, amount: int, usage: UsageRecord | None = None) -> Settlement:
        try:
            return await self._settle(hold_id, amount, usage)
        except WalletUnavailable:
            if hold_id not in self._fail_open_holds:
                raise
        # A fail-open hold settled while Redis is still down: the ledger settles it (and decides the coverage).
        settlement = await self.sql.settle(hold_id, amount, usage)
        self._fail_open_holds.discard(hold_id)
        return settlement

    async def _settle(self, hold_id: str, amount: int, usage: UsageRecord | None = None) -> Settlement:
        assert 0 <= amount <= MAX_AMOUNT, "a capture must be between 0 and 2**53"
        w = await self._locate(hold_id)
        if w is None:
            raise HoldNotFound(hold_id)
        keys = self.keys.hot(w, hold_id)
        content = _hash("settle", amount)
        payload = _usage_json(usage) if usage is not None else ""
        adopted = False
        for _ in range(20):
            r = await self.script("SETTLE", keys, [hold_id, amount, content, now_ms(), payload, self._retention_ms])
            status = r[0]
            if status == "not_loaded":
                await self.rebuild(w)
                continue
            if status == "stale":
                return await self._settle_stale(w, hold_id, amount, usage)
            if status == "not_found":
                if not adopted and await self._adopt(w, hold_id):
                    adopted = True
                    continue
                return await self._settled_in_sql(hold_id, amount)
            if status == "conflict":
                raise IdempotencyConflict(f"settle:{hold_id}")
            if status == "replay":
                balance = Balance(w.mode, w.customer_id, w.asset, int(r[3]), int(r[4]), int(r[5]), int(r[6]))
                return Settlement(hold_id, int(r[1]), int(r[2]), balance, replayed=True)
            known = self._known.pop(hold_id, None)
            self._fail_open_holds.discard(hold_id)
            self._unconfirmed[hold_id] = _Unconfirmed(time.monotonic(), w, known, int(r[1]), int(r[2]), usage)
            while len(self._unconfirmed) > self._known_max:
                dropped, _ = self._unconfirmed.popitem(last=False)
                log.error("too many settlements awaiting the ledger; no longer watching %s", dropped)
            balance = Balance(w.mode, w.customer_id, w.asset, int(r[3]), int(r[4]), int(r[5]), int(r[6]))
            return Settlement(hold_id, int(r[1]), int(r[2]), balance)
        raise WalletUnavailable("The wallet is being rebuilt; retry shortly.", code="wallet_unavailable")

    async def confirm_settlements(self, *, older_than_s: float = 1.0) -> int:
        """Make sure this process's settlements reached the ledger; return how many were re-applied.

        Why: a settle lives only in Redis (and its stream) until the sink commits it. If Redis loses its data
        meanwhile (FLUSHALL, a restart without persistence, a failover that lost writes), the usage would be
        lost. So each process watches its own settlements until SQL shows the hold resolved; one that Redis no
        longer shows as settled and SQL has not resolved is applied to SQL directly (idempotent by hold id,
        like the sink's), and the next reconciliation rebuilds the projection around it."""
        cutoff = time.monotonic() - older_than_s
        due = [(hid, u) for hid, u in list(self._unconfirmed.items())[:2000] if u.at < cutoff]
        if not due:
            return 0
        ids = [hid for hid, _ in due]
        h = t.holds.c
        states: dict[str, str] = dict(await self.sql.read(lambda conn: conn.execute(
            select(h.id, h.state).where(h.id.in_(ids))).all()))
        reapplied = 0
        for hold_id, _ in due:
            if states.get(hold_id) in ("captured", "voided"):
                self._unconfirmed.pop(hold_id, None)
        due = [(hid, u) for hid, u in due if states.get(hid) not in ("captured", "voided")]
        if not due:
            return 0
        # The rest are asked of Redis in one round trip (one by one, a sink behind by a few thousand
        # settlements spent its time here instead of draining).
        pipe = self.redis.pipeline(transaction=False)
        for hold_id, u in due:
            pipe.hget(self.keys.hold(u.wallet, hold_id), "st")
        in_redis_all: list[Any] = await self.redis_call(pipe.execute())
        for (hold_id, u), in_redis in zip(due, in_redis_all, strict=True):
            state = states.get(hold_id)
            if in_redis in ("captured", "voided"):
                continue  # still on its way through the stream
            if state is None:
                if u.known is None:
                    log.error("settlement of %s was lost with Redis data and its hold is unknown here", hold_id)
                    self._unconfirmed.pop(hold_id, None)
                    continue
                await self.sql.reserve(u.wallet.mode, u.wallet.customer_id, u.wallet.asset, u.known.amount,
                                       hold_id=hold_id, ttl_ms=max(1, u.known.expires_at_ms - u.known.created_at_ms),
                                       overdraw=True)
            await self.sql.settle(hold_id, u.charged, u.usage, overdraw=True)
            if u.written_off and u.usage is not None:
                from metergate.wallet.redis.sink import record_write_off

                await self.sql.write(record_write_off, u.usage.id, u.written_off)
            log.warning("settlement of %s was lost with Redis data; applied to the ledger directly", hold_id)
            self._unconfirmed.pop(hold_id, None)
            reapplied += 1
        return reapplied

    async def _settle_stale(self, w: WalletRef, hold_id: str, amount: int, usage: UsageRecord | None) -> Settlement:
        """Settle a hold that outlived a loss of Redis data (see scripts.py: epochs): the wallet's projection
        does not count it, so the ledger answers — a replay if it resolved the hold, else the ledger settles
        it and the projection is reloaded around the change."""
        hold = await self.sql.get_hold(hold_id)
        if hold is not None and hold.state != "pending":
            return await self._settled_in_sql(hold_id, amount)
        settlement = await self.sql.settle(hold_id, amount, usage)
        await self.reload(w.mode, w.customer_id, w.asset)
        return settlement

    async def _settled_in_sql(self, hold_id: str, amount: int) -> Settlement:
        """A settle replayed after Redis forgot the hold: the ledger's answer."""
        hold = await self.sql.get_hold(hold_id)
        if hold is None or hold.state == "pending":
            raise HoldNotFound(hold_id)
        balance = await self.balance(hold.mode, hold.customer_id, hold.asset)
        return Settlement(hold_id, hold.captured_amount, max(0, amount - hold.captured_amount), balance,
                          replayed=True)

    async def extend_hold(self, hold_id: str, amount: int, *, step: int, ttl_ms: int) -> Hold:
        assert 0 < amount <= MAX_AMOUNT, "an extension must be positive"
        w = await self._locate(hold_id)
        if w is None:
            raise HoldNotFound(hold_id)
        keys = self.keys.hot(w, hold_id)
        adopted = False
        for _ in range(20):
            r = await self.script("EXTEND", keys, [hold_id, amount, step, ttl_ms, now_ms()])
            status = r[0]
            if status == "not_loaded":
                await self.rebuild(w)
                continue
            if status == "stale":
                raise HoldNotFound(hold_id)  # it outlived a loss of Redis data: no longer extendable
            if status == "not_found":
                if not adopted and await self._adopt(w, hold_id):
                    adopted = True
                    continue
                raise HoldNotFound(hold_id)
            if status == "insufficient":
                raise InsufficientFunds(asset=w.asset, available=int(r[1]), required=amount)
            hold = Hold(hold_id, w.mode, w.customer_id, w.asset, int(r[1]), r[2], int(r[3]), int(r[4]), int(r[5]))
            known = self._known.get(hold_id)
            if known is not None:
                known.amount, known.expires_at_ms = hold.amount, hold.expires_at_ms
            return hold
        raise WalletUnavailable("The wallet is being rebuilt; retry shortly.", code="wallet_unavailable")

    async def expire_holds(self, *, now_ms: int, limit: int = 500) -> int:
        """Expire the holds past their expiry on every shard; each expiry is one idempotent script, so
        every replica may sweep at once."""
        expired = 0
        for shard in range(self.keys.shards):
            zkey = self.keys.expiry(shard)
            ids: list[str] = await self.redis_call(
                self.redis.zrangebyscore(zkey, "-inf", f"({now_ms}", start=0, num=limit))
            for hold_id in ids:
                hkey = self.keys.hold_in(shard, hold_id)
                mode, customer_id, asset = await self.redis_call(
                    self.redis.hmget(hkey, "m", "cu", "a"))
                if mode is None:
                    await self.redis_call(self.redis.zrem(zkey, hold_id))
                    continue
                w = WalletRef(mode, customer_id, asset)
                for _ in range(3):
                    done = int(await self.script("EXPIRE", self.keys.hot(w, hold_id),
                                                 [hold_id, now_ms, self._retention_ms]))
                    if done != -1:
                        break
                    await self.rebuild(w)
                if done == 1:
                    expired += 1
                    self._known.pop(hold_id, None)
        return expired

    # ------------------------------------------------------------------ reads

    async def balances(self, mode: Mode, customer_id: str) -> list[Balance]:
        out = []
        for b in await self.sql.balances(mode, customer_id):
            try:
                live = await self.projection(WalletRef(mode, customer_id, b.asset))
            except WalletUnavailable:
                live = None
            out.append(live or b)
        return out

    async def balance(self, mode: Mode, customer_id: str, asset: str) -> Balance:
        try:
            live = await self.projection(WalletRef(mode, customer_id, asset))
        except WalletUnavailable:
            live = None
        return live or await self.sql.balance(mode, customer_id, asset)

    async def get_hold(self, hold_id: str) -> Hold | None:
        w = await self._locate(hold_id)
        if w is not None:
            hkey = self.keys.hold(w, hold_id)
            try:
                h = await self.redis_call(self.redis.hmget(hkey, "amt", "st", "exp", "cr", "cap", "e"))
                epoch = await self.redis_call(self.redis.hget(self.keys.wallet(w)[0], "e"))
            except WalletUnavailable:
                h, epoch = [None], None
            stale = h[0] is not None and h[1] == "pending" and (h[5] or "") != (epoch or "")
            if h[0] is not None and not stale:
                return Hold(hold_id, w.mode, w.customer_id, w.asset, int(h[0]), h[1], int(h[2]), int(h[3]), int(h[4]))
        return await self.sql.get_hold(hold_id)

    async def ledger(self, mode: Mode, customer_id: str, *, limit: int,
                     before: int | None = None) -> list[LedgerEntry]:
        return await self.sql.ledger(mode, customer_id, limit=limit, before=before)

    async def usage(self, mode: Mode, customer_id: str, *, limit: int,
                    before: int | None = None) -> list[tuple[int, UsageRecord]]:
        return await self.sql.usage(mode, customer_id, limit=limit, before=before)

    async def audit(self) -> list[str]:
        """The ledger's own invariants (see :meth:`SqlWalletStore.audit`); the projection is compared with the
        ledger by :func:`metergate.wallet.redis.reconcile.reconcile`."""
        return await self.sql.audit()

    # ------------------------------------------------------------------ reports (SQL) and rate limits

    async def usage_summary(self, mode: Mode, *, group_by: UsageGrouping, from_ms: int, to_ms: int,
                            limit: int) -> list[UsageAggregate]:
        return await self.sql.usage_summary(mode, group_by=group_by, from_ms=from_ms, to_ms=to_ms, limit=limit)

    async def rate_limit_overrides(self) -> list[RateLimitOverride]:
        return await self.sql.rate_limit_overrides()

    async def set_rate_limit_override(self, mode: Mode, customer_id: str, *, requests_per_minute: int | None,
                                      tokens_per_minute: int | None) -> RateLimitOverride:
        return await self.sql.set_rate_limit_override(mode, customer_id, requests_per_minute=requests_per_minute,
                                                      tokens_per_minute=tokens_per_minute)

    async def delete_rate_limit_override(self, mode: Mode, customer_id: str) -> bool:
        return await self.sql.delete_rate_limit_override(mode, customer_id)

    async def prune_rate_limit_windows(self, *, before_ms: int) -> int:
        """Windows in Redis expire by themselves; this prunes the SQL store's (left by an SQL-only run)."""
        return await self.sql.prune_rate_limit_windows(before_ms=before_ms)


__all__ = ["REDIS_DOWN", "KeySpace", "RedisWalletStore", "WalletRef", "WalletUnavailable", "connect"]
