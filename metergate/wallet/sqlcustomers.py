"""The SQL store's customers and API keys: creating and listing customers, issuing, finding, revoking and
labelling keys.

Why apart from the money operations (:mod:`metergate.wallet.sql`): these rows are written once per customer or
key, never on a request's hot path, and none of them touches the ledger; only a key's hash is ever stored.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, insert, select, update
from sqlalchemy.exc import IntegrityError

from metergate.wallet import schema as t
from metergate.wallet.errors import CustomerExists, CustomerNotFound
from metergate.wallet.models import ApiKey, Customer, Mode, now_ms
from metergate.wallet.sqlrunner import SqlRunner


class CustomerKeys(SqlRunner):
    """Customers and their API keys (see the module docstring)."""

    async def create_customer(self, mode: Mode, customer_id: str, name: str) -> Customer:
        customer = Customer(mode=mode, id=customer_id, name=name, created_at_ms=now_ms())
        try:
            await self.write(lambda conn: conn.execute(insert(t.customers).values(
                mode=mode, id=customer_id, name=name, created_at_ms=customer.created_at_ms)))
        except IntegrityError:
            raise CustomerExists(customer_id) from None
        return customer

    async def get_customer(self, mode: Mode, customer_id: str) -> Customer | None:
        row = await self.read(lambda conn: conn.execute(select(t.customers).where(
            t.customers.c.mode == mode, t.customers.c.id == customer_id)).first())
        return _customer(row) if row else None

    async def list_customers(self, mode: Mode, *, limit: int, after: str | None = None) -> list[Customer]:
        stmt = select(t.customers).where(t.customers.c.mode == mode)
        if after is not None:
            stmt = stmt.where(t.customers.c.id > after)
        rows = await self.read(lambda conn: conn.execute(stmt.order_by(t.customers.c.id).limit(limit)).all())
        return [_customer(r) for r in rows]

    async def create_api_key(self, mode: Mode, customer_id: str, *, key_id: str, key_hash: str,
                             prefix: str, attributes: dict[str, str] | None = None) -> ApiKey:
        key = ApiKey(id=key_id, mode=mode, customer_id=customer_id, prefix=prefix, created_at_ms=now_ms(),
                     attributes=dict(attributes or {}))
        try:
            await self.write(lambda conn: conn.execute(insert(t.api_keys).values(
                id=key_id, key_hash=key_hash, prefix=prefix, mode=mode, customer_id=customer_id,
                created_at_ms=key.created_at_ms, attributes=key.attributes or None)))
        except IntegrityError:
            raise CustomerNotFound(customer_id) from None
        return key

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        row = await self.read(lambda conn: conn.execute(
            select(t.api_keys).where(t.api_keys.c.key_hash == key_hash)).first())
        return _api_key(row) if row else None

    async def revoke_api_key(self, mode: Mode, key_id: str) -> ApiKey | None:
        def op(conn: Connection) -> Row[Any] | None:
            conn.execute(update(t.api_keys).where(
                t.api_keys.c.id == key_id, t.api_keys.c.mode == mode, t.api_keys.c.revoked_at_ms.is_(None),
            ).values(revoked_at_ms=now_ms()))
            return conn.execute(select(t.api_keys).where(t.api_keys.c.id == key_id,
                                                         t.api_keys.c.mode == mode)).first()

        row = await self.write(op)
        return _api_key(row) if row else None

    async def set_api_key_attributes(self, mode: Mode, key_id: str, attributes: dict[str, str]) -> ApiKey | None:
        def op(conn: Connection) -> Row[Any] | None:
            conn.execute(update(t.api_keys).where(t.api_keys.c.id == key_id, t.api_keys.c.mode == mode)
                         .values(attributes=dict(attributes) or None))
            return conn.execute(select(t.api_keys).where(t.api_keys.c.id == key_id,
                                                         t.api_keys.c.mode == mode)).first()

        row = await self.write(op)
        return _api_key(row) if row else None


def _customer(row: Row[Any]) -> Customer:
    return Customer(mode=row.mode, id=row.id, name=row.name, created_at_ms=row.created_at_ms)


def _api_key(row: Row[Any]) -> ApiKey:
    return ApiKey(id=row.id, mode=row.mode, customer_id=row.customer_id, prefix=row.prefix,
                  created_at_ms=row.created_at_ms, revoked_at_ms=row.revoked_at_ms,
                  attributes={str(k): str(v) for k, v in (row.attributes or {}).items()})

