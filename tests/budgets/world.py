"""Shared factories for the budget tests: a customer with a three-level tree (customer root, a project, its
agents) on a real wallet store, a guard on an injected clock, and the reference model beside it."""

from __future__ import annotations

from dataclasses import dataclass, field

from metergate.budgets.admission import BudgetGuard, Ticket
from metergate.budgets.denials import BudgetExceeded
from metergate.budgets.model import ROOT, Limit, Node
from metergate.budgets.windows import Window
from metergate.wallet.store import WalletStore
from tests.budgets.reference import Event, Reference, RefLimit

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a Thursday
ASSET = "USD"


@dataclass
class Clock:
    now: int = START_MS

    def __call__(self) -> int:
        return self.now


@dataclass
class World:
    store: WalletStore
    guard: BudgetGuard
    clock: Clock
    ref: Reference
    customer: str = "acme"
    limits: dict[str, Limit] = field(default_factory=dict)

    async def limit(self, limit_id: str, node: str, dimension: str, amount: int, kind: str, length_ms: int = 0,
                    buckets: int = 1) -> None:
        window = Window(kind, length_ms, buckets)  # type: ignore[arg-type]
        limit = Limit("test", self.customer, limit_id, node, dimension, amount, window,  # type: ignore[arg-type]
                      ASSET if dimension == "spend" else None)
        saved, created = await self.store.put_budget_limit(limit)
        assert created
        self.limits[limit_id] = saved
        self.ref.limits[limit_id] = RefLimit(limit_id, node, dimension, amount, kind, length_ms, buckets)
        self.guard.invalidate("test", self.customer)

    async def set_amount(self, limit_id: str, amount: int) -> None:
        updated = await self.store.update_budget_limit("test", self.customer, limit_id, amount)
        assert updated is not None and updated.amount == amount
        self.ref.limits[limit_id].amount = amount
        self.guard.invalidate("test", self.customer)

    async def ticket(self, node: str) -> Ticket:
        ticket = await self.guard.resolve("test", self.customer, key_id=None, header=node, header_trusted=True,
                                          model="gpt-4o-mini")
        assert ticket is not None
        return ticket

    async def admit(self, node: str, tokens: int = 10, spend: int = 100) -> tuple[Ticket | None, str | None]:
        """Admit through the guard; (ticket, None) when admitted, (None, refusing limit id) when refused."""
        ticket = await self.ticket(node)
        try:
            await self.guard.admit(ticket, tokens=tokens, spend=spend, asset=ASSET)
        except BudgetExceeded as refused:
            return None, refused.extra["limit"]["id"]
        return ticket, None


async def three_levels(store: WalletStore, agents: int = 2) -> World:
    """acme: root -> project p -> agents a1..aN (no limits yet)."""
    await store.create_customer("test", "acme", "Acme")
    parents: dict[str, str | None] = {ROOT: None, "p": ROOT}
    await store.put_budget_node(Node("test", "acme", "p", ROOT, "project", "Project"))
    for i in range(1, agents + 1):
        await store.put_budget_node(Node("test", "acme", f"a{i}", "p", "agent", f"Agent {i}"))
        parents[f"a{i}"] = "p"
    clock = Clock()
    return World(store, BudgetGuard(store, cache_ttl_s=0, clock=clock), clock, Reference(parents))


__all__ = ["ASSET", "START_MS", "Clock", "Event", "World", "three_levels"]
