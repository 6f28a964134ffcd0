"""Admission along a three-level path (customer root, project, agent), table-driven against the reference model.

Method: each case builds the tree on a real store (SQLite, then PostgreSQL), sets its limits, then plays
steps on an injected clock — admit a request of (tokens, spend) at a node, settle an earlier one for less,
advance the clock — and checks every admission's verdict twice: against the outcome the table states, and
against the reference model (tests/budgets/reference.py), which keeps every event and recounts windows from
first principles. A refused request must leave nothing counted anywhere on its path.
"""

from __future__ import annotations

from typing import Any

import pytest

from metergate.wallet.store import WalletStore
from tests.budgets.reference import DAY
from tests.budgets.world import World, three_levels

H = 3_600_000
M = 60_000

# (case id, limits, steps). A limit: (id, node, dimension, amount, kind, length_ms, buckets).
# Steps: ("admit", node, tokens, spend, expected refusing limit or None) | ("settle", step index, charged,
# tokens used) | ("advance", ms).
CASES: list[tuple[str, list[tuple[Any, ...]], list[tuple[Any, ...]]]] = [
    # --- request limits at each level
    ("agent requests per day", [("a1-req", "a1", "requests", 2, "day", 0, 1)], [
        ("admit", "a1", 1, 1, None), ("admit", "a1", 1, 1, None), ("admit", "a1", 1, 1, "a1-req"),
        ("admit", "a2", 1, 1, None),  # a sibling is not limited by a1's limit
        ("advance", DAY), ("admit", "a1", 1, 1, None)]),
    ("project requests shared by its agents", [("p-req", "p", "requests", 3, "fixed", H, 1)], [
        ("admit", "a1", 1, 1, None), ("admit", "a2", 1, 1, None), ("admit", "p", 1, 1, None),
        ("admit", "a2", 1, 1, "p-req"), ("advance", H), ("admit", "a2", 1, 1, None)]),
    ("customer root requests cap everything below", [("root-req", "root", "requests", 2, "week", 0, 1)], [
        ("admit", "a1", 1, 1, None), ("admit", "a2", 1, 1, None), ("admit", "root", 1, 1, "root-req"),
        ("advance", 7 * DAY), ("admit", "a1", 1, 1, None)]),
    # --- the lowest refusal leaves nothing claimed above it
    ("agent refuses, project keeps its quota", [("a1-req", "a1", "requests", 1, "day", 0, 1),
                                                ("p-req", "p", "requests", 2, "day", 0, 1)], [
        ("admit", "a1", 1, 1, None), ("admit", "a1", 1, 1, "a1-req"), ("admit", "a1", 1, 1, "a1-req"),
        ("admit", "a2", 1, 1, None), ("admit", "a2", 1, 1, "p-req")]),
    # --- tokens: the estimate is admitted, the provider's count is kept at settlement
    ("agent tokens, corrected at settlement", [("a1-tok", "a1", "tokens", 100, "rolling", 10 * M, 10)], [
        ("admit", "a1", 60, 1, None), ("admit", "a1", 60, 1, "a1-tok"),
        ("settle", 0, 1, 20),  # used 20 of the 60 estimated: 40 come back
        ("admit", "a1", 60, 1, None), ("admit", "a1", 30, 1, "a1-tok")]),
    ("a request larger than the limit never fits", [("p-tok", "p", "tokens", 50, "day", 0, 1)], [
        ("admit", "a1", 51, 1, "p-tok"), ("admit", "a1", 50, 1, None)]),
    # --- spend: the hold is admitted, the charge is kept
    ("project spend per month", [("p-spend", "p", "spend", 1_000, "month", 0, 1)], [
        ("admit", "a1", 1, 600, None), ("admit", "a2", 1, 600, "p-spend"),
        ("settle", 0, 250, 1),  # charged 250 of a 600 hold
        ("admit", "a2", 1, 600, None), ("admit", "a1", 1, 200, "p-spend"),
        ("advance", 31 * DAY), ("admit", "a1", 1, 1_000, None)]),
    ("spend at three levels, tightest wins", [("root-spend", "root", "spend", 5_000, "day", 0, 1),
                                              ("p-spend", "p", "spend", 3_000, "day", 0, 1),
                                              ("a1-spend", "a1", "spend", 1_000, "day", 0, 1)], [
        ("admit", "a1", 1, 900, None), ("admit", "a1", 1, 200, "a1-spend"), ("admit", "a2", 1, 2_000, None),
        ("admit", "a2", 1, 200, "p-spend"), ("admit", "root", 1, 2_000, None), ("admit", "root", 1, 200,
                                                                                "root-spend")]),
    # --- rolling windows free capacity bucket by bucket
    ("rolling requests free after the window", [("a1-roll", "a1", "requests", 2, "rolling", 60_000, 60)], [
        ("admit", "a1", 1, 1, None), ("advance", 30_000), ("admit", "a1", 1, 1, None),
        ("admit", "a1", 1, 1, "a1-roll"),
        ("advance", 29_999), ("admit", "a1", 1, 1, "a1-roll"),  # 59.999 s after the first: still counted
        ("advance", 1), ("admit", "a1", 1, 1, None),  # 60 s after the first's bucket started: freed
        ("admit", "a1", 1, 1, "a1-roll")]),
    ("rolling tokens mixed with a fixed request limit", [
        ("p-roll", "p", "tokens", 300, "rolling", 60 * M, 60), ("a2-req", "a2", "requests", 2, "fixed", 10 * M, 1)], [
        ("admit", "a1", 100, 1, None), ("advance", 20 * M), ("admit", "a2", 100, 1, None),
        ("admit", "a2", 50, 1, None), ("admit", "a2", 1, 1, "a2-req"), ("admit", "a1", 51, 1, "p-roll"),
        ("advance", 40 * M),  # the first request's bucket leaves the window: 100 tokens free
        ("admit", "a1", 100, 1, None), ("admit", "a1", 51, 1, "p-roll"),
        ("advance", 20 * M), ("admit", "a2", 150, 1, None)]),
]


@pytest.mark.parametrize(("limits", "steps"), [pytest.param(lim, st, id=name) for name, lim, st in CASES])
async def test_admission_matches_the_table_and_the_reference(store: WalletStore, limits: list[tuple[Any, ...]],
                                                             steps: list[tuple[Any, ...]]) -> None:
    world = await three_levels(store)
    for limit in limits:
        await world.limit(*limit)
    admitted: dict[int, tuple[Any, Any]] = {}
    for i, step in enumerate(steps):
        if step[0] == "advance":
            world.clock.now += step[1]
            continue
        if step[0] == "settle":
            ticket, event = admitted[step[1]]
            world.guard.settled(ticket, charged=step[2], tokens_used=step[3])
            world.ref.settle(event, charged=step[2], tokens_used=step[3])
            continue
        _, node, tokens, spend, expected = step
        refusing = world.ref.refusing(node, tokens, spend, world.clock.now)
        assert (expected is None and not refusing) or expected in refusing, (
            f"step {i}: the table says {expected}, the reference model {refusing}")
        ticket, refused = await world.admit(node, tokens, spend)
        assert refused == expected, f"step {i} {step}: refused by {refused}"
        if ticket is not None:
            event = world.ref.admit(node, tokens, spend, world.clock.now)
            assert event is not None
            admitted[_index(steps, i)] = (ticket, event)
    await check_use(world)


def _index(steps: list[tuple[Any, ...]], i: int) -> int:
    """Admissions are numbered 0, 1, ... in the order they appear (what "settle" steps refer to)."""
    return sum(1 for s in steps[:i] if s[0] == "admit")


async def check_use(world: World) -> None:
    """What the store counts per limit now equals the reference's use plus this process's unused leases."""
    await world.guard.flush()
    counted = await world.store.budget_use("test", world.customer, at_ms=world.clock.now)
    for limit_id, ref in world.ref.limits.items():
        limit = world.limits[limit_id]
        lease = world.guard.leases.find(limit)
        unused = lease.left if lease is not None and lease.bucket_start_ms == limit.window.bucket_start(
            world.clock.now) else 0
        assert counted.get(limit_id, 0) == world.ref.use(ref, world.clock.now) + unused, limit_id
        assert counted.get(limit_id, 0) <= ref.amount


async def test_a_refused_request_leaves_nothing_counted_above_it(store: WalletStore) -> None:
    world = await three_levels(store)
    await world.limit("a1-req", "a1", "requests", 1, "day")
    await world.limit("p-spend", "p", "spend", 500, "day")
    assert (await world.admit("a1", spend=100))[1] is None
    for _ in range(5):
        assert (await world.admit("a1", spend=100))[1] == "a1-req"
    # The project's spend counts only the one admitted request: a2 can still spend the other 400.
    assert (await world.admit("a2", spend=400))[1] is None
    assert (await world.admit("a2", spend=1))[1] == "p-spend"


async def test_give_back_after_a_refused_hold_returns_everything(store: WalletStore) -> None:
    world = await three_levels(store)
    await world.limit("p-req", "p", "requests", 1, "day")
    ticket, refused = await world.admit("a1")
    assert refused is None and ticket is not None
    world.guard.give_back(ticket)  # what the proxy does when the wallet then refuses the hold
    assert (await world.admit("a2"))[1] is None
    assert (await world.admit("a2"))[1] == "p-req"
