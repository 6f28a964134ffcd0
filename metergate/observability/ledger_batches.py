"""Ledger batch hooks: the wallet's group commits reach tracing through these two calls, which cost a global
read when tracing is off.

A group commit (SQLite's writer thread, PostgreSQL's group-commit task) writes the operations of many requests
in one transaction, so no single request's trace can contain it: a batch is a span of its own, the root of
its own trace, with a span **link** to the span that was current when each of its operations was submitted
(the request's ``metergate.hold``, ``metergate.extend`` or ``metergate.settle``). A trace viewer then goes
from a request to the batch that made its hold durable, and from a slow batch to every request it delayed.

The two hooks:

* :func:`link`, when an operation is queued, on the submitting task: the current span's context, kept on the
  queued operation (``None`` when tracing is off, or nothing is being traced);
* :func:`batch`, around the transaction that writes a batch, on the writer's thread or task: the batch's span,
  from the links its operations carry.

Off (the default, and always when ``opentelemetry`` is not installed), :data:`_RECORDER` is ``None``: ``link``
returns ``None`` and ``batch`` returns one shared no-op context manager, so the hot path captures no context and
allocates nothing. On, :mod:`metergate.observability.otel` installs its recorder for the life of the app.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol


class Queued(Protocol):
    """A queued operation of a group commit, carrying what :func:`link` returned when it was submitted."""

    link: Any


class Recorder(Protocol):
    """What tracing plugs in (implemented in :mod:`metergate.observability.otel`)."""

    def link(self, op: object) -> Any: ...
    def batch(self, backend: str, ops: Sequence[Queued]) -> AbstractContextManager[None]: ...


_RECORDER: Recorder | None = None
_OFF: AbstractContextManager[None] = contextlib.nullcontext()


def link(op: object = None) -> Any:
    """At submit time: what the batch span will link to for this operation (``op``: a wallet engine operation,
    or ``None`` for any other write); ``None`` when tracing is off."""
    recorder = _RECORDER
    return None if recorder is None else recorder.link(op)


def batch(backend: str, ops: Sequence[Queued]) -> AbstractContextManager[None]:
    """Around writing ``ops`` in one transaction on ``backend`` (``sqlite``, ``postgresql``): the batch's span,
    ended when the block exits (an exception marks it failed and propagates)."""
    recorder = _RECORDER
    return _OFF if recorder is None else recorder.batch(backend, ops)


def install(recorder: Recorder) -> None:
    global _RECORDER
    _RECORDER = recorder


def uninstall(recorder: Recorder) -> None:
    """Remove ``recorder`` unless another app has installed its own since."""
    global _RECORDER
    if _RECORDER is recorder:
        _RECORDER = None


def installed() -> bool:
    return _RECORDER is not None


__all__ = ["Queued", "Recorder", "batch", "install", "installed", "link", "uninstall"]
