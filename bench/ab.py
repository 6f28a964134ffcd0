"""Two ``metergate serve`` setups measured against each other in the same run: the rounds shared by the A/B
benchmarks (bench/ratelimits.py, bench/tracing.py). Each setup is started, funded and warmed up; then each
round measures both, alternating which goes first, so that drift on the machine hits both sides alike."""

from __future__ import annotations

import sys
from typing import Any

from run import Cell, Servers, fund_customer, run_cell  # bench/ is a directory of scripts


async def measure_ab(servers: dict[str, Servers], *, stream: bool, concurrency: int, rounds: int,
                     duration: float) -> dict[str, list[Cell]]:
    """Every round's cell per setup (the dict's order is the first round's order). Stops the servers."""
    names = tuple(servers)
    cells: dict[str, list[Cell]] = {name: [] for name in names}
    try:
        for s in servers.values():
            s.workdir.mkdir()
            s.start()
        for s in servers.values():
            await s.wait_ready()
        urls: dict[str, str] = {}
        for name, s in servers.items():
            base = f"http://127.0.0.1:{s.ports['metergate']}"
            await fund_customer(base)
            urls[name] = f"{base}/openai/v1/chat/completions"
            warm = Cell("metergate", stream, 4, -1)
            await run_cell(urls[name], warm, 0.0, 0.5, {})  # imports, tokenizer, first SQLite pages
            if warm.errors:
                raise RuntimeError(f"{name} failed during warm-up: {warm.error_samples}")
        for rnd in range(rounds):
            for name in (names if rnd % 2 == 0 else names[::-1]):
                s = servers[name]
                cell = Cell("metergate", stream, concurrency, rnd)
                pids: dict[str, Any] = {"upstream": s.pid("upstream"), "proxy": s.pid("metergate")}
                await run_cell(urls[name], cell, 0.4, duration, pids,
                               [p for srv in servers.values() for p in srv.procs_pids()])
                cells[name].append(cell)
                if cell.errors:
                    print(f"  ! {name}: {cell.errors} errors, e.g. {cell.error_samples}", file=sys.stderr)
            print(f"  round {rnd + 1}/{rounds} done", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    return cells
