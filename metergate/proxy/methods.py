"""Which methods a proxied path answers, per RFC 9110: ``OPTIONS`` lists them, any other gets 405 with ``Allow``.

``OPTIONS`` needs no identification: it says only what the path accepts, which a 405 would say anyway, and
a browser's CORS preflight never carries credentials (metergate.proxy.cors answers those before this).
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from metergate.errors import MethodNotAllowed


def check_method(request: web.Request, allow: Sequence[str], what: str) -> web.Response | None:
    """``None`` when ``request`` may go on; the answer to an ``OPTIONS``; otherwise raise 405 naming ``allow``."""
    if request.method == "OPTIONS" and "OPTIONS" in allow:
        return web.Response(status=204, headers={"Allow": ", ".join(allow)})
    if request.method not in allow:
        served = [method for method in allow if method not in ("HEAD", "OPTIONS")]
        raise MethodNotAllowed(f"{what} accepts {' or '.join(served)} only.", allow=allow)
    return None
