"""The wallet side of a Realtime API session: one hold per response, settled from its ``response.done``.

A session is a series of responses, each billed like a request of its own: a hold placed before the response
may start, settled from the usage the upstream reports in ``response.done`` (a usage record per response, with
the text and audio split in its detail), the rest released. Between responses the session keeps one *spare*
hold, the one the next response will draw: placed at the upgrade (the session's authorization) and again
after every settlement. A client ``response.create`` is forwarded only when a spare is in place or can be
placed; otherwise the session is cut off. A response the upstream starts by itself (server VAD) claims the
spare; without one, metergate cancels it upstream and ends the session, and bills what ``response.done``
reports for the cancelled response against an empty hold (captured as far as the wallet covers, the rest
written off: never lost).

While a response runs, its hold grows with the output delivered (:meth:`SessionMeter.admit_output`, the
Realtime analogue of :mod:`metergate.proxy.budget`); when the wallet cannot cover more, the relay cancels the
response upstream and delivers no more of it, and its ``response.done`` bills what the provider counted.

Why one hold per response rather than partial captures from one session hold: it works on every wallet store
(the Redis wallet has no partial captures), each response gets its usage record (prices, margins, invoiced
meter events and tier counters work as for any request), and a spare hold that sits idle is simply voided and
placed again to keep it ahead of ``hold_ttl_s`` (:meth:`SessionMeter.refresh`).

Nothing lost: a response whose ``response.done`` never comes (the client left and the grace period passed,
the upstream broke off) is billed an estimate marked ``estimated``: the context the previous response saw plus
its output and what the client sent since, and the output delivered (text tokens counted, audio by its
duration). When the session ends every hold it still has is settled or voided; if the process dies, they
expire after ``hold_ttl_s``, which the session keeps pushing out while it lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from metergate.config.routes import RouteMatch
from metergate.errors import BadGateway, BadRequest
from metergate.metering.realtime import RealtimeUsage, genai_audio_rates
from metergate.metering.tokenizer import counter_for
from metergate.payments.spendcaps import SpendCapReached
from metergate.pricing.engine import CostUnknown
from metergate.pricing.service import Resolved
from metergate.proxy.identify import Identity
from metergate.wallet.errors import HoldNotFound, InsufficientFunds
from metergate.wallet.models import Hold, Settlement, UsageRecord, stored_text

if TYPE_CHECKING:
    from metergate.proxy.pipeline import Pipeline

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_PCM16_BYTES_PER_S = 48_000  # the Realtime API's default audio: 16-bit mono PCM at 24 kHz
_ANOMALY_CHARS = 200
_STATUS_CODES = {"completed": 200, "incomplete": 200, "failed": 502}  # the record's status; cancelled: 499
_MAX_REMEMBERED = 10_000  # response ids remembered as billed
_MAX_ACTIVE = 8  # responses in flight at once; the API runs one per conversation, plus out-of-band ones
_MAX_TEXT_CHARS = 1 << 20  # text kept per response (and of client input) for an estimate; beyond, 1 token/char


class Refused(Exception):
    """The wallet cannot cover the next response (``error`` is the 402 the client would have got over HTTP)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(slots=True)
class Tally:
    """Text and audio seen on one side of a response, kept only for an estimate: text up to
    ``_MAX_TEXT_CHARS`` (counted with the tokenizer when needed), beyond it one token a character."""

    text: list[str] = field(default_factory=list)
    chars: int = 0
    overflow_chars: int = 0
    audio_bytes: int = 0

    def add(self, text: str | None = None, audio_b64_chars: int = 0) -> None:
        if text:
            if self.chars + len(text) <= _MAX_TEXT_CHARS:
                self.text.append(text)
                self.chars += len(text)
            else:
                self.overflow_chars += len(text)
        self.audio_bytes += audio_b64_chars * 3 // 4

    async def text_tokens(self, model: str) -> int:
        if not self.text:
            return self.overflow_chars
        joined = "".join(self.text)
        count = counter_for(model).count
        # A large text is never counted on the event loop.
        tokens = count(joined) if len(joined) < 65_536 else await asyncio.to_thread(count, joined)
        return tokens + self.overflow_chars


@dataclass(slots=True)
class Response:
    """One response in flight: its hold and what was seen of it, for an estimate should no usage come."""

    id: str
    seq: int
    hold: Hold
    context: RealtimeUsage  # the previous response's context and output: input this one sees at least
    sent: Tally  # what the client added since the previous response
    started: float = field(default_factory=time.monotonic)
    out: Tally = field(default_factory=Tally)
    steps: int = 0  # extensions of its hold (growth and expiry refreshes share the idempotency steps)
    stopped: bool = False  # the wallet could not cover more of it: cancelled upstream, nothing more delivered


class SessionMeter:
    """Holds and settlements of one session; every method may be called from either relay direction."""

    def __init__(self, pipeline: Pipeline, identity: Identity, match: RouteMatch, model: str, rate: Resolved,
                 session_id: str, feature: str | None) -> None:
        self._p = pipeline
        self.identity = identity
        self.match = match
        self.model = model
        self.rate = rate
        self.session_id = session_id
        self.feature = feature
        self._settings = pipeline.settings.realtime
        self._ttl_ms = pipeline.settings.hold_ttl_s * 1000
        self._lock = asyncio.Lock()  # one hold decision at a time
        self.spare: Hold | None = None
        self.active: dict[str, Response] = {}
        self._seq = 0
        self._holds = 0
        self.last: RealtimeUsage | None = None  # the previous response's usage (the context grows from it)
        self.last_price = 0
        self.sent = Tally()  # client input since the previous response
        self._rates = genai_audio_rates(match.route.provider_id, model)
        self._open: dict[str, Hold] = {}  # every hold placed and not yet settled or voided
        self._inflight: set[asyncio.Future[Any]] = set()
        self.closed = False
        self._billed: dict[str, None] = {}  # the latest response ids billed, oldest first: one bill each

    # ------------------------------------------------------------------ pricing

    def price(self, usage: RealtimeUsage) -> int:
        """Raises ``CostUnknown`` for a cost-plus rule whose provider cost is unknown."""
        cost = self.cost_nanos(usage) if self.rate.rule.markup is not None else None
        return self.rate.price(usage.quantities(), cost).amount

    def cost_nanos(self, usage: RealtimeUsage) -> int | None:
        """The provider's cost: a configured override (text rates, which then price audio too), else
        genai-prices' audio rates for the model, else its text rates."""
        costs = self._p.costs
        if self.model in self._p.settings.cost_overrides or self._rates is None:
            return costs.cost(self.match.route.provider_id, self.model, usage.as_usage()).nanos
        return self._rates.nanos(usage)

    def hold_estimate(self) -> RealtimeUsage:
        s = self._settings
        return RealtimeUsage(audio_input=s.response_hold_input_tokens, audio_output=s.response_hold_output_tokens,
                             source="estimated")

    def hold_tokens(self) -> int:
        """The tokens a response is admitted with by the rate limits: what its hold is priced from."""
        estimate = self.hold_estimate()
        last = self.last.input_tokens + self.last.output_tokens if self.last is not None else 0
        return max(estimate.input_tokens + estimate.output_tokens, last)

    def hold_amount(self) -> int:
        """What the next response is held for: the configured estimate priced as audio, and at least what
        the previous response cost (the conversation it saw only grows)."""
        try:
            return max(self.price(self.hold_estimate()), self.last_price)
        except CostUnknown:
            raise BadRequest(f"Model {self.model!r} is priced over its provider cost, which is unknown.",
                             code="unknown_cost", param="model") from None

    # ------------------------------------------------------------------ holds

    async def _reserve(self, amount: int) -> Hold:
        """Place a hold, remembered in ``_open`` until it is settled or voided: should the caller be cancelled
        meanwhile, :meth:`close` still finds it (the reservation itself runs to its end, shielded)."""
        p = self._p
        self._holds += 1
        hold_id = f"hold_{self.session_id[4:]}_{self._holds}"

        async def place() -> Hold:
            if p.spend_caps is not None:
                await p.spend_caps.admit(self.identity.mode, self.identity.customer_id, self.rate.asset, amount)
            hold, _ = await p.store.reserve(self.identity.mode, self.identity.customer_id, self.rate.asset,
                                            amount, hold_id=hold_id, ttl_ms=self._ttl_ms)
            self._open[hold.id] = hold
            p.metrics.hold_opened()
            return hold

        return await self._tracked(place())

    async def _tracked(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a wallet operation to its end even if the caller is cancelled; :meth:`close` waits for it."""
        task = asyncio.ensure_future(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    async def authorize(self) -> None:
        """The session's first hold, before the upgrade; raises the 402 (or 400 ``unknown_cost``) to answer."""
        try:
            self.spare = await self._reserve(self.hold_amount())
        except InsufficientFunds as short:
            raise self._p.insufficient(self.identity, short) from None

    async def admit_response(self) -> None:
        """Before a client's ``response.create`` is forwarded: a spare hold must be in place; raises
        :class:`Refused` when the wallet cannot cover one."""
        async with self._lock:
            if self.spare is None:
                self.spare = await self._place_spare()

    async def _place_spare(self) -> Hold:
        if self.closed:
            raise Refused(RuntimeError("the session is over"))
        amount = self.hold_amount()
        try:
            return await self._reserve(amount)
        except InsufficientFunds as short:
            raise Refused(self._p.insufficient(self.identity, short)) from None
        except SpendCapReached as capped:
            raise Refused(capped) from None

    async def started(self, response_id: str) -> Refused | None:
        """The upstream announced a response (``response.created``): it draws the spare hold. When there is
        none and none can be placed, the refusal is returned: the caller cancels the response and ends the
        session, and the response is billed against an empty hold."""
        async with self._lock:
            if response_id in self.active:
                return None
            hold, refused = self.spare, None
            self.spare = None
            if hold is None and len(self.active) >= _MAX_ACTIVE:
                refused = Refused(BadGateway(f"The upstream started more than {_MAX_ACTIVE} responses at once.",
                                             code="upstream_invalid"))
                hold = await self._reserve(0)
            elif hold is None:
                try:
                    hold = await self._place_spare()
                except Refused as short:
                    hold, refused = await self._reserve(0), short
            self.active[response_id] = self._response(response_id, hold)
            return refused

    def _response(self, response_id: str, hold: Hold) -> Response:
        """A response starting now: it sees at least the previous one's context and output (``last``) and
        what the client sent since."""
        self._seq += 1
        last = self.last or RealtimeUsage(source="estimated")
        context = RealtimeUsage(text_input=last.text_input + last.cached_text_input + last.text_output,
                                audio_input=last.audio_input + last.cached_audio_input + last.audio_output,
                                source="estimated")
        sent, self.sent = self.sent, Tally()
        return Response(response_id, self._seq, hold, context, sent)

    def client_input(self, *, texts: Sequence[str] = (), audio_b64_chars: int = 0) -> None:
        """What the client added to the conversation since the last response (for an estimate)."""
        self.sent.add(audio_b64_chars=audio_b64_chars)
        for text in texts:
            self.sent.add(text)

    def delta(self, response_id: str, *, text: str | None = None, audio_b64_chars: int = 0) -> None:
        response = self.active.get(response_id)
        if response is not None:
            response.out.add(text, audio_b64_chars)

    def _expected(self, response: Response) -> RealtimeUsage:
        """What the response costs so far, as far as metergate can see it while it runs (cheaply: audio by
        its duration, text at four characters a token): the previous response's input as it was billed, the
        previous output and the client's audio since as uncached input, and the output delivered."""
        last = self.last or RealtimeUsage(source="estimated")
        media, out = self._p.settings.media, response.out
        return RealtimeUsage(
            text_input=last.text_input + last.text_output + response.sent.chars // 4,
            audio_input=last.audio_input + last.audio_output
            + response.sent.audio_bytes * media.audio_tokens_per_s // _PCM16_BYTES_PER_S,
            cached_text_input=last.cached_text_input, cached_audio_input=last.cached_audio_input,
            text_output=(out.chars + out.overflow_chars) // 4,
            audio_output=out.audio_bytes * self._settings.audio_output_tokens_per_s // _PCM16_BYTES_PER_S,
            source="estimated")

    async def admit_output(self, response_id: str) -> bool:
        """After an output delta: whether what the response delivered is still within its hold, growing the
        hold by ``response_hold_output_tokens / 2`` of audio output when it is not (the last of the wallet when
        a whole step is not there). ``False``: the wallet cannot pay for more; the caller cancels the response
        upstream and delivers no more of it. Its ``response.done`` still bills what the provider counted."""
        response = self.active.get(response_id)
        if response is None:
            return True
        if response.stopped:
            return False
        try:
            expected = self._expected(response)
            if self.price(expected) <= response.hold.amount:
                return True
            step = max(1, self._settings.response_hold_output_tokens // 2)
            wanted = self.price(replace(expected, audio_output=expected.audio_output + step)) - response.hold.amount
        except CostUnknown:
            return True  # priced over a cost that is unknown: the settlement falls back to the hold
        async with self._lock:
            for amount in (wanted, None):
                try:
                    if amount is None:  # the last of the wallet
                        balance = await self._p.store.balance(self.identity.mode, self.identity.customer_id,
                                                              response.hold.asset)
                        amount = balance.available
                        if amount <= 0:
                            break
                    if self._p.spend_caps is not None:
                        await self._p.spend_caps.admit(self.identity.mode, self.identity.customer_id,
                                                       response.hold.asset, amount)
                    response.steps += 1
                    response.hold = await self._tracked(self._p.store.extend_hold(
                        response.hold.id, amount, step=response.steps, ttl_ms=self._ttl_ms))
                    return True
                except (InsufficientFunds, SpendCapReached):
                    continue
                except HoldNotFound:
                    break
        log.info("%s: the wallet cannot cover more of response %s; stopping it", self.session_id,
                 response_id[:64])
        response.stopped = True
        return False

    async def estimate(self, response: Response) -> RealtimeUsage:
        """A response whose usage never came: the input it saw at least (audio sent at
        ``media.audio_tokens_per_s``), and the output delivered (audio at ``audio_output_tokens_per_s``)."""
        sent_audio = response.sent.audio_bytes * self._p.settings.media.audio_tokens_per_s // _PCM16_BYTES_PER_S
        audio_out = response.out.audio_bytes * self._settings.audio_output_tokens_per_s // _PCM16_BYTES_PER_S
        return replace(response.context, text_input=response.context.text_input
                       + await response.sent.text_tokens(self.model),
                       audio_input=response.context.audio_input + sent_audio,
                       text_output=await response.out.text_tokens(self.model), audio_output=audio_out)

    async def done(self, response_id: str, usage: RealtimeUsage | None, *, status: str,
                   anomaly: str | None = None) -> Settlement | None:
        """Settle a response from its ``response.done`` (``usage`` ``None``: none reported, or an anomaly,
        so the estimate is billed), then place the next spare hold (a refusal is left for the next
        response.create to report). Runs to its end even if the caller is cancelled."""
        return await self._tracked(self._done(response_id, usage, status=status, anomaly=anomaly))

    async def _done(self, response_id: str, usage: RealtimeUsage | None, *, status: str,
                    anomaly: str | None) -> Settlement | None:
        if response_id in self._billed:
            log.warning("%s: a second response.done for %s; not billed again", self.session_id, response_id[:64])
            return None
        self._billed[response_id] = None
        while len(self._billed) > _MAX_REMEMBERED:
            del self._billed[next(iter(self._billed))]
        response = self.active.pop(response_id, None)
        if response is None:
            async with self._lock:  # a response.done for a response never announced: bill it all the same
                spare, self.spare = self.spare, None
                hold = spare or await self._reserve(0)
                response = self._response(response_id, hold)
        billed = usage if usage is not None else await self.estimate(response)
        settlement = await self._settle(response, billed, status=status, anomaly=anomaly)
        if usage is not None:
            self.last, self.last_price = usage, self._final_price(billed, response.hold.amount)
        async with self._lock:
            if self.spare is None and not self.closed:
                try:
                    self.spare = await self._place_spare()
                except Refused:
                    log.info("%s: the wallet cannot cover the next response", self.session_id)
        return settlement

    def _final_price(self, usage: RealtimeUsage, fallback: int) -> int:
        try:
            return self.price(usage)
        except CostUnknown:
            return fallback

    def _cost_detail(self, cost: int | None) -> dict[str, str]:
        """Where a record's provider cost came from, and the audio rates when they priced it."""
        if cost is None:
            return {"source": "unknown"}
        if self.model in self._p.settings.cost_overrides:
            return {"source": "override"}
        if self._rates is None:
            return {"source": "genai-prices", "audio": "priced as text"}
        return {"source": "genai-prices", **self._rates.as_detail()}

    async def _settle(self, response: Response, usage: RealtimeUsage, *, status: str,
                      anomaly: str | None) -> Settlement | None:
        # A response the provider failed is not charged unless the route says so (as a failed Responses reply).
        free = status == "failed" and not self.match.route.charge_failed_replies
        price = 0 if free else self._final_price(usage, response.hold.amount)
        totals = usage.as_usage()
        cost = self.cost_nanos(usage)
        detail: dict[str, Any] = {
            "price": self.rate.as_detail(), "hold": response.hold.amount, "session": self.session_id,
            "response_id": stored_text(response.id, 64), "response_status": stored_text(status, 32),
            "tokens": usage.detail(), "duration_ms": int((time.monotonic() - response.started) * 1000),
            "cost": self._cost_detail(cost),
        }
        if anomaly:
            detail["usage_anomalies"] = [stored_text(anomaly, _ANOMALY_CHARS)]
        record = UsageRecord(
            id=f"{self.session_id}_r{response.seq}", mode=self.identity.mode, customer_id=self.identity.customer_id,
            hold_id=response.hold.id, route=self.match.route.prefix, endpoint="realtime", model=self.model,
            feature=self.feature, stream=True, status_code=_STATUS_CODES.get(status, 499),
            usage_source=usage.source, tokens_input=totals.input_tokens,
            tokens_cached_input=totals.cached_input_tokens, tokens_output=totals.output_tokens, tokens_reasoning=0,
            asset=response.hold.asset, price_amount=price, cost_nanos=cost, detail=detail)
        settlement = await self._p.settler.settle(self._p.store, response.hold.id, price, record)
        self._open.pop(response.hold.id, None)
        self._count(record, settlement)
        if settlement is not None:
            await self._p.prices.count(self.rate, record.id, record.mode, record.customer_id, usage.quantities())
            if self._p.on_settled is not None:
                try:
                    await self._p.on_settled(record.mode, record.customer_id, record.asset, settlement.balance)
                except Exception:
                    log.exception("%s: after-settlement hook failed", record.id)
        return settlement

    def _count(self, record: UsageRecord, settlement: Settlement | None) -> None:
        """The response in the proxy's metrics, as a request (``endpoint="realtime"``)."""
        m = self._p.metrics
        m.open_holds.dec()
        outcome = "ok" if settlement is not None else "settlement_failed"
        m.requests.labels(record.route, record.endpoint, f"{record.status_code // 100}xx", outcome).inc()
        if record.detail.get("usage_anomalies"):
            m.usage_anomalies.labels(record.route, record.endpoint).inc()
        if settlement is None:
            return
        for kind, count in (("input", record.tokens_input), ("cached_input", record.tokens_cached_input),
                            ("output", record.tokens_output)):
            if count:
                m.tokens.labels(kind, record.usage_source).inc(count)
        if settlement.charged:
            m.charged.labels(record.asset).inc(settlement.charged)
        if settlement.written_off:
            m.written_off.labels(record.asset).inc(settlement.written_off)
        if record.cost_nanos:
            m.cost.inc(record.cost_nanos)

    async def refresh(self) -> None:
        """Keep the session's holds ahead of their expiry: the idle spare is voided and placed again (nothing
        is charged for it), a long response's hold is pushed out by extending it by one unit."""
        await self._tracked(self._refresh())

    async def _refresh(self) -> None:
        async with self._lock:
            if self.spare is not None and not self.closed:
                old, self.spare = self.spare, None
                await self._void(old)
                with contextlib.suppress(Refused):  # the next response.create reports it
                    self.spare = await self._place_spare()
        for response in list(self.active.values()):
            response.steps += 1
            with contextlib.suppress(InsufficientFunds, HoldNotFound):  # it keeps its expiry: rarely outlived
                response.hold = await self._p.store.extend_hold(response.hold.id, 1, step=response.steps,
                                                                ttl_ms=self._ttl_ms)

    async def _void(self, hold: Hold) -> None:
        try:
            await self._p.store.settle(hold.id, 0)
            self._open.pop(hold.id, None)
            self._p.metrics.open_holds.dec()
        except Exception:
            log.exception("%s: voiding hold %s failed; it expires after hold_ttl_s", self.session_id, hold.id)

    async def close(self) -> None:
        """The session is over: let the wallet operations in flight finish, bill every response still in
        flight by its estimate, and void every other hold the session placed."""
        while self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        self.closed = True
        for response_id, response in list(self.active.items()):
            self.active.pop(response_id, None)
            await self._settle(response, await self.estimate(response), status="incomplete", anomaly=None)
        self.spare = None
        for hold in list(self._open.values()):
            await self._void(hold)


__all__ = ["Refused", "Response", "SessionMeter"]
