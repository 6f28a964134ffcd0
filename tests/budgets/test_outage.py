"""With the database unreachable, budgets behave like spend caps for reading and fail closed for claiming:
a tree read before keeps applying, a customer whose tree was never read has no budget (its requests are not
refused for an outage the wallet rides out), and a limit whose lease is spent is never passed unseen.

Method: a real SQLite store behind a seam that can be switched to raise the driver's OperationalError on
budget reads and claims (what an unreachable PostgreSQL raises), driving the guard directly.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from metergate.budgets.admission import BudgetGuard
from metergate.budgets.model import ROOT, Limit, Node, Tree
from metergate.budgets.windows import Window
from metergate.wallet.sql import SqlWalletStore
from tests.budgets.world import START_MS, Clock


class FlakyStore(SqlWalletStore):
    down = False

    def _check(self) -> None:
        if self.down:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    async def budget_tree(self, mode: Any, customer_id: str) -> Tree:
        self._check()
        return await super().budget_tree(mode, customer_id)

    async def claim_budget(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return await super().claim_budget(*args, **kwargs)


async def test_an_outage_keeps_read_trees_and_never_passes_a_limit(tmp_path: Any) -> None:
    store = FlakyStore(f"sqlite:///{tmp_path / 'w.db'}")
    await store.open()
    try:
        for customer in ("acme", "other"):
            await store.create_customer("test", customer, customer)
        await store.put_budget_node(Node("test", "acme", "p", ROOT, "project"))
        await store.put_budget_limit(Limit("test", "acme", "p-req", "p", "requests", 1, Window("day")))
        guard = BudgetGuard(store, cache_ttl_s=0, clock=Clock(START_MS))
        ticket = await guard.resolve("test", "acme", key_id=None, header="p", header_trusted=True, model="m")
        assert ticket is not None and [lim.id for lim in ticket.limits] == ["p-req"]
        store.down = True
        again = await guard.resolve("test", "acme", key_id=None, header="p", header_trusted=True, model="m")
        assert again is not None and again.limits == ticket.limits  # the tree read before
        assert await guard.resolve("test", "other", key_id=None, header=None, header_trusted=True,
                                   model="m") is None  # never read: no budget, not a refusal
        with pytest.raises(OperationalError):  # the lease is empty and the store unreachable: refused (503)
            await guard.admit(again, tokens=1, spend=1, asset="USD")
        assert again.taken == []
    finally:
        await store.close()
