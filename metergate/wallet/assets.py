"""Assets a wallet can hold, and the conversions allowed between them.

The assets in ``settings.assets`` are always present in both modes and cannot be changed through the API;
operators add their own per mode (code, name, scale of the smallest unit, optionally the value of one major
unit in a fiat currency, a Decimal string, for margin reporting). Codes follow ``AssetSettings``' rule.

A conversion exists only where the operator configured one (``from_asset`` -> ``to_asset`` at ``rate`` major
units of the target per major unit of the source). :func:`converted_amount` turns a source amount into the
target's smallest unit exactly, rounding *down* (``ROUND_FLOOR``): a customer never receives a fraction of a
unit that was not paid for. The debit and the grant happen in one transaction (``SqlWalletStore.convert``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError

from metergate.config.settings import AssetSettings
from metergate.errors import BadRequest, Conflict
from metergate.wallet import schema as t
from metergate.wallet.errors import UnknownAsset
from metergate.wallet.models import Asset, Conversion, GrantPurpose, Mode, now_ms
from metergate.wallet.sql import SqlWalletStore

ASSET_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")  # as config.settings.AssetSettings
_CURRENCY = re.compile(r"^[A-Z]{3}$")
MAX_SCALE = 12


def parse_decimal(text: object, param: str, *, positive: bool = True) -> Decimal:
    """A plain, finite decimal string (``"0.002"``) or refuse with 400 naming ``param``."""
    if not isinstance(text, str) or not re.fullmatch(r"[0-9]{1,20}(\.[0-9]{1,18})?", text):
        raise BadRequest(f"'{param}' must be a plain decimal string such as \"0.25\".", code="invalid_request",
                         param=param)
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise BadRequest(f"'{param}' is not a decimal number.", param=param) from None
    if positive and value <= 0:
        raise BadRequest(f"'{param}' must be greater than zero.", param=param)
    return value


def converted_amount(amount: int, *, from_scale: int, to_scale: int, rate: Decimal) -> int:
    """``amount`` (smallest unit of the source) in the target's smallest unit, rounded down."""
    exact = Decimal(amount) * rate * (Decimal(10) ** (to_scale - from_scale))
    return int(exact.to_integral_value(rounding=ROUND_FLOOR))


class AssetRegistry:
    def __init__(self, store: SqlWalletStore, configured: Sequence[AssetSettings]) -> None:
        self._store = store
        self._configured = {a.code: a for a in configured}

    def _from_settings(self, mode: Mode, a: AssetSettings) -> Asset:
        value = str(a.value_per_unit) if a.value_per_unit is not None else None
        return Asset(mode=mode, code=a.code, name=a.name, scale=a.scale, value_per_unit=value,
                     value_currency=a.value_currency, configured=True)

    async def get(self, mode: Mode, code: str) -> Asset | None:
        if code in self._configured:
            return self._from_settings(mode, self._configured[code])
        c = t.assets.c
        row = await self._store.read(lambda conn: conn.execute(select(t.assets).where(
            c.mode == mode, c.code == code)).first())
        return _asset(row) if row is not None else None

    async def require(self, mode: Mode, code: object) -> Asset:
        found = await self.get(mode, code) if isinstance(code, str) else None
        if found is None:
            raise UnknownAsset(str(code))
        return found

    async def all(self, mode: Mode) -> list[Asset]:
        c = t.assets.c
        rows = await self._store.read(lambda conn: conn.execute(select(t.assets).where(c.mode == mode)
                                                                 .order_by(c.code)).all())
        return [self._from_settings(mode, a) for a in self._configured.values()] + [_asset(r) for r in rows]

    async def create(self, mode: Mode, *, code: str, name: str, scale: int, value_per_unit: str | None,
                     value_currency: str | None) -> Asset:
        if not ASSET_CODE.match(code):
            raise BadRequest("'code' must be 1-32 letters, digits, '_' or '-', starting with a letter.",
                             code="invalid_asset", param="code")
        if not 0 <= scale <= MAX_SCALE:
            raise BadRequest(f"'scale' must be an integer from 0 to {MAX_SCALE}.", code="invalid_asset",
                             param="scale")
        if value_per_unit is not None:
            parse_decimal(value_per_unit, "value_per_unit", positive=False)
            if value_currency is None or not _CURRENCY.match(value_currency):
                raise BadRequest("'value_currency' (an ISO 4217 code such as \"USD\") goes with 'value_per_unit'.",
                                 code="invalid_asset", param="value_currency")
        elif value_currency is not None:
            raise BadRequest("'value_currency' needs 'value_per_unit'.", code="invalid_asset",
                             param="value_per_unit")
        asset = Asset(mode, code, name, scale, value_per_unit, value_currency)
        existing = await self.get(mode, code)
        if existing is not None:
            if existing == asset:
                return existing  # creating the same asset again is a no-op
            raise Conflict(f"Asset {code!r} already exists with other properties.", code="already_exists",
                           param="code")
        try:
            await self._store.write(lambda conn: conn.execute(insert(t.assets).values(
                mode=mode, code=code, name=name, scale=scale, value_per_unit=value_per_unit,
                value_currency=value_currency, created_at_ms=now_ms())))
        except IntegrityError as exc:  # a concurrent create of the same code
            again = await self.get(mode, code)
            if again == asset:
                return asset
            raise Conflict(f"Asset {code!r} already exists with other properties.", code="already_exists",
                           param="code") from exc
        return asset

    # ------------------------------------------------------------------ conversions

    async def set_conversion(self, mode: Mode, from_asset: str, to_asset: str, rate: Decimal,
                             purpose: GrantPurpose) -> Conversion:
        await self.require(mode, from_asset)
        await self.require(mode, to_asset)
        if from_asset == to_asset:
            raise BadRequest("A conversion needs two different assets.", param="to_asset")
        values = {"rate": str(rate), "purpose": purpose, "updated_at_ms": now_ms()}

        def op(conn: Connection) -> None:
            stmt = self._store.dialect_insert(t.asset_conversions).values(
                mode=mode, from_asset=from_asset, to_asset=to_asset, **values)
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["mode", "from_asset", "to_asset"], set_=values))

        await self._store.write(op)
        return Conversion(mode, from_asset, to_asset, str(rate), purpose)

    async def conversion(self, mode: Mode, from_asset: str, to_asset: str) -> Conversion | None:
        c = t.asset_conversions.c
        row = await self._store.read(lambda conn: conn.execute(select(t.asset_conversions).where(
            c.mode == mode, c.from_asset == from_asset, c.to_asset == to_asset)).first())
        return _conversion(row) if row is not None else None

    async def conversions(self, mode: Mode) -> list[Conversion]:
        c = t.asset_conversions.c
        rows = await self._store.read(lambda conn: conn.execute(select(t.asset_conversions).where(
            c.mode == mode).order_by(c.from_asset, c.to_asset)).all())
        return [_conversion(r) for r in rows]


def _asset(r: Any) -> Asset:
    return Asset(mode=r.mode, code=r.code, name=r.name, scale=int(r.scale), value_per_unit=r.value_per_unit,
                 value_currency=r.value_currency)


def _conversion(r: Any) -> Conversion:
    return Conversion(mode=r.mode, from_asset=r.from_asset, to_asset=r.to_asset, rate=r.rate, purpose=r.purpose)
