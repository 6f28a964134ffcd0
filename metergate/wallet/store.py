"""The one interface through which everything else reaches wallet storage.

Implementations: :class:`metergate.wallet.sql.SqlWalletStore` (SQLite embedded default, PostgreSQL in
production); a Redis-backed store for many replicas plugs in behind the same protocol.

Contract shared by every implementation:

* every mutation carries an idempotency key (a hold id is one); replaying a mutation with the same key
  and the same content returns the first result, with different content raises ``IdempotencyConflict``;
* ``reserve`` is atomic check-and-hold: concurrent reserves never take ``available`` below zero;
* ``settle`` resolves a hold at most once; the amount it captures may exceed the hold only as far as
  the wallet can cover, and anything beyond that is recorded as written off, never silently lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from metergate.wallet.models import (
    ApiKey,
    Balance,
    Customer,
    Hold,
    LedgerEntry,
    Mode,
    RateLimitDenial,
    RateLimitOverride,
    Settlement,
    UsageAggregate,
    UsageGrouping,
    UsageRecord,
)
from metergate.wallet.quota import QuotaClaim, QuotaGrant

if TYPE_CHECKING:
    from metergate.budgets.claims import BudgetClaim, BudgetDenial, BudgetGrant
    from metergate.budgets.model import FiredAlert, Limit, Node, Tree
    from metergate.wallet.sql import SqlWalletStore


class WalletStore(Protocol):
    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the backing storage cannot be reached."""

    @property
    def system_of_record(self) -> SqlWalletStore:
        """The SQL store that is this wallet's ledger: the store itself when it admits in SQL (SQLite,
        PostgreSQL, PostgreSQL with Redis rate-limit windows), or the one under a wallet that admits elsewhere
        (the Redis wallet). Payments, billing, pricing and reports keep their tables beside the wallet's in it,
        and the wallet administration (assets, grants, plans, subscriptions, the hold API) is served only by a
        store that is its own system of record, since it changes balances the admission layer must see."""

    async def expire_entitlements(self, *, now_ms: int) -> None:
        """The sweep's other half beside :meth:`expire_holds`: grants past their expiry, subscription periods
        that are due. Idempotent, so many replicas may run it at once."""

    async def refresh_overdraft(self, mode: Mode, customer_id: str, asset: str) -> None:
        """Billing changed a credit line in the system of record: make admission see it (a no-op where the
        system of record admits)."""

    # Customers and keys.
    async def create_customer(self, mode: Mode, customer_id: str, name: str) -> Customer: ...
    async def get_customer(self, mode: Mode, customer_id: str) -> Customer | None: ...
    async def list_customers(self, mode: Mode, *, limit: int, after: str | None = None) -> list[Customer]: ...
    async def create_api_key(self, mode: Mode, customer_id: str, *, key_id: str, key_hash: str,
                             prefix: str, attributes: dict[str, str] | None = None) -> ApiKey: ...
    async def find_api_key(self, key_hash: str) -> ApiKey | None: ...
    async def revoke_api_key(self, mode: Mode, key_id: str) -> ApiKey | None: ...
    async def set_api_key_attributes(self, mode: Mode, key_id: str, attributes: dict[str, str]) -> ApiKey | None:
        """Replace a key's pricing attributes; ``None`` when the mode has no such key."""

    # Money.
    async def credit(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                     idempotency_key: str, memo: str = "") -> LedgerEntry: ...
    async def reserve(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                      hold_id: str, ttl_ms: int) -> tuple[Hold, Balance]: ...
    async def extend_hold(self, hold_id: str, amount: int, *, step: int, ttl_ms: int) -> Hold: ...
    async def settle(self, hold_id: str, amount: int, usage: UsageRecord | None = None) -> Settlement: ...

    def lease_of(self, hold_id: str) -> tuple[str, int] | None:
        """The escrow lease (its hold id) and the share of it that backs ``hold_id`` when that hold lives only
        in this process's memory; ``None`` for a hold the store keeps. A bill kept past this process's life
        (:mod:`metergate.proxy.spool`) is settled through it."""
    async def expire_holds(self, *, now_ms: int, limit: int = 500) -> int: ...

    # Reads.
    async def balances(self, mode: Mode, customer_id: str) -> list[Balance]: ...
    async def balance(self, mode: Mode, customer_id: str, asset: str) -> Balance: ...
    async def get_hold(self, hold_id: str) -> Hold | None: ...
    async def ledger(self, mode: Mode, customer_id: str, *, limit: int,
                     before: int | None = None) -> list[LedgerEntry]: ...
    async def usage(self, mode: Mode, customer_id: str, *, limit: int,
                    before: int | None = None) -> list[tuple[int, UsageRecord]]: ...
    async def audit(self) -> list[str]:
        """Re-derive every balance from the ledger and return each discrepancy found (none: [])."""

    # Reports.
    async def usage_summary(self, mode: Mode, *, group_by: UsageGrouping, from_ms: int, to_ms: int,
                            limit: int) -> list[UsageAggregate]:
        """Usage sums per group and asset over ``from_ms <= created_at_ms < to_ms``, ordered by key, at most
        ``limit`` rows."""

    # Rate limits.
    async def rate_limit_overrides(self) -> list[RateLimitOverride]:
        """Every customer's override, all modes (the limiter keeps them in memory)."""

    async def set_rate_limit_override(self, mode: Mode, customer_id: str, *, requests_per_minute: int | None,
                                      tokens_per_minute: int | None) -> RateLimitOverride: ...
    async def delete_rate_limit_override(self, mode: Mode, customer_id: str) -> bool: ...
    async def claim_rate_quota(self, mode: Mode, customer_id: str, claims: list[QuotaClaim], *,
                               window_start_ms: int) -> list[QuotaGrant] | RateLimitDenial:
        """Lease quota from the shared windows by :func:`metergate.wallet.quota.grant`, every subject or none,
        atomically; ``customer_id`` is whose request it is (the key subjects are that customer's keys), so a
        store may keep all of a customer's windows together."""

    async def release_rate_quota(self, mode: Mode, customer_id: str, releases: list[tuple[str, int, int]], *,
                                 window_start_ms: int) -> None:
        """Give back unused leased quota, (subject, requests, tokens), to a window that is still open."""

    async def prune_rate_limit_windows(self, *, before_ms: int) -> int:
        """Delete the windows that started before ``before_ms``; return how many."""

    # Budgets (metergate/budgets): a tree of nodes below each customer, spending from its one wallet.
    async def budget_tree(self, mode: Mode, customer_id: str) -> Tree:
        """The customer's budget nodes, limits and key attachments."""

    async def budget_use(self, mode: Mode, customer_id: str, *, at_ms: int) -> dict[str, int]:
        """Each limit's claimed use in the window in force at ``at_ms``."""

    async def fired_budget_alerts(self, mode: Mode, customer_id: str | None, *, limit: int) -> list[FiredAlert]:
        """Alert thresholds' crossings (one customer's, or every customer's with ``None``), active first."""

    async def put_budget_node(self, node: Node) -> tuple[Node, bool]: ...
    async def update_budget_node(self, mode: Mode, customer_id: str, node_id: str,
                                 changes: dict[str, Any]) -> Node: ...
    async def delete_budget_node(self, mode: Mode, customer_id: str, node_id: str) -> bool: ...
    async def put_budget_limit(self, limit: Limit) -> tuple[Limit, bool]: ...
    async def update_budget_limit(self, mode: Mode, customer_id: str, limit_id: str,
                                  amount: int) -> Limit | None: ...
    async def delete_budget_limit(self, mode: Mode, customer_id: str, limit_id: str) -> bool: ...
    async def attach_budget_key(self, mode: Mode, key_id: str, node_id: str | None) -> str | None: ...
    async def claim_budget(self, mode: Mode, customer_id: str, claims: list[BudgetClaim], *,
                           now_ms: int) -> list[BudgetGrant] | BudgetDenial:
        """Lease from the limits' windows by :func:`metergate.wallet.quota.grant_one`, all or none, atomically."""

    async def release_budget(self, mode: Mode, customer_id: str, releases: list[tuple[str, int, int]]) -> None:
        """Give back (limit id, bucket start, amount) leased and not used."""

    async def prune_budget_usage(self, *, before_ms: int) -> int: ...

class HoldPath(Protocol):
    """The hot operations the proxy calls per request: a :class:`WalletStore`'s own, or escrow leases in front
    of it (:class:`metergate.wallet.escrow.Escrow`), with the same contract."""

    async def reserve(self, mode: Mode, customer_id: str, asset: str, amount: int, *,
                      hold_id: str, ttl_ms: int) -> tuple[Hold, Balance]: ...
    async def extend_hold(self, hold_id: str, amount: int, *, step: int, ttl_ms: int) -> Hold: ...
    async def settle(self, hold_id: str, amount: int, usage: UsageRecord | None = None) -> Settlement: ...

    def lease_of(self, hold_id: str) -> tuple[str, int] | None:
        """See :meth:`WalletStore.lease_of`."""
