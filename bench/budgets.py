"""What budget admission costs per request: a three-level path vs a flat customer vs no budget, in one run.

    uv run python bench/budgets.py            # 7 interleaved rounds of 20,000 admissions per target
    uv run python bench/budgets.py --quick    # 3 rounds of 5,000

Why: a request's admission along its budget path must not be a store round trip (the wallet-engine rule: no
durable write per request on a hot path). This drives :class:`metergate.budgets.admission.BudgetGuard`
exactly as the proxy does — resolve the path, admit one request (tokens, spend), settle it for less — on a
real SQLite store, for three targets on one customer each:

* ``none``: the customer has no budget tree (a cached empty tree: the cost every request pays);
* ``flat``: the customer's root with one requests limit;
* ``three_levels``: root -> project -> agent, each with a requests, a tokens and a spend limit (9 limits).

Limits are far above the load, so nothing is refused and the difference is the cost of counting. Rounds
interleave the targets, alternating the order; per round the ratios to ``flat`` are taken, then the medians
are reported, with the store calls (claims) per 1,000 admissions. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from metergate.budgets.admission import BudgetGuard
from metergate.budgets.model import ROOT, Limit, Node
from metergate.budgets.windows import Window
from metergate.wallet.sql import SqlWalletStore

BIG = 10**14
TARGETS = ("none", "flat", "three_levels")


class CountingStore(SqlWalletStore):
    claims = 0

    async def claim_budget(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        CountingStore.claims += 1
        return await super().claim_budget(*args, **kwargs)


async def setup(store: SqlWalletStore) -> None:
    for customer in TARGETS:
        await store.create_customer("test", customer, customer)
    await store.put_budget_limit(Limit("test", "flat", "flat-req", ROOT, "requests", BIG, Window("day")))
    await store.put_budget_node(Node("test", "three_levels", "p", ROOT, "project"))
    await store.put_budget_node(Node("test", "three_levels", "a", "p", "agent"))
    for node in (ROOT, "p", "a"):
        for dimension, window in (("requests", Window("rolling", 60_000, 60)), ("tokens", Window("day")),
                                  ("spend", Window("month"))):
            await store.put_budget_limit(Limit("test", "three_levels", f"{node}-{dimension}", node, dimension,  # type: ignore[arg-type]
                                               BIG, window, "USD" if dimension == "spend" else None))


async def one_round(guard: BudgetGuard, target: str, n: int) -> tuple[float, int]:
    node = "a" if target == "three_levels" else None
    claims_before = CountingStore.claims
    started = time.perf_counter()
    for _ in range(n):
        ticket = await guard.resolve("test", target, key_id=None, header=node, header_trusted=True,
                                     model="gpt-4o-mini")
        if ticket is None:
            continue
        await guard.admit(ticket, tokens=120, spend=900, asset="USD")
        guard.settled(ticket, charged=300, tokens_used=60)
    return (time.perf_counter() - started) / n * 1e9, CountingStore.claims - claims_before


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        store = CountingStore(f"sqlite:///{Path(tmp) / 'bench.db'}")
        await store.open()
        try:
            await setup(store)
            guard = BudgetGuard(store, cache_ttl_s=3600)
            for target in TARGETS:  # warm: trees cached, leases grown to their steady size
                await one_round(guard, target, 2_000)
            ns: dict[str, list[float]] = {t: [] for t in TARGETS}
            claims: dict[str, int] = dict.fromkeys(TARGETS, 0)
            ratios: dict[str, list[float]] = {"three_levels": [], "none": []}
            for r in range(args.rounds):
                order = TARGETS if r % 2 == 0 else TARGETS[::-1]
                got = {}
                for target in order:
                    got[target], calls = await one_round(guard, target, args.admissions)
                    ns[target].append(got[target])
                    claims[target] += calls
                ratios["three_levels"].append(got["three_levels"] / got["flat"])
                ratios["none"].append(got["none"] / got["flat"])
        finally:
            await store.close()
    total = args.rounds * args.admissions
    return {"rounds": args.rounds, "admissions_per_round": args.admissions,
            "ns_per_admission_median": {t: round(statistics.median(v)) for t, v in ns.items()},
            "ratio_to_flat_median": {t: round(statistics.median(v), 2) for t, v in ratios.items()},
            "store_claims_per_1000": {t: round(c * 1000 / total, 3) for t, c in claims.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5,000 admissions")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--admissions", type=int)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.admissions = args.admissions or (5_000 if args.quick else 20_000)
    if not (1 <= args.rounds <= 50 and 100 <= args.admissions <= 1_000_000):
        parser.error("--rounds 1-50, --admissions 100-1,000,000")
    print(json.dumps(asyncio.run(main_async(args)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
