"""Stateful property test of budgets: spends, settlements, window advances and limit changes in any order,
from two processes sharing one store.

Method: a ``RuleBasedStateMachine`` drives two :class:`BudgetGuard` instances (two replicas, each with its own
leases) over one real ``SqlWalletStore`` (SQLite, and PostgreSQL when it runs) on an explicit clock that only
the rules move. A spend is what the proxy does: admit along the path, then hold on the wallet (giving the
budget back if the wallet refuses), later settle for at most the hold. The reference model
(tests/budgets/reference.py) recounts every window from the events. Asserted at every step: a request the
guards admit is one the reference admits, so no node ever exceeds its limit; a refusal comes early by at most
the other replica's unused lease on the refusing limit; the wallet never overspends and its ledger audits clean.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule, run_state_machine_as_test

from metergate.budgets.admission import BudgetGuard
from metergate.budgets.denials import BudgetExceeded
from metergate.budgets.model import ROOT, Limit, Node
from metergate.budgets.windows import Window
from metergate.wallet.errors import InsufficientFunds
from metergate.wallet.sql import SqlWalletStore
from tests.budgets.reference import DAY, Reference, RefLimit
from tests.budgets.world import ASSET, START_MS, Clock
from tests.conftest import _reset_pg

T = TypeVar("T")
MIN = 60_000
FUNDS = 20_000
LIMITS = [  # id, node, dimension, amount, window
    ("root-spend", ROOT, "spend", 6_000, Window("day")),
    ("p-req", "p", "requests", 12, Window("rolling", 10 * MIN, 60)),
    ("p-tok", "p", "tokens", 2_000, Window("fixed", 60 * MIN)),
    ("a1-spend", "a1", "spend", 1_500, Window("rolling", 60 * MIN, 12)),
    ("a2-req", "a2", "requests", 6, Window("day")),
]


def make_machine(url: str) -> type[RuleBasedStateMachine]:
    class BudgetMachine(RuleBasedStateMachine):
        spends = Bundle("spends")

        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.store = SqlWalletStore(url)
            self.run(self.store.open())
            self.customer = "c-" + uuid.uuid4().hex[:12]  # PostgreSQL examples share one database
            self.clock = Clock(START_MS)
            self.guards = [BudgetGuard(self.store, cache_ttl_s=0, clock=self.clock) for _ in range(2)]
            self.ref = Reference({ROOT: None, "p": ROOT, "a1": "p", "a2": "p"})
            self.limits: dict[str, Limit] = {}
            self.n = 0
            self.run(self.setup())

        async def setup(self) -> None:
            await self.store.create_customer("test", self.customer, "Prop")
            await self.store.credit("test", self.customer, ASSET, FUNDS, idempotency_key=f"{self.customer}-seed")
            await self.store.put_budget_node(Node("test", self.customer, "p", ROOT, "project"))
            for agent in ("a1", "a2"):
                await self.store.put_budget_node(Node("test", self.customer, agent, "p", "agent"))
            for limit_id, node, dimension, amount, window in LIMITS:
                limit = Limit("test", self.customer, limit_id, node, dimension, amount, window,  # type: ignore[arg-type]
                              ASSET if dimension == "spend" else None)
                await self.store.put_budget_limit(limit)
                self.limits[limit_id] = limit
                self.ref.limits[limit_id] = RefLimit(limit_id, node, dimension, amount, window.kind,
                                                     window.length_ms, window.buckets)

        def run(self, coro: Coroutine[Any, Any, T]) -> T:
            return self.loop.run_until_complete(coro)

        def teardown(self) -> None:
            self.run(self.store.close())
            self.loop.close()

        # ---------------------------------------------------------------- rules

        @rule(target=spends, replica=st.integers(0, 1), node=st.sampled_from([ROOT, "p", "a1", "a2"]),
              tokens=st.integers(1, 400), hold=st.integers(1, 900))
        def spend(self, replica: int, node: str, tokens: int, hold: int) -> Any:
            guard = self.guards[replica]
            now = self.clock.now
            ticket = self.run(guard.resolve("test", self.customer, key_id=None, header=node, header_trusted=True,
                                            model="m"))
            assert ticket is not None
            refusing = self.ref.refusing(node, tokens, hold, now)
            try:
                self.run(guard.admit(ticket, tokens=tokens, spend=hold, asset=ASSET))
            except BudgetExceeded as refused:
                limit_id = refused.extra["limit"]["id"]
                ref = self.ref.limits[limit_id]
                need = self.ref.need(ref, tokens, hold)
                other = self.guards[1 - replica].leases.find(self.limits[limit_id])
                window = self.limits[limit_id].window
                # The other replica's unused lease of this window, of the limit's present version or of one it
                # replaced: the store counts a lease of an older version in the window until it is given back
                # (at that replica's next claim), so a limit changed meanwhile is refused early by it too.
                unused = other.left if other is not None and other.bucket_start_ms == window.bucket_start(now) else 0
                # Refused early by at most the other replica's unused lease: never while the quota is free.
                assert self.ref.use(ref, now) + unused + need > ref.amount, (limit_id, refusing)
                return None
            assert not refusing, f"admitted past {refusing}"
            self.n += 1
            hold_id = f"h-{self.customer}-{self.n}"
            try:
                self.run(self.store.reserve("test", self.customer, ASSET, hold, hold_id=hold_id, ttl_ms=DAY))
            except InsufficientFunds:
                guard.give_back(ticket)
                return None
            event = self.ref.admit(node, tokens, hold, now)
            assert event is not None
            return (replica, ticket, event, hold_id, hold, tokens)

        @rule(spent=consumes(spends), charge_pct=st.integers(0, 100), tokens_pct=st.integers(0, 100))
        def settle(self, spent: Any, charge_pct: int, tokens_pct: int) -> None:
            if spent is None:
                return
            replica, ticket, event, hold_id, hold, tokens = spent
            charged = hold * charge_pct // 100
            settlement = self.run(self.store.settle(hold_id, charged))
            assert settlement.charged == charged
            used = tokens * tokens_pct // 100
            self.guards[replica].settled(ticket, charged=charged, tokens_used=used)
            self.ref.settle(event, charged=charged, tokens_used=used)

        @rule(ms=st.sampled_from([1_000, 10_000, 2 * MIN, 20 * MIN, 60 * MIN, DAY]))
        def advance(self, ms: int) -> None:
            self.clock.now += ms

        @rule(limit_id=st.sampled_from([lim[0] for lim in LIMITS]), pct=st.sampled_from([50, 80, 120, 200]))
        def change_limit(self, limit_id: str, pct: int) -> None:
            amount = max(1, self.ref.limits[limit_id].amount * pct // 100)
            updated = self.run(self.store.update_budget_limit("test", self.customer, limit_id, amount))
            assert updated is not None
            self.limits[limit_id] = updated
            self.ref.limits[limit_id].amount = amount

        @rule(replica=st.integers(0, 1))
        def flush(self, replica: int) -> None:
            self.run(self.guards[replica].flush())

        # ---------------------------------------------------------------- invariants

        @invariant()
        def store_never_counts_past_a_limit_it_granted(self) -> None:
            counted = self.run(self.store.budget_use("test", self.customer, at_ms=self.clock.now))
            for limit_id, ref in self.ref.limits.items():
                # What the store counts is at least what was admitted and not returned...
                assert counted.get(limit_id, 0) >= self.ref.use(ref, self.clock.now), limit_id

        @invariant()
        def wallet_never_overspends(self) -> None:
            for b in self.run(self.store.balances("test", self.customer)):
                assert b.debits_posted + b.debits_pending <= b.credits_posted, b

        @invariant()
        def ledger_balanced(self) -> None:
            assert self.run(self.store.audit()) == []

    return BudgetMachine


@pytest.fixture
def machine_url(store_url: str) -> str:
    if store_url.startswith("postgresql"):
        asyncio.run(_reset_pg(store_url))
    return store_url


def test_budget_state_machine(machine_url: str) -> None:
    examples = 30 if machine_url.startswith("sqlite") else 15
    run_state_machine_as_test(make_machine(machine_url), settings=settings(
        max_examples=examples, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
