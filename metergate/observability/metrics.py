"""Prometheus metrics, one registry per application.

The pipeline reports three moments: a hold placed (:meth:`Metrics.hold_opened`), a settlement finished
(:meth:`Metrics.settled`, with the exchange, its usage record and the settlement), and a request refused
(:meth:`Metrics.denied`, from the observing middleware, by error code). Labels are bounded by
configuration and code — route prefixes, endpoints, status classes, outcomes, error codes, assets —
never by customer, key, model or request, so that the series count cannot grow with traffic.

Metrics (all counters are ``*_total``):

* ``metergate_requests_total{route,endpoint,status_class,outcome}`` forwarded requests, one per
  settlement; outcome is ``ok``, ``error`` (an error status reached the client), ``cut`` (a stream cut at
  the shutdown deadline), ``cancelled`` (the handler was cancelled before an answer) or
  ``settlement_failed`` (the hold is left to expire). Refused requests are in ``denials``.
* ``metergate_denials_total{reason}`` requests refused with a 4xx error, by error code.
* ``metergate_unavailable_total{reason}`` requests refused with a 503 because storage metergate needs is
  unreachable or full (``storage_unavailable``, ``wallet_unavailable``, ``ledger_backlog``); nothing charged.
* ``metergate_tokens_total{type,source}`` tokens settled; type is ``input`` (cached included),
  ``cached_input``, ``output`` or ``reasoning`` (subsets, as OpenAI reports them); source is
  ``provider`` or ``estimated``.
* ``metergate_usage_anomalies_total{route,endpoint}`` settled requests whose upstream reported usage
  metergate did not believe (billed from the estimate; the usage record's ``detail.usage_anomalies`` says why).
* ``metergate_charged_total{asset}`` and ``metergate_written_off_total{asset}`` in the asset's smallest unit.
* ``metergate_cost_nanodollars_total`` the providers' cost, where known.
* ``metergate_upstream_latency_seconds`` from forwarding until the upstream's response headers.
* ``metergate_time_to_first_token_seconds`` streams: from the hold until the first content event.
* ``metergate_open_holds`` holds placed by this process and not yet settled.
* ``metergate_expired_holds_total`` holds the sweeper released after their TTL.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from metergate.wallet.models import Settlement, UsageRecord

if TYPE_CHECKING:
    from metergate.proxy.pipeline import Exchange

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_STATUS_CLASS = {n: f"{n}xx" for n in range(10)}
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("metergate_requests", "Forwarded requests, one per settlement.",
                                ["route", "endpoint", "status_class", "outcome"], registry=r)
        self.denials = Counter("metergate_denials", "Requests refused with a 4xx error, by error code.",
                               ["reason"], registry=r)
        self.unavailable = Counter("metergate_unavailable",
                                   "Requests refused with a 503 (storage unreachable or full), by error code.",
                                   ["reason"], registry=r)
        self.tokens = Counter("metergate_tokens", "Tokens settled, by type and by who counted them.",
                              ["type", "source"], registry=r)
        self.usage_anomalies = Counter(
            "metergate_usage_anomalies", "Requests with implausible upstream usage, billed from the estimate.",
            ["route", "endpoint"], registry=r)
        self.charged = Counter("metergate_charged", "Amount captured from wallets, in the asset's smallest unit.",
                               ["asset"], registry=r)
        self.written_off = Counter("metergate_written_off",
                                   "Usage the wallets could not cover, in the asset's smallest unit.",
                                   ["asset"], registry=r)
        self.cost = Counter("metergate_cost_nanodollars", "Provider cost of settled requests, where known.",
                            registry=r)
        self.upstream_latency = Histogram("metergate_upstream_latency_seconds",
                                          "From forwarding a request until the upstream's response headers.",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("metergate_time_to_first_token_seconds",
                                     "Streams: from the hold until the first content event.",
                                     buckets=_TTFT_BUCKETS, registry=r)
        self.open_holds = Gauge("metergate_open_holds", "Holds placed by this process and not yet settled.",
                                registry=r)
        self.expired_holds = Counter("metergate_expired_holds", "Holds released by the sweeper after their TTL.",
                                     registry=r)
        self.settlement_backlog = Gauge(
            "metergate_settlement_backlog", "Settlements of delivered answers the store has not taken yet, kept "
            "by this process and retried (metergate/proxy/settlement.py).", registry=r)
        self.settlements_unbilled = Counter(
            "metergate_settlements_unbilled", "Delivered answers written off unbilled: the store refused their "
            "settlement, or was still down at shutdown (each logged with its usage record).", ["route"], registry=r)
        # Each labelled series, looked up once: prometheus_client's ``labels()`` takes a lock and rebuilds its
        # key on every call, and the labels are bounded (see above), so these dicts are too.
        self._series: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Counter, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*labels)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def hold_opened(self) -> None:
        self.open_holds.inc()

    def denied(self, reason: str) -> None:
        self._child(self.denials, reason).inc()

    def refused_unavailable(self, reason: str) -> None:
        self.unavailable.labels(reason).inc()

    def expired(self, count: int) -> None:
        self.expired_holds.inc(count)

    def settled(self, ex: Exchange, record: UsageRecord, task: asyncio.Future[Settlement | None]) -> None:
        """The done callback of an exchange's settlement: count the request, its usage and its money."""
        self.open_holds.dec()
        settlement = None if task.cancelled() or task.exception() is not None else task.result()
        if settlement is None:
            outcome = "settlement_failed"
        elif ex.cut:
            outcome = "cut"
        elif ex.status == 0:
            outcome = "cancelled"
        elif ex.status >= 400:
            outcome = "error"
        else:
            outcome = "ok"
        status_class = _STATUS_CLASS.get(record.status_code // 100) or f"{record.status_code // 100}xx"
        self._child(self.requests, record.route, record.endpoint, status_class, outcome).inc()
        if ex.upstream_latency_s is not None:
            self.upstream_latency.observe(ex.upstream_latency_s)
        if ex.first_token_s is not None:
            self.first_token.observe(ex.first_token_s)
        if record.detail.get("usage_anomalies"):
            self._child(self.usage_anomalies, record.route, record.endpoint).inc()
        if settlement is None:
            return
        if record.usage_source != "none":
            source = record.usage_source
            for kind, count in (("input", record.tokens_input), ("cached_input", record.tokens_cached_input),
                                ("output", record.tokens_output), ("reasoning", record.tokens_reasoning)):
                if count:
                    self._child(self.tokens, kind, source).inc(count)
        if settlement.charged:
            self._child(self.charged, record.asset).inc(settlement.charged)
        if settlement.written_off:
            self._child(self.written_off, record.asset).inc(settlement.written_off)
        if record.cost_nanos:
            self.cost.inc(record.cost_nanos)
