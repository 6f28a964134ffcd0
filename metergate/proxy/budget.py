"""Mid-stream enforcement: a stream never delivers more output than its hold pays for.

A stream's hold covers the prompt plus the output the request allows when the wallet covers that (its
``max_tokens``), else a small initial output (``initial_output_tokens``). The output can then outgrow the
hold: a request without ``max_tokens`` is not capped upstream, and one whose limit was not held in full
can run past what was held. Non-streaming requests are streamed from the upstream internally and metered
the same way (:mod:`metergate.proxy.bounding`). As content
events pass, :class:`StreamBudget` keeps a count of the output delivered and, before an event would take
it past what the hold covers, grows the hold by ``increment_tokens`` worth of output. When the wallet
cannot cover a whole increment it takes what is left; when nothing is left the event is not delivered
and the relay ends the stream cleanly (see ``StreamMeter.stop_events``), billing exactly what was delivered.
A request that names its own output limit (``max_tokens`` and the like) held in full needs none of this:
the upstream stops it there, within the hold, so such streams are relayed without counting.

Counting is cheap on the common path: a token is at least one byte and a character at most four bytes,
so while ``4 x characters delivered`` stays within the covered output no token is counted at all. Past
that point the count is exact and incremental: tiktoken's encodings first split text into pre-tokens by a
regular expression and encode each on its own, and a space that follows a non-space character always
starts a new pre-token, so the count of the text before such a space never changes as text is appended.
Only the text after the last such boundary is re-counted per event. The count therefore equals the
tokenizer's count of everything delivered, which is what the settlement bills when the stream is stopped.

What it cannot see: reasoning tokens a provider does not stream, and text beyond the meter's
``max_text_chars``. Those reach the bill through the provider's final usage, captured beyond the hold
only as far as the wallet covers, the rest written off explicitly by the settlement.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from metergate.proxy.adapters.base import StreamMeter
from metergate.wallet.errors import HoldNotFound, InsufficientFunds

log = logging.getLogger(__name__)
_TAIL_CHARS = 512  # re-count at most about this much text per event...
_TAIL_CHARS_MAX = 8192  # ...unless it has no pre-token boundary, up to this much
_UNLIMITED = 1 << 40  # output tokens: a hold that covers this many is treated as covering any stream


class StreamBudget:
    """The output a stream's hold covers, grown in increments as the stream delivers."""

    def __init__(self, *, held: int, covered_tokens: int, price_of: Callable[[int], int],
                 count: Callable[[str], int], extend: Callable[[int, int], Awaitable[object]],
                 increment_tokens: int) -> None:
        """``held``: the hold's amount; ``covered_tokens``: output tokens it is known to cover (the
        estimate's output); ``price_of(n)``: the price of the prompt plus ``n`` output tokens (monotonic);
        ``extend(amount, step)``: grow the hold, raising ``InsufficientFunds`` when the wallet is short."""
        self.held = held
        self.covered = covered_tokens
        self.tokens: int | None = None  # delivered output tokens, counted once the cheap bound is passed
        self._settled_tokens = 0  # tokens of the delivered text before the last pre-token boundary
        self._tail = ""  # the delivered text after it, re-counted as pieces arrive
        self._counted_pieces = 0
        self.extensions = 0
        self.exhausted = False
        self._price_of = price_of
        self._count = count
        self._extend = extend
        self._increment = max(1, increment_tokens)

    async def admit(self, meter: StreamMeter, first_new_piece: int) -> bool:
        """Whether the text the meter collected from ``first_new_piece`` on may be delivered; grows the
        hold when it must. ``False``: the wallet is dry, the event must not reach the client."""
        if self.tokens is None and meter.text_chars * 4 <= self.covered:
            return True
        self._tail += "".join(meter.text[self._counted_pieces:])
        self._counted_pieces = len(meter.text)
        self._settle_prefix()
        self.tokens = self._settled_tokens + self._count(self._tail)
        while self.tokens > self.covered:
            if not await self._grow(self.tokens):
                self.exhausted = True
                return False
        return True

    def _settle_prefix(self) -> None:
        """Move the counted text before the tail's last pre-token boundary out of the tail."""
        if len(self._tail) < _TAIL_CHARS:
            return
        cut = len(self._tail) - 1
        while cut > 0 and not (self._tail[cut] == " " and not self._tail[cut - 1].isspace()):
            cut -= 1
        if cut == 0:
            if len(self._tail) < _TAIL_CHARS_MAX:
                return
            cut = len(self._tail) // 2  # no boundary in a long run (text without spaces): approximate
        self._settled_tokens += self._count(self._tail[:cut])
        self._tail = self._tail[cut:]

    def rewind(self, meter: StreamMeter, first_new_piece: int) -> None:
        """Forget the pieces of an event that was not delivered, so that the bill leaves them out (the
        stream ends here, so the budget's own count is not needed any more)."""
        dropped = meter.text[first_new_piece:]
        del meter.text[first_new_piece:]
        meter.text_chars -= sum(len(piece) for piece in dropped)

    async def _grow(self, needed: int) -> bool:
        amount = self._price_of(needed + self._increment) - self.held
        if amount > 0:
            try:
                await self._extend(amount, self.extensions)
            except InsufficientFunds as short:
                if short.available <= 0:
                    return False
                amount = short.available  # the last of the wallet: cover what it can
                try:
                    await self._extend(amount, self.extensions)
                except (InsufficientFunds, HoldNotFound):
                    return False
            except HoldNotFound:
                log.warning("a stream's hold was resolved while it was still streaming; stopping it")
                return False
            self.extensions += 1
            self.held += amount
        covered = self._covered_by(self.held)
        if covered <= self.covered:
            return False  # the extension bought not one more token
        self.covered = covered
        return True

    def _covered_by(self, held: int) -> int:
        return tokens_covered(self._price_of, held, self.covered)


def tokens_covered(price_of: Callable[[int], int], held: int, floor: int = 0) -> int:
    """The most output tokens whose price is within ``held``, at least ``floor`` (known to be covered):
    prices are monotonic in tokens, so a doubling search and a bisection find it."""
    low, high = floor, max(floor * 2, 64)
    while price_of(high) <= held:
        if high >= _UNLIMITED:
            return _UNLIMITED
        low, high = high, high * 2
    while high - low > 1:  # price_of(low) <= held < price_of(high)
        middle = (low + high) // 2
        if price_of(middle) <= held:
            low = middle
        else:
            high = middle
    return low
