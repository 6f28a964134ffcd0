"""Budgets for a store that keeps its real-time state elsewhere (the Redis wallet): delegated to its SQL store.

Why that is enough: budget windows are claimed per chunk of requests (:mod:`metergate.budgets.leases`), not
per request, so they never sit on the hot path's round trip to storage; the SQL ledger behind the Redis
wallet is shared by every replica already, and its row locks make each claim atomic across them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from metergate.budgets.claims import BudgetClaim, BudgetDenial, BudgetGrant
from metergate.budgets.model import FiredAlert, Limit, Node, Tree
from metergate.wallet.models import Mode

if TYPE_CHECKING:
    from metergate.wallet.sql import SqlWalletStore


class BudgetsInSql:
    """Mixed into a store whose ``sql`` attribute is the SQL wallet store behind it."""

    sql: SqlWalletStore

    async def budget_tree(self, mode: Mode, customer_id: str) -> Tree:
        return await self.sql.budget_tree(mode, customer_id)

    async def budget_use(self, mode: Mode, customer_id: str, *, at_ms: int) -> dict[str, int]:
        return await self.sql.budget_use(mode, customer_id, at_ms=at_ms)

    async def fired_budget_alerts(self, mode: Mode, customer_id: str | None, *, limit: int) -> list[FiredAlert]:
        return await self.sql.fired_budget_alerts(mode, customer_id, limit=limit)

    async def put_budget_node(self, node: Node) -> tuple[Node, bool]:
        return await self.sql.put_budget_node(node)

    async def update_budget_node(self, mode: Mode, customer_id: str, node_id: str, changes: dict[str, Any]) -> Node:
        return await self.sql.update_budget_node(mode, customer_id, node_id, changes)

    async def delete_budget_node(self, mode: Mode, customer_id: str, node_id: str) -> bool:
        return await self.sql.delete_budget_node(mode, customer_id, node_id)

    async def put_budget_limit(self, limit: Limit) -> tuple[Limit, bool]:
        return await self.sql.put_budget_limit(limit)

    async def update_budget_limit(self, mode: Mode, customer_id: str, limit_id: str, amount: int) -> Limit | None:
        return await self.sql.update_budget_limit(mode, customer_id, limit_id, amount)

    async def delete_budget_limit(self, mode: Mode, customer_id: str, limit_id: str) -> bool:
        return await self.sql.delete_budget_limit(mode, customer_id, limit_id)

    async def attach_budget_key(self, mode: Mode, key_id: str, node_id: str | None) -> str | None:
        return await self.sql.attach_budget_key(mode, key_id, node_id)

    async def claim_budget(self, mode: Mode, customer_id: str, claims: list[BudgetClaim], *,
                           now_ms: int) -> list[BudgetGrant] | BudgetDenial:
        return await self.sql.claim_budget(mode, customer_id, claims, now_ms=now_ms)

    async def release_budget(self, mode: Mode, customer_id: str, releases: list[tuple[str, int, int]]) -> None:
        await self.sql.release_budget(mode, customer_id, releases)

    async def prune_budget_usage(self, *, before_ms: int) -> int:
        return await self.sql.prune_budget_usage(before_ms=before_ms)
