"""Single-use links: the id of each link that has been used, in the SQL system of record.

A link whose first use opens a session (the operator dashboard's) is claimed here by its id before the
session is granted; a second claim of the same id is refused, on this replica or any other, because the
id is the primary key of ``used_links`` and the claim is one insert. Rows are kept until the link they
name has expired (a replay after that is refused by the expiry anyway) and pruned, a bounded batch at a
time, by later claims.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Connection, String, Table, delete, insert, select
from sqlalchemy.exc import IntegrityError

from metergate.wallet import schema as w
from metergate.wallet.models import now_ms
from metergate.wallet.sql import SqlWalletStore

used_links = Table(
    "used_links", w.metadata,
    Column("id", String(64), primary_key=True),
    Column("scope", String(32), nullable=False),
    Column("expires_at_ms", BigInteger, nullable=False, index=True),
    Column("used_at_ms", BigInteger, nullable=False),
)

_PRUNE_BATCH = 100


class UsedLinks:
    def __init__(self, sql: SqlWalletStore) -> None:
        self._sql = sql
        self._ready = False

    async def _ensure(self) -> None:
        # A wallet opened before this module was imported has no such table yet.
        if not self._ready:
            await self._sql.write(lambda conn: w.metadata.create_all(conn, tables=[used_links], checkfirst=True))
            self._ready = True

    async def claim(self, link_id: str, *, scope: str, expires_at_s: int) -> bool:
        """Record the link as used; ``False`` when it was used before (here or on another replica)."""
        await self._ensure()
        c = used_links.c
        at = now_ms()

        def op(conn: Connection) -> bool:
            stale = select(c.id).where(c.expires_at_ms < at).limit(_PRUNE_BATCH)
            conn.execute(delete(used_links).where(c.id.in_(stale)))
            if conn.execute(select(c.id).where(c.id == link_id)).first() is not None:
                return False
            conn.execute(insert(used_links).values(id=link_id, scope=scope, expires_at_ms=expires_at_s * 1000,
                                                   used_at_ms=at))
            return True

        try:
            claimed: bool = await self._sql.write(op)
        except IntegrityError:
            return False  # another replica claimed it between our check and our insert
        return claimed
