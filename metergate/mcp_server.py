"""``metergate mcp``: an MCP server that lets an assistant ask a running control plane about customers' money.

It speaks to metergate over the admin API with :class:`metergate_client.AsyncClient` (URL and admin key from
``--url`` / ``METERGATE_URL``, ``METERGATE_ADMIN_KEY`` or a profile, as the other admin commands), so it sees
exactly what that admin key sees: one mode. A test-mode key never reaches a live customer; the tools say so
when asked for one. It imports nothing of the server's, and ``serve`` never imports it (the ``mcp`` SDK is the
optional extra ``metergate[mcp]``).

Tools:

* ``balance``, ``recent_usage``: a customer's balances and latest usage records;
* ``quote``, ``preflight``: what a request (or event) would cost, and whether the wallet covers it now;
  nothing is held or written;
* ``portal_link``: a signed link to the customer's billing page;
* ``credit``, ``grant`` (only with ``--operator``): add money, exactly once per ``idempotency_key``, which the
  caller must give: an assistant that retries a call must not credit twice.

Every failure is a tool error (``is_error``) with the admin API's stable code and a sentence, never a
traceback: an unknown customer, a customer of the other mode, an amount that is not a positive decimal the
asset can hold, an unreachable control plane.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import Field

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer
    from starlette.types import ASGIApp, Receive, Scope, Send

    from metergate_client import AsyncClient, Balance, Quote, UsageRecord

T = TypeVar("T")
MODES = {"mg_test_": "test", "mg_live_": "live"}
_AMOUNT = re.compile(r"[0-9]{1,16}(\.[0-9]{1,18})?")

CustomerId = Annotated[str, Field(description="The customer's id in metergate (as the app names it)",
                                  min_length=1, max_length=128)]
Amount = Annotated[str, Field(description="A positive decimal in the asset's major unit, as a string: '12.50'")]
IdempotencyKey = Annotated[str, Field(
    description="Required: the operation happens once per key (an invoice or ticket number); a retry with the "
                "same key changes nothing", min_length=1, max_length=128)]
Asset = Annotated[str | None, Field(description="Asset code (default: the pricing asset, e.g. USD)")]
Tokens = Annotated[int, Field(ge=0, le=10**10)]
Memo = Annotated[str, Field(max_length=500, description="Why, for the ledger")]
# The tools' annotations are read from this module's globals (the SDK evaluates them): keep the aliases here.
Model = Annotated[str | None, Field(description="The model of a proxy request, e.g. gpt-4o-mini")]
Event = Annotated[str | None, Field(description="An event type instead of a request (e.g. gpu.job)")]
Quantities = Annotated[dict[str, str] | None,
                       Field(description="The event's quantities as decimal strings, e.g. {'gpu_seconds': '30'}")]
Access = Literal["view_topup", "billing_admin"]
Purpose = Literal["paid", "promotional", "trial", "entitlement", "adjustment"]
ExpiresAt = Annotated[int | None, Field(ge=0, description="epoch milliseconds; none: never")]
Limit = Annotated[int, Field(ge=1, le=100)]


def mode_of(admin_key: str) -> str:
    """The mode an admin key works in, from its prefix (the server scopes every object by it)."""
    for prefix, mode in MODES.items():
        if admin_key.startswith(prefix):
            return mode
    raise ValueError("the admin key must start with mg_test_ or mg_live_")


def amount_of(text: str) -> Decimal:
    """A positive, plain decimal amount; a float, an exponent, a sign or zero is refused before any call."""
    if not isinstance(text, str) or not _AMOUNT.fullmatch(text.strip()):
        raise _tool_error("invalid_amount", f"amount must be a positive decimal string such as '12.50', not {text!r}")
    value = Decimal(text.strip())
    if value <= 0:
        raise _tool_error("invalid_amount", "amount must be above zero")
    return value


def _tool_error(code: str, message: str) -> Exception:
    from mcp.server.mcpserver.exceptions import ToolError

    return ToolError(f"{code}: {message}")


def _balance(b: Balance) -> dict[str, Any]:
    return {"asset": b.asset, "available": str(b.available), "available_minor": b.available_minor,
            "pending": str(b.pending), "pending_minor": b.pending_minor}


def _usage(u: UsageRecord) -> dict[str, Any]:
    return {"id": u.id, "created_at_ms": u.created_at_ms, "route": u.route, "model": u.model,
            "tokens_input": u.tokens_input, "tokens_output": u.tokens_output, "asset": u.asset,
            "charged": str(u.charged), "charged_minor": u.charged_minor, "written_off_minor": u.written_off_minor}


def _quote(q: Quote) -> dict[str, Any]:
    return {"customer_id": q.customer_id, "asset": q.asset, "amount": str(q.amount), "amount_minor": q.amount_minor,
            "rule": q.raw.get("rule"), "version": q.raw.get("version")}


class Tools:
    """The tools' bodies over one client; each turns the client's typed errors into tool errors."""

    def __init__(self, client: AsyncClient, mode: str) -> None:
        self.client, self.mode = client, mode

    async def _call(self, customer_id: str | None, fn: Callable[[], Awaitable[T]]) -> T:
        from metergate_client import ApiError, ConnectionFailed, MetergateError

        try:
            return await fn()
        except ApiError as exc:
            if exc.code in ("customer_not_found", "unknown_customer") and customer_id is not None:
                other = "live" if self.mode == "test" else "test"
                raise _tool_error(exc.code, f"no customer {customer_id!r} in {self.mode} mode (this server "
                                  f"uses a {self.mode}-mode admin key: {other}-mode customers are out of its "
                                  "reach)") from None
            where = f" ({exc.param})" if exc.param else ""
            raise _tool_error(exc.code, f"{exc.message}{where}") from None
        except ConnectionFailed as exc:
            raise _tool_error("unreachable", str(exc)) from None
        except (MetergateError, ValueError, TypeError) as exc:
            raise _tool_error("invalid_request", str(exc)) from None

    async def balance(self, customer_id: str) -> dict[str, Any]:
        balances = await self._call(customer_id, lambda: self.client.balances(customer_id))
        return {"customer_id": customer_id, "mode": self.mode, "balances": [_balance(b) for b in balances]}

    async def recent_usage(self, customer_id: str, limit: int) -> dict[str, Any]:
        page = await self._call(customer_id, lambda: self.client.usage(customer_id, limit=limit))
        return {"customer_id": customer_id, "mode": self.mode, "records": [_usage(u) for u in page.data]}

    @staticmethod
    def _priced(model: str | None, input_tokens: int, output_tokens: int, cached_input_tokens: int,
                event_type: str | None, quantities: dict[str, str] | None, feature: str | None) -> dict[str, Any]:
        if event_type is not None:
            return {"type": event_type, "quantities": dict(quantities or {}),
                    "feature": feature}
        if model is None:
            raise _tool_error("invalid_request", "give a model (and token counts), or an event_type and quantities")
        return {"model": model, "feature": feature, "usage": {
            "input_tokens": input_tokens, "output_tokens": output_tokens, "cached_input_tokens": cached_input_tokens}}

    async def quote(self, customer_id: str, **request: Any) -> dict[str, Any]:
        priced = self._priced(**request)
        quote = await self._call(customer_id, lambda: self.client.quote(customer_id, **priced))
        return {**_quote(quote), "mode": self.mode}

    async def preflight(self, customer_id: str, **request: Any) -> dict[str, Any]:
        priced = self._priced(**request)
        found = await self._call(customer_id, lambda: self.client.preflight(customer_id, **priced))
        return {**_quote(found.quote), "mode": self.mode, "allowed": found.allowed, "available": str(found.available),
                "shortfall": str(found.shortfall), "held": False}

    async def portal_link(self, customer_id: str, access: str) -> dict[str, Any]:
        link = await self._call(customer_id, lambda: self.client.portal_link(customer_id, access))
        return {"customer_id": customer_id, "url": link.url, "access": access, "expires_in_s": link.expires_in_s}

    async def credit(self, customer_id: str, amount: str, asset: str | None, idempotency_key: str,
                     memo: str) -> dict[str, Any]:
        value = amount_of(amount)
        done = await self._call(customer_id, lambda: self.client.credit(
            customer_id, value, asset=asset, idempotency_key=idempotency_key, memo=memo))
        return {"customer_id": customer_id, "mode": self.mode, "asset": done.entry.asset,
                "credited": str(done.entry.amount), "entry_seq": done.entry.seq,
                "idempotency_key": done.entry.idempotency_key, "balance": _balance(done.balance)}

    async def grant(self, customer_id: str, amount: str, asset: str | None, purpose: str, expires_at_ms: int | None,
                    idempotency_key: str, memo: str) -> dict[str, Any]:
        value = amount_of(amount)
        made = await self._call(customer_id, lambda: self.client.create_grant(
            customer_id, value, asset=asset, purpose=purpose, expires_at_ms=expires_at_ms,
            idempotency_key=idempotency_key, memo=memo))
        return {"customer_id": customer_id, "mode": self.mode, "grant_id": made.id, "asset": made.asset,
                "purpose": made.purpose, "state": made.state, "amount": str(made.amount), "free": str(made.free),
                "expires_at_ms": made.expires_at_ms}


def build_server(tools: Tools, *, operator: bool) -> MCPServer:
    """The MCP server with its tools registered (``credit`` and ``grant`` only for an operator)."""
    from mcp.server.mcpserver import MCPServer
    from mcp_types import ToolAnnotations

    from metergate import __version__

    reads = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    server = MCPServer("metergate", version=__version__, instructions=(
        f"metergate prepaid wallets, {tools.mode} mode only. Amounts are exact decimal strings in the asset's "
        "major unit. quote and preflight hold nothing."))

    @server.tool(annotations=reads)
    async def balance(customer_id: CustomerId) -> dict[str, Any]:
        """A customer's balances: available (what a new request may spend) and pending (held) per asset."""
        return await tools.balance(customer_id)

    @server.tool(annotations=reads)
    async def recent_usage(customer_id: CustomerId,
                           limit: Limit = 20) -> dict[str, Any]:
        """A customer's latest usage records, newest first: model, tokens, what was charged."""
        return await tools.recent_usage(customer_id, limit)

    @server.tool(annotations=reads)
    async def quote(customer_id: CustomerId, model: Model = None, input_tokens: Tokens = 0, output_tokens: Tokens = 0,
                    cached_input_tokens: Tokens = 0, event_type: Event = None, quantities: Quantities = None,
                    feature: str | None = None) -> dict[str, Any]:
        """What a request (a model and token counts) or an event would cost this customer now. Nothing is held."""
        return await tools.quote(customer_id, model=model, input_tokens=input_tokens, output_tokens=output_tokens,
                                 cached_input_tokens=cached_input_tokens, event_type=event_type,
                                 quantities=quantities, feature=feature)

    @server.tool(annotations=reads)
    async def preflight(customer_id: CustomerId, model: Model = None, input_tokens: Tokens = 0,
                        output_tokens: Tokens = 0, cached_input_tokens: Tokens = 0, event_type: Event = None,
                        quantities: Quantities = None, feature: str | None = None) -> dict[str, Any]:
        """Would this request be allowed right now, and at what cost: the quote beside the available balance,
        with the shortfall if any. Nothing is held, so a later request can still be refused."""
        return await tools.preflight(customer_id, model=model, input_tokens=input_tokens, output_tokens=output_tokens,
                                     cached_input_tokens=cached_input_tokens, event_type=event_type,
                                     quantities=quantities, feature=feature)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False))
    async def portal_link(customer_id: CustomerId,
                          access: Access = "view_topup") -> dict[str, Any]:
        """A signed, short-lived link to the customer's billing page: view_topup (balance and top-up) or
        billing_admin (also auto top-up, spend caps, payment methods). Hand it only to that customer."""
        return await tools.portal_link(customer_id, access)

    if operator:
        writes = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                 open_world_hint=False)

        @server.tool(annotations=writes)
        async def credit(customer_id: CustomerId, amount: Amount, idempotency_key: IdempotencyKey,
                         asset: Asset = None, memo: Memo = "") -> dict[str, Any]:
            """Credit a customer's wallet (a paid grant) once per idempotency_key."""
            return await tools.credit(customer_id, amount, asset, idempotency_key, memo)

        @server.tool(annotations=writes)
        async def grant(customer_id: CustomerId, amount: Amount, idempotency_key: IdempotencyKey,
                        asset: Asset = None,
                        purpose: Purpose = "promotional", expires_at_ms: ExpiresAt = None,
                        memo: Memo = "") -> dict[str, Any]:
            """Grant credit (a trial, a promotion, an adjustment), optionally expiring; once per idempotency_key."""
            return await tools.grant(customer_id, amount, asset, purpose, expires_at_ms, idempotency_key, memo)

    return server


def bearer_only(app: ASGIApp, token: str) -> ASGIApp:
    """``app`` behind ``Authorization: Bearer <token>`` (compared in constant time); anything else is a 401."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(sent, expected):
                body = json.dumps({"error": {"message": "This MCP endpoint needs 'Authorization: Bearer <token>' "
                                             "(METERGATE_MCP_TOKEN).", "type": "authentication_error",
                                             "code": "invalid_token", "param": None}}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


async def serve(url: str, admin_key: str, *, operator: bool, http_port: int | None, host: str,
                token: str | None = None) -> None:
    """Run the MCP server until its transport ends: stdio, or streamable HTTP on ``host:http_port`` at ``/mcp``
    (behind ``token`` when one is given)."""
    from metergate_client import AsyncClient

    async with AsyncClient(url, admin_key) as client:
        server = build_server(Tools(client, mode_of(admin_key)), operator=operator)
        if http_port is None:
            await server.run_stdio_async()
            return
        import uvicorn

        app = server.streamable_http_app(streamable_http_path="/mcp", host=host)
        guarded = bearer_only(app, token) if token else app
        await uvicorn.Server(uvicorn.Config(guarded, host=host, port=http_port, log_level="warning")).serve()
