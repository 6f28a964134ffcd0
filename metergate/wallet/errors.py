"""Wallet failures, as members of the HTTP-aware error tree in :mod:`metergate.errors`."""

from __future__ import annotations

import logging

from sqlalchemy.exc import InterfaceError, OperationalError

from metergate.errors import BadRequest, Conflict, NotFound, PaymentRequired

#: What "the database cannot be reached" looks like from the SQL store: SQLAlchemy's wrapped driver errors,
#: and the raw refusal asyncpg raises while (re)connecting.
STORAGE_DOWN: tuple[type[Exception], ...] = (OperationalError, InterfaceError, ConnectionRefusedError)


def log_retrying(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """A background loop's failure, to be retried: one line while the database is down (it comes back, and a
    traceback every tick would bury everything else for the length of the outage), the traceback otherwise."""
    if isinstance(exc, STORAGE_DOWN):
        logger.warning("%s: the database is unreachable (%s); retrying", what, type(exc).__name__)
    else:
        logger.error("%s; retrying", what, exc_info=exc)


class InsufficientFunds(PaymentRequired):
    def __init__(self, *, asset: str, available: int, required: int) -> None:
        super().__init__(f"The wallet holds {available} of {asset} (smallest unit) but this needs {required}.",
                         code="insufficient_funds")
        self.asset = asset
        self.available = available
        self.required = required


class IdempotencyConflict(Conflict):
    def __init__(self, key: str) -> None:
        super().__init__(f"Idempotency key {key!r} was already used with different content.",
                         code="idempotency_conflict", param="idempotency_key")


class CustomerNotFound(NotFound):
    def __init__(self, customer_id: str) -> None:
        super().__init__(f"No customer {customer_id!r} in this mode.", code="customer_not_found")


class CustomerExists(Conflict):
    def __init__(self, customer_id: str) -> None:
        super().__init__(f"Customer {customer_id!r} already exists.", code="already_exists", param="id")


class UnknownAsset(BadRequest):
    def __init__(self, asset: str) -> None:
        super().__init__(f"Unknown asset {asset!r}.", code="unknown_asset", param="asset")


class HoldNotFound(NotFound):
    def __init__(self, hold_id: str) -> None:
        super().__init__(f"No hold {hold_id!r}.", code="hold_not_found")


class HoldNotPending(Conflict):
    def __init__(self, hold_id: str, state: str) -> None:
        super().__init__(f"Hold {hold_id!r} is {state}: it can no longer be extended or captured from in part.",
                         code="hold_not_pending")


class CaptureBelowCaptured(Conflict):
    def __init__(self, hold_id: str, captured: int, total: int) -> None:
        super().__init__(f"Hold {hold_id!r} has captured {captured} already; a final total of {total} would "
                         "un-capture it.", code="capture_below_captured", param="amount")


class GrantNotFound(NotFound):
    def __init__(self, grant_id: str) -> None:
        super().__init__(f"No grant {grant_id!r} in this mode.", code="grant_not_found")


class StoreInUse(Exception):
    """The shared store is in use by another wallet topology: opening this one would admit against balances
    that the other is still spending. Raised by a store's ``open()``; ``metergate serve`` prints it and exits 2."""
