"""A v3 database (before budgets) opens under the current schema: its usage records keep everything and gain an
empty budget path, and the budget tables exist.

Method: build a wallet with the current code, turn it back into the v3 shape (no ``usage_records.budget_path``,
schema version 3), reopen it, and check what it holds and that a record with a path can be written.
"""

from __future__ import annotations

from sqlalchemy import Connection, delete, select, text

from metergate.budgets.model import ROOT, Node
from metergate.wallet import schema as t
from metergate.wallet.models import UsageRecord
from metergate.wallet.sql import SqlWalletStore


def record(n: int, path: str | None) -> UsageRecord:
    return UsageRecord(id=f"req{n}", mode="test", customer_id="acme", hold_id=f"h{n}", route="/openai",
                       endpoint="chat.completions", model="m", feature=None, stream=False, status_code=200,
                       usage_source="provider", tokens_input=1, tokens_cached_input=0, tokens_output=1,
                       tokens_reasoning=0, asset="USD", price_amount=10, budget_path=path)


async def test_a_v3_wallet_is_upgraded_to_budget_paths(store_url: str) -> None:
    store = SqlWalletStore(store_url)
    await store.open()
    try:
        await store.write(lambda conn: [conn.execute(delete(table)) for table in reversed(t.metadata.sorted_tables)
                                         if table is not t.schema_version])
        await store.create_customer("test", "acme", "Acme")
        await store.credit("test", "acme", "USD", 1000, idempotency_key="seed")
        await store.reserve("test", "acme", "USD", 100, hold_id="h1", ttl_ms=60_000)
        await store.settle("h1", 10, record(1, None))

        def downgrade(conn: Connection) -> None:
            conn.execute(text("ALTER TABLE usage_records DROP COLUMN budget_path"))
            conn.execute(delete(t.schema_version))
            conn.execute(t.schema_version.insert().values(version=3, applied_at_ms=0))

        await store.write(downgrade)
    finally:
        await store.close()
    upgraded = SqlWalletStore(store_url)
    await upgraded.open()
    try:
        versions = await upgraded.read(lambda conn: conn.execute(select(t.schema_version.c.version)).scalars().all())
        assert sorted(versions) == [3, 4]
        [(_, old)] = await upgraded.usage("test", "acme", limit=10)
        assert (old.id, old.charged_amount, old.budget_path) == ("req1", 10, None)
        await upgraded.put_budget_node(Node("test", "acme", "p", ROOT, "project"))
        await upgraded.reserve("test", "acme", "USD", 100, hold_id="h2", ttl_ms=60_000)
        await upgraded.settle("h2", 20, record(2, "root/p"))
        paths = [r.budget_path for _, r in await upgraded.usage("test", "acme", limit=10)]
        assert sorted(map(str, paths)) == ["None", "root/p"]
        assert await upgraded.audit() == []
    finally:
        await upgraded.close()
