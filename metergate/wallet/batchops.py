"""The batch engine's operations: what a hot wallet call (reserve, extend, settle, a lease's capture) asks of one
group commit, as a plain value the engine decides together with the batch's others.

Why a module of its own: the writers that queue operations (SQLite's writer thread, PostgreSQL's group commit,
the store's hot methods) need only these values and :data:`CLASSIC`, not the rows the engine loads
(:mod:`metergate.wallet.batchstate`) nor how it decides (:mod:`metergate.wallet.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metergate.wallet.models import Mode, UsageRecord


class _Classic:
    """The outcome of an operation the engine hands to the per-operation path."""

    def __repr__(self) -> str:
        return "CLASSIC"


CLASSIC: Any = _Classic()


@dataclass(frozen=True, slots=True)
class ReserveOp:
    mode: Mode
    customer_id: str
    asset: str
    amount: int
    hold_id: str
    ttl_ms: int
    now: int
    overdraw: bool


@dataclass(frozen=True, slots=True)
class ExtendOp:
    hold_id: str
    amount: int
    key: str
    ttl_ms: int
    now: int
    overdraw: bool


@dataclass(frozen=True, slots=True)
class SettleOp:
    hold_id: str
    amount: int
    usage: UsageRecord | None
    now: int
    overdraw: bool


@dataclass(frozen=True, slots=True)
class CaptureOp:
    """Capture ``amount`` from a pending hold and keep it open, under its own idempotency ``key``, with the usage
    record it pays for: one request's settlement against an escrow lease (:mod:`metergate.wallet.escrow`)."""

    hold_id: str
    amount: int
    key: str
    usage: UsageRecord | None
    now: int
    overdraw: bool
    held: int | None = None  # at most this much is drawn from the hold (the request's own share of a lease)


EngineOp = ReserveOp | ExtendOp | SettleOp | CaptureOp

__all__ = ["CLASSIC", "CaptureOp", "EngineOp", "ExtendOp", "ReserveOp", "SettleOp"]
