"""Notifications to the operator: low balance, top-up succeeded or failed, wallet depleted, and a change of
a wallet's billing settings (``billing_settings.changed``: auto top-up, spend caps, or a session opened to
change its payment methods — who changed it, through which link, from what to what).

Each notification is a row of the durable webhook outbox (:mod:`metergate.webhooks.outbox`), committed
before :meth:`Notifier.notify` returns, and sent by the delivery loop (:mod:`metergate.webhooks.delivery`)
as one JSON ``POST`` to ``notify_url``, signed in the Standard Webhooks format (``webhook-id``,
``webhook-timestamp``, ``webhook-signature``) and, when ``notify_secret`` is set, with the earlier
``Metergate-Signature`` header too (:mod:`metergate.webhooks.signing`). Recording a notification never
fails the operation that caused it: a storage error is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from typing import Any, Literal

from sqlalchemy import Connection

from metergate.wallet.models import Mode
from metergate.webhooks.delivery import WebhookDelivery
from metergate.webhooks.outbox import WebhookOutbox
from metergate.webhooks.signing import SIGNATURE_HEADER, sign, verify

__all__ = ["BILLING_SETTINGS_CHANGED", "SIGNATURE_HEADER", "Notifier", "settings_change", "settings_changed", "sign",
           "verify"]
log = logging.getLogger(__name__)
BILLING_SETTINGS_CHANGED = "billing_settings.changed"


class Notifier:
    def __init__(self, outbox: WebhookOutbox, delivery: WebhookDelivery) -> None:
        self.outbox = outbox
        self.delivery = delivery

    async def notify(self, event_type: str, mode: Mode, customer_id: str, data: dict[str, Any]) -> str | None:
        """Record one notification (sent when a ``notify_url`` is configured, else kept as ``skipped``);
        returns its id, or ``None`` when it could not be recorded."""
        try:
            return await self.outbox.add(event_type, mode, customer_id, data, deliver=self.delivery.enabled)
        except Exception:
            log.exception("notification %s for %s customer %s not recorded", event_type, mode, customer_id)
            return None

    def record(self, conn: Connection, event_type: str, mode: Mode, customer_id: str, data: dict[str, Any]) -> str:
        """Record one notification inside the caller's transaction, so that it commits with the event."""
        return self.outbox.insert(conn, event_type, mode, customer_id, data, deliver=self.delivery.enabled)

    async def flush(self) -> None:
        """Send the notifications due so far."""
        if self.delivery.enabled:
            await self.delivery.flush()


def _plain(value: object) -> object:
    """A setting as the notification shows it: its own fields, without the wallet it belongs to."""
    if is_dataclass(value) and not isinstance(value, type):
        fields = asdict(value)
        return {k: v for k, v in fields.items() if k not in ("mode", "customer_id", "updated_at_ms")}
    return value


def _change(mode: Mode, customer_id: str, setting: str, before: object, after: object, changed_by: str,
            link_id: str | None) -> dict[str, Any] | None:
    """The notification's data, or ``None`` when the setting was saved as it was (nothing changed)."""
    if _plain(before) == _plain(after):
        return None
    return {"setting": setting, "changed_by": changed_by, "link_id": link_id, "before": _plain(before),
            "after": _plain(after)}


def settings_change(notifier: Notifier, mode: Mode, customer_id: str, setting: str, before: object, after: object,
                    *, changed_by: Literal["portal"], link_id: str | None = None) -> Callable[[Connection], object]:
    """The ``billing_settings.changed`` notification of a change (``before`` / ``after``: ``None`` for off),
    to run in the transaction that saves it; it records nothing when the setting is saved as it was."""
    data = _change(mode, customer_id, setting, before, after, changed_by, link_id)

    def record(conn: Connection) -> None:
        if data is not None:
            notifier.record(conn, BILLING_SETTINGS_CHANGED, mode, customer_id, data)
            _log_change(data, mode, customer_id)

    return record


async def settings_changed(notifier: Notifier, mode: Mode, customer_id: str, setting: str, before: object,
                           after: object, *, changed_by: Literal["portal"], link_id: str | None = None) -> None:
    """Tell the operator of a change that metergate does not store itself (a Stripe billing portal opened)."""
    data = _change(mode, customer_id, setting, before, after, changed_by, link_id)
    if data is not None:
        await notifier.notify(BILLING_SETTINGS_CHANGED, mode, customer_id, data)
        _log_change(data, mode, customer_id)


def _log_change(data: dict[str, Any], mode: Mode, customer_id: str) -> None:
    # Also logged, so that the change is on record where no notify_url is configured.
    log.info("billing setting %s of %s customer %s changed through the %s (link %s)", data["setting"], mode,
             customer_id, data["changed_by"], data["link_id"] or "-")
