"""Billing modes: what ``prepaid`` and ``invoiced`` mean for a wallet, as values and one pure rule.

A customer is ``prepaid`` (the default: a hold before forwarding, 402 when short) or ``invoiced``
(metered and priced the same way, never blocked by the balance, the usage reported to Stripe Billing).
An invoiced customer may keep a prepaid wallet for some assets (``asset_modes``: GPU-seconds prepaid
while dollars stay invoiced).

Invoiced is the wallet's overdraft: the proxy's hold is the same conditional ``UPDATE`` honouring
``overdraft_limit``, so an invoiced account's limit is its credit limit (a billion major units when
uncapped) and its negative balance is what the customer owes. Nothing on the request path changes, and
spend caps still apply.

Targets (the overdraft limit a configuration asks for, per asset):

* invoiced: the credit limit, or :func:`uncapped` when none is set;
* prepaid after invoiced: the debt left by the invoiced period, ``max(0, debits_posted -
  credits_posted)`` at the switch. That debt stays as it is: it was reported to Stripe as meter events
  and Stripe invoices it, so the prepaid wallet must not repay it. The prepaid wallet starts from
  whatever credits exist beyond it (``available`` is then ``credits - debits`` of the new period);
* prepaid after prepaid: unchanged.

The overdraft limit applied is ``max(target, exposure)`` with ``exposure = debits_posted +
debits_pending - credits_posted``: lowering a limit below what is already drawn would make ``available``
negative, so the limit first stops at the exposure (no new hold fits) and converges down to the target
as holds settle or credits arrive (:meth:`BillingStore.converge`). It only ever tightens that way.

Holds in flight at a switch finish as admitted; their usage records are billed in the mode in effect
when each record is created (at settlement), like every other record: after a switch to prepaid they are
paid from the wallet and not reported to Stripe.

Switching prepaid → invoiced leaves any prepaid balance in the wallet: it is spent first (``available``
counts it), and the usage that spends it is invoiced too, so the change record keeps the balance at the
switch for finance to credit on the Stripe invoice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from metergate.errors import BadRequest

BillingMode = Literal["prepaid", "invoiced"]
MODES: tuple[BillingMode, ...] = ("prepaid", "invoiced")
_MAX_LIMIT = 10**15


def uncapped(scale: int) -> int:
    """The overdraft of an invoiced account without a credit limit: a billion major units."""
    return int(10 ** (scale + 9))


@dataclass(frozen=True, slots=True)
class BillingConfig:
    """A customer's billing configuration; ``credit_limits`` per asset in its smallest unit (absent:
    uncapped)."""

    billing_mode: BillingMode = "prepaid"
    asset_modes: dict[str, BillingMode] = field(default_factory=dict)
    credit_limits: dict[str, int] = field(default_factory=dict)

    def mode_of(self, asset: str) -> BillingMode:
        mode: BillingMode = self.asset_modes.get(asset, self.billing_mode)
        return mode

    def as_json(self) -> dict[str, Any]:
        return {"billing_mode": self.billing_mode, "asset_modes": dict(self.asset_modes),
                "credit_limits": dict(self.credit_limits)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> BillingConfig:
        return BillingConfig(data["billing_mode"], dict(data.get("asset_modes") or {}),
                             {k: int(v) for k, v in (data.get("credit_limits") or {}).items()})


PREPAID = BillingConfig()


def target_for(new: BillingConfig, old: BillingConfig, asset: str, *, scale: int, credits_posted: int,
               debits_posted: int, previous_target: int) -> int:
    """The overdraft limit ``new`` asks for on one asset (see the module docstring)."""
    if new.mode_of(asset) == "invoiced":
        return new.credit_limits.get(asset, uncapped(scale))
    if old.mode_of(asset) == "invoiced":
        return max(0, debits_posted - credits_posted)  # the invoiced debt, left for Stripe to collect
    return previous_target


def parse_config(body: dict[str, Any], assets: dict[str, int]) -> BillingConfig:
    """The configuration in a ``PUT .../billing`` body, or a 400 naming the field.

    ``{"billing_mode": "invoiced", "asset_modes": {"GPU_SECONDS": "prepaid"}, "credit_limits": {"USD": 5000000}}``
    """
    unknown = set(body) - {"billing_mode", "asset_modes", "credit_limits", "memo", "changed_by"}
    if unknown:
        raise BadRequest(f"Unknown field {sorted(unknown)[0]!r}.", param=sorted(unknown)[0])
    mode = body.get("billing_mode")
    if mode not in MODES:
        raise BadRequest("'billing_mode' must be 'prepaid' or 'invoiced'.", param="billing_mode")
    asset_modes = body.get("asset_modes") or {}
    if not isinstance(asset_modes, dict):
        raise BadRequest("'asset_modes' must be an object of asset: mode.", param="asset_modes")
    for asset, value in asset_modes.items():
        if asset not in assets:
            raise BadRequest(f"Unknown asset {asset!r} in 'asset_modes'.", code="unknown_asset", param="asset_modes")
        if value not in MODES:
            raise BadRequest("Each 'asset_modes' value must be 'prepaid' or 'invoiced'.", param="asset_modes")
    limits = body.get("credit_limits") or {}
    if not isinstance(limits, dict):
        raise BadRequest("'credit_limits' must be an object of asset: limit.", param="credit_limits")
    parsed: dict[str, int] = {}
    for asset, value in limits.items():
        if asset not in assets:
            raise BadRequest(f"Unknown asset {asset!r} in 'credit_limits'.", code="unknown_asset",
                             param="credit_limits")
        if value is None:
            continue  # uncapped
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_LIMIT:
            raise BadRequest("A credit limit must be an integer in the asset's smallest unit (0 .. 10^15), or "
                             "null for none.", code="invalid_amount", param="credit_limits")
        parsed[asset] = value
    return BillingConfig(mode, {a: m for a, m in asset_modes.items() if m != mode}, parsed)
