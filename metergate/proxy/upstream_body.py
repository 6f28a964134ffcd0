"""Reading an upstream's whole answer into memory, bounded: the unary relays (metered, media, free endpoints)
all buffer the body before they bill or forward it, and an upstream that never stops must not exhaust memory."""

from __future__ import annotations

import aiohttp

from metergate.errors import BadGateway, GatewayTimeout


async def read_limited(upstream: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or 502 ``upstream_invalid`` once it exceeds ``limit`` bytes; transport errors propagate."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in upstream.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BadGateway(f"The upstream response exceeded {limit} bytes.", code="upstream_invalid")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_limited_answer(upstream: aiohttp.ClientResponse, limit: int, *, note: str = "") -> bytes:
    """:func:`read_limited`, with a stalled or broken upstream answered 504 or 502; ``note`` ends the message
    (e.g. that nothing was charged)."""
    try:
        return await read_limited(upstream, limit)
    except TimeoutError:
        raise GatewayTimeout(f"The upstream stopped answering.{note}") from None
    except aiohttp.ClientError:
        raise BadGateway(f"The upstream connection failed mid-response.{note}") from None
