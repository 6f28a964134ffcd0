"""A v1 database (before grants) opens under the current schema with its balances intact, its holds still
settleable, and a clean audit; a v2 database (before key attributes) keeps its proxy keys, with no attributes.

Method: build a wallet with the current code, turn it back into the older shape (v1: no grant column, no grants,
no allocations; v2: no ``api_keys.attributes``), reopen it, and check what it holds.
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
            conn.execute(text("ALTER TABLE api_keys DROP COLUMN attributes"))
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
        assert version == t.SCHEMA_VERSION == 4
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


async def test_a_v2_wallets_keys_survive_the_upgrade_to_key_attributes(store_url: str) -> None:
    store = SqlWalletStore(store_url)
    await store.open()
    try:
        await store.write(lambda conn: [conn.execute(delete(table)) for table in reversed(t.metadata.sorted_tables)
                                         if table is not t.schema_version])
        await store.create_customer(MODE, "acme", "Acme")
        await store.create_api_key(MODE, "acme", key_id="key_old", key_hash="h" * 64, prefix="mgk_test_old")

        def downgrade(conn: Connection) -> None:
            conn.execute(text("ALTER TABLE api_keys DROP COLUMN attributes"))
            conn.execute(delete(t.schema_version))
            conn.execute(t.schema_version.insert().values(version=2, applied_at_ms=0))

        await store.write(downgrade)
    finally:
        await store.close()
    upgraded = SqlWalletStore(store_url)
    await upgraded.open()
    try:
        versions = await upgraded.read(lambda conn: conn.execute(select(t.schema_version.c.version)).scalars().all())
        assert sorted(versions) == [2, 3, 4]
        key = await upgraded.find_api_key("h" * 64)
        assert key is not None and (key.id, key.customer_id, key.attributes) == ("key_old", "acme", {})
        changed = await upgraded.set_api_key_attributes(MODE, "key_old", {"feature": "search"})
        assert changed is not None and changed.attributes == {"feature": "search"}
        assert (await upgraded.find_api_key("h" * 64)).attributes == {"feature": "search"}  # type: ignore[union-attr]
    finally:
        await upgraded.close()
