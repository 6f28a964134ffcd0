"""``client.events.send(...)``: usage events delivered in the background, in batches, exactly once.

Each event gets its id when it is sent (given, or a fresh one); the server counts an id once however often
it arrives, so a batch whose answer was lost — a timeout, a server restarting — is simply sent again, whole,
with the same ids. The queue is bounded (``max_queue``): ``send`` blocks while it is full (or raises
:class:`QueueFull` after ``timeout_s``), so a producer faster than the server slows down rather than
growing memory. ``flush()`` waits until every queued event has an answer; ``close()`` (and leaving the
client's ``with`` block) flushes. A batch the server cannot be reached for is retried for
``give_up_after_s``, then its events are listed in ``failed``; events the server rejects (insufficient
funds, no price rule, ...) are listed in ``rejected`` with their code: nothing was charged for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from metergate_client.calls import Amount, decimal_text
from metergate_client.errors import ApiError, ConnectionFailed, MetergateError, ServerError
from metergate_client.models import EventResult, Json

MAX_BATCH = 500  # the server's limit per call


class QueueFull(MetergateError):
    """The event queue stayed full for the whole timeout."""


def event(customer: str, type: str, *, quantity: Amount | None = None, quantities: Mapping[str, Amount] | None = None,
          attributes: Mapping[str, str] | None = None, timestamp: int | str | None = None,
          cost_usd: Amount | None = None, id: str | None = None) -> Json:
    """One event as the server takes it (``quantity`` or ``quantities``; decimal strings, never floats)."""
    if (quantity is None) == (quantities is None):
        raise ValueError("give either quantity or quantities")
    body: Json = {"id": id or f"ev_{uuid.uuid4().hex}", "customer_id": customer, "type": type}
    if quantity is not None:
        body["quantity"] = decimal_text(quantity, "quantity")
    else:
        assert quantities is not None
        body["quantities"] = {name: decimal_text(q, name) for name, q in quantities.items()}
    if attributes:
        body["attributes"] = dict(attributes)
    if timestamp is not None:
        body["timestamp"] = timestamp
    if cost_usd is not None:
        body["cost_usd"] = decimal_text(cost_usd, "cost_usd")
    return body


@dataclass
class Tally:
    """What the server answered so far."""

    accepted: int = 0
    duplicate: int = 0
    rejected: list[EventResult] = field(default_factory=list)
    failed: list[tuple[Json, str]] = field(default_factory=list)  # (event, why), never delivered

    def count(self, results: list[EventResult]) -> None:
        for r in results:
            if r.status == "accepted":
                self.accepted += 1
            elif r.status == "duplicate":
                self.duplicate += 1
            else:
                self.rejected.append(r)


def _transient(error: MetergateError) -> bool:
    return isinstance(error, ConnectionFailed | ServerError) or (isinstance(error, ApiError) and error.status == 429)


class EventBatcher:
    """The sync client's batcher: one daemon thread, started by the first ``send``."""

    def __init__(self, send_batch: Callable[[list[Json]], list[EventResult]], *, max_batch: int = MAX_BATCH,
                 max_queue: int = 10_000, linger_s: float = 0.2, give_up_after_s: float = 120.0,
                 retry_backoff_s: float = 0.5) -> None:
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be 1-{MAX_BATCH}")
        self._send_batch = send_batch
        self._max_batch, self._linger_s = max_batch, linger_s
        self._give_up_after_s, self._backoff_s = give_up_after_s, retry_backoff_s
        self._queue: queue.Queue[Json | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.tally = Tally()

    def send(self, customer: str, type: str, *, quantity: Amount | None = None,
             quantities: Mapping[str, Amount] | None = None, attributes: Mapping[str, str] | None = None,
             timestamp: int | str | None = None, cost_usd: Amount | None = None, id: str | None = None,
             timeout_s: float | None = None) -> str:
        """Queue one event; its id. Blocks while the queue is full (``timeout_s``: then :class:`QueueFull`)."""
        body = event(customer, type, quantity=quantity, quantities=quantities, attributes=attributes,
                     timestamp=timestamp, cost_usd=cost_usd, id=id)
        self._start()
        try:
            self._queue.put(body, timeout=timeout_s)
        except queue.Full:
            raise QueueFull(f"the event queue stayed full for {timeout_s} s") from None
        return str(body["id"])

    def flush(self) -> None:
        """Wait until every event queued so far has been answered (or given up)."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        if self._thread is None:
            return
        self.flush()
        self._queue.put(None)
        self._thread.join()
        self._thread = None

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="metergate-events", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                return
            batch = [first]
            deadline = time.monotonic() + self._linger_s
            stop = False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._deliver(batch)
            for _ in batch:
                self._queue.task_done()
            if stop:
                self._queue.task_done()
                return

    def _deliver(self, batch: list[Json]) -> None:
        give_up = time.monotonic() + self._give_up_after_s
        while True:
            try:
                self.tally.count(self._send_batch(batch))
                return
            except MetergateError as error:
                if not _transient(error) or time.monotonic() >= give_up:
                    self.tally.failed.extend((e, str(error)) for e in batch)
                    return
            time.sleep(self._backoff_s)


class AsyncEventBatcher:
    """The async client's batcher: one task on the running loop, started by the first ``send``."""

    def __init__(self, send_batch: Callable[[list[Json]], Awaitable[list[EventResult]]], *,
                 max_batch: int = MAX_BATCH, max_queue: int = 10_000, linger_s: float = 0.2,
                 give_up_after_s: float = 120.0, retry_backoff_s: float = 0.5) -> None:
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be 1-{MAX_BATCH}")
        self._send_batch = send_batch
        self._max_batch, self._linger_s = max_batch, linger_s
        self._give_up_after_s, self._backoff_s = give_up_after_s, retry_backoff_s
        self._max_queue = max_queue
        self._queue: asyncio.Queue[Json] | None = None
        self._task: asyncio.Task[None] | None = None
        self.tally = Tally()

    async def send(self, customer: str, type: str, *, quantity: Amount | None = None,
                   quantities: Mapping[str, Amount] | None = None, attributes: Mapping[str, str] | None = None,
                   timestamp: int | str | None = None, cost_usd: Amount | None = None, id: str | None = None) -> str:
        body = event(customer, type, quantity=quantity, quantities=quantities, attributes=attributes,
                     timestamp=timestamp, cost_usd=cost_usd, id=id)
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=self._max_queue)
            self._task = asyncio.get_running_loop().create_task(self._run())
        await self._queue.put(body)  # waits while the queue is full
        return str(body["id"])

    async def flush(self) -> None:
        if self._queue is not None:
            await self._queue.join()

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = self._queue = None

    async def _run(self) -> None:
        assert self._queue is not None
        q = self._queue
        while True:
            batch = [await q.get()]
            try:
                async with asyncio.timeout(self._linger_s):
                    while len(batch) < self._max_batch:
                        batch.append(await q.get())
            except TimeoutError:
                pass
            await self._deliver(batch)
            for _ in batch:
                q.task_done()

    async def _deliver(self, batch: list[Json]) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._give_up_after_s
        while True:
            try:
                self.tally.count(await self._send_batch(batch))
                return
            except MetergateError as error:
                if not _transient(error) or loop.time() >= give_up:
                    self.tally.failed.extend((e, str(error)) for e in batch)
                    return
            await asyncio.sleep(self._backoff_s)
