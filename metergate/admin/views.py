"""Answer shapes of the admin API that are not a dataclass's ``asdict``, as ``TypedDict``: the handler builds
them through the class (mypy checks every key and type) and :mod:`metergate.admin.answers` publishes the same
class as a schema, so the two are one."""

from __future__ import annotations

from typing import TypedDict

from metergate.admin.schemas import DecimalText


class BalanceView(TypedDict):
    """A wallet's balance in one asset: ``available`` (in the smallest unit, and as a decimal string in the
    major unit) is what a new hold may take; ``posted`` what the customer owns once every hold resolves to
    nothing; ``pending`` what open holds reserve."""

    asset: str
    available: int
    available_decimal: DecimalText
    posted: int
    pending: int
    credits_posted: int
    debits_posted: int
