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
* **Batches, in parallel per hold.** A batch's events are grouped by hold, each group applied in order,
  the groups concurrently (SQLite group-commits them; PostgreSQL spreads them over its pool).
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

from sqlalchemy import Connection, update

from metergate.wallet import schema as t
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


def _record_write_off(conn: Connection, usage_id: str, written_off: int) -> None:
    """The SQL settle, replaying an admitted capture, records no write-off; Redis decided one: keep it."""
    u = t.usage_records.c
    conn.execute(update(t.usage_records).where(u.id == usage_id).values(written_off_amount=written_off))


# The longest wait between two attempts while SQL (or Redis) fails. An attempt costs one failed connection, and
# every second of wait after the database is back is a second more of backlog and of 503 ``ledger_backlog``:
# with 5 s here, a 60 s PostgreSQL outage took 6.1 s to recover from (tests/redis/test_pg_outage.py).
MAX_BACKOFF_S = 1.0


class LedgerSink:
    def __init__(self, store: RedisWalletStore, *, batch: int = 256, lease_ms: int = 5_000,
                 idle_s: float = 0.02, reconcile_interval_s: float = 30.0) -> None:
        self.store = store
        self.batch = batch
        self.lease_ms = lease_ms
        self.idle_s = idle_s
        self.applied = 0
        self.failures = 0
        self._groups: set[str] = set()
        self.stopping = False
        self.reconcile_interval_s = reconcile_interval_s
        self.repaired = 0
        self._next_reconcile = time.monotonic() + reconcile_interval_s
        self._next_confirm = 0.0

    async def run(self) -> None:
        """Forever: drain every shard this replica can lease; back off while SQL or Redis fails."""
        backoff = 0.0
        while not self.stopping:
            try:
                moved = 0
                for shard in range(self.store.keys.shards):
                    if not self.stopping and await self._lease(shard):
                        moved += await self.drain_shard(shard)
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

    async def _lease(self, shard: int) -> bool:
        got = await self.store.script("LEASE", [self.store.keys.lease(shard)], [self.store.consumer, self.lease_ms])
        return bool(int(got))

    async def _ensure_group(self, stream: str) -> None:
        if stream in self._groups:
            return
        try:
            await self.store.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(stream)

    async def drain_shard(self, shard: int) -> int:
        """Apply one batch of the shard's stream to SQL; how many entries were committed and acknowledged.
        Raises if some could not be applied (they stay pending, retried first next time)."""
        stream = self.store.keys.stream(shard)
        r = self.store.redis
        await self._ensure_group(stream)
        try:
            claimed = await r.xautoclaim(stream, GROUP, self.store.consumer, min_idle_time=0, start_id="0-0",
                                         count=self.batch)
            entries: list[tuple[str, dict[str, str]]] = claimed[1]
            if not entries:
                read = await r.xreadgroup(GROUP, self.store.consumer, {stream: ">"}, count=self.batch)
                entries = read[0][1] if read else []
        except Exception as exc:
            if "NOGROUP" in str(exc):  # the stream was flushed away: recreate the group next time
                self._groups.discard(stream)
                return 0
            raise
        entries = [(eid, fields) for eid, fields in entries if fields]
        if not entries:
            return 0
        chains: dict[str, list[tuple[str, dict[str, str]]]] = defaultdict(list)
        for eid, fields in entries:
            chains[fields["h"]].append((eid, fields))
        results = await asyncio.gather(*(self._apply_chain(chain) for chain in chains.values()),
                                       return_exceptions=True)
        done: list[tuple[str, dict[str, str]]] = []
        error: BaseException | None = None
        for result in results:
            if isinstance(result, BaseException):
                error = result
            else:
                done.extend(result)
        if done:
            keys = [stream] + [self.store.keys.unapplied(_wallet(fields)) for _, fields in done]
            await self.store.script("ACK", keys, [GROUP, *(eid for eid, _ in done)])
            self.applied += len(done)
        if error is not None:
            raise error
        return len(done)

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
        if kind == "hold":
            await sql.reserve(f["m"], f["cu"], f["a"], int(f["amt"]), hold_id=hold_id,  # type: ignore[arg-type]
                              ttl_ms=int(f["ttl"]), overdraw=True)
        elif kind == "extend":
            await sql.extend_hold(hold_id, int(f["amt"]), step=int(f["step"]), ttl_ms=int(f["ttl"]), overdraw=True)
        elif kind == "settle":
            usage = UsageRecord(**json.loads(f["usage"])) if f.get("usage") else None
            await sql.settle(hold_id, int(f["amt"]), usage, overdraw=True)
            written_off = int(f.get("wo") or 0)
            if written_off and usage is not None:
                await sql.write(_record_write_off, usage.id, written_off)
        elif kind == "expire":
            # At the sink's clock, not Redis's decision time ``at``: the SQL hold (and its grant allocations)
            # were written at the sink's clock, and a grant must not look "not yet live" to its own hold.
            await sql.write(_expire_hold, hold_id, max(int(f["at"]), now_ms()))
        else:
            log.error("ledger sink: unknown event %r, skipped", kind)


def _wallet(fields: dict[str, str]) -> Any:
    from metergate.wallet.redis.store import WalletRef

    return WalletRef(fields["m"], fields["cu"], fields["a"])  # type: ignore[arg-type]


__all__ = ["GROUP", "LedgerSink"]
