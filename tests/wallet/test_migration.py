"""A v1 database (before grants) opens under v2 with its balances intact, its holds still settleable, and a clean
audit.

Method: build a wallet with the current code, turn it back into the v1 shape (no grant column, no grants, no
allocations, version 1), reopen it, and check balances, a settlement of a hold placed before, and ``audit()``.
"""

from __future__ import annotations

from sqlalchemy import Connection, delete, func, select, text

from metergate.wallet import schema as t
from metergate.wallet.sql import SqlWalletStore

MODE = "test"


async def test_a_v1_wallet_is_upgraded_to_grants(store_url: str) -> None:
    store = SqlWalletStore(store_url)
    await store.open()
    try:
        await store.write(lambda conn: [conn.execute(delete(table)) for table in reversed(t.metadata.sorted_tables)
                                         if table is not t.schema_version])
        await store.create_customer(MODE, "acme", "Acme")
        await store.credit(MODE, "acme", "USD", 1000, idempotency_key="seed")
        await store.reserve(MODE, "acme", "USD", 300, hold_id="done", ttl_ms=60_000)
        await store.settle("done", 200)
        await store.reserve(MODE, "acme", "USD", 500, hold_id="open", ttl_ms=60_000)

        def downgrade(conn: Connection) -> None:
            for table in (t.hold_allocations, t.grants):
                conn.execute(delete(table))
            conn.execute(text("ALTER TABLE ledger_entries DROP COLUMN grant_id"))
            conn.execute(delete(t.schema_version))
            conn.execute(t.schema_version.insert().values(version=1, applied_at_ms=0))

        await store.write(downgrade)
    finally:
        await store.close()
    upgraded = SqlWalletStore(store_url)
    await upgraded.open()
    try:
        version = await upgraded.read(lambda conn: conn.execute(select(func.max(t.schema_version.c.version)))
                                       .scalar())
        assert version == 2
        balance = await upgraded.balance(MODE, "acme", "USD")
        assert (balance.credits_posted, balance.debits_posted, balance.debits_pending) == (1000, 200, 500)
        [grant] = await upgraded.grants(MODE, "acme")
        assert (grant.source, grant.amount, grant.consumed, grant.held, grant.free) == ("v1", 1000, 200, 500, 300)
        assert await upgraded.audit() == []
        settled = await upgraded.settle("open", 450)
        assert (settled.charged, settled.balance.available) == (450, 350)
        await upgraded.reserve(MODE, "acme", "USD", 350, hold_id="after", ttl_ms=60_000)
        assert await upgraded.audit() == []
    finally:
        await upgraded.close()
