"""Escrow leases: a hot wallet admitted in memory, against a durable hold this process owns.

Why: on a hot wallet every request made two round trips to the shared store (hold, then settle), each a write
of the shared account row; under many replicas the row's lock, and under one the writer's per-operation cost,
capped the rate. With a lease (O'Neil's escrow method), a process holds one durable hold on the wallet — sized
from the wallet's recent spend rate and a share of what it has available — and admits each request against it
in memory. A request then costs the shared store one write, its settlement (a capture from the lease that keeps
the lease open, with the request's usage record and its own ledger key), batched with the others by the group
commit. The hold is in memory only: nothing of a request is durable until its settlement is.

Rules, each a property the tests check:

* **No overspend.** A request is admitted only if the lease's free part covers it; the lease is a hold, so
  the wallet has reserved it. A capture beyond the lease (a request that cost more than its estimate) draws
  the wallet like any capture beyond its hold does: as far as the wallet covers, the rest written off.
* **Nothing lost.** A settlement is acknowledged only once its capture has committed. A process that dies
  leaves its leases to expire (their TTL, kept alive by this process's heartbeat); what they captured is what
  the committed settlements say, and the sweeper releases the rest. A settlement that fails is put back, so
  that the caller's retry finds the request's hold where it was.
* **Leases never starve a fundable request.** Only hot wallets are leased (``hot_per_s`` reserves a second
  seen here), a lease is at most ``1/share`` of what the wallet has available, and one that would cover fewer
  than ``min_requests`` requests is not taken: a small wallet is served hold by hold from the shared store, as
  without leases. When the shared store refuses a request and leases are outstanding on that wallet, this
  process retires its own lease and recalls the others' (a row in ``lease_recalls``, read by every lease
  holder's heartbeat); their owners stop admitting and return them once their requests in flight settle, and the
  refused request is tried again when the funds are back, for at most ``recall_wait_s``.
* **Leases shrink in place.** What a lease holds free beyond its need goes back to the shared store at once,
  without waiting for the lease's requests to settle, by one idempotent store operation (``shrink_hold``):
  a retiring lease (recalled, idle, replaced, too large for the wallet) keeps only what its requests in flight
  hold; an active one whose free part is well above its target (:mod:`metergate.wallet.escrowpolicy`: the
  spend rate dropped, or the wallet's free balance fell) keeps its target. The lease counts a shrink before
  the store has it, so that it never admits against funds it is giving back.
* **Idempotent.** A request's settlement carries its own key (``settle:<hold id>``), whichever path settles it.

What a lease trades: a request admitted here is not visible as a hold of its own in the shared store (the
lease is), and a replayed ``reserve`` of a request already settled is admitted again (its settlement's key
still prevents a second charge).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import replace

from metergate.wallet.errors import (
    HoldNotFound,
    HoldNotPending,
    IdempotencyConflict,
    InsufficientFunds,
    log_retrying,
)
from metergate.wallet.escrowlease import AccountKey, Lease, LeaseBackend, LocalHold
from metergate.wallet.escrowpolicy import EscrowPolicy, Heat, excess, target, worth_leasing
from metergate.wallet.models import Balance, Hold, Mode, Settlement, UsageRecord, now_ms

log = logging.getLogger(__name__)

SETTLED_KEPT = 10_000  # how many settled requests a replayed settle is recognised for


class Escrow:
    """Admission against leases, in front of the durable store: ``reserve``, ``extend_hold`` and ``settle``
    with the store's own signatures and contract, falling through to the store for what is not leased."""

    def __init__(self, store: LeaseBackend, policy: EscrowPolicy | None = None, *, owner: str | None = None) -> None:
        self.store = store
        self.policy = policy or EscrowPolicy()
        self.owner = owner or f"{os.getpid()}{secrets.token_hex(4)}"
        self._ids = itertools.count(1)
        self._leases: dict[AccountKey, Lease] = {}
        self._retired: list[Lease] = []  # retiring leases replaced by a newer one, still to be returned
        self._local: dict[str, LocalHold] = {}
        # Requests whose hold expired unsettled (their settlement was late: the store was down, say): a late
        # settle still captures what they used, as a capture beyond a hold of nothing, as for a durable hold.
        self._expired: collections.OrderedDict[str, LocalHold] = collections.OrderedDict()
        self._locks: dict[AccountKey, asyncio.Lock] = {}
        self._balances: dict[AccountKey, tuple[Balance, float]] = {}  # as last seen, and when (monotonic)
        # A lease closer than this to its expiry admits nothing more (its renewal is overdue).
        self._margin_ms = int(self.policy.ttl_s * 1000 / 3)
        self._heat: dict[AccountKey, Heat] = {}
        self._cool_until: dict[AccountKey, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._recalling: dict[AccountKey, asyncio.Task[bool]] = {}
        self._recall_need: dict[AccountKey, int] = {}  # the largest refused request waiting on each recall
        self._waiting: dict[AccountKey, int] = {}  # reserves waiting for a top-up, by wallet
        # Recently settled local holds -> their lease, for replays; bounded, oldest dropped first (an OrderedDict:
        # a plain dict's first key is found by scanning past every deleted one).
        self._settled: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._ticker: asyncio.Task[None] | None = None
        self.stats = {"leases": 0, "topups": 0, "local": 0, "durable": 0, "recalls": 0, "returned": 0,
                      "shrinks": 0}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_forever(), name="mg-escrow")

    async def close(self) -> None:
        """Return every lease (the caller has let its requests finish); a lease that cannot be returned now
        expires by its TTL."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        await self.quiesce()
        for lease in [*self._leases.values(), *self._retired]:
            lease.retiring = True
            with contextlib.suppress(Exception):
                await lease.give_back(self.store)
                self.stats["returned"] += 1
        self._leases.clear()
        self._retired.clear()
        log.info("escrow closed: %s", self.stats)

    async def quiesce(self) -> None:
        """Wait for the top-ups running in the background (tests, and before returning leases)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------------ the store's hot operations

    async def reserve(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                      hold_id: str, ttl_ms: int) -> tuple[Hold, Balance]:
        key = (mode, customer_id, asset)
        found = self._local.get(hold_id)
        if found is not None:
            h = found.hold
            if (h.mode, h.customer_id, h.asset, found.reserved) != (*key, amount):
                raise IdempotencyConflict(f"hold:{hold_id}")
            return h, self._balance_hint(key)
        if amount > 0 and self._hot(key):
            lease = self._leases.get(key)
            for _ in range(3):  # others may take what a top-up brought before this request runs again
                now = now_ms()
                if lease is not None and lease.admits(amount, now, self._margin_ms):
                    return self._admit(lease, key, hold_id, amount, ttl_ms, now)
                self._waiting[key] = self._waiting.get(key, 0) + 1
                try:
                    lease = await self._grow(key, amount)
                finally:
                    self._waiting[key] -= 1
                    if not self._waiting[key]:
                        del self._waiting[key]
                if lease is None or self._cool_until.get(key, 0.0) > time.monotonic():
                    break
        self.stats["durable"] += 1
        try:
            return await self.store.reserve(mode, customer_id, asset, amount, hold_id=hold_id, ttl_ms=ttl_ms)
        except InsufficientFunds:
            # Bring back what sits in leases, then ask once more: also when none was outstanding any more, since
            # a lease may have gone back between the refusal and the recall. A second refusal is the answer.
            await self._recall(key, amount)
            return await self.store.reserve(mode, customer_id, asset, amount, hold_id=hold_id, ttl_ms=ttl_ms)

    async def extend_hold(self, hold_id: str, amount: int, *, step: int | str, ttl_ms: int) -> Hold:
        found = self._local.get(hold_id)
        if found is None:
            return await self.store.extend_hold(hold_id, amount, step=step, ttl_ms=ttl_ms)  # type: ignore[arg-type]
        if found.steps is not None and step in found.steps:
            return found.hold  # this step was applied already
        lease = found.lease
        now = now_ms()
        if not lease.admits(amount, now, self._margin_ms) and not lease.retiring:
            await self._grow(lease.key, amount)
        if lease.retiring or not lease.admits(amount, now_ms(), self._margin_ms):
            raise InsufficientFunds(asset=lease.key[2], available=max(0, lease.free), required=amount)
        lease.local += amount
        h = found.hold
        found.hold = Hold(h.id, h.mode, h.customer_id, h.asset, h.amount + amount, h.state,
                          max(h.expires_at_ms, now + ttl_ms), h.created_at_ms, h.captured_amount)
        if found.steps is None:
            found.steps = set()
        found.steps.add(step)
        return found.hold

    def lease_of(self, hold_id: str) -> tuple[str, int] | None:
        found = self._local.get(hold_id) or self._expired.get(hold_id)
        return None if found is None else (found.lease.hold_id, found.hold.amount)

    async def settle(self, hold_id: str, amount: int, usage: UsageRecord | None = None) -> Settlement:
        found = self._local.pop(hold_id, None) or self._expired.pop(hold_id, None)
        if found is None:
            lease_id = self._settled.get(hold_id)
            if lease_id is not None:  # a replay: the capture's key answers it with the first result
                done = await self.store.capture_usage(lease_id, amount, key=f"settle:{hold_id}", usage=usage)
                return Settlement(hold_id, done.charged, done.written_off, done.balance, replayed=done.replayed)
            return await self.store.settle(hold_id, amount, usage)
        lease = found.lease
        held = found.hold.amount
        lease.local -= held
        lease.captured += amount
        lease.inflight += 1
        lease.used_at = time.monotonic()
        try:
            done = await self.store.capture_usage(lease.hold_id, amount, key=f"settle:{hold_id}", usage=usage,
                                                  held=held)
        except BaseException:
            lease.captured -= amount  # not acknowledged: the request's hold is back for the caller's retry
            lease.local += held
            self._local[hold_id] = found
            raise
        finally:
            lease.inflight -= 1
        lease.captured += done.charged - amount  # what it did not cover was written off, not taken
        # What the store drew beyond the request's share grew the hold (as a delta: answers come in any order, and
        # a shrink makes the hold's amount go down as well as up).
        lease.amount += done.charged - min(amount, held)
        if done.hold.state != "pending":  # the lease ran out (expired): it backs nothing any more
            lease.dead = True
            if self._leases.get(lease.key) is lease:
                self._retire(lease.key, cool=False)
        self._settled[hold_id] = lease.hold_id
        if len(self._settled) > SETTLED_KEPT:
            self._settled.popitem(last=False)
        self._balances[lease.key] = (done.balance, time.monotonic())
        return Settlement(hold_id, done.charged, done.written_off, done.balance, replayed=done.replayed)

    def local_hold(self, hold_id: str) -> Hold | None:
        """A request's hold admitted against a lease (the shared store knows only the lease)."""
        found = self._local.get(hold_id)
        return None if found is None else found.hold

    def leased(self) -> Iterable[Lease]:
        return [*self._leases.values(), *self._retired]

    # ------------------------------------------------------------------ admission

    def _hot(self, key: AccountKey) -> bool:
        """Count the reserve; True if the wallet is hot here (a lease is worth its round trips) and not cooling
        down after a recall."""
        now = time.monotonic()
        second = int(now)
        heat = self._heat.get(key)
        if heat is None:
            heat = self._heat[key] = Heat(second)
        heat.seen(second)
        if self._cool_until.get(key, 0.0) > now:
            return False
        return key in self._leases or max(heat.count, heat.last) >= self.policy.hot_per_s

    def _admit(self, lease: Lease, key: AccountKey, hold_id: str, amount: int, ttl_ms: int,
               now: int) -> tuple[Hold, Balance]:
        hold = Hold(hold_id, key[0], key[1], key[2], amount, "pending", now + ttl_ms, now, 0)
        lease.local += amount
        lease.unit = amount
        lease.used_at = time.monotonic()
        self._local[hold_id] = LocalHold(lease, hold, amount)
        self.stats["local"] += 1
        if lease.free < lease.last_grant // 2 and not lease.growing:
            self._spawn(self._grow(key, amount))  # top up ahead of need, so that requests never wait for it
        return hold, self._balance_hint(key)

    def _balance_hint(self, key: AccountKey) -> Balance:
        """The wallet as of this process's last round trip on it (a lease admits without one)."""
        found = self._balances.get(key)
        return found[0] if found is not None else Balance(key[0], key[1], key[2], 0, 0, 0)

    async def _recent_balance(self, key: AccountKey) -> Balance:
        """The wallet as the last round trip on it left it (a settlement's capture returns it) if that was less
        than a heartbeat ago, else as the store has it now: sizing a top-up needs no read of its own while the
        wallet is busy. Sizing only: the durable reserve or extension that follows checks the funds itself."""
        found = self._balances.get(key)
        if found is not None and time.monotonic() - found[1] < self.policy.tick_s:
            return found[0]
        balance = await self.store.balance(*key)
        self._balances[key] = (balance, time.monotonic())
        return balance

    async def _grow(self, key: AccountKey, amount: int) -> Lease | None:
        """Take a lease on the wallet, or top this process's up, sized from its spend rate; ``None`` when the
        wallet is too small to lease (it is then served hold by hold)."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            lease = self._leases.get(key)
            now = now_ms()
            if lease is not None and lease.admits(amount, now, self._margin_ms) and lease.free >= lease.last_grant // 2:
                return lease
            if self._cool_until.get(key, 0.0) > time.monotonic():
                return lease
            if lease is not None:
                lease.growing = True
            try:
                balance = await self._recent_balance(key)
                # At least the requests waiting for this top-up, so that a burst is admitted by one round trip.
                size = target(self.policy, unit=amount, rate=self._heat.get(key, Heat()).rate(),
                              waiting=self._waiting.get(key, 1), available=balance.available)
                if not worth_leasing(self.policy, size, amount):
                    self._cool(key)
                    return lease
                ttl_ms = int(self.policy.ttl_s * 1000)
                if lease is not None and not lease.retiring and now < lease.expires_at_ms - self._margin_ms:
                    try:
                        hold = await self.store.extend_hold(lease.hold_id, size, step=next(lease.steps),
                                                            ttl_ms=ttl_ms)
                    except (HoldNotFound, HoldNotPending):  # it ran out (this process stalled past its TTL)
                        self._retire(key, cool=False)
                        lease.growing = False
                        lease = None
                    else:
                        lease.amount += size
                        lease.expires_at_ms = hold.expires_at_ms
                        lease.last_grant = size
                        self.stats["topups"] += 1
                        return lease
                hold, balance = await self.store.reserve(*key, size, hold_id=f"lease:{self.owner}:{next(self._ids)}",
                                                         ttl_ms=ttl_ms)
                fresh = Lease(key, hold.id, hold.amount, hold.expires_at_ms, now, last_grant=size)
                self._balances[key] = (balance, time.monotonic())
                if lease is not None:
                    lease.retiring = True
                    self._retired.append(lease)
                self._leases[key] = fresh
                self.stats["leases"] += 1
                return fresh
            except InsufficientFunds:
                self._cool(key)
                return lease
            finally:
                if lease is not None:
                    lease.growing = False

    def _cool(self, key: AccountKey) -> None:
        self._cool_until[key] = time.monotonic() + self.policy.cooldown_s

    def _spawn(self, coro: object) -> None:
        async def run() -> None:
            try:
                await coro  # type: ignore[misc]
            except Exception as exc:
                log_retrying(log, "escrow: a lease top-up failed", exc)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ shrinking

    async def shrink(self) -> None:
        """Size every lease now, as the heartbeat does but with each wallet's balance read afresh (not as the last
        round trip left it), and shrink or return the retired ones: the sizing step on demand, for when the
        wallet is known to have changed (an operator's tooling, the tests) rather than at the next heartbeat."""
        for key, lease in list(self._leases.items()):
            balance = await self.store.balance(*key)
            self._balances[key] = (balance, time.monotonic())
            await self._size(key, lease, balance)
        await self._return_ready(None)

    async def _size(self, key: AccountKey, lease: Lease, balance: Balance) -> None:
        """The heartbeat's sizing step for an active lease: shrink it to its target when it holds well above that
        free, or retire it when its target is too small to lease. Why at the heartbeat: what makes a lease too
        large is what happens between requests — the spend rate drops, or other replicas' holds take the
        wallet's free balance down (a lease is at most ``1/share`` of what the wallet has free outside leases) —
        and admission is no place for a round trip. A lease is never shrunk below its target, so the next
        requests are admitted without a top-up; a shrink interrupted earlier is sent again first."""
        if lease.unshrunk is not None:
            await self._shrink(lease, 0)  # sent again as it was
            return
        if lease.growing or lease.shrinking or not lease.unit:
            return
        heat = self._heat.get(key, Heat())
        heat.roll(int(time.monotonic()))  # a rate not counted this second or the last is no rate
        size = target(self.policy, unit=lease.unit, rate=heat.rate(), waiting=self._waiting.get(key, 0),
                      available=balance.available)
        if not excess(self.policy, lease.free, size):
            return
        if not worth_leasing(self.policy, size, lease.unit):
            self._retire(key)  # the wallet is small for its traffic now: hold by hold (the retired lease shrinks)
            return
        lease.last_grant = size  # a top-up is due again below half of this, not of the larger grant before
        await self._shrink(lease, size)

    async def _shrink(self, lease: Lease, keep: int) -> None:
        if await lease.shrink(self.store, keep):
            self.stats["shrinks"] += 1

    # ------------------------------------------------------------------ recall

    async def _recall(self, key: AccountKey, amount: int) -> bool:
        """After the shared store refused a request of ``amount``: bring back what sits in leases on this wallet,
        this process's own and others' (through the recall row), waiting at most ``recall_wait_s``, or until the
        wallet has the largest refused request's amount free (the leases' holders shrink them to what their
        requests in flight hold at once, without waiting for those to settle); True if there was any to wait for
        (the request is then tried again). One recall per wallet at a time, however many requests were refused
        meanwhile."""
        self._recall_need[key] = max(self._recall_need.get(key, 0), amount)
        task = self._recalling.get(key)
        if task is None:
            task = self._recalling[key] = asyncio.create_task(self._bring_back(key))

            def done(_t: object) -> None:
                self._recalling.pop(key, None)
                self._recall_need.pop(key, None)

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _bring_back(self, key: AccountKey) -> bool:
        self._retire(key)
        deadline = time.monotonic() + self.policy.recall_wait_s
        waited = False
        while True:
            others = await self.store.recall_leases(*key, owner=self.owner, at_ms=now_ms())
            await self._return_ready(key)
            if not others and not any(lease.key == key for lease in self._retired):
                if waited:
                    self.stats["recalls"] += 1
                return waited
            waited = True
            if time.monotonic() >= deadline:
                return True
            if (await self.store.balance(*key)).available >= self._recall_need.get(key, 0):
                self.stats["recalls"] += 1  # shrunk leases gave back enough: no need to wait for the rest
                return True
            await asyncio.sleep(min(0.05, self.policy.tick_s))

    # ------------------------------------------------------------------ the heartbeat

    async def _tick_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:
                log_retrying(log, "escrow heartbeat failed", exc)
            await asyncio.sleep(self.policy.tick_s)

    async def tick(self) -> None:
        """Renew leases about to run out, return idle and retired ones, drop requests' holds whose TTL passed,
        and retire the leases another process recalled."""
        now = now_ms()
        for hold_id, found in list(self._local.items()):
            if found.hold.expires_at_ms < now:  # a request that never settled: its hold expires, as a durable one
                del self._local[hold_id]
                found.lease.local -= found.hold.amount
                self._expired[hold_id] = LocalHold(found.lease, replace(found.hold, amount=0, state="expired"), 0)
                if len(self._expired) > SETTLED_KEPT:
                    self._expired.popitem(last=False)
                log.warning("escrow: hold %s expired unsettled", hold_id)
        if self._leases:
            recalls = await self.store.lease_recalls(list(self._leases))
            for key, at_ms in recalls.items():
                lease = self._leases.get(key)
                if lease is not None and at_ms >= lease.taken_at_ms:
                    self._retire(key)
        idle = time.monotonic() - self.policy.idle_s
        for key, lease in list(self._leases.items()):
            if lease.used_at < idle and lease.local == 0:
                self._retire(key)
                continue
            if lease.expires_at_ms - now < self.policy.ttl_s * 1000 * 2 / 3:
                try:
                    hold = await self.store.touch_hold(lease.hold_id, ttl_ms=int(self.policy.ttl_s * 1000))
                    lease.expires_at_ms = hold.expires_at_ms
                except (HoldNotPending, HoldNotFound):
                    self._retire(key)  # expired (this process stalled past its TTL): the sweeper released it
                    continue
            await self._size(key, lease, await self._recent_balance(key))
        await self._return_ready(None)
        for key in [k for k, until in self._cool_until.items() if until < time.monotonic()]:
            del self._cool_until[key]
        stale = int(time.monotonic()) - 10
        for key in [k for k, h in self._heat.items() if h.second < stale]:
            del self._heat[key]

    def _retire(self, key: AccountKey, *, cool: bool = True) -> None:
        lease = self._leases.pop(key, None)
        if lease is not None:
            lease.retiring = True
            self._retired.append(lease)
            if cool:
                self._cool(key)

    async def _return_ready(self, key: AccountKey | None) -> None:
        """Return the retired leases whose requests have all settled, and shrink the others to what their
        requests in flight hold: a retired lease admits nothing more, so what it holds free serves no request
        here, and a replica refused for want of it (a recall) gets it now rather than when they settle."""
        for lease in list(self._retired):
            if (key is not None and lease.key != key) or lease.shrinking:
                continue
            if lease.local <= 0 and lease.inflight == 0:
                self._retired.remove(lease)
                await lease.give_back(self.store)
                self.stats["returned"] += 1
            elif lease.free > 0 or lease.unshrunk is not None:
                await self._shrink(lease, 0)


__all__ = ["Escrow", "EscrowPolicy", "LeaseBackend"]
