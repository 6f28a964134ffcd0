"""The asynchronous client: the same methods as :class:`~metergate_client.Client`, awaited."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import EllipsisType, TracebackType
from typing import Any, TypeVar

from metergate_client import calls
from metergate_client.batcher import AsyncEventBatcher
from metergate_client.calls import Amount, Call
from metergate_client.client import preflight_of
from metergate_client.errors import InsufficientFunds, InvalidRequest, MetergateError
from metergate_client.jobs import AsyncJob, OnStop, _JobState
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
from metergate_client.transport import AsyncTransport, RetryPolicy

T = TypeVar("T")


class AsyncClient:
    """``AsyncClient(url, admin_key)``; use it in an ``async with`` block (or ``await close()``)."""

    def __init__(self, url: str, admin_key: str, *, timeout_s: float = 30.0, retry: RetryPolicy | None = None,
                 events_max_queue: int = 10_000, events_max_batch: int = 500,
                 events_give_up_after_s: float = 120.0) -> None:
        self._transport = AsyncTransport(url, admin_key, timeout_s=timeout_s, policy=retry or RetryPolicy())
        self._scales: dict[str, int] = {}
        self.events = AsyncEventBatcher(self.send_events, max_queue=events_max_queue, max_batch=events_max_batch,
                                   give_up_after_s=events_give_up_after_s)

    @classmethod
    def from_profile(cls, name: str | None = None, **options: Any) -> AsyncClient:
        profile = load_profile(name)
        return cls(profile.url, profile.admin_key, **options)

    @property
    def url(self) -> str:
        return self._transport.base_url

    async def _send(self, call: Call[T]) -> T:
        return await self._transport.send(call)

    async def close(self) -> None:
        try:
            await self.events.close()
        finally:
            await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        await self.close()

    # ------------------------------------------------------------------ customers, keys, money

    async def create_customer(self, customer_id: str, name: str = "") -> Customer:
        return await self._send(calls.create_customer(customer_id, name))

    async def list_customers(self, limit: int = 50, cursor: str | None = None) -> Page[Customer]:
        return await self._send(calls.list_customers(limit, cursor))

    async def get_customer(self, customer_id: str) -> Customer:
        """The customer with a balance per asset."""
        return await self._send(calls.get_customer(customer_id))

    async def balances(self, customer_id: str) -> list[Balance]:
        return await self._send(calls.balances(customer_id))

    async def credit(self, customer_id: str, amount: Amount, *, asset: str | None = None,
               idempotency_key: str | None = None, memo: str = "") -> Credit:
        """Credit ``amount`` (major unit of the asset); once per ``idempotency_key``."""
        return await self._send(calls.credit(customer_id, amount, asset=asset, idempotency_key=idempotency_key,
                                             memo=memo))

    async def issue_key(self, customer_id: str) -> ApiKey:
        return await self._send(calls.issue_key(customer_id))

    async def revoke_key(self, key_id: str) -> ApiKey:
        return await self._send(calls.revoke_key(key_id))

    async def ledger(self, customer_id: str, limit: int = 50, cursor: str | None = None) -> Page[LedgerEntry]:
        return await self._send(calls.ledger(customer_id, limit, cursor))

    async def usage(self, customer_id: str, limit: int = 50, cursor: str | None = None) -> Page[UsageRecord]:
        return await self._send(calls.usage(customer_id, limit, cursor))

    async def portal_link(self, customer_id: str, access: str | None = None) -> Link:
        return await self._send(calls.portal_link(customer_id, access))

    async def dashboard_link(self) -> Link:
        return await self._send(calls.dashboard_link())

    async def assets(self) -> list[Asset]:
        return await self._send(calls.assets())

    async def asset_scale(self, code: str) -> int:
        if code not in self._scales:
            self._scales.update({a.code: a.scale for a in await self.assets()})
        if code not in self._scales:
            raise InvalidRequest(400, "unknown_asset", f"Unknown asset {code!r}.", "asset")
        return self._scales[code]

    async def top_up_url(self, customer_id: str) -> str | None:
        """A portal link of the kind a 402 carries, or None when the server cannot make one."""
        try:
            return (await self.portal_link(customer_id, "view_topup")).url
        except MetergateError:
            return None

    # ------------------------------------------------------------------ grants

    async def list_grants(self, customer_id: str, *, asset: str | None = None, limit: int = 50,
                    cursor: str | None = None) -> Page[Grant]:
        return await self._send(calls.list_grants(customer_id, asset=asset, limit=limit, cursor=cursor))

    async def create_grant(self, customer_id: str, amount: Amount, *, asset: str | None = None, purpose: str = "paid",
                     priority: int = 0, effective_at_ms: int | None = None, expires_at_ms: int | None = None,
                     memo: str = "", idempotency_key: str | None = None) -> Grant:
        return await self._send(calls.create_grant(customer_id, amount, asset=asset, purpose=purpose, priority=priority,
                                             effective_at_ms=effective_at_ms, expires_at_ms=expires_at_ms,
                                             memo=memo, idempotency_key=idempotency_key))

    async def void_grant(self, grant_id: str) -> Grant:
        return await self._send(calls.void_grant(grant_id))

    # ------------------------------------------------------------------ holds

    async def create_hold(self, customer_id: str, amount: Amount, *, asset: str | None = None, ttl_s: int = 300,
                    idempotency_key: str | None = None, hold_id: str | None = None) -> Hold:
        """Hold ``amount``; 402 :class:`InsufficientFunds` (with ``portal_url``) when the wallet cannot cover it."""
        try:
            return await self._send(calls.create_hold(customer_id, amount, asset=asset, ttl_s=ttl_s,
                                                idempotency_key=idempotency_key, hold_id=hold_id))
        except InsufficientFunds as short:
            if short.portal_url is None:
                url = await self.top_up_url(customer_id)
                if url is not None:
                    short.body["portal_url"] = url
            raise

    async def get_hold(self, hold_id: str) -> Hold:
        return await self._send(calls.get_hold(hold_id))

    async def heartbeat(self, hold_id: str, *, used: Amount, next_amount: Amount, ttl_s: int = 300,
                  idempotency_key: str | None = None) -> Heartbeat:
        return await self._send(calls.heartbeat(hold_id, used=used, next_amount=next_amount, ttl_s=ttl_s,
                                          idempotency_key=idempotency_key))

    async def capture(self, hold_id: str, amount: Amount, *, final: bool = False,
                idempotency_key: str | None = None) -> Hold:
        return await self._send(calls.capture(hold_id, amount, final=final, idempotency_key=idempotency_key))

    async def extend_hold(self, hold_id: str, amount: Amount, *, ttl_s: int = 300,
                    idempotency_key: str | None = None) -> Hold:
        return await self._send(calls.extend_hold(hold_id, amount, ttl_s=ttl_s, idempotency_key=idempotency_key))

    async def void_hold(self, hold_id: str, *, idempotency_key: str | None = None) -> Hold:
        return await self._send(calls.void_hold(hold_id, idempotency_key=idempotency_key))

    def hold(self, customer_id: str, *, estimate: Amount, asset: str, ttl_s: int = 300,
             increment: Amount | None = None, on_stop: OnStop = "return",
             idempotency_key: str | None = None) -> AsyncJob:
        """A job's hold as an async context manager (see :mod:`metergate_client.jobs`)."""
        return AsyncJob(self, _JobState(customer_id, estimate=estimate, asset=asset, ttl_s=ttl_s,
                                        increment=increment, on_stop=on_stop, key=idempotency_key))

    # ------------------------------------------------------------------ prices and events

    async def quote(self, customer_id: str, *, model: str | None = None, usage: Mapping[str, int] | None = None,
              payload: Json | None = None, type: str | None = None, quantities: Mapping[str, Amount] | None = None,
              attributes: Mapping[str, str] | None = None, feature: str | None = None, route: str | None = None,
              cost_usd: Amount | None = None, version: str | None = None) -> Quote:
        """Price a hypothetical request (``model`` with ``usage``, or a ``payload``) or event (``type``,
        ``quantities``); the wallet is not touched."""
        return await self._send(calls.quote(customer_id, model=model, usage=usage, payload=payload, type=type,
                                      quantities=quantities, attributes=attributes, feature=feature, route=route,
                                      cost_usd=cost_usd, version=version))

    async def preflight(self, customer_id: str, **quote: Any) -> Preflight:
        """Would this be allowed, and what would it cost? A quote beside the balance; nothing is held."""
        priced = await self.quote(customer_id, **quote)
        return preflight_of(priced, await self.balances(customer_id))

    async def send_events(self, events: list[Json]) -> list[EventResult]:
        """One batch now (up to 500); ``await client.events.send`` batches in the background instead."""
        return await self._send(calls.send_events(events))

    async def validate_prices(self, rules: Any) -> Json:
        return await self._send(calls.validate_prices(rules))

    async def create_price_version(self, rules: Any, note: str = "", *, idempotency_key: str | None = None) -> Json:
        """Validate and store a draft price version (422 :class:`InvalidRequest` naming the rule); once per
        ``idempotency_key`` (the same key again returns the first draft)."""
        return await self._send(calls.create_price_version(rules, note, idempotency_key))

    async def list_price_versions(self, limit: int = 50, cursor: str | None = None) -> Json:
        return await self._send(calls.list_price_versions(limit, cursor))

    async def get_price_version(self, version_id: str) -> Json:
        return await self._send(calls.get_price_version(version_id))

    async def simulate_price_version(self, version_id: str, from_: int | str, to: int | str) -> Json:
        """Re-price the recorded usage of ``[from_, to)`` under a stored version."""
        return await self._send(calls.simulate_price_version(version_id, from_, to))

    async def simulate_prices(self, rules: Any, from_: int | str, to: int | str) -> Json:
        """Re-price the recorded usage of ``[from_, to)`` under a rule set that is not stored."""
        return await self._send(calls.simulate_prices(rules, from_, to))

    async def publish_price_version(self, version_id: str, effective_at: int | str | None = None) -> Json:
        return await self._send(calls.publish_price_version(version_id, effective_at))

    async def list_keys(self, customer_id: str, limit: int = 200) -> list[ApiKey]:
        """The customer's proxy API keys, newest first (prefixes only: a secret is shown once, when issued)."""
        return await self._send(calls.list_keys(customer_id, limit))

    async def list_holds(self, customer_id: str | None = None, limit: int = 200) -> list[Hold]:
        """Open holds (all customers, or one), soonest expiry first."""
        return await self._send(calls.list_holds(customer_id, limit))

    # ------------------------------------------------------------------ budgets

    async def budget_tree(self, customer_id: str) -> BudgetTree:
        """The customer's budget tree: each node with its limits, their use and the keys attached."""
        return await self._send(calls.budget_tree(customer_id))

    async def get_budget_node(self, customer_id: str, node_id: str) -> BudgetNodeView:
        return await self._send(calls.get_budget_node(customer_id, node_id))

    async def create_budget_node(self, customer_id: str, node_id: str, kind: str, *, parent_id: str | None = None,
                                 name: str = "", allowed_models: Sequence[str] | None = None) -> BudgetNode:
        """Idempotent by ``node_id``: the same node again returns it; a different one is a 409 :class:`Conflict`."""
        return await self._send(calls.create_budget_node(customer_id, node_id, kind, parent_id=parent_id, name=name,
                                                         allowed_models=allowed_models))

    async def update_budget_node(self, customer_id: str, node_id: str, *, name: str | None = None,
                                 allowed_models: Sequence[str] | EllipsisType | None = ...) -> BudgetNode:
        call = calls.update_budget_node(customer_id, node_id, name=name, allowed_models=allowed_models)
        return await self._send(call)

    async def delete_budget_node(self, customer_id: str, node_id: str) -> Deleted:
        return await self._send(calls.delete_budget_node(customer_id, node_id))

    async def create_budget_limit(self, customer_id: str, node_id: str, limit_id: str, *, dimension: str, amount: int,
                                  window: BudgetWindow | str, asset: str | None = None) -> BudgetLimit:
        """``amount``: requests, tokens, or (spend) the asset's smallest unit; idempotent by ``limit_id``."""
        call = calls.create_budget_limit(customer_id, node_id, limit_id, dimension=dimension, amount=amount,
                                         window=window, asset=asset)
        return await self._send(call)

    async def update_budget_limit(self, customer_id: str, limit_id: str, amount: int) -> BudgetLimit:
        return await self._send(calls.update_budget_limit(customer_id, limit_id, amount))

    async def delete_budget_limit(self, customer_id: str, limit_id: str) -> Deleted:
        return await self._send(calls.delete_budget_limit(customer_id, limit_id))

    async def attach_key(self, key_id: str, node_id: str | None) -> KeyAttachment:
        return await self._send(calls.attach_key(key_id, node_id))

    async def list_budget_alerts(self, customer_id: str) -> list[BudgetAlertRule]:
        return await self._send(calls.list_budget_alerts(customer_id))

    async def set_budget_alert(self, customer_id: str, rule_id: str, target: str, *, percents: Sequence[int] = (),
                               amounts: Sequence[int] = ()) -> BudgetAlertRule:
        call = calls.set_budget_alert(customer_id, rule_id, target, percents=percents, amounts=amounts)
        return await self._send(call)

    async def list_fired_budget_alerts(self, customer_id: str) -> list[FiredBudgetAlert]:
        return await self._send(calls.list_fired_budget_alerts(customer_id))

    async def delete_budget_alert(self, customer_id: str, rule_id: str) -> Deleted:
        return await self._send(calls.delete_budget_alert(customer_id, rule_id))
