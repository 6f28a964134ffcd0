"""A reference model of budget admission, written from the specification and not from the implementation:
every admission is an event kept forever, and a limit's use at instant t is the sum of the events its window
counts at t, computed from first principles (calendar arithmetic with datetime, integer division for the
fixed and rolling windows). A request is admitted when, for every limit on its path, use + need <= amount."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

DAY = 86_400_000


@dataclass
class RefLimit:
    id: str
    node: str
    dimension: str  # requests | tokens | spend
    amount: int
    kind: str  # day | week | month | fixed | rolling
    length_ms: int = 0
    buckets: int = 1


@dataclass
class Event:
    at_ms: int
    amounts: dict[str, int] = field(default_factory=dict)  # limit id -> amount still counted


def _month(ms: int) -> tuple[int, int]:
    d = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return d.year, d.month


def counted(limit: RefLimit, event_ms: int, now_ms: int) -> bool:
    if event_ms > now_ms:
        return False
    if limit.kind == "day":
        return event_ms // DAY == now_ms // DAY
    if limit.kind == "week":
        monday = dt.date(1970, 1, 5)  # the first Monday after the epoch

        def week(ms: int) -> int:
            return (dt.datetime.fromtimestamp(ms / 1000, dt.UTC).date() - monday).days // 7

        return week(event_ms) == week(now_ms)
    if limit.kind == "month":
        return _month(event_ms) == _month(now_ms)
    if limit.kind == "fixed":
        return event_ms // limit.length_ms == now_ms // limit.length_ms
    g = limit.length_ms // limit.buckets
    return event_ms // g > now_ms // g - limit.buckets


class Reference:
    def __init__(self, parents: dict[str, str | None]) -> None:
        self.parents = parents  # node -> parent (None: the root)
        self.limits: dict[str, RefLimit] = {}
        self.events: list[Event] = []

    def path(self, node: str) -> list[str]:
        out: list[str] = []
        current: str | None = node
        while current is not None:
            out.append(current)
            current = self.parents[current]
        return out[::-1]

    def use(self, limit: RefLimit, now_ms: int) -> int:
        return sum(e.amounts.get(limit.id, 0) for e in self.events if counted(limit, e.at_ms, now_ms))

    def need(self, limit: RefLimit, tokens: int, spend: int) -> int:
        return {"requests": 1, "tokens": tokens, "spend": spend}[limit.dimension]

    def refusing(self, node: str, tokens: int, spend: int, now_ms: int) -> list[str]:
        """The limits on the path that would refuse this request (sorted by id; empty: admitted)."""
        path = set(self.path(node))
        return sorted(lim.id for lim in self.limits.values() if lim.node in path
                      and self.use(lim, now_ms) + self.need(lim, tokens, spend) > lim.amount)

    def admit(self, node: str, tokens: int, spend: int, now_ms: int) -> Event | None:
        if self.refusing(node, tokens, spend, now_ms):
            return None
        path = set(self.path(node))
        event = Event(now_ms, {lim.id: self.need(lim, tokens, spend) for lim in self.limits.values()
                               if lim.node in path})
        self.events.append(event)
        return event

    def settle(self, event: Event, *, charged: int, tokens_used: int) -> None:
        for limit_id in list(event.amounts):
            lim = self.limits.get(limit_id)
            if lim is None:
                continue
            if lim.dimension == "spend":
                event.amounts[limit_id] = min(event.amounts[limit_id], charged)
            elif lim.dimension == "tokens":
                event.amounts[limit_id] = min(event.amounts[limit_id], tokens_used)

    def remove(self, limit_id: str) -> None:
        self.limits.pop(limit_id, None)
        for e in self.events:
            e.amounts.pop(limit_id, None)
