"""``metergate demo``: the product working end to end in under a minute, on the embedded default.

Starts the mock upstream and the proxy on free loopback ports with a throwaway SQLite database,
creates a customer with a small balance through the admin API, then sends real requests through the
official ``openai`` SDK (plain and streaming) until the wallet refuses one with a 402 and its portal
link.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
from aiohttp import web

from metergate.config.settings import load_settings
from metergate.demo.mock_upstream import build_mock_upstream
from metergate.proxy.app import build_app

MODEL = "gpt-4o"
FUNDS = "0.005000"


class _Background:
    """An event loop in a thread, serving aiohttp apps on loopback."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._runners: list[web.AppRunner] = []

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def serve(self, make_app: Callable[[int], web.Application], port: int = 0) -> int:
        async def start() -> int:
            runner = web.AppRunner(make_app(port))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", port)
            await site.start()
            self._runners.append(runner)
            return int(runner.addresses[0][1])

        result: int = self.run(start())
        return result

    def close(self) -> None:
        async def stop() -> None:
            for runner in reversed(self._runners):
                await runner.cleanup()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_demo(*, keep: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="metergate-demo-"))
    bg = _Background()
    try:
        upstream_port = bg.serve(lambda _port: build_mock_upstream())
        admin_key = "mg_test_" + secrets.token_urlsafe(18)
        port = _free_port()
        settings = load_settings(
            port=port, database_url=f"sqlite:///{workdir / 'metergate.db'}",
            routes=[{"prefix": "/openai", "upstream": f"http://127.0.0.1:{upstream_port}",
                     "api_key": "sk-demo-provider-key"}],
            pricing={"asset": "USD", "models": {MODEL: {"input_per_mtok": "5.00", "cached_input_per_mtok": "2.50",
                                                        "output_per_mtok": "20.00"}}},
            admin_keys=[admin_key], portal_secrets={"demo": secrets.token_urlsafe(32)},
            # A request without max_tokens is held for 64 output tokens, then grown 32 at a time as it streams.
            initial_output_tokens=64, stream_extend_tokens=32)
        base = f"http://127.0.0.1:{port}"
        bg.serve(lambda _p: build_app(settings, public_url=base), port)
        return _script(base, admin_key, workdir)
    finally:
        bg.close()
        if keep:
            print(f"\nDemo database kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _outrun(client: openai.OpenAI, admin: httpx.Client) -> None:
    """A trial grant, then a stream with no max_tokens that outruns it: metergate grows the hold as tokens
    flow and, when the grant is spent, ends the stream the way the SDK knows (finish_reason "length")."""
    admin.post("/customers/acme/grants", json={
        "asset": "USD", "amount_decimal": "0.002", "purpose": "trial", "idempotency_key": "demo-trial",
        "expires_at_ms": int(time.time() * 1000) + 3_600_000}).raise_for_status()
    print("\nGranted a $0.002000 trial credit, expiring in an hour. A long answer, streamed, no max_tokens:")
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me everything."}], stream=True,
        extra_headers={"X-Mock-Behavior": "words:400"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1]
    notice = (last.model_extra or {}).get("metergate", {})
    record = admin.get("/customers/acme/usage", params={"limit": 1}).json()["data"][0]
    print(f"  stopped after {len(text.split())} words ({record['tokens_output']} tokens): "
          f"finish_reason={last.choices[0].finish_reason!r}, stop_reason={notice.get('stop_reason')!r}")
    print(f"  charged ${notice.get('charged')} for exactly what was delivered; balance ${notice.get('balance')}")


def _script(base: str, admin_key: str, workdir: Path) -> int:
    with httpx.Client(base_url=f"{base}/admin/v1", headers={"Authorization": f"Bearer {admin_key}"}) as admin, \
            openai.OpenAI(base_url=f"{base}/openai/v1", api_key="unused-by-sidecar",
                          default_headers={"X-Metergate-Customer": "acme", "X-Metergate-Mode": "test"},
                          max_retries=0) as client:
        return _drain(admin, client)


def _drain(admin: httpx.Client, client: openai.OpenAI) -> int:
    print("metergate demo — embedded default (SQLite), mock OpenAI upstream, official openai SDK\n")
    admin.post("/customers", json={"id": "acme", "name": "Acme AI"}).raise_for_status()
    admin.post("/customers/acme/credits", json={"amount_decimal": FUNDS, "idempotency_key": "demo-topup-1",
                                                "memo": "demo top-up"}).raise_for_status()
    print(f"Created customer 'acme' (test mode) with ${FUNDS} of prepaid credit.")
    print(f"Pricing {MODEL}: $5.00 / $20.00 per million input / output tokens.\n")
    header = f"{'#':>2}  {'kind':<9} {'in':>4} {'out':>4}  {'price $':>10}  {'cost $':>12}  {'balance $':>10}"
    print(header)
    print("-" * len(header))
    prompts = ["Explain prepaid metering in one line.", "Why hold before forwarding?",
               "What does settlement do?", "How are cached tokens priced?"]
    for number in range(1, 50):
        stream = number % 2 == 0
        messages = [{"role": "user", "content": prompts[number % len(prompts)]}]
        try:
            if stream:
                chunks = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                                        stream=True, max_tokens=64)
                for _ in chunks:
                    pass
            else:
                client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64)  # type: ignore[arg-type]
        except openai.APIStatusError as error:
            body: Any = error.body if isinstance(error.body, dict) else {}
            print(f"\nRequest {number} refused: HTTP {error.status_code} {body.get('code')}")
            print(f"  message:    {body.get('message')}")
            print(f"  balance:    ${body.get('balance')}   required: ${body.get('required')}")
            print(f"  portal_url: {body.get('portal_url')}")
            page = httpx.get(str(body.get("portal_url")))
            print(f"  the portal link opens a real page: HTTP {page.status_code}, "
                  f"{'shows the balance' if 'Balance' in page.text else 'unexpected content'}")
            if error.status_code != 402:
                return 1
            _outrun(client, admin)
            audit = admin.get("/customers/acme/ledger", params={"limit": 200}).json()["data"]
            print(f"\nLedger: {len(audit)} append-only entries for acme. Done.")
            return 0
        record = admin.get("/customers/acme/usage", params={"limit": 1}).json()["data"][0]
        balance = admin.get("/customers/acme/balance").json()["balances"][0]["available_decimal"]
        cost = "n/a" if record["cost_nanos"] is None else f"{record['cost_nanos'] / 1e9:.9f}"
        print(f"{number:>2}  {'stream' if stream else 'json':<9} {record['tokens_input']:>4} "
              f"{record['tokens_output']:>4}  {record['charged_decimal']:>10}  {cost:>12}  {balance:>10}")
    print("The wallet never ran dry; something is wrong.")
    return 1
