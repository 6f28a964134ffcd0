"""Drain the Redis wallet's event streams into the SQL ledger, exactly once in effect.

Why this shape:

* **One drainer per shard at a time, any replica.** A shard's lease (``SET PX``, renewed while held) picks
  the replica that drains it; every replica runs a sink, so a dead one's shards move to another within a
  lease period. Events of one hold must reach SQL in order (hold, extend, settle/expire); one drainer per
  shard keeps stream order.
* **Consumer group, XACK after commit.** Entries are read with ``XREADGROUP`` into the shard's group and
  acknowledged only after their SQL transaction committed. A drainer first takes over every pending entry
  (``XAUTOCLAIM`` from idle 0: it holds the lease, so whoever read them before is gone or has lost it) and
  reads new entries only when none is pending, so a failed entry is retried before anything after it.
* **Idempotent on replay.** Every SQL write is keyed: holds by hold id, extensions by step, settles by
  hold, expiries by hold (:func:`_expire_hold` below). A batch re-applied after a crash between commit and
  XACK changes nothing.
* **A stream batch is one group commit.** A batch's holds and settles are submitted to the SQL store's group
  commit together, in stream order, so the batch engine decides them in one transaction, in order: a hold
  and its settle read in the same batch cost one commit, not two awaited one after the other, and are
  ledgered exactly as if they had come in two batches (``tests/redis/test_sink.py``). Per-hold order holds
  because an event is decided only after the ones before it: when the engine hands an event to the
  per-operation path (it runs after the batch), a later event of the same hold that did not find it is
  applied again after it. Chains with an extension (rare) still run one event at a time. Redis's write-offs
  and the expiries follow in one more transaction; the XACK comes after all of them.
* **Cheap turns.** Leases are renewed concurrently (one round trip a turn, not one per shard) and at most
  every ``RENEW_S``; an empty shard is read again after ``idle_s``, not on every turn of a busy one; a shard
  known to have nothing pending is read with ``XREADGROUP`` alone (``XAUTOCLAIM`` after a takeover or a
  failure); a shard's read grows (up to ``BATCH_GROWTH`` times ``batch``) while its backlog fills whole
  batches, and the next read overlaps the SQL commit of the current batch (it takes only new entries, and
  on a failure they are simply pending, reclaimed in order next turn). Why: the sink shares its event loop
  with admission, so every sequential round trip of a turn waits behind the request handlers; with one
  round trip per shard per turn, two commits per hold, and the watch on this process's own settlements
  (``confirm_settlements``, now one pipelined round trip) asking Redis about each in turn, a hot wallet's
  drain ran at a third of its admission.
* **SQL down.** A failed group stays pending; the drainer backs off (up to 5 s) and retries. Nothing is held
  in this process: the stream in Redis is the buffer, bounded by the store's ``max_backlog``.
* **Acked entries are deleted** (``XDEL``) and counted off their wallet's unapplied counter in the same
  script, so the stream holds exactly what SQL lacks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, bindparam, update

from metergate.wallet import schema as t
from metergate.wallet.errors import HoldNotFound
from metergate.wallet.holdops import expire_in
from metergate.wallet.models import Hold, UsageRecord, now_ms

if TYPE_CHECKING:
    from metergate.wallet.redis.store import RedisWalletStore

log = logging.getLogger(__name__)
GROUP = "ledger"


def _expire_hold(conn: Connection, hold_id: str, at_ms: int) -> bool:
    """Expire one named hold in SQL exactly as the SQL store's sweeper does (its conditional UPDATE, then
    :func:`metergate.wallet.holdops.expire_in`); a no-op unless the hold is pending. The SQL sweeper picks
    holds by its own clock; here Redis decided the expiry, of this hold."""
    h = t.holds.c
    row = conn.execute(update(t.holds).where(h.id == hold_id, h.state == "pending").values(
        state="expired", resolved_at_ms=at_ms).returning(*t.holds.c)).first()
    if row is None:
        return False
    expire_in(conn, Hold(id=row.id, mode=row.mode, customer_id=row.customer_id, asset=row.asset,
                         amount=int(row.amount), state="expired", expires_at_ms=int(row.expires_at_ms),
                         created_at_ms=int(row.created_at_ms), captured_amount=int(row.captured_amount)), at_ms)
    return True


def record_write_off(conn: Connection, usage_id: str, written_off: int) -> None:
    """The SQL settle, replaying an admitted capture, records no write-off; Redis decided one: keep it."""
    u = t.usage_records.c
    conn.execute(update(t.usage_records).where(u.id == usage_id).values(written_off_amount=written_off))


# The longest wait between two attempts while SQL (or Redis) fails. An attempt costs one failed connection, and
# every second of wait after the database is back is a second more of backlog and of 503 ``ledger_backlog``:
# with 5 s here, a 60 s PostgreSQL outage took 6.1 s to recover from (tests/redis/test_pg_outage.py).
MAX_BACKOFF_S = 1.0
# How long a held lease is trusted without asking Redis again (a lease lasts ``lease_ms``, seconds): short, so
# that after a flush or a restart of Redis (every lease gone at once) two replicas never drain one shard for
# longer than this plus a batch; long enough that a busy drain does not renew on each of its turns.
RENEW_S = 0.05
# At most this long on one shard's backlog before the sink's loop turns again (the other shards, the watch on
# this process's settlements).
TURN_S = 0.25
# A shard's reads grow up to this many times ``batch`` while its backlog fills them (and shrink back after).
BATCH_GROWTH = 8


class LedgerSink:
    def __init__(self, store: RedisWalletStore, *, batch: int = 256, lease_ms: int = 5_000,
                 idle_s: float = 0.02, reconcile_interval_s: float = 30.0) -> None:
        self.store = store
        self.batch = batch
        self.max_batch = batch * BATCH_GROWTH
        self.lease_ms = lease_ms
        self.idle_s = idle_s
        self.applied = 0
        self.failures = 0
        self.batches = 0  # stream batches committed and acknowledged (for the benchmarks and tests)
        self._groups: set[str] = set()
        self.stopping = False
        self.reconcile_interval_s = reconcile_interval_s
        self.repaired = 0
        self._next_reconcile = time.monotonic() + reconcile_interval_s
        self._next_confirm = 0.0
        self._leased: dict[int, float] = {}  # shard -> when our last LEASE of it succeeded
        self._tried: dict[int, float] = {}  # shard -> when we last tried a lease another replica held
        self._clean: set[int] = set()  # shards whose pending list we know to be empty (no XAUTOCLAIM needed)
        self._count: dict[int, int] = {}  # shard -> the next read's COUNT (adapts to the backlog)
        self._quiet_until: dict[int, float] = {}  # shard -> not read before then (it was empty)
        self._stash: dict[int, list[tuple[str, dict[str, str]]]] = {}  # read ahead, applied first next turn

    async def run(self) -> None:
        """Forever: drain every shard this replica can lease; back off while SQL or Redis fails."""
        backoff = 0.0
        while not self.stopping:
            try:
                held = await self._leases()
                results = await asyncio.gather(*(self.drain_shard(shard) for shard in held),
                                               return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    raise errors[0]
                moved = sum(r for r in results if isinstance(r, int))
                backoff = 0.0
                if time.monotonic() >= self._next_confirm:
                    self._next_confirm = time.monotonic() + 0.5
                    await self.store.confirm_settlements()
                if time.monotonic() >= self._next_reconcile:
                    self._next_reconcile = time.monotonic() + self.reconcile_interval_s
                    if await self._lease(0):  # one replica at a time reconciles (shard 0's drainer)
                        await self._reconcile()
                if not moved:
                    await asyncio.sleep(self.idle_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                self._clean.clear()
                self._stash.clear()
                backoff = min(MAX_BACKOFF_S, max(0.05, backoff * 2))
                log.warning("ledger sink: %s; retrying in %.2f s", exc, backoff)
                await asyncio.sleep(backoff)

    async def _reconcile(self) -> None:
        """Compare every wallet with the ledger and rebuild the drifting ones (a flush racing a batch, a credit
        whose projection update failed, a grant change made in SQL)."""
        from metergate.wallet.redis.reconcile import reconcile

        for row in await reconcile(self.store, repair=True):
            if row.status == "repaired":
                self.repaired += 1
                log.warning("reconciliation: rebuilt %s:%s:%s, projection %s != ledger %s", row.mode,
                            row.customer_id, row.asset, row.redis, row.ledger)

    async def _leases(self) -> list[int]:
        """The shards this replica may drain now. A lease it holds is renewed once ``RENEW_S`` has passed since
        the last renewal (a flush or a restart of Redis frees every lease at once, so a held lease is not
        trusted for longer than that: a shard must not have two drainers for more than a batch), a shard
        another replica holds is asked for again after a tenth of a lease. The asks run concurrently: one
        round trip per turn, not one per shard; and a busy turn, which lasts a batch's commit, asks nothing."""
        now = time.monotonic()
        retry_s = min(0.2, self.lease_ms / 10_000)
        held, ask = [], []
        for shard in range(self.store.keys.shards):
            if now - self._leased.get(shard, -1e9) < RENEW_S:
                held.append(shard)
            elif shard in self._leased or now - self._tried.get(shard, -1e9) >= retry_s:
                ask.append(shard)
        got = await asyncio.gather(*(self._lease(shard) for shard in ask))
        held += [shard for shard, ok in zip(ask, got, strict=True) if ok]
        # A shard found empty is read again after ``idle_s``, not on every turn of a busy shard's drain.
        return sorted(shard for shard in held if now >= self._quiet_until.get(shard, 0.0))

    async def _lease(self, shard: int) -> bool:
        asked = time.monotonic()
        got = bool(int(await self.store.script("LEASE", [self.store.keys.lease(shard)],
                                               [self.store.consumer, self.lease_ms])))
        if got:
            if shard not in self._leased:
                self._clean.discard(shard)  # taken over: whoever drained it before may have left entries pending
            self._leased[shard] = asked
        else:
            self._leased.pop(shard, None)
            self._clean.discard(shard)
            self._stash.pop(shard, None)
            self._tried[shard] = asked
        return got

    async def _ensure_group(self, stream: str) -> None:
        if stream in self._groups:
            return
        try:
            await self.store.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(stream)

    async def _read(self, shard: int, *, new_only: bool = False) -> list[tuple[str, dict[str, str]]]:
        """The next entries to apply: the pending ones first (``XAUTOCLAIM``) unless the shard is known clean,
        else new ones (``XREADGROUP``). ``new_only``: a read ahead, made while the previous batch commits."""
        stream = self.store.keys.stream(shard)
        r = self.store.redis
        count = self._count.get(shard, self.batch)
        await self._ensure_group(stream)
        try:
            entries: list[tuple[str, dict[str, str]]] = []
            stashed = None if new_only else self._stash.pop(shard, None)
            if stashed and shard in self._clean:
                return stashed
            if not new_only and shard not in self._clean:
                claimed = await self.store.redis_call(r.xautoclaim(
                    stream, GROUP, self.store.consumer, min_idle_time=0, start_id="0-0", count=count))
                entries = claimed[1]
                if not entries:
                    self._clean.add(shard)
            if not entries:
                read = await self.store.redis_call(r.xreadgroup(GROUP, self.store.consumer, {stream: ">"},
                                                                 count=count))
                entries = read[0][1] if read else []
        except Exception as exc:
            if "NOGROUP" in str(exc):  # the stream was flushed away: recreate the group next time
                self._groups.discard(stream)
                return []
            raise
        return [(eid, fields) for eid, fields in entries if fields]

    async def _read_ahead(self, shard: int) -> tuple[list[tuple[str, dict[str, str]]], bool]:
        """The next new entries, read while the current batch commits, and whether the lease is still ours
        (renewed alongside once ``RENEW_S`` has passed: a long drain keeps checking that it is the only one)."""
        if time.monotonic() - self._leased.get(shard, -1e9) < RENEW_S:
            return await self._read(shard, new_only=True), True
        entries, ours = await asyncio.gather(self._read(shard, new_only=True), self._lease(shard))
        return entries, ours

    def _adapt(self, shard: int, read: int, ok: bool) -> None:
        """Grow the shard's next read while its backlog fills whole batches that commit, shrink it back once
        it does not; a failing shard goes back to ``batch`` (while SQL is down, each failed batch costs one
        attempt per event)."""
        count = self._count.get(shard, self.batch)
        self._count[shard] = self.batch if not ok else min(self.max_batch, count * 2) if read >= count else \
            max(self.batch, count // 2)

    async def drain_shard(self, shard: int) -> int:
        """Apply the shard's stream to SQL, batch after batch while its backlog lasts (each batch's next read
        overlapping its SQL commit); how many entries were committed and acknowledged. Raises if some could
        not be applied (they stay pending, retried first next time)."""
        moved, started = 0, time.monotonic()
        entries = await self._read(shard)
        if not entries:
            self._quiet_until[shard] = time.monotonic() + self.idle_s
        while entries:
            # Read ahead while this batch commits; only from a clean shard (else the pending ones come first)
            # and only when the backlog is likely to fill it.
            ahead = asyncio.ensure_future(self._read_ahead(shard)) \
                if shard in self._clean and len(entries) >= self.batch else None
            try:
                moved += await self._apply_batch(shard, entries)
                self._adapt(shard, len(entries), True)
            except BaseException:
                self._adapt(shard, len(entries), False)
                self._clean.discard(shard)  # what the read ahead took is pending now: reclaimed in order next time
                if ahead is not None:
                    await asyncio.gather(ahead, return_exceptions=True)
                raise
            if ahead is None:
                break
            entries, ours = await ahead
            if not ours:
                break  # the lease went to another replica: what the read ahead took, it claims
            if self.stopping or time.monotonic() - started >= TURN_S:
                # Let run() turn (the other shards, the settlement watch): the entries read ahead come first
                # next turn (pending under this consumer, and in ``_stash`` meanwhile).
                if entries:
                    self._stash[shard] = entries
                break
        return moved

    async def _apply_batch(self, shard: int, entries: list[tuple[str, dict[str, str]]]) -> int:
        chains: dict[str, list[tuple[str, dict[str, str]]]] = defaultdict(list)
        for eid, fields in entries:
            chains[fields["h"]].append((eid, fields))
        done, error = await self._apply_chains(list(chains.values()))
        if done:
            stream = self.store.keys.stream(shard)
            keys = [stream] + [self.store.keys.unapplied(_wallet(fields)) for _, fields in done]
            await self.store.script("ACK", keys, [GROUP, *(eid for eid, _ in done)])
            self.applied += len(done)
            self.batches += 1
        if error is not None:
            raise error
        return len(done)

    async def _apply_chains(self, chains: list[list[tuple[str, dict[str, str]]]]) \
            -> tuple[list[tuple[str, dict[str, str]]], BaseException | None]:
        """Apply a batch's chains (one per hold, in stream order); the entries applied and the first error.

        The hot events (holds, settles) of every chain are submitted to the ledger's group commit at once, in
        stream order, so a hold and its settle normally share one transaction, decided in order by the batch
        engine (the settle sees the hold it follows). A chain whose event failed there is applied again from
        that event on, one event after the other (the event may have failed only because the one before it
        went through the per-operation path, after the batch); if it fails again, the chain's prefix counts as
        applied and the rest stays pending. Extensions are rare: their chains run one event at a time, as
        before. Expiries and Redis's write-offs follow in one more transaction."""
        slow = [c for c in chains if any(f["t"] not in _FAST for _, f in c)]
        fast = [c for c in chains if all(f["t"] in _FAST for _, f in c)]
        slow_task = asyncio.gather(*(self._apply_chain(c) for c in slow), return_exceptions=True) if slow else None
        done: list[tuple[str, dict[str, str]]] = []
        error: BaseException | None = None
        if fast:
            # Hot events, in stream order across chains (each chain's own events stay in order).
            hot = sorted(((eid, i, j) for i, c in enumerate(fast) for j, (eid, f) in enumerate(c)
                          if f["t"] != "expire"), key=lambda x: _order(x[0]))
            futures = {(i, j): asyncio.ensure_future(self._apply_hot(fast[i][j][1])) for _, i, j in hot}
            await asyncio.gather(*futures.values(), return_exceptions=True)
            finals: list[tuple[str, dict[str, str]]] = []  # expiries and write-offs still to write
            settled = await asyncio.gather(*(self._settle_chain(chain, [futures.get((i, j)) for j in range(len(chain))])
                                             for i, chain in enumerate(fast)))
            for applied in settled:
                for eid, f in applied[0]:
                    (finals if f["t"] == "expire" or (f["t"] == "settle" and int(f.get("wo") or 0)) else done)\
                        .append((eid, f))
                error = error or applied[1]
            if finals:
                try:
                    await self.store.sql.write(_finish, [f for _, f in finals], now_ms())
                    done.extend(finals)
                except Exception as exc:
                    error = error or exc
        if slow_task is not None:
            for result in await slow_task:
                if isinstance(result, BaseException):
                    error = error or result
                else:
                    done.extend(result)
        return done, error

    async def _settle_chain(self, chain: list[tuple[str, dict[str, str]]],
                            futures: list[asyncio.Future[None] | None]) \
            -> tuple[list[tuple[str, dict[str, str]]], BaseException | None]:
        """One fast chain after its batch: the prefix applied and the error that stopped it. An event that did
        not find its hold although the chain's earlier event went through (that one took the per-operation
        path, which runs after the batch) is applied again, with the rest of the chain, one after the other.
        Expiries are passed through (written by the caller, after the prefix)."""
        applied: list[tuple[str, dict[str, str]]] = []
        for k, ((eid, f), fut) in enumerate(zip(chain, futures, strict=True)):
            if fut is None or fut.exception() is None:
                applied.append((eid, f))
                continue
            exc = fut.exception()
            assert exc is not None
            if k == 0 or not isinstance(exc, HoldNotFound):
                log.warning("ledger sink: event %s of hold %s failed: %s", eid, f["h"], exc)
                return applied, exc
            for eid2, f2 in chain[k:]:
                if f2["t"] == "expire":
                    applied.append((eid2, f2))
                    continue
                try:
                    await self._apply_hot(f2)
                except Exception as exc:
                    log.warning("ledger sink: event %s of hold %s failed: %s", eid2, f2["h"], exc)
                    return applied, exc
                applied.append((eid2, f2))
            break
        return applied, None

    async def _apply_hot(self, f: dict[str, str]) -> None:
        sql = self.store.sql
        if f["t"] == "hold":
            await sql.reserve(f["m"], f["cu"], f["a"], int(f["amt"]), hold_id=f["h"],  # type: ignore[arg-type]
                              ttl_ms=int(f["ttl"]), overdraw=True)
        else:
            usage = UsageRecord(**json.loads(f["usage"])) if f.get("usage") else None
            await sql.settle(f["h"], int(f["amt"]), usage, overdraw=True)

    async def _apply_chain(self, chain: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
        """Apply one hold's events in stream order; the ones applied (all, or raise after a prefix)."""
        applied: list[tuple[str, dict[str, str]]] = []
        for eid, fields in chain:
            try:
                await self._apply(fields)
            except Exception as exc:
                if applied:
                    exc.add_note(f"{len(applied)} earlier events of hold {fields['h']} were applied")
                    # Keep what committed: acknowledge the prefix, leave the rest pending.
                    log.warning("ledger sink: event %s of hold %s failed: %s", eid, fields["h"], exc)
                    return applied
                raise
            applied.append((eid, fields))
        return applied

    async def _apply(self, f: dict[str, str]) -> None:
        sql = self.store.sql
        kind, hold_id = f["t"], f["h"]
        if kind in ("hold", "settle"):
            await self._apply_hot(f)
            if kind == "settle":
                written_off = int(f.get("wo") or 0)
                if written_off and f.get("usage"):
                    await sql.write(record_write_off, json.loads(f["usage"])["id"], written_off)
        elif kind == "extend":
            await sql.extend_hold(hold_id, int(f["amt"]), step=int(f["step"]), ttl_ms=int(f["ttl"]), overdraw=True)
        elif kind == "expire":
            # At the sink's clock, not Redis's decision time ``at``: the SQL hold (and its grant allocations)
            # were written at the sink's clock, and a grant must not look "not yet live" to its own hold.
            await sql.write(_expire_hold, hold_id, max(int(f["at"]), now_ms()))
        else:
            log.error("ledger sink: unknown event %r, skipped", kind)


# Events whose chains go through one batch: holds and settles (the batch engine's), expiries (written after).
_FAST = frozenset({"hold", "settle", "expire"})


def _order(eid: str) -> tuple[int, int]:
    ms, _, seq = eid.partition("-")
    return int(ms), int(seq or 0)


def _finish(conn: Connection, events: list[dict[str, str]], now: int) -> None:
    """A batch's expiries and Redis's write-offs, in one transaction: each idempotent (see the module docs)."""
    u = t.usage_records.c
    offs = [{"uid": json.loads(f["usage"])["id"], "wo": int(f["wo"])} for f in events
            if f["t"] == "settle" and f.get("usage")]
    if offs:
        conn.execute(update(t.usage_records).where(u.id == bindparam("uid")).values(
            written_off_amount=bindparam("wo")), offs)
    for f in events:
        if f["t"] == "expire":
            _expire_hold(conn, f["h"], max(int(f["at"]), now))


def _wallet(fields: dict[str, str]) -> Any:
    from metergate.wallet.redis.keyspace import WalletRef

    return WalletRef(fields["m"], fields["cu"], fields["a"])  # type: ignore[arg-type]


__all__ = ["GROUP", "LedgerSink"]
