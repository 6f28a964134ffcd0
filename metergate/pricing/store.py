"""Price versions and tier counters in the wallet's SQL database.

Runs its statements through the wallet store's own transactions (SQLite's writer thread, PostgreSQL's pool),
as :mod:`metergate.payments.store` does. Publishing is a conditional ``UPDATE ... WHERE state = 'draft'``, so
two operators publishing one draft at once publish it once; a published version is never changed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from metergate.errors import Conflict, NotFound
from metergate.pricing import schema as p
from metergate.pricing.rules import RuleSet, parse_rule_set
from metergate.pricing.versions import PriceVersion
from metergate.wallet import schema as w
from metergate.wallet.models import Mode, UsageRecord, now_ms
from metergate.wallet.sql import SqlWalletStore
from metergate.wallet.sqlusage import usage_of

_MICROS = Decimal(1_000_000)


class PricingStore:
    def __init__(self, wallet: SqlWalletStore) -> None:
        self.wallet = wallet

    async def open(self) -> None:
        """Create the pricing tables on a wallet opened before this module was imported."""
        await self.wallet.write(lambda conn: w.metadata.create_all(conn, tables=list(p.TABLES), checkfirst=True))

    # ---------------------------------------------------------------- versions

    async def create_draft(self, mode: Mode, rules: RuleSet, note: str,
                           idempotency_key: str | None = None) -> tuple[PriceVersion, bool]:
        """Store a draft; with ``idempotency_key``, once per key: the same key again returns the first draft
        (``False``: not created now), the same key with other rules is 409 ``idempotency_conflict``."""
        version = PriceVersion(f"pv_{uuid.uuid4().hex[:24]}", mode, "draft", rules, note, now_ms())
        digest = rules_sha256(rules)
        k = p.price_version_keys.c

        def op(conn: Connection) -> str | None:
            if idempotency_key is not None:
                claimed = conn.execute(select(k.version_id, k.rules_sha256).where(
                    k.mode == mode, k.idempotency_key == idempotency_key)).first()
                if claimed is not None:
                    return _replayed(claimed, digest, idempotency_key)
                conn.execute(insert(p.price_version_keys).values(
                    mode=mode, idempotency_key=idempotency_key, version_id=version.id, rules_sha256=digest,
                    created_at_ms=version.created_at_ms))
            conn.execute(insert(p.price_versions).values(
                id=version.id, mode=mode, state="draft", rules=rules.source, note=note,
                created_at_ms=version.created_at_ms))
            return None

        try:
            existing_id = await self.wallet.write(op)
        except IntegrityError:
            # Another create with this key committed between our read and our insert (PostgreSQL); the key's
            # primary key refused ours, and our draft went with it: answer as the first create did.
            row = await self.wallet.read(lambda conn: conn.execute(select(k.version_id, k.rules_sha256).where(
                k.mode == mode, k.idempotency_key == idempotency_key)).first())
            if row is None:
                raise
            existing_id = _replayed(row, digest, str(idempotency_key))
        if existing_id is None:
            return version, True
        existing = await self.get(mode, existing_id)
        assert existing is not None, "a claimed idempotency key names a stored version"
        return existing, False

    async def get(self, mode: Mode, version_id: str) -> PriceVersion | None:
        c = p.price_versions.c
        row = await self.wallet.read(lambda conn: conn.execute(select(p.price_versions).where(
            c.mode == mode, c.id == version_id)).first())
        return self._version(row) if row is not None else None

    async def list_versions(self, mode: Mode, *, limit: int, before_ms: int | None = None) -> list[PriceVersion]:
        c = p.price_versions.c
        stmt = select(p.price_versions).where(c.mode == mode)
        if before_ms is not None:
            stmt = stmt.where(c.created_at_ms < before_ms)
        rows = await self.wallet.read(lambda conn: conn.execute(
            stmt.order_by(c.created_at_ms.desc(), c.id.desc()).limit(limit)).all())
        return [self._version(r) for r in rows]

    async def published(self, *, exclude: set[str] | None = None) -> list[PriceVersion]:
        """The published versions of both modes, but those in ``exclude`` (already loaded: published versions
        never change, so a refresh reads only new ones)."""
        c = p.price_versions.c
        known = exclude or set()

        def op(conn: Connection) -> list[Any]:
            ids = [i for i in conn.execute(select(c.id).where(c.state == "published")).scalars() if i not in known]
            if not ids:
                return []
            return list(conn.execute(select(p.price_versions).where(c.id.in_(ids))).all())

        rows = await self.wallet.read(op)
        return [self._version(r) for r in rows]

    async def publish(self, mode: Mode, version_id: str, effective_at_ms: int) -> PriceVersion:
        """Publish a draft once; publishing it again with the same ``effective_at`` returns it unchanged."""
        c = p.price_versions.c

        def op(conn: Connection) -> Any:
            conn.execute(update(p.price_versions).where(c.mode == mode, c.id == version_id, c.state == "draft").values(
                state="published", effective_at_ms=effective_at_ms, published_at_ms=now_ms()))
            return conn.execute(select(p.price_versions).where(c.mode == mode, c.id == version_id)).first()

        row = await self.wallet.write(op)
        if row is None:
            raise NotFound(f"No price version {version_id!r} in this mode.", code="not_found", param="version_id")
        version = self._version(row)
        if version.effective_at_ms != effective_at_ms:
            raise Conflict(f"Price version {version_id!r} is already published, effective at "
                           f"{version.effective_at_ms}; a published version never changes.",
                           code="already_published", param="effective_at")
        return version

    def _version(self, row: Any) -> PriceVersion:
        # Stored rules were validated when they were written, against the mode's assets then; an asset that has
        # disappeared since (removed from the configuration) is refused when a rule drawing it prices.
        rules = parse_rule_set(row.rules, None)
        return PriceVersion(id=row.id, mode=row.mode, state=row.state, rules=rules, note=row.note or "",
                            created_at_ms=int(row.created_at_ms), effective_at_ms=_opt(row.effective_at_ms),
                            published_at_ms=_opt(row.published_at_ms))

    # ---------------------------------------------------------------- tier counters

    async def period_usage(self, mode: Mode, customer_id: str,
                           counters: list[tuple[str, int]]) -> dict[str, Decimal]:
        """Each counter's total in its period, ``counters`` being (counter, period start ms) pairs."""
        c = p.pricing_period_usage.c

        def op(conn: Connection) -> dict[str, Decimal]:
            totals: dict[str, Decimal] = {}
            for counter, start in counters:
                total = conn.execute(select(func.coalesce(func.sum(c.quantity_micros), 0)).where(
                    c.mode == mode, c.customer_id == customer_id, c.counter == counter,
                    c.period_start_ms == start)).scalar_one()
                totals[counter] = Decimal(int(total)) / _MICROS
            return totals

        result: dict[str, Decimal] = await self.wallet.read(op)
        return result

    async def add_period_usage(self, record_id: str, mode: Mode, customer_id: str,
                               rows: list[tuple[str, int, Decimal]]) -> None:
        """Count an item's quantities once: (counter, period start ms, quantity) rows keyed by the record id."""
        if not rows:
            return
        values = [{"record_id": record_id, "counter": counter, "mode": mode, "customer_id": customer_id,
                   "period_start_ms": start, "quantity_micros": int(quantity * _MICROS)}
                  for counter, start, quantity in rows]
        # A retried item was counted already: the primary key keeps it to once.
        with contextlib.suppress(IntegrityError):
            await self.wallet.write(lambda conn: conn.execute(insert(p.pricing_period_usage), values))

    # ---------------------------------------------------------------- recorded usage (the simulator)

    async def usage_between(self, mode: Mode, from_ms: int, to_ms: int, *, limit: int,
                            after: tuple[int, int] | None = None) -> list[tuple[tuple[int, int], UsageRecord]]:
        """A page of usage records with ``from_ms <= created_at_ms < to_ms``, oldest first, each with its
        (created_at_ms, seq) position; ``after`` is the last position of the previous page."""
        c = w.usage_records.c
        stmt = select(w.usage_records).where(c.mode == mode, c.created_at_ms >= from_ms, c.created_at_ms < to_ms)
        if after is not None:
            stmt = stmt.where(or_(c.created_at_ms > after[0], and_(c.created_at_ms == after[0], c.seq > after[1])))
        rows = await self.wallet.read(lambda conn: conn.execute(
            stmt.order_by(c.created_at_ms, c.seq).limit(limit)).all())
        return [((int(r.created_at_ms), int(r.seq)), usage_of(r)) for r in rows]


def rules_sha256(rules: RuleSet) -> str:
    """The SHA-256 of a rule set's canonical JSON (sorted keys, no spaces): what a replayed create compares."""
    canonical = json.dumps(rules.source, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _replayed(claimed: Any, digest: str, key: str) -> str:
    if claimed.rules_sha256 != digest:
        raise Conflict(f"Idempotency key {key!r} was used for another rule set.", param="idempotency_key")
    return str(claimed.version_id)


def _opt(value: Any) -> int | None:
    return None if value is None else int(value)
