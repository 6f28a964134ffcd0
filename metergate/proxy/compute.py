"""Generic compute endpoints: prepaid metering for GPU jobs, inference servers, any HTTP API.

A compute route is metered in units: wall-clock seconds that metergate measures around the upstream
exchange (``meter: time``), a number the upstream returns in a header or a JSON field, or one per request.
The hold covers ``hold_units`` up front; a timed request that outruns it extends the hold by
``extend_units`` before it runs out, and when the wallet cannot cover the next increment the job is
stopped — a GPU job halts at zero instead of running up debt. The time actually used is billed either way.

What units cost: by default ``units x unit_price`` in the route's own asset (e.g. ``GPU_SECONDS``). A
published price version that has a rule naming ``type: compute`` (and, say, ``route: /gpu``) prices the
route's requests instead, with everything a rule can do (an asset of its own such as USD, per-request
fees, volume tiers, minimums, cost-plus over ``cost_per_unit_usd``) over the quantities ``units`` and
``requests``. Every amount is the price of a number of units: the hold is the price of ``hold_units``, an
extension the price of the units then covered minus what is held, the charge the price of the units used.
A request that failed upstream is charged nothing, fees included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from metergate.budgets.admission import NODE_HEADER, Ticket
from metergate.budgets.denials import BudgetExceeded
from metergate.config.routes import ComputeSettings, RouteMatch
from metergate.errors import BadGateway, BadRequest, GatewayTimeout
from metergate.money import COST_SCALE, format_minor, to_minor
from metergate.pricing.engine import CostUnknown
from metergate.pricing.service import Resolved
from metergate.proxy import headers as hh
from metergate.proxy.identify import Identity
from metergate.wallet.errors import InsufficientFunds
from metergate.wallet.models import Hold, Settlement, UsageRecord

if TYPE_CHECKING:
    from metergate.proxy.pipeline import Pipeline

log = logging.getLogger(__name__)
_CLIENT_GONE = (ConnectionResetError, ConnectionError, aiohttp.ClientConnectionResetError)
_EXTEND_LEAD_S = Decimal("0.5")  # extend this long before the held time runs out


@dataclass(frozen=True, slots=True)
class UnitPrice:
    """What units of one compute request cost, in the smallest unit of ``asset``: the price rule chosen for it
    (``terms``), else its route's ``unit_price``."""

    config: ComputeSettings
    terms: Resolved | None
    asset: str
    scale: int

    def cost_nanos(self, units: Decimal) -> int | None:
        per_unit = self.config.cost_per_unit_usd
        return to_minor(units * per_unit, COST_SCALE) if per_unit is not None else None

    def of(self, units: Decimal) -> int:
        """Raises ``CostUnknown`` for a cost-plus rule on a route without ``cost_per_unit_usd``."""
        if self.terms is None:
            return to_minor(units * self.config.unit_price, self.scale)
        return self.terms.price(quantities(units), self.cost_nanos(units)).amount

    def detail(self) -> dict[str, Any]:
        if self.terms is None:
            return {"unit_price": str(self.config.unit_price)}
        return {"price": self.terms.as_detail()}


def quantities(units: Decimal) -> dict[str, Decimal]:
    """A compute request's quantities for a price rule."""
    return {"units": units, "requests": Decimal(1)}


@dataclass(slots=True)
class Job:
    request_id: str
    identity: Identity
    match: RouteMatch
    config: ComputeSettings
    price: UnitPrice
    hold: Hold
    covered_units: Decimal
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    extensions: int = 0
    stopped_for_funds: bool = False
    status: int = 0
    units: Decimal | None = None  # reported by the upstream (meter: header/json)
    response: web.StreamResponse | None = None
    budget: Ticket | None = None  # the budget path it was admitted along (metergate.budgets)

    def elapsed_s(self) -> Decimal:
        end = self.finished if self.finished is not None else time.perf_counter()
        return Decimal(str(round(end - self.started, 6)))



class ComputeRelay:
    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline

    async def handle(self, request: web.Request, request_id: str, match: RouteMatch) -> web.StreamResponse:
        config = match.route.compute
        assert config is not None
        p = self._p
        identity = await p.identifier.identify(request)
        attributes = p.prices.request_attributes(request.headers,
                                                 identity.attributes if identity.via == "api_key" else None)
        body = await p._read_body(request, json_only=False)
        terms = await p.prices.resolve_compute(
            identity.mode, identity.customer_id, route=match.route.prefix, provider=match.route.provider_id,
            path=match.upstream_path, attributes=attributes)
        price = UnitPrice(config, terms, terms.asset, terms.scale) if terms is not None else UnitPrice(
            config, None, config.asset, p.settings.asset(config.asset).scale)
        held_units = config.hold_units if config.meter != "request" else Decimal(1)
        try:
            held = price.of(held_units)
        except CostUnknown:
            raise BadRequest(f"Route {match.route.prefix} is priced over its provider cost, which it does not "
                             "configure (cost_per_unit_usd).", code="unknown_cost") from None
        # A job spends along its budget path like any request (one request, no tokens, its hold); a node's
        # allowed models do not apply to it (it names no model).
        ticket = await p.budgets.resolve(identity.mode, identity.customer_id, key_id=identity.key_id,
                                         header=request.headers.get(NODE_HEADER),
                                         header_trusted=identity.via == "header", model=None)
        if ticket is not None:
            await p.budgets.admit(ticket, tokens=0, spend=held, asset=price.asset)
        try:
            hold = await p._authorize(identity, request_id, held, price.asset)
        except BaseException:
            if ticket is not None:
                p.budgets.give_back(ticket)
            raise
        job = Job(request_id, identity, match, config, price, hold, held_units, budget=ticket)
        relay = asyncio.create_task(self._relay(request, body, job))
        extender = asyncio.create_task(self._extend(job, relay)) if config.meter == "time" else None
        response: web.StreamResponse | None = None
        try:
            response = await relay
        except asyncio.CancelledError:
            if not job.stopped_for_funds:
                raise  # the handler itself is being cancelled (shutdown); the settlement below still runs
            response = job.response  # the wallet ran dry mid-job: bill the time used, end what was started
        finally:
            if job.finished is None:
                job.finished = time.perf_counter()
            if extender is not None:
                extender.cancel()
            await asyncio.shield(self._settle(job))
        if response is None or not response.prepared:
            short = InsufficientFunds(asset=job.price.asset, available=0, required=job.hold.amount)
            raise p.insufficient(identity, short)
        # The body ends only now, after settlement: a client that has the whole answer sees it billed.
        with contextlib.suppress(*_CLIENT_GONE):
            await response.write_eof()
        return response

    async def _relay(self, request: web.Request, body: bytes, job: Job) -> web.StreamResponse:
        p = self._p
        assert p.session is not None
        key = job.match.route.api_key
        headers = hh.upstream_request_headers(
            request.headers, auth=("Authorization", f"Bearer {key.get_secret_value()}") if key else None,
            drop=(p.settings.customer_header, p.settings.mode_header, p.settings.attribution_header))
        if request.content_type:
            headers["Content-Type"] = request.headers.get("Content-Type", request.content_type)
        try:
            upstream = await p.session.request(request.method, job.match.upstream_url, data=body, headers=headers,
                                               allow_redirects=False)
        except TimeoutError:
            raise GatewayTimeout("The upstream did not answer in time; nothing was charged.") from None
        except aiohttp.ClientError:
            raise BadGateway("The upstream could not be reached; nothing was charged.") from None
        job.status = upstream.status
        if 300 <= upstream.status < 400:
            upstream.release()
            raise BadGateway("The upstream answered with a redirect, which metergate does not follow.",
                             code="upstream_redirect")
        response = job.response = web.StreamResponse(status=upstream.status,
                                                     headers=hh.client_response_headers(upstream.headers))
        response.headers["X-Metergate-Request-Id"] = job.request_id
        response.headers["X-Metergate-Asset"] = job.price.asset
        buffered: list[bytes] = []
        try:
            if job.config.meter == "header":
                job.units = _decimal(upstream.headers.get(job.config.usage_header))
            if job.config.meter == "json":
                # The units are in the body: read it whole (bounded), then relay it.
                size = 0
                async for chunk in upstream.content.iter_any():
                    size += len(chunk)
                    if size > p.settings.max_response_bytes:
                        raise BadGateway("The upstream response is too large.", code="upstream_invalid")
                    buffered.append(chunk)
                job.finished = time.perf_counter()
                job.units = _json_units(b"".join(buffered), job.config.usage_json_field)
                await response.prepare(request)
                await response.write(b"".join(buffered))
            else:
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    try:
                        await response.write(chunk)
                    except _CLIENT_GONE:
                        break  # nobody is waiting for the result: stop the job, bill the time used
                job.finished = time.perf_counter()
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("%s: compute upstream failed mid-response: %s", job.request_id, type(exc).__name__)
        finally:
            if job.finished is None:
                job.finished = time.perf_counter()
            upstream.release()
        return response

    async def _extend(self, job: Job, relay: asyncio.Task[web.StreamResponse]) -> None:
        """Keep the hold ahead of the clock; stop the job when the wallet cannot cover the next step."""
        p, config = self._p, job.config
        while True:
            wait = float(job.covered_units - _EXTEND_LEAD_S - job.elapsed_s())
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                # What the units then covered cost, less what is held: under a volume tier or a minimum the
                # next step can cost nothing more (then the hold stays as it is).
                step = job.price.of(job.covered_units + config.extend_units) - job.hold.amount
                if step > 0:
                    if job.budget is not None:
                        try:  # a node's spend limit stops a job as an empty wallet does
                            await p.budgets.extend(job.budget, step, job.price.asset)
                        except BudgetExceeded:
                            raise InsufficientFunds(asset=job.price.asset, available=0, required=step) from None
                    job.hold = await p.holds.extend_hold(job.hold.id, step, step=job.extensions + 1,
                                                         ttl_ms=p.settings.hold_ttl_s * 1000)
            except InsufficientFunds:
                log.info("%s: wallet cannot cover the next %s units; stopping the job", job.request_id,
                         config.extend_units)
                # Let the held time run out first: it is paid for.
                remaining = float(job.covered_units - job.elapsed_s())
                if remaining > 0:
                    await asyncio.sleep(remaining)
                job.stopped_for_funds = True
                job.finished = time.perf_counter()
                relay.cancel()
                return
            job.extensions += 1
            job.covered_units += config.extend_units

    async def _settle(self, job: Job) -> Settlement | None:
        p, config = self._p, job.config
        succeeded = 0 < job.status < 400
        if config.meter == "time":
            units: Decimal | None = job.elapsed_s() if (succeeded or job.stopped_for_funds) else Decimal(0)
            if units is not None and job.stopped_for_funds:
                units = min(units, job.covered_units)  # never bill beyond what was held and paid for
            source = "measured"
        elif config.meter == "request":
            units, source = (Decimal(1) if succeeded else Decimal(0)), "measured"
        else:
            units, source = (job.units if succeeded else Decimal(0)), "provider"
        if units is None:
            log.warning("%s: the upstream reported no units; nothing billed", job.request_id)
            units, source = Decimal(0), "none"
        billed = succeeded or job.stopped_for_funds  # a failed request costs nothing, not even a fee
        price = job.price.of(units) if billed else 0
        cost = job.price.cost_nanos(units)
        record = UsageRecord(
            id=job.request_id, mode=job.identity.mode, customer_id=job.identity.customer_id, hold_id=job.hold.id,
            route=job.match.route.prefix, endpoint="compute", model=job.match.upstream_path[:128] or "/",
            feature=None, stream=False, status_code=job.status or 499, usage_source=source,  # type: ignore[arg-type]
            tokens_input=0, tokens_cached_input=0, tokens_output=0, tokens_reasoning=0, asset=job.price.asset,
            price_amount=price, cost_nanos=cost,
            detail={"meter": config.meter, "units": str(units), **job.price.detail(),
                    "held_units": str(job.covered_units), "extensions": job.extensions,
                    "stopped_for_funds": job.stopped_for_funds, "elapsed_s": str(job.elapsed_s())},
            budget_path=job.budget.path_text if job.budget is not None else None)
        settlement = await p.settler.settle(p.holds, job.hold.id, price, record)
        if settlement is not None and job.budget is not None:
            p.budgets.settled(job.budget, charged=settlement.charged, tokens_used=0)
        if settlement is not None and p.on_budget_settled is not None:
            p.on_budget_settled(job.identity.mode, job.identity.customer_id)
        if settlement is not None and job.response is not None and not job.response.prepared:
            job.response.headers["X-Metergate-Charged"] = format_minor(settlement.charged, job.price.scale)
        if settlement is not None and billed and job.price.terms is not None:
            await p.prices.count(job.price.terms, record.id, record.mode, record.customer_id, quantities(units))
        return settlement


def _decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        return None
    return number if number.is_finite() and number >= 0 else None


def _json_units(body: bytes, path: str) -> Decimal | None:
    try:
        node: Any = json.loads(body)
    except (ValueError, RecursionError):
        return None
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return _decimal(node)


__all__ = ["ComputeRelay"]
