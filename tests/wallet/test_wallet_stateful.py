"""Stateful property test of the wallet: grants, holds, extensions, partial and final captures, voids, hold and
grant expiry, and subscription period ticks, in any order Hypothesis finds.

Method: a ``RuleBasedStateMachine`` drives a real store in each topology (``tests/topologies.py``: SQLite,
PostgreSQL with two replicas, PostgreSQL with Redis windows, two replicas, calls alternating between them)
through its public methods with an explicit clock, which only the rules move forward. After every step it
asserts: the ledger re-derives every balance and every grant (``audit()`` is empty); debits posted plus
pending never exceed credits (no overdraft is configured, so nothing may overspend); and each hold is
resolved at most once (a second resolution is a replay with the first answer, or a conflict, and changes
nothing).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from metergate.errors import Conflict
from metergate.wallet.errors import HoldNotFound, HoldNotPending, IdempotencyConflict, InsufficientFunds
from metergate.wallet.models import Entitlement
from metergate.wallet.sql import SqlWalletStore
from metergate.wallet.subscriptions import Subscriptions
from tests.conftest import _reset_pg
from tests.topologies import database_url, make_store, redis_for

T = TypeVar("T")
MODE = "test"
ASSETS = ("USD", "TOKENS")
MIN = 60_000
DAY = 86_400_000


def make_machine(new_store: Callable[[], SqlWalletStore]) -> type[RuleBasedStateMachine]:
    class WalletMachine(RuleBasedStateMachine):
        holds = Bundle("holds")
        resolved = Bundle("resolved")
        grant_ids = Bundle("grants")

        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.store = new_store()
            self.run(self.store.open())
            self.subs = Subscriptions(self.store)
            self.customer = "c-" + uuid.uuid4().hex[:12]  # PostgreSQL examples share one database
            self.now = 1_900_000_000_000
            self.run(self.store.create_customer(MODE, self.customer, "Prop"))
            self.settled: dict[str, tuple[int, int]] = {}  # hold -> (amount asked, total charged)
            self.n = 0

        def run(self, coro: Coroutine[Any, Any, T]) -> T:
            return self.loop.run_until_complete(coro)

        def teardown(self) -> None:
            self.run(self.store.close())
            self.loop.close()

        def key(self) -> str:
            self.n += 1
            return f"{self.customer}-{self.n}"

        # ---------------------------------------------------------------- rules

        @rule(target=grant_ids, asset=st.sampled_from(ASSETS), amount=st.integers(1, 500),
              purpose=st.sampled_from(["paid", "promotional", "trial", "adjustment"]), priority=st.integers(0, 3),
              expires_in=st.none() | st.integers(1, 10 * MIN), starts_in=st.sampled_from([0, 0, MIN, 3 * MIN]))
        def credit(self, asset: str, amount: int, purpose: Any, priority: int, expires_in: int | None,
                   starts_in: int) -> str:
            entry = self.run(self.store.credit(
                MODE, self.customer, asset, amount, idempotency_key=self.key(), purpose=purpose, priority=priority,
                effective_at_ms=self.now + starts_in,
                expires_at_ms=None if expires_in is None else self.now + starts_in + expires_in, at_ms=self.now))
            assert entry.grant_id is not None
            return entry.grant_id

        @rule(target=holds, asset=st.sampled_from(ASSETS), amount=st.integers(1, 400), ttl=st.integers(1, 5 * MIN))
        def reserve(self, asset: str, amount: int, ttl: int) -> Any:
            hold_id = "h-" + self.key()
            try:
                hold, _ = self.run(self.store.reserve(MODE, self.customer, asset, amount, hold_id=hold_id,
                                                      ttl_ms=ttl, at_ms=self.now))
            except InsufficientFunds as refused:
                # the refusal brought the wallet's grants up to date: what it reports is what is spendable
                after = self.run(self.store.balance(MODE, self.customer, asset))
                assert amount > after.available == refused.available
                return multiple()
            assert hold.amount == amount
            again, _ = self.run(self.store.reserve(MODE, self.customer, asset, amount, hold_id=hold_id, ttl_ms=ttl,
                                                   at_ms=self.now))
            assert again == hold  # a replayed hold changes nothing
            return hold_id

        @rule(hold_id=holds, amount=st.integers(1, 200))
        def extend(self, hold_id: str, amount: int) -> None:
            before = self.run(self.store.get_hold(hold_id))
            assert before is not None
            try:
                after = self.run(self.store.extend_hold(hold_id, amount, step=self.key(), ttl_ms=2 * MIN,
                                                        at_ms=self.now))
            except InsufficientFunds as refused:
                assert amount > refused.available
            except HoldNotFound:
                assert before.state != "pending"  # expired by the sweeper meanwhile
            else:
                assert after.amount == before.amount + amount and after.pending == before.pending + amount

        @rule(hold_id=holds, amount=st.integers(0, 300))
        def capture_part(self, hold_id: str, amount: int) -> None:
            key = self.key()
            try:
                done = self.run(self.store.capture(hold_id, amount, idempotency_key=key, at_ms=self.now))
            except HoldNotPending:
                return
            assert done.charged + done.written_off == amount
            replay = self.run(self.store.capture(hold_id, amount, idempotency_key=key, at_ms=self.now))
            assert replay.replayed and replay.charged == done.charged

        @rule(target=resolved, hold_id=consumes(holds), extra=st.integers(0, 600))
        def settle(self, hold_id: str, extra: int) -> str:
            hold = self.run(self.store.get_hold(hold_id))
            assert hold is not None
            total = hold.captured_amount + extra
            done = self.run(self.store.settle(hold_id, total, at_ms=self.now))
            assert done.charged + done.written_off == total and not done.replayed
            self.settled[hold_id] = (total, done.charged)
            return hold_id

        @rule(hold_id=resolved, other=st.integers(0, 600))
        def resolve_again(self, hold_id: str, other: int) -> None:
            total, charged = self.settled[hold_id]
            hold = self.run(self.store.get_hold(hold_id))
            assert hold is not None
            balance = self.run(self.store.balance(MODE, self.customer, hold.asset))
            replay = self.run(self.store.settle(hold_id, total, at_ms=self.now))
            assert replay.replayed and replay.charged == charged
            if other != total:
                with pytest.raises(IdempotencyConflict):
                    self.run(self.store.settle(hold_id, other, at_ms=self.now))
            assert self.run(self.store.balance(MODE, self.customer, hold.asset)) == balance

        @rule(grant_id=grant_ids)
        def void_grant(self, grant_id: str) -> None:
            voided = self.run(self.store.void_grant(MODE, grant_id, at_ms=self.now))
            assert voided is not None and voided.state in ("voided", "expired")

        @rule(ms=st.sampled_from([1_000, 30_000, 2 * MIN, 6 * MIN, DAY]))
        def advance(self, ms: int) -> None:
            self.now += ms

        @rule()
        def sweep(self) -> None:
            self.run(self.store.expire_holds(now_ms=self.now))
            self.run(self.store.expire_grants(now_ms=self.now))

        @rule(cap=st.none() | st.integers(1, 300))
        def subscribe(self, cap: int | None) -> None:
            plan = f"p-{self.customer}-{cap}"
            self.run(self.subs.create_plan(MODE, plan, name="Daily", period="days", period_days=1,
                                           entitlements=(Entitlement("TOKENS", 250, rollover_cap=cap),)))
            try:
                self.run(self.subs.subscribe(MODE, "s-" + self.customer, customer_id=self.customer, plan_id=plan,
                                             at_ms=self.now))
            except Conflict as exc:  # a second subscribe with another plan
                assert exc.code == "already_exists"

        @rule()
        def tick(self) -> None:
            subscription = self.run(self.subs.get(MODE, "s-" + self.customer))
            if subscription is not None:
                first = self.run(self.subs.tick(MODE, subscription.id, now_ms=self.now))
                assert self.run(self.subs.tick(MODE, subscription.id, now_ms=self.now)) == 0
                assert first >= 0

        # ---------------------------------------------------------------- invariants

        @invariant()
        def ledger_explains_everything(self) -> None:
            assert self.run(self.store.audit()) == []

        @invariant()
        def no_overspend(self) -> None:
            for b in self.run(self.store.balances(MODE, self.customer)):
                assert b.debits_posted + b.debits_pending <= b.credits_posted, b

    return WalletMachine


def test_wallet_state_machine(request: pytest.FixtureRequest, topology: str, tmp_path: Path) -> None:
    url = database_url(request, topology, tmp_path)
    if url.startswith("postgresql"):
        asyncio.run(_reset_pg(url))
    redis = redis_for(request, topology)
    run_state_machine_as_test(make_machine(lambda: make_store(topology, url, redis)), settings=settings(
        max_examples=40 if topology == "sqlite" else 15, stateful_step_count=40, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
