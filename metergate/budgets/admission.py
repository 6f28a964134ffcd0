"""Admission along a request's budget path: every node on it admits the request, or none is charged.

What the proxy calls (:class:`BudgetGuard`): :meth:`~BudgetGuard.resolve` finds the request's path (its
proxy key's node, or the node the app names in the trusted ``X-Metergate-Budget-Node`` header, else just the
customer's root) and checks the models the path allows; :meth:`~BudgetGuard.admit` then takes, with each
attempt at the wallet hold, one request, the admission estimate of tokens and the hold's amount from every
limit on the path — all of them or none, with no await between the check and the take (the fast path, from
this process's leases) or in one store transaction (a claim, all limits or none). If the wallet then
refuses the hold, :meth:`~BudgetGuard.give_back` returns everything, so that nothing stays counted for a
request that was not served. A stream's hold growing is spending too: :meth:`~BudgetGuard.extend` takes each
step from the path's spend limits. At settlement, :meth:`~BudgetGuard.settled` returns what the hold and the
token estimate did not use.

Outages: a tree that cannot be read is taken from the last read (or, never read, as no budget), like spend
caps; a claim that cannot reach the store fails the request (503): a limit is never passed unseen.

No durable write per request: a request is a store call only when a lease runs short (once per chunk).
Guarantees, per limit and window (see :mod:`metergate.budgets.leases`): what all replicas admit never
exceeds the limit; a refusal may come early by the other replicas' unused leases. A tree changed through
another replica's admin API is seen within ``cache_ttl_s`` (the same bound as a proxy key's revocation);
a lowered limit applies to new claims at once, while quota a replica had already leased (at most 1/16 of the
old limit) may still be admitted until it reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from metergate.budgets.claims import BudgetDenial
from metergate.budgets.denials import BudgetExceeded, ModelNotAllowed
from metergate.budgets.leases import BudgetLeaseBook
from metergate.budgets.model import NODE_ID, ROOT, Dimension, Limit, Node, Tree, path_text
from metergate.errors import BadRequest, Forbidden
from metergate.wallet.errors import STORAGE_DOWN
from metergate.wallet.models import Mode, now_ms
from metergate.wallet.store import WalletStore

log = logging.getLogger(__name__)

NODE_HEADER = "X-Metergate-Budget-Node"
_CACHE_MAX = 100_000
_PRUNE_EVERY_MS = 3_600_000
_KEEP_BUCKETS_MS = 367 * 86_400_000  # the longest window (a year and a day) plus a day


@dataclass(slots=True)
class Taken:
    """What one limit admitted for a request, from which bucket of its window."""

    limit: Limit
    bucket_start_ms: int
    amount: int


@dataclass(slots=True)
class Ticket:
    """A request's budget path, its limits, and what it has been admitted for so far."""

    mode: Mode
    customer_id: str
    path: tuple[Node, ...]
    limits: tuple[Limit, ...]  # every limit on the path, by id
    taken: list[Taken] = field(default_factory=list)
    tokens: int = 0  # the token estimate admitted

    @property
    def path_text(self) -> str:
        return path_text(self.path)

    @property
    def node(self) -> Node:
        return self.path[-1]


class BudgetGuard:
    def __init__(self, store: WalletStore, *, cache_ttl_s: float = 2.0, clock: Callable[[], int] = now_ms) -> None:
        self._store = store
        self._ttl_s = cache_ttl_s
        #: Milliseconds since the epoch; a seam for tests that need a window to roll.
        self.clock = clock
        self._trees: dict[tuple[Mode, str], tuple[float, Tree]] = {}
        self._paths: dict[int, tuple[Tree, dict[str, tuple[tuple[Node, ...], tuple[Limit, ...]]]]] = {}
        self.leases = BudgetLeaseBook()
        self._task: asyncio.Task[None] | None = None
        self._pruned_at_ms = 0
        self._warned_at = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def start(self, interval_s: float = 1.0) -> None:
        self._task = asyncio.create_task(self._flush_forever(interval_s))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for lease in self.leases.unused():  # a stopping process gives its unused leases back
            self.leases.returns.setdefault((lease.mode, lease.customer_id), []).append(
                (lease.limit_id, lease.bucket_start_ms, lease.left))
            lease.left = 0
        await self.flush()

    async def _flush_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()
            now = self.clock()
            if now - self._pruned_at_ms >= _PRUNE_EVERY_MS:
                self._pruned_at_ms = now
                with contextlib.suppress(Exception):
                    await self._store.prune_budget_usage(before_ms=now - _KEEP_BUCKETS_MS)

    async def flush(self) -> None:
        """Give back to the store what is queued (unused quota of buckets or limit versions that passed)."""
        for (mode, customer_id), releases in self.leases.take_returns().items():
            try:
                await self._store.release_budget(mode, customer_id, releases)
            except STORAGE_DOWN as exc:
                log.warning("giving back unused budget quota failed (%s); it lapses with its window",
                            type(exc).__name__)
            except Exception:
                log.exception("giving back unused budget quota failed; it lapses with its window")

    # ------------------------------------------------------------------ trees

    async def tree(self, mode: Mode, customer_id: str) -> Tree:
        key = (mode, customer_id)
        cached = self._trees.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        try:
            tree = await self._store.budget_tree(mode, customer_id)
        except STORAGE_DOWN as exc:
            # The database is unreachable (a wallet that rides out outages, Redis, still answers): keep the
            # tree last read, or, never having read one, no budget — as spend caps do, a customer-chosen
            # limit must not turn an outage into refusals. A claim a limit needs still fails (503).
            if time.monotonic() - self._warned_at > 10:
                self._warned_at = time.monotonic()
                log.warning("budget trees unreadable (%s); using the trees read before", type(exc).__name__)
            return cached[1] if cached is not None else Tree(mode, customer_id)
        if len(self._trees) >= _CACHE_MAX:
            self._trees.clear()
        if cached is not None:
            self._paths.pop(id(cached[1]), None)
        self._trees[key] = (now, tree)
        return tree

    def invalidate(self, mode: Mode, customer_id: str) -> None:
        """Take a change made through this process's admin API into effect at once."""
        cached = self._trees.pop((mode, customer_id), None)
        if cached is not None:
            self._paths.pop(id(cached[1]), None)

    # ------------------------------------------------------------------ admission

    async def resolve(self, mode: Mode, customer_id: str, *, key_id: str | None, header: str | None,
                      header_trusted: bool, model: str | None) -> Ticket | None:
        """The request's path and limits, or ``None`` when its customer has no budget tree. Refuses a node
        header that is untrusted (a proxy-key request: its node is the key's) or names no node, and a model
        a node on the path does not allow (``model=None``: no model to check, a read of the caller's budget)."""
        if header is not None and not header_trusted:
            raise Forbidden(f"The {NODE_HEADER} header is only accepted with the trusted customer header; a proxy "
                            "key's requests are charged to the node the key is attached to.",
                            code="untrusted_budget_node_header", param=NODE_HEADER)
        if header is not None and not NODE_ID.fullmatch(header):
            raise BadRequest(f"The {NODE_HEADER} header is not a valid node id.", code="unknown_budget_node",
                             param=NODE_HEADER)
        tree = await self.tree(mode, customer_id)
        if tree.empty:
            if header is not None:
                raise BadRequest(f"Customer {customer_id!r} has no budget node {header!r}.",
                                 code="unknown_budget_node", param=NODE_HEADER)
            return None
        node_id = header if header is not None else tree.key_nodes.get(key_id or "", ROOT)
        found = self._path(tree, node_id)
        if found is None:
            if header is not None:
                raise BadRequest(f"Customer {customer_id!r} has no budget node {header!r}.",
                                 code="unknown_budget_node", param=NODE_HEADER)
            found = self._path(tree, ROOT)  # a key attached to a node deleted since: the customer's own limits
            assert found is not None, "a tree with nodes has its root"
        path, limits = found
        for node in path:
            if model is not None and not node.allows(model):
                raise ModelNotAllowed(path, node, model)
        return Ticket(mode, customer_id, path, limits)

    def _path(self, tree: Tree, node_id: str) -> tuple[tuple[Node, ...], tuple[Limit, ...]] | None:
        """A node's path and the limits on it, by id, computed once per loaded tree."""
        paths = self._paths.get(id(tree))
        if paths is None or paths[0] is not tree:
            if len(self._paths) >= _CACHE_MAX:
                self._paths.clear()
            paths = self._paths[id(tree)] = (tree, {})
        cached = paths[1].get(node_id)
        if cached is None:
            path = tree.path(node_id)
            if not path:
                return None
            limits = tuple(sorted((limit for node in path for limit in tree.limits.get(node.id, ())),
                                  key=lambda limit: limit.id))
            cached = paths[1][node_id] = (path, limits)
        return cached

    async def admit(self, ticket: Ticket, *, tokens: int, spend: int, asset: str) -> None:
        """Admit one request of ``tokens`` (estimate) holding ``spend`` of ``asset`` on every limit of the path,
        or raise :class:`BudgetExceeded` having admitted nothing."""
        assert not ticket.taken, "a ticket is admitted once; give_back first to admit it again"
        needs = [(limit, _need(limit, tokens=tokens, spend=spend, asset=asset, requests=1))
                 for limit in ticket.limits]
        ticket.taken = await self._take(ticket, [(limit, need) for limit, need in needs if need > 0])
        ticket.tokens = tokens

    async def extend(self, ticket: Ticket, amount: int, asset: str) -> None:
        """A growing hold's next step: ``amount`` more from the path's spend limits in ``asset``."""
        needs = [(limit, amount) for limit in ticket.limits if limit.dimension == "spend" and limit.asset == asset]
        if needs and amount > 0:
            ticket.taken.extend(await self._take(ticket, needs))

    def give_back(self, ticket: Ticket) -> None:
        """Return everything the ticket was admitted for (its hold was refused)."""
        for taken in ticket.taken:
            self._return(taken, taken.amount)
        ticket.taken = []

    def settled(self, ticket: Ticket, *, charged: int, tokens_used: int) -> None:
        """Return what the request did not use: its spend beyond ``charged``, its tokens beyond the count."""
        spent = {limit_id: charged for limit_id in {t.limit.id for t in ticket.taken if t.limit.dimension == "spend"}}
        unused_tokens = max(0, ticket.tokens - tokens_used)
        for taken in ticket.taken:
            if taken.limit.dimension == "spend":
                keep = min(taken.amount, spent[taken.limit.id])
                spent[taken.limit.id] -= keep
                self._return(taken, taken.amount - keep)
            elif taken.limit.dimension == "tokens":
                self._return(taken, min(taken.amount, unused_tokens))
        ticket.taken = []

    def _return(self, taken: Taken, amount: int) -> None:
        if amount <= 0:
            return
        limit = taken.limit
        lease = self.leases.find(limit)
        if lease is not None and lease.version == limit.version and lease.bucket_start_ms == taken.bucket_start_ms:
            lease.left += amount  # still this bucket's and this version's: admitted again locally
            return
        self.leases.returns.setdefault((limit.mode, limit.customer_id), []).append(
            (limit.id, taken.bucket_start_ms, amount))

    # ------------------------------------------------------------------ leases and claims

    def _try(self, needs: list[tuple[Limit, int]], now: int) -> list[Taken] | None:
        """Take every need from this process's leases if all of them cover it, else take nothing."""
        leases = [self.leases.lease(limit, limit.window.bucket_start(now)) for limit, _ in needs]
        if any(lease.left < need for lease, (_, need) in zip(leases, needs, strict=True)):
            return None
        out: list[Taken] = []
        for lease, (limit, need) in zip(leases, needs, strict=True):
            lease.left -= need
            out.append(Taken(limit, lease.bucket_start_ms, need))
        return out

    async def _take(self, ticket: Ticket, needs: list[tuple[Limit, int]]) -> list[Taken]:
        if not needs:
            return []
        taken = self._try(needs, self.clock())
        if taken is not None:
            return taken
        now = self.clock()
        locks = [self.leases.lease(limit, limit.window.bucket_start(now)).lock for limit, _ in needs]
        async with contextlib.AsyncExitStack() as stack:
            for lock in locks:  # needs are in limit-id order: every request locks in the same order
                await stack.enter_async_context(lock)
            for _ in range(3):
                taken = await self._claim(ticket, needs)
                if taken is not None:
                    return taken
        raise AssertionError("three budget claims in a row outlived their buckets")

    async def _claim(self, ticket: Ticket, needs: list[tuple[Limit, int]]) -> list[Taken] | None:
        now = self.clock()
        taken = self._try(needs, now)
        if taken is not None:
            return taken  # served by a claim made while this request waited for the locks
        leases = [self.leases.lease(limit, limit.window.bucket_start(now)) for limit, _ in needs]
        returns = self.leases.returns.pop((ticket.mode, ticket.customer_id), None)
        if returns:
            # Quota given back since (a passed bucket's, an old limit version's) first: a claim must see it,
            # and a remembered refusal may no longer hold.
            await self._store.release_budget(ticket.mode, ticket.customer_id, returns)
            for lease in leases:
                lease.denial = None
        for lease, (limit, need) in zip(leases, needs, strict=True):
            denial = self.leases.known_denial(lease, need, now)
            if denial is not None:
                raise self._refusal(ticket, limit, denial, need)
        short = [(lease, limit, need) for lease, (limit, need) in zip(leases, needs, strict=True) if lease.left < need]
        claims = [self.leases.claim(lease, need, now) for lease, _, need in short]
        outcome = await self._store.claim_budget(ticket.mode, ticket.customer_id, claims, now_ms=now)
        done = self.clock()
        if isinstance(outcome, BudgetDenial):
            for lease, limit, need in short:
                if lease.limit_id == outcome.limit_id:
                    lease.denial, lease.denied_at_ms = outcome, done
                    raise self._refusal(ticket, limit, outcome, need)
            raise AssertionError("a denial names a limit of the claim")
        granted = {g.limit_id: g for g in outcome}
        gone: set[str] = set()
        for lease, limit, _ in short:
            g = granted[lease.limit_id]
            if g.amount is None:
                gone.add(limit.id)
                self.invalidate(ticket.mode, ticket.customer_id)
                continue
            if g.version != limit.version:
                self.invalidate(ticket.mode, ticket.customer_id)  # the tree is stale: reload it
            if lease.bucket_start_ms == g.bucket_start_ms and lease.version == limit.version:
                lease.left += g.granted
                lease.denial = None
            else:
                self.leases.returns.setdefault((ticket.mode, ticket.customer_id), []).append(
                    (limit.id, g.bucket_start_ms, g.granted))  # claimed for a bucket that has passed
        return self._try([(limit, need) for limit, need in needs if limit.id not in gone], self.clock())

    def _refusal(self, ticket: Ticket, limit: Limit, denial: BudgetDenial, need: int) -> BudgetExceeded:
        node = next((n for n in ticket.path if n.id == limit.node_id), ticket.node)
        return BudgetExceeded(ticket.path, node, limit, denial.used, need, denial.retry_after_ms or
                              limit.window.frees_at(limit.window.bucket_start(self.clock())) - self.clock())


def _need(limit: Limit, *, tokens: int, spend: int, asset: str, requests: int) -> int:
    dimension: Dimension = limit.dimension
    if dimension == "requests":
        return requests
    if dimension == "tokens":
        return tokens
    return spend if limit.asset == asset else 0


__all__ = ["NODE_HEADER", "BudgetGuard", "Taken", "Ticket"]
