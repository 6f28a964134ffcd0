"""Where a request path goes, worked out once per distinct path and query.

Which route a path falls under, which of the route's handlers serves it (a compute route, the Realtime
WebSocket, a free endpoint, a media endpoint, or a metered endpoint) and the upstream URL it is forwarded to
depend on the path, the query and the configuration only. Working them out means splitting and decoding the
path, matching prefixes, walking the free-endpoint catalogue and re-encoding the URL: the same work, with the
same answer, for every request on the same endpoint. :class:`Destinations` keeps the answers for the paths
seen most recently (bounded, so that a client sending random paths cannot grow it), and never keeps a
refusal: a path that is refused (400 ``invalid_path``, 404 ``unknown_route``...) is judged afresh each time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from yarl import URL

from metergate.config.routes import RouteMatch
from metergate.proxy.passthrough import FreeRequest

Kind = Literal["compute", "realtime", "free", "media", "metered"]
DEFAULT_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Destination:
    """A path's handler and what it needs; ``endpoint`` and ``upstream_url`` for a metered endpoint."""

    match: RouteMatch
    kind: Kind
    free: FreeRequest | None = None
    media: str | None = None
    endpoint: str | None = None
    upstream_url: URL | None = None


class Destinations:
    """A bounded memo of ``resolve(raw_path, raw_query)``: the oldest answer goes first when it is full."""

    def __init__(self, resolve: Callable[[str, str], Destination | None], size: int = DEFAULT_SIZE) -> None:
        assert size >= 1
        self._resolve = resolve
        self._size = size
        self._known: dict[tuple[str, str], Destination] = {}

    def find(self, raw_path: str, raw_query: str) -> Destination | None:
        """The destination of a raw path and query; ``None`` when no route has the path's prefix. Raises what
        ``resolve`` raises (and keeps nothing then)."""
        key = (raw_path, raw_query)
        found = self._known.get(key)
        if found is None:
            found = self._resolve(raw_path, raw_query)
            if found is None:
                return None
            if len(self._known) >= self._size:
                del self._known[next(iter(self._known))]
            self._known[key] = found
        return found

    def __len__(self) -> int:
        return len(self._known)
