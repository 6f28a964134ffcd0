"""Exact amounts: integers in an asset's smallest unit, and the one rounding rule.

Every amount that is stored, compared or sent over the wire is an ``int`` counted in the
smallest unit of its asset (micro-dollars for the default ``USD`` asset, whose scale is 6).
``Decimal`` appears only inside price arithmetic, and it leaves that arithmetic through
:func:`to_minor`, the single place where metergate rounds.

Rounding rule: half-up (``ROUND_HALF_UP``) to the smallest unit, once per priced event.
Because the rule is monotonic, a usage that is no larger than its estimate never prices
above the hold that the estimate placed.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

#: Provider costs are kept in nano-dollars so that the cost of a single token of the
#: cheapest model is still a whole number; margins convert prices up to this scale.
COST_SCALE = 9


def to_minor(value: Decimal, scale: int) -> int:
    """Convert an exact major-unit value to the asset's smallest unit, rounding half-up."""
    return int((value * (Decimal(10) ** scale)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def format_minor(amount: int, scale: int) -> str:
    """Render a smallest-unit integer as a plain decimal string, e.g. ``1500000`` -> ``"1.500000"``."""
    if scale == 0:
        return str(amount)
    sign = "-" if amount < 0 else ""
    digits = str(abs(amount)).rjust(scale + 1, "0")
    return f"{sign}{digits[:-scale]}.{digits[-scale:]}"


def parse_major(text: str, scale: int) -> int:
    """Parse a decimal string in major units into the smallest unit, refusing lost precision.

    ``"1.25"`` at scale 6 is ``1250000``; ``"0.0000001"`` at scale 6 raises ``ValueError``
    rather than being rounded silently, because a credit must be exactly what was asked.
    """
    try:
        value = Decimal(text)
    except (InvalidOperation, TypeError) as exc:
        raise ValueError(f"not a decimal number: {text!r}") from exc
    if not value.is_finite():
        raise ValueError(f"not a finite number: {text!r}")
    scaled = value * (Decimal(10) ** scale)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{text!r} has more than {scale} decimal places")
    return int(scaled)
