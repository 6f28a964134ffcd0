"""The synchronous client. Every method is one admin API call (see :mod:`metergate_client.calls`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from types import EllipsisType, TracebackType
from typing import Any, TypeVar

from metergate_client import calls
from metergate_client.batcher import EventBatcher
from metergate_client.calls import Amount, Call
from metergate_client.errors import InsufficientFunds, InvalidRequest, MetergateError
from metergate_client.jobs import Job, OnStop, _JobState
from metergate_client.models import (
    ApiKey,
    Asset,
    Balance,
    BudgetAlertRule,
    BudgetLimit,
    BudgetNode,
    BudgetNodeView,
    BudgetTree,
    BudgetWindow,
    Credit,
    Customer,
    Deleted,
    EventResult,
    FiredBudgetAlert,
    Grant,
    Heartbeat,
    Hold,
    Json,
    KeyAttachment,
    LedgerEntry,
    Link,
    Page,
    Preflight,
    Quote,
    UsageRecord,
)
from metergate_client.profiles import load_profile
from metergate_client.transport import RetryPolicy, SyncTransport

T = TypeVar("T")


def preflight_of(quote: Quote, balances: list[Balance]) -> Preflight:
    available = next((b.available for b in balances if b.asset == quote.asset), Decimal(0))
    return Preflight(allowed=available >= quote.amount, quote=quote, available=available,
                     shortfall=max(quote.amount - available, Decimal(0)))


class Client:
    """``Client(url, admin_key)``, or ``Client.from_profile()``; use it in a ``with`` block (or ``close()``)."""

    def __init__(self, url: str, admin_key: str, *, timeout_s: float = 30.0, retry: RetryPolicy | None = None,
                 events_max_queue: int = 10_000, events_max_batch: int = 500,
                 events_give_up_after_s: float = 120.0) -> None:
        self._transport = SyncTransport(url, admin_key, timeout_s=timeout_s, policy=retry or RetryPolicy())
        self._scales: dict[str, int] = {}
        self.events = EventBatcher(self.send_events, max_queue=events_max_queue, max_batch=events_max_batch,
                                   give_up_after_s=events_give_up_after_s)

    @classmethod
    def from_profile(cls, name: str | None = None, **options: Any) -> Client:
        profile = load_profile(name)
        return cls(profile.url, profile.admin_key, **options)

    @property
    def url(self) -> str:
        return self._transport.base_url

    def _send(self, call: Call[T]) -> T:
        return self._transport.send(call)

    def close(self) -> None:
        try:
            self.events.close()
        finally:
            self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ customers, keys, money

    def create_customer(self, customer_id: str, name: str = "") -> Customer:
        return self._send(calls.create_customer(customer_id, name))

    def list_customers(self, limit: int = 50, cursor: str | None = None) -> Page[Customer]:
        return self._send(calls.list_customers(limit, cursor))

    def get_customer(self, customer_id: str) -> Customer:
        """The customer with a balance per asset."""
        return self._send(calls.get_customer(customer_id))

    def balances(self, customer_id: str) -> list[Balance]:
        return self._send(calls.balances(customer_id))

    def credit(self, customer_id: str, amount: Amount, *, asset: str | None = None,
               idempotency_key: str | None = None, memo: str = "") -> Credit:
        """Credit ``amount`` (major unit of the asset); once per ``idempotency_key``."""
        return self._send(calls.credit(customer_id, amount, asset=asset, idempotency_key=idempotency_key, memo=memo))

    def issue_key(self, customer_id: str) -> ApiKey:
        return self._send(calls.issue_key(customer_id))

    def revoke_key(self, key_id: str) -> ApiKey:
        return self._send(calls.revoke_key(key_id))

    def ledger(self, customer_id: str, limit: int = 50, cursor: str | None = None) -> Page[LedgerEntry]:
        return self._send(calls.ledger(customer_id, limit, cursor))

    def usage(self, customer_id: str, limit: int = 50, cursor: str | None = None) -> Page[UsageRecord]:
        return self._send(calls.usage(customer_id, limit, cursor))

    def portal_link(self, customer_id: str, access: str | None = None) -> Link:
        return self._send(calls.portal_link(customer_id, access))

    def dashboard_link(self) -> Link:
        return self._send(calls.dashboard_link())

    def assets(self) -> list[Asset]:
        return self._send(calls.assets())

    def asset_scale(self, code: str) -> int:
        if code not in self._scales:
            self._scales.update({a.code: a.scale for a in self.assets()})
        if code not in self._scales:
            raise InvalidRequest(400, "unknown_asset", f"Unknown asset {code!r}.", "asset")
        return self._scales[code]

    def top_up_url(self, customer_id: str) -> str | None:
        """A portal link of the kind a 402 carries, or None when the server cannot make one."""
        try:
            return self.portal_link(customer_id, "view_topup").url
        except MetergateError:
            return None

    # ------------------------------------------------------------------ grants

    def list_grants(self, customer_id: str, *, asset: str | None = None, limit: int = 50,
                    cursor: str | None = None) -> Page[Grant]:
        return self._send(calls.list_grants(customer_id, asset=asset, limit=limit, cursor=cursor))

    def create_grant(self, customer_id: str, amount: Amount, *, asset: str | None = None, purpose: str = "paid",
                     priority: int = 0, effective_at_ms: int | None = None, expires_at_ms: int | None = None,
                     memo: str = "", idempotency_key: str | None = None) -> Grant:
        return self._send(calls.create_grant(customer_id, amount, asset=asset, purpose=purpose, priority=priority,
                                             effective_at_ms=effective_at_ms, expires_at_ms=expires_at_ms,
                                             memo=memo, idempotency_key=idempotency_key))

    def void_grant(self, grant_id: str) -> Grant:
        return self._send(calls.void_grant(grant_id))

    # ------------------------------------------------------------------ holds

    def create_hold(self, customer_id: str, amount: Amount, *, asset: str | None = None, ttl_s: int = 300,
                    idempotency_key: str | None = None, hold_id: str | None = None) -> Hold:
        """Hold ``amount``; 402 :class:`InsufficientFunds` (with ``portal_url``) when the wallet cannot cover it."""
        try:
            return self._send(calls.create_hold(customer_id, amount, asset=asset, ttl_s=ttl_s,
                                                idempotency_key=idempotency_key, hold_id=hold_id))
        except InsufficientFunds as short:
            if short.portal_url is None:
                url = self.top_up_url(customer_id)
                if url is not None:
                    short.body["portal_url"] = url
            raise

    def get_hold(self, hold_id: str) -> Hold:
        return self._send(calls.get_hold(hold_id))

    def heartbeat(self, hold_id: str, *, used: Amount, next_amount: Amount, ttl_s: int = 300,
                  idempotency_key: str | None = None) -> Heartbeat:
        return self._send(calls.heartbeat(hold_id, used=used, next_amount=next_amount, ttl_s=ttl_s,
                                          idempotency_key=idempotency_key))

    def capture(self, hold_id: str, amount: Amount, *, final: bool = False,
                idempotency_key: str | None = None) -> Hold:
        return self._send(calls.capture(hold_id, amount, final=final, idempotency_key=idempotency_key))

    def extend_hold(self, hold_id: str, amount: Amount, *, ttl_s: int = 300,
                    idempotency_key: str | None = None) -> Hold:
        return self._send(calls.extend_hold(hold_id, amount, ttl_s=ttl_s, idempotency_key=idempotency_key))

    def void_hold(self, hold_id: str, *, idempotency_key: str | None = None) -> Hold:
        return self._send(calls.void_hold(hold_id, idempotency_key=idempotency_key))

    def hold(self, customer_id: str, *, estimate: Amount, asset: str, ttl_s: int = 300,
             increment: Amount | None = None, on_stop: OnStop = "return", idempotency_key: str | None = None) -> Job:
        """A job's hold as a context manager (see :mod:`metergate_client.jobs`)."""
        return Job(self, _JobState(customer_id, estimate=estimate, asset=asset, ttl_s=ttl_s, increment=increment,
                                   on_stop=on_stop, key=idempotency_key))

    # ------------------------------------------------------------------ prices and events

    def quote(self, customer_id: str, *, model: str | None = None, usage: Mapping[str, int] | None = None,
              payload: Json | None = None, type: str | None = None, quantities: Mapping[str, Amount] | None = None,
              attributes: Mapping[str, str] | None = None, feature: str | None = None, route: str | None = None,
              cost_usd: Amount | None = None, version: str | None = None) -> Quote:
        """Price a hypothetical request (``model`` with ``usage``, or a ``payload``) or event (``type``,
        ``quantities``); the wallet is not touched."""
        return self._send(calls.quote(customer_id, model=model, usage=usage, payload=payload, type=type,
                                      quantities=quantities, attributes=attributes, feature=feature, route=route,
                                      cost_usd=cost_usd, version=version))

    def preflight(self, customer_id: str, **quote: Any) -> Preflight:
        """Would this be allowed, and what would it cost? A quote beside the balance; nothing is held."""
        priced = self.quote(customer_id, **quote)
        return preflight_of(priced, self.balances(customer_id))

    def send_events(self, events: list[Json]) -> list[EventResult]:
        """One batch now (up to 500); ``client.events.send`` batches in the background instead."""
        return self._send(calls.send_events(events))

    def validate_prices(self, rules: Any) -> Json:
        return self._send(calls.validate_prices(rules))

    def create_price_version(self, rules: Any, note: str = "", *, idempotency_key: str | None = None) -> Json:
        """Validate and store a draft price version (422 :class:`InvalidRequest` naming the rule); once per
        ``idempotency_key`` (the same key again returns the first draft)."""
        return self._send(calls.create_price_version(rules, note, idempotency_key))

    def list_price_versions(self, limit: int = 50, cursor: str | None = None) -> Json:
        return self._send(calls.list_price_versions(limit, cursor))

    def get_price_version(self, version_id: str) -> Json:
        return self._send(calls.get_price_version(version_id))

    def simulate_price_version(self, version_id: str, from_: int | str, to: int | str) -> Json:
        """Re-price the recorded usage of ``[from_, to)`` under a stored version."""
        return self._send(calls.simulate_price_version(version_id, from_, to))

    def simulate_prices(self, rules: Any, from_: int | str, to: int | str) -> Json:
        """Re-price the recorded usage of ``[from_, to)`` under a rule set that is not stored."""
        return self._send(calls.simulate_prices(rules, from_, to))

    def publish_price_version(self, version_id: str, effective_at: int | str | None = None) -> Json:
        return self._send(calls.publish_price_version(version_id, effective_at))

    def list_keys(self, customer_id: str, limit: int = 200) -> list[ApiKey]:
        """The customer's proxy API keys, newest first (prefixes only: a secret is shown once, when issued)."""
        return self._send(calls.list_keys(customer_id, limit))

    def list_holds(self, customer_id: str | None = None, limit: int = 200) -> list[Hold]:
        """Open holds (all customers, or one), soonest expiry first."""
        return self._send(calls.list_holds(customer_id, limit))

    # ------------------------------------------------------------------ budgets

    def budget_tree(self, customer_id: str) -> BudgetTree:
        """The customer's budget tree: each node with its limits, their use and the keys attached."""
        return self._send(calls.budget_tree(customer_id))

    def get_budget_node(self, customer_id: str, node_id: str) -> BudgetNodeView:
        return self._send(calls.get_budget_node(customer_id, node_id))

    def create_budget_node(self, customer_id: str, node_id: str, kind: str, *, parent_id: str | None = None,
                           name: str = "", allowed_models: Sequence[str] | None = None) -> BudgetNode:
        """Idempotent by ``node_id``: the same node again returns it; a different one is a 409 :class:`Conflict`."""
        return self._send(calls.create_budget_node(customer_id, node_id, kind, parent_id=parent_id, name=name,
                                                   allowed_models=allowed_models))

    def update_budget_node(self, customer_id: str, node_id: str, *, name: str | None = None,
                           allowed_models: Sequence[str] | EllipsisType | None = ...) -> BudgetNode:
        return self._send(calls.update_budget_node(customer_id, node_id, name=name, allowed_models=allowed_models))

    def delete_budget_node(self, customer_id: str, node_id: str) -> Deleted:
        return self._send(calls.delete_budget_node(customer_id, node_id))

    def create_budget_limit(self, customer_id: str, node_id: str, limit_id: str, *, dimension: str, amount: int,
                            window: BudgetWindow | str, asset: str | None = None) -> BudgetLimit:
        """``amount``: requests, tokens, or (spend) the asset's smallest unit; idempotent by ``limit_id``."""
        return self._send(calls.create_budget_limit(customer_id, node_id, limit_id, dimension=dimension, amount=amount,
                                                    window=window, asset=asset))

    def update_budget_limit(self, customer_id: str, limit_id: str, amount: int) -> BudgetLimit:
        return self._send(calls.update_budget_limit(customer_id, limit_id, amount))

    def delete_budget_limit(self, customer_id: str, limit_id: str) -> Deleted:
        return self._send(calls.delete_budget_limit(customer_id, limit_id))

    def attach_key(self, key_id: str, node_id: str | None) -> KeyAttachment:
        return self._send(calls.attach_key(key_id, node_id))

    def list_budget_alerts(self, customer_id: str) -> list[BudgetAlertRule]:
        return self._send(calls.list_budget_alerts(customer_id))

    def set_budget_alert(self, customer_id: str, rule_id: str, target: str, *, percents: Sequence[int] = (),
                         amounts: Sequence[int] = ()) -> BudgetAlertRule:
        return self._send(calls.set_budget_alert(customer_id, rule_id, target, percents=percents, amounts=amounts))

    def list_fired_budget_alerts(self, customer_id: str) -> list[FiredBudgetAlert]:
        return self._send(calls.list_fired_budget_alerts(customer_id))

    def delete_budget_alert(self, customer_id: str, rule_id: str) -> Deleted:
        return self._send(calls.delete_budget_alert(customer_id, rule_id))
