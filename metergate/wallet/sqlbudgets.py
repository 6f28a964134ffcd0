"""The SQL store's budgets: nodes, limits, key attachments, and the limits' windows shared by every replica.

A limit's window is its rows of ``budget_usage``, one per bucket, holding the quota *claimed* in that bucket
by every process (leased, admitted or not). A claim runs in one write transaction: it locks each limit's row
of ``budget_limits`` in limit-id order (``SELECT ... FOR UPDATE`` on PostgreSQL, so that claims on one
limit queue and two replicas never wait on each other's rows in opposite orders; SQLite has one writer),
sums the buckets the limit counts, applies :func:`metergate.wallet.quota.grant_one` with the limit's amount
as the row has it, and writes the grants only if every limit's need fits (all or none). A claim is made per
chunk, not per request (:mod:`metergate.budgets.leases`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy import Connection, Row, and_, delete, select, update

from metergate.budgets.claims import BudgetClaim, BudgetDenial, BudgetGrant
from metergate.budgets.model import (
    MAX_DEPTH,
    MAX_LIMITS_PER_NODE,
    MAX_NODES,
    ROOT,
    FiredAlert,
    Limit,
    Node,
    Tree,
)
from metergate.budgets.windows import Window, retry_after_ms
from metergate.errors import Conflict, NotFound
from metergate.wallet import schema as t
from metergate.wallet.models import Mode, now_ms
from metergate.wallet.quota import grant_one
from metergate.wallet.sqlrunner import SqlRunner


class NodeNotFound(NotFound):
    def __init__(self, node_id: str) -> None:
        super().__init__(f"No budget node {node_id!r} for this customer.", code="unknown_budget_node")


class BudgetTables(SqlRunner):
    # ------------------------------------------------------------------ reads

    async def budget_tree(self, mode: Mode, customer_id: str) -> Tree:
        """The customer's nodes, limits and key attachments, read together."""
        return await self.read(_tree, mode, customer_id)

    async def budget_use(self, mode: Mode, customer_id: str, *, at_ms: int) -> dict[str, int]:
        """Each limit's claimed use in the window in force at ``at_ms`` (limits without use are left out)."""

        def op(conn: Connection) -> dict[str, int]:
            tree = _tree(conn, mode, customer_id)
            out: dict[str, int] = {}
            for limits in tree.limits.values():
                for limit in limits:
                    used = sum(u for _, u in _buckets(conn, limit, limit.window.bucket_start(at_ms)))
                    if used:
                        out[limit.id] = used
            return out

        return await self.read(op)

    async def fired_budget_alerts(self, mode: Mode, customer_id: str | None, *, limit: int) -> list[FiredAlert]:
        """The alert thresholds' crossings, of one customer or (``None``) of every customer in ``mode``:
        those still active first, then the recovered ones, newest first within each."""
        e, r = t.budget_alert_events.c, t.budget_alert_rules.c
        query = (select(t.budget_alert_events, r.target)
                 .join(t.budget_alert_rules, and_(r.mode == e.mode, r.customer_id == e.customer_id,
                                                  r.id == e.rule_id))
                 .where(e.mode == mode)
                 .order_by(e.recovered_at_ms.is_not(None), e.fired_at_ms.desc(), e.customer_id, e.rule_id,
                           e.threshold)
                 .limit(limit))
        if customer_id is not None:
            query = query.where(e.customer_id == customer_id)
        rows = await self.read(lambda conn: conn.execute(query).all())
        return [FiredAlert(row.mode, row.customer_id, row.rule_id, row.target, row.threshold,
                           int(row.period_start_ms), int(row.fired_at_ms),
                           None if row.recovered_at_ms is None else int(row.recovered_at_ms)) for row in rows]

    # ------------------------------------------------------------------ nodes

    async def put_budget_node(self, node: Node) -> tuple[Node, bool]:
        """Create ``node`` (and the customer's root if need be); an identical node already there is returned
        as it is (``False``: not created), a different one is a 409."""

        def op(conn: Connection) -> tuple[Node, bool]:
            self.require_customer(conn, node.mode, node.customer_id)
            tree = _tree(conn, node.mode, node.customer_id)
            existing = tree.nodes.get(node.id)
            if existing is not None:
                if (existing.parent_id, existing.kind, existing.name, existing.allowed_models) != (
                        node.parent_id, node.kind, node.name, node.allowed_models):
                    raise Conflict(f"Budget node {node.id!r} already exists with other settings.",
                                   code="already_exists", param="id")
                return existing, False
            if node.id == ROOT:
                raise Conflict("'root' is the customer's own node; it exists already.", code="already_exists",
                               param="id")
            if len(tree.nodes) >= MAX_NODES:
                raise Conflict(f"A customer has at most {MAX_NODES} budget nodes.", code="too_many_nodes")
            if ROOT not in tree.nodes:
                _insert_node(conn, Node(node.mode, node.customer_id, ROOT, None, "customer",
                                        created_at_ms=now_ms()))
                tree = _tree(conn, node.mode, node.customer_id)
            assert node.parent_id is not None
            parent_path = tree.path(node.parent_id)
            if not parent_path:
                raise NodeNotFound(node.parent_id)
            if len(parent_path) > MAX_DEPTH:  # the root plus MAX_DEPTH nodes below it
                raise Conflict(f"Budget trees are at most {MAX_DEPTH} levels below the customer.",
                               code="tree_too_deep", param="parent_id")
            node_now = replace(node, created_at_ms=node.created_at_ms or now_ms())
            _insert_node(conn, node_now)
            return node_now, True

        return await self.write(op)

    async def update_budget_node(self, mode: Mode, customer_id: str, node_id: str, changes: dict[str, Any]) -> Node:
        """Change a node's ``name`` or ``allowed_models`` (the root's too: it is created if need be)."""

        def op(conn: Connection) -> Node:
            self.require_customer(conn, mode, customer_id)
            tree = _tree(conn, mode, customer_id)
            if node_id == ROOT and ROOT not in tree.nodes:
                _insert_node(conn, Node(mode, customer_id, ROOT, None, "customer", created_at_ms=now_ms()))
            elif node_id not in tree.nodes:
                raise NodeNotFound(node_id)
            values: dict[str, Any] = {}
            if "name" in changes:
                values["name"] = changes["name"]
            if "allowed_models" in changes:
                models = changes["allowed_models"]
                values["allowed_models"] = list(models) if models is not None else None
            if values:
                n = t.budget_nodes.c
                conn.execute(update(t.budget_nodes).where(
                    n.mode == mode, n.customer_id == customer_id, n.id == node_id).values(**values))
            return _tree(conn, mode, customer_id).nodes[node_id]

        return await self.write(op)

    async def delete_budget_node(self, mode: Mode, customer_id: str, node_id: str) -> bool:
        """Delete a leaf node with its limits, their windows and its keys' attachments (409 with children)."""

        def op(conn: Connection) -> bool:
            tree = _tree(conn, mode, customer_id)
            if node_id not in tree.nodes:
                return False
            if tree.children(node_id):
                raise Conflict(f"Budget node {node_id!r} has child nodes; delete them first.",
                               code="node_has_children")
            limit_ids = [limit.id for limit in tree.limits.get(node_id, ())]
            _delete_limits(conn, mode, customer_id, limit_ids)
            k, n = t.budget_key_nodes.c, t.budget_nodes.c
            conn.execute(delete(t.budget_key_nodes).where(k.mode == mode, k.customer_id == customer_id,
                                                          k.node_id == node_id))
            conn.execute(delete(t.budget_nodes).where(n.mode == mode, n.customer_id == customer_id,
                                                      n.id == node_id))
            return True

        return await self.write(op)

    # ------------------------------------------------------------------ limits

    async def put_budget_limit(self, limit: Limit) -> tuple[Limit, bool]:
        """Create a limit on a node (the root is created if need be); identical replay: ``False``."""

        def op(conn: Connection) -> tuple[Limit, bool]:
            self.require_customer(conn, limit.mode, limit.customer_id)
            tree = _tree(conn, limit.mode, limit.customer_id)
            for limits in tree.limits.values():
                for existing in limits:
                    if existing.id == limit.id:
                        if (existing.node_id, existing.dimension, existing.amount, existing.window,
                                existing.asset) != (limit.node_id, limit.dimension, limit.amount, limit.window,
                                                    limit.asset):
                            raise Conflict(f"Budget limit {limit.id!r} already exists with other settings.",
                                           code="already_exists", param="id")
                        return existing, False
            if limit.node_id == ROOT and ROOT not in tree.nodes:
                _insert_node(conn, Node(limit.mode, limit.customer_id, ROOT, None, "customer",
                                        created_at_ms=now_ms()))
            elif limit.node_id not in tree.nodes:
                raise NodeNotFound(limit.node_id)
            if len(tree.limits.get(limit.node_id, ())) >= MAX_LIMITS_PER_NODE:
                raise Conflict(f"A budget node has at most {MAX_LIMITS_PER_NODE} limits.", code="too_many_limits")
            conn.execute(t.budget_limits.insert().values(_limit_row(limit)))
            return limit, True

        return await self.write(op)

    async def update_budget_limit(self, mode: Mode, customer_id: str, limit_id: str, amount: int) -> Limit | None:
        """Change a limit's amount (its version goes up: every process drops its leases of the old one)."""

        def op(conn: Connection) -> Limit | None:
            c = t.budget_limits.c
            row = conn.execute(self.for_update(select(t.budget_limits).where(
                c.mode == mode, c.customer_id == customer_id, c.id == limit_id))).first()
            if row is None:
                return None
            if int(row.amount) != amount:
                conn.execute(update(t.budget_limits).where(
                    c.mode == mode, c.customer_id == customer_id, c.id == limit_id,
                ).values(amount=amount, version=c.version + 1, updated_at_ms=now_ms()))
            return _limit(conn.execute(select(t.budget_limits).where(
                c.mode == mode, c.customer_id == customer_id, c.id == limit_id)).one())

        return await self.write(op)

    async def delete_budget_limit(self, mode: Mode, customer_id: str, limit_id: str) -> bool:
        def op(conn: Connection) -> bool:
            return _delete_limits(conn, mode, customer_id, [limit_id]) > 0

        return await self.write(op)

    # ------------------------------------------------------------------ keys

    async def attach_budget_key(self, mode: Mode, key_id: str, node_id: str | None) -> str | None:
        """Attach a proxy key to a node of its customer (``None``: detach); the key's customer, or ``None``
        when the mode has no such key."""

        def op(conn: Connection) -> str | None:
            a = t.api_keys.c
            key = conn.execute(select(a.customer_id).where(a.id == key_id, a.mode == mode)).first()
            if key is None:
                return None
            customer_id = str(key.customer_id)
            k = t.budget_key_nodes.c
            conn.execute(delete(t.budget_key_nodes).where(k.key_id == key_id))
            if node_id is not None:
                if node_id not in _tree(conn, mode, customer_id).nodes:
                    raise NodeNotFound(node_id)
                conn.execute(t.budget_key_nodes.insert().values(key_id=key_id, mode=mode, customer_id=customer_id,
                                                                node_id=node_id))
            return customer_id

        return await self.write(op)

    # ------------------------------------------------------------------ windows

    async def claim_budget(self, mode: Mode, customer_id: str, claims: list[BudgetClaim], *,
                           now_ms: int) -> list[BudgetGrant] | BudgetDenial:
        """Lease from each limit's window by :func:`metergate.wallet.quota.grant_one`, all or none."""
        return await self.write(_claim, self.for_update, self.dialect_insert, mode, customer_id, claims, now_ms)

    async def release_budget(self, mode: Mode, customer_id: str, releases: list[tuple[str, int, int]]) -> None:
        """Give back (limit id, bucket start, amount) claimed and not used."""

        def op(conn: Connection) -> None:
            u = t.budget_usage.c
            for limit_id, bucket, amount in sorted(releases):
                assert amount >= 0, "a release gives back what was claimed"
                conn.execute(update(t.budget_usage).where(
                    u.mode == mode, u.customer_id == customer_id, u.limit_id == limit_id,
                    u.bucket_start_ms == bucket, u.used >= amount).values(used=u.used - amount))

        await self.write(op)

    async def prune_budget_usage(self, *, before_ms: int) -> int:
        """Delete buckets that started before ``before_ms`` (older than any window counts: a year and a day)."""
        u = t.budget_usage.c
        pruned: int = await self.write(lambda conn: conn.execute(delete(t.budget_usage).where(
            u.bucket_start_ms < before_ms)).rowcount)
        return pruned


def _claim(conn: Connection, for_update: Any, insert_: Any, mode: Mode, customer_id: str,
           claims: list[BudgetClaim], at_ms: int) -> list[BudgetGrant] | BudgetDenial:
    c = t.budget_limits.c
    decided: list[tuple[Limit | None, BudgetClaim, int, int, int]] = []
    for claim in sorted(claims, key=lambda cl: cl.limit_id):
        row = conn.execute(for_update(select(t.budget_limits).where(
            c.mode == mode, c.customer_id == customer_id, c.id == claim.limit_id))).first()
        if row is None:
            decided.append((None, claim, 0, 0, 0))
            continue
        limit = _limit(row)
        bucket = limit.window.bucket_start(at_ms)
        buckets = _buckets(conn, limit, bucket)
        used = sum(u for _, u in buckets)
        granted = grant_one(limit.amount, used, claim.need, claim.want)
        if granted is None:
            return BudgetDenial(limit.id, limit.node_id, limit.amount, used, claim.need,
                                retry_after_ms(limit.window, buckets, limit=limit.amount, need=claim.need,
                                               now_ms=at_ms))
        decided.append((limit, claim, bucket, granted, used))
    u = t.budget_usage
    out: list[BudgetGrant] = []
    for found, claim, bucket, granted, used in decided:
        if found is None:
            out.append(BudgetGrant(claim.limit_id, 0, claim.want, 0, None, 0))
            continue
        if granted:
            stmt = insert_(u).values(mode=mode, customer_id=customer_id, limit_id=found.id, bucket_start_ms=bucket,
                                     used=granted)
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["mode", "customer_id", "limit_id", "bucket_start_ms"],
                set_={"used": u.c.used + stmt.excluded.used}))
        out.append(BudgetGrant(found.id, bucket, granted, used + granted, found.amount, found.version))
    return out


def _buckets(conn: Connection, limit: Limit, bucket_start_ms: int) -> list[tuple[int, int]]:
    """The (start, use) of every bucket the limit counts from ``bucket_start_ms`` on, oldest first. Buckets
    after it count too: a replica whose clock runs ahead may have claimed there already."""
    u = t.budget_usage.c
    rows = conn.execute(select(u.bucket_start_ms, u.used).where(
        u.mode == limit.mode, u.customer_id == limit.customer_id, u.limit_id == limit.id,
        u.bucket_start_ms >= limit.window.counted_from(bucket_start_ms), u.used > 0,
    ).order_by(u.bucket_start_ms)).all()
    return [(int(r.bucket_start_ms), int(r.used)) for r in rows]


def _tree(conn: Connection, mode: Mode, customer_id: str) -> Tree:
    n, c, k = t.budget_nodes.c, t.budget_limits.c, t.budget_key_nodes.c
    nodes = {str(r.id): _node(r) for r in conn.execute(select(t.budget_nodes).where(
        n.mode == mode, n.customer_id == customer_id)).all()}
    if not nodes:
        return Tree(mode, customer_id)
    limits: dict[str, list[Limit]] = {}
    for r in conn.execute(select(t.budget_limits).where(c.mode == mode, c.customer_id == customer_id)
                          .order_by(c.id)).all():
        limits.setdefault(str(r.node_id), []).append(_limit(r))
    keys = {str(r.key_id): str(r.node_id) for r in conn.execute(select(k.key_id, k.node_id).where(
        k.mode == mode, k.customer_id == customer_id)).all()}
    return Tree(mode, customer_id, nodes, {node: tuple(ls) for node, ls in limits.items()}, keys)


def _delete_limits(conn: Connection, mode: Mode, customer_id: str, limit_ids: list[str]) -> int:
    if not limit_ids:
        return 0
    c, u = t.budget_limits.c, t.budget_usage.c
    conn.execute(delete(t.budget_usage).where(u.mode == mode, u.customer_id == customer_id,
                                              u.limit_id.in_(limit_ids)))
    deleted: int = conn.execute(delete(t.budget_limits).where(c.mode == mode, c.customer_id == customer_id,
                                                              c.id.in_(limit_ids))).rowcount
    return deleted


def _insert_node(conn: Connection, node: Node) -> None:
    conn.execute(t.budget_nodes.insert().values(
        mode=node.mode, customer_id=node.customer_id, id=node.id, parent_id=node.parent_id, kind=node.kind,
        name=node.name, allowed_models=list(node.allowed_models) if node.allowed_models is not None else None,
        created_at_ms=node.created_at_ms or now_ms()))


def _node(r: Row[Any]) -> Node:
    models = r.allowed_models
    return Node(r.mode, r.customer_id, r.id, r.parent_id, r.kind, r.name or "",
                tuple(models) if models is not None else None, int(r.created_at_ms))


def _limit_row(limit: Limit) -> dict[str, Any]:
    return {"mode": limit.mode, "customer_id": limit.customer_id, "id": limit.id, "node_id": limit.node_id,
            "dimension": limit.dimension, "amount": limit.amount, "window_kind": limit.window.kind,
            "window_length_ms": limit.window.length_ms, "window_buckets": limit.window.buckets,
            "asset": limit.asset, "version": limit.version, "updated_at_ms": now_ms()}


def _limit(r: Row[Any]) -> Limit:
    window = Window(r.window_kind, int(r.window_length_ms), int(r.window_buckets))
    return Limit(r.mode, r.customer_id, r.id, r.node_id, r.dimension, int(r.amount), window, r.asset,
                 int(r.version))


__all__ = ["BudgetTables", "NodeNotFound"]
