"""The OpenAPI paths of the webhook admin API (:mod:`metergate.webhooks.admin`), merged by
:mod:`metergate.admin.openapi`; the response schemas are those of :meth:`Webhook.as_json` and of the
follow endpoint."""

from __future__ import annotations

from typing import Any

from metergate.webhooks.admin import FOLLOW_WAIT_MAX_S
from metergate.webhooks.outbox import STATUSES

_ERROR = {"$ref": "#/components/schemas/Error"}
_CURSOR = {"type": "string", "pattern": r"^[0-9]{1,16}:[A-Za-z0-9_]{0,64}$"}
_MS = {"type": "integer", "description": "epoch milliseconds"}
_NULLABLE_MS = {"type": ["integer", "null"], "description": "epoch milliseconds"}
WEBHOOK = {"type": "object", "required": ["id", "type", "status", "attempts", "created_at_ms", "payload"],
           "properties": {
               "id": {"type": "string", "description": "the webhook-id header: receivers deduplicate by it"},
               "type": {"type": "string", "examples": ["balance.low", "topup.succeeded", "topup.failed",
                                                       "wallet.depleted", "billing_settings.changed"]},
               "customer_id": {"type": ["string", "null"]},
               "status": {"type": "string", "enum": list(STATUSES)},
               "attempts": {"type": "integer", "minimum": 0},
               "created_at_ms": _MS,
               "next_attempt_at_ms": {**_NULLABLE_MS, "description": "when pending: the next attempt"},
               "delivered_at_ms": _NULLABLE_MS,
               "last_error": {"type": ["string", "null"]},
               "payload": {"type": "object", "description": "the body sent", "required": ["id", "type", "data"],
                           "properties": {"id": {"type": "string"}, "type": {"type": "string"},
                                          "created": {"type": "integer"}, "mode": {"type": "string"},
                                          "customer_id": {"type": ["string", "null"]},
                                          "data": {"type": "object"}}}}}
_PAGE = {"type": "object", "required": ["data", "next_cursor"], "properties": {
    "data": {"type": "array", "items": {"$ref": "#/components/schemas/Webhook"}},
    "next_cursor": {"anyOf": [_CURSOR, {"type": "null"}]}}}
_FORWARD = {"type": "object", "required": ["data", "next_cursor"], "properties": {
    "data": {"type": "array", "items": {"type": "object", "required": ["id", "type", "body", "headers"],
                                        "properties": {
                                            "id": {"type": "string"}, "type": {"type": "string"},
                                            "body": {"type": "string", "description": "the exact body signed"},
                                            "headers": {"type": "object", "additionalProperties": {"type": "string"},
                                                        "description": "webhook-id, webhook-timestamp, "
                                                                       "webhook-signature (and Metergate-Signature "
                                                                       "with notify_secret), signed now"}}}},
    "next_cursor": _CURSOR}}


def _op(summary: str, schema: dict[str, Any], *, params: list[dict[str, Any]]) -> dict[str, Any]:
    return {"summary": summary, "parameters": params, "responses": {
        "200": {"description": "OK", "content": {"application/json": {"schema": schema}}},
        "default": {"description": "Error", "content": {"application/json": {"schema": _ERROR}}}}}


def webhook_schemas() -> dict[str, Any]:
    return {"Webhook": WEBHOOK}


def webhook_paths() -> dict[str, Any]:
    one = {"$ref": "#/components/schemas/Webhook"}
    webhook_id = [{"name": "webhook_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    listing = [{"name": "status", "in": "query", "schema": {"type": "string", "enum": list(STATUSES)}},
               {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
               {"name": "cursor", "in": "query", "description": "next_cursor of the previous page", "schema": _CURSOR}]
    follow = [{"name": "after", "in": "query", "description": "next_cursor of the previous answer; none: after "
                                                              "the newest notification", "schema": _CURSOR},
              {"name": "wait_s", "in": "query", "description": "how long to wait for a notification (long poll)",
               "schema": {"type": "number", "minimum": 0, "maximum": FOLLOW_WAIT_MAX_S, "default": 0}}]
    return {
        "/admin/v1/webhooks": {"get": _op("Notifications, newest first, with their delivery state", _PAGE,
                                          params=listing)},
        "/admin/v1/webhooks/follow": {"get": _op(
            "Notifications after a cursor, oldest first, with signed headers to forward (metergate webhooks "
            "listen)", _FORWARD, params=follow)},
        "/admin/v1/webhooks/{webhook_id}": {"get": _op("One notification", one, params=webhook_id)},
        "/admin/v1/webhooks/{webhook_id}/redeliver": {"post": _op(
            "Send a notification again now: same webhook-id, same body, a fresh set of attempts", one,
            params=webhook_id)},
    }
