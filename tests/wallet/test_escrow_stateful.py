"""Stateful property test of escrow leases: two processes' leases on one wallet, in any order Hypothesis finds —
credits, reserves admitted against leases or by the shared store, extensions, settlements above and below the
hold, replays, heartbeats, idle returns, recalls (a refused reserve), shrinks (a hold placed in the shared store
directly takes part of the wallet, and a lease is sized down to its target, or a retired one to what its
requests in flight hold), and crashes (a process abandons its leases; the sweeper expires them past their TTL).

After every step: the ledger re-derives every balance (``audit()`` is empty); nothing overspends (debits posted
plus pending never exceed credits: no overdraft is configured); the wallet's posted debits are exactly what the
settlements said they charged (each request billed once, replays included); no lease is over-admitted (its
requests' holds plus its captures never exceed what it holds); and no lease counts more free than its hold in
the shared store holds (shrinks and top-ups counted once each). At the end every process closes or is swept, and
nothing is left pending.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
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

from metergate.wallet.errors import InsufficientFunds
from metergate.wallet.escrow import Escrow, EscrowPolicy
from metergate.wallet.models import UsageRecord, now_ms
from metergate.wallet.sql import SqlWalletStore
from tests.conftest import _reset_pg

T = TypeVar("T")
MODE, ASSET = "test", "USD"
# No heartbeat runs by itself (the heartbeat rule is one); ``tick_s`` is also how long a wallet's balance as last
# seen sizes a lease without a read of its own: kept short, so that leases are sized from the wallet as it is.
POLICY = EscrowPolicy(hot_per_s=1, horizon_s=1.0, share=4, min_requests=2, ttl_s=2, idle_s=3600, tick_s=0.01,
                      recall_wait_s=0.3, cooldown_s=0, shrink_factor=2)


def make_machine(url: str) -> type[RuleBasedStateMachine]:
    class EscrowMachine(RuleBasedStateMachine):
        holds = Bundle("holds")
        settled = Bundle("settled")

        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            shared = url.startswith("sqlite")
            first = SqlWalletStore(url)
            self.stores = [first, first if shared else SqlWalletStore(url)]
            for s in dict.fromkeys(self.stores):
                self.run(s.open())
            self.customer = "c-" + uuid.uuid4().hex[:12]
            self.run(first.create_customer(MODE, self.customer, "Prop"))
            self.procs = [Escrow(s, POLICY) for s in self.stores]
            self.abandoned: list[Escrow] = []
            self.charged = 0  # what the settlements said they charged
            self.answers: dict[str, tuple[int, int]] = {}  # hold -> (price, charged)
            self.n = 0

        def run(self, coro: Coroutine[Any, Any, T]) -> T:
            """Run one step, and let the top-ups it started in the background finish (a step is atomic)."""
            result = self.loop.run_until_complete(coro)
            for p in getattr(self, "procs", []):
                self.loop.run_until_complete(p.quiesce())
            return result

        def teardown(self) -> None:
            try:
                for p in self.procs:
                    self.run(p.close())
                self.run(self.stores[0].expire_holds(now_ms=now_ms() + 10**9))  # crashed processes' leases
                b = self.run(self.stores[0].balance(MODE, self.customer, ASSET))
                assert b.debits_pending == 0, b
                assert self.run(self.stores[0].audit()) == []
            finally:
                for s in dict.fromkeys(self.stores):
                    self.run(s.close())
                self.loop.close()

        def usage(self, hold_id: str, price: int) -> UsageRecord:
            return UsageRecord(id="u" + hold_id, mode=MODE, customer_id=self.customer, hold_id=hold_id, route="/v1",
                               endpoint="chat", model="m", feature=None, stream=False, status_code=200,
                               usage_source="provider", tokens_input=1, tokens_cached_input=0, tokens_output=1,
                               tokens_reasoning=0, asset=ASSET, price_amount=price)

        # ---------------------------------------------------------------- rules

        @rule(amount=st.integers(1, 60_000))  # up to 20 of the largest requests: enough to lease
        def credit(self, amount: int) -> None:
            self.n += 1
            self.run(self.stores[0].credit(MODE, self.customer, ASSET, amount,
                                           idempotency_key=f"{self.customer}-k{self.n}"))

        @rule(target=holds, proc=st.integers(0, 1), amount=st.integers(1, 3_000))
        def reserve(self, proc: int, amount: int) -> Any:
            self.n += 1
            hold_id = f"h{self.customer}{self.n}"
            try:
                self.run(self.procs[proc].reserve(MODE, self.customer, ASSET, amount, hold_id=hold_id,
                                                  ttl_ms=60_000))
            except InsufficientFunds:
                return (proc, None)
            return proc, hold_id

        @rule(target=holds, proc=st.integers(0, 1), amount=st.integers(1, 3_000), part=st.integers(0, 9))
        def shrink(self, proc: int, amount: int, part: int) -> Any:
            """A request reserved through the process (leased, if the wallet allows), then a hold of ``part``
            tenths of what the wallet has free placed in the shared store directly (a replica without leases;
            settled through either process, it falls through to the store), then the process sizes its leases
            against the wallet as it is now: a lease well above its target gives back the rest, one too large for
            the wallet retires, a retired one keeps only what its requests in flight hold."""
            leased = self.reserve(proc, amount)
            self.n += 1
            hold_id = f"d{self.customer}{self.n}"
            direct = self.run(self.stores[0].balance(MODE, self.customer, ASSET)).available * part // 10
            if direct > 0:
                self.run(self.stores[0].reserve(MODE, self.customer, ASSET, direct, hold_id=hold_id,
                                                ttl_ms=60_000))
            self.run(self.procs[proc].shrink())
            return multiple(leased, (proc, hold_id if direct > 0 else None))

        @rule(hold=holds, amount=st.integers(1, 2_000))
        def extend(self, hold: tuple[int, str | None], amount: int) -> None:
            proc, hold_id = hold
            if hold_id is None or hold_id in self.answers:
                return
            self.n += 1
            try:
                self.run(self.procs[proc].extend_hold(hold_id, amount, step=self.n, ttl_ms=60_000))
            except (InsufficientFunds, LookupError):
                pass
            except Exception as error:  # a hold that expired or is unknown to a new process: refused, not lost
                assert type(error).__name__ in ("HoldNotFound", "HoldNotPending"), error

        @rule(target=settled, hold=consumes(holds), price=st.integers(0, 4_000))
        def settle(self, hold: tuple[int, str | None], price: int) -> Any:
            proc, hold_id = hold
            if hold_id is None:
                return (proc, None)
            try:
                done = self.run(self.procs[proc].settle(hold_id, price, self.usage(hold_id, price)))
            except Exception as error:  # its process crashed: the lease it was admitted against is gone
                assert type(error).__name__ == "HoldNotFound", error
                return (proc, None)
            assert not done.replayed
            assert done.charged + done.written_off == price
            self.charged += done.charged
            self.answers[hold_id] = (price, done.charged)
            return (proc, hold_id)

        @rule(hold=settled)
        def replay(self, hold: tuple[int, str | None]) -> None:
            proc, hold_id = hold
            if hold_id is None or self.procs[proc] in self.abandoned:
                return
            price, charged = self.answers[hold_id]
            try:
                again = self.run(self.procs[proc].settle(hold_id, price, self.usage(hold_id, price)))
            except Exception as error:  # a new process after a crash does not know the request
                assert type(error).__name__ == "HoldNotFound", error
                return
            assert (again.charged, again.replayed) == (charged, True)

        @rule(proc=st.integers(0, 1))
        def heartbeat(self, proc: int) -> None:
            self.run(self.procs[proc].tick())

        @rule(proc=st.integers(0, 1))
        def go_idle(self, proc: int) -> None:
            for lease in self.procs[proc].leased():
                lease.used_at = 0.0
            self.run(self.procs[proc].tick())

        @rule(proc=st.integers(0, 1))
        def crash(self, proc: int) -> None:
            """The process dies: its leases and the requests admitted against them are abandoned; past the
            leases' TTL the sweeper releases what they did not capture."""
            self.abandoned.append(self.procs[proc])
            self.procs[proc] = Escrow(self.stores[proc], POLICY)
            self.run(self.stores[0].expire_holds(now_ms=now_ms() + 3_000))

        # ---------------------------------------------------------------- invariants

        @invariant()
        def ledger_derives_everything(self) -> None:
            assert self.run(self.stores[0].audit()) == []

        @invariant()
        def no_overspend_and_billed_once(self) -> None:
            b = self.run(self.stores[0].balance(MODE, self.customer, ASSET))
            assert b.debits_posted + b.debits_pending <= b.credits_posted, b
            assert b.debits_posted == self.charged, (b, self.charged)

        @invariant()
        def no_lease_over_admitted(self) -> None:
            for p in self.procs:
                for lease in p.leased():
                    assert lease.inflight == 0, lease
                    assert lease.dead or lease.free >= 0, lease  # an expired lease backs nothing

        @invariant()
        def no_lease_counts_more_than_its_hold(self) -> None:
            for p in self.procs:
                for lease in p.leased():
                    hold = self.run(self.stores[0].get_hold(lease.hold_id))
                    if hold is not None and hold.state == "pending" and not lease.dead:
                        assert lease.captured == hold.captured_amount, (lease, hold)
                        assert lease.amount <= hold.amount, (lease, hold)

    return EscrowMachine


@pytest.fixture
def machine_url(store_url: str) -> str:
    if store_url.startswith("postgresql"):
        asyncio.run(_reset_pg(store_url))
    return store_url


def test_escrow_state_machine(machine_url: str) -> None:
    examples = 20 if machine_url.startswith("sqlite") else 8
    run_state_machine_as_test(make_machine(machine_url), settings=settings(
        max_examples=examples, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
