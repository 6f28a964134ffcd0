"""A/B in one run: what tracing costs when it is off, against the same code with every tracing hook removed.

    uv run python bench/tracing_off.py             # 5 rounds of 2 s windows per target, unary
    uv run python bench/tracing_off.py --stream    # streamed requests: a hook runs per upstream event
    uv run python bench/tracing_off.py --quick     # 3 rounds of 0.5 s windows

Two ``python -m metergate serve`` processes with ``tracing: off``, each running a copy of HEAD's package
(``git archive HEAD``, so commit first): ``off`` as it is, ``stripped`` with every call into the tracing hooks
removed from the request pipeline and the ledger's group commits: each statement that calls ``tracing.*`` or
``ledger_batches.*`` is deleted, each ``with tracing.*():`` block is replaced by its body (with the calls on its
``as`` name), each argument computed by a hook is dropped. A hook used in any other way stops the
benchmark rather than be measured wrong. Everything else (settings, upstreams, pinning, the interleaved rounds
of bench/ab.py) is as in bench/tracing.py; the ratios are taken within a round, then the medians reported.

A shared machine's round-to-round noise is larger than what the hooks can cost, so the benchmark also times
the hooks themselves, off, in this process (``timeit``): the nanoseconds a request spends in them, to be read
against its microseconds of proxy CPU.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ab import ab_args, ab_parser, measure_ab, print_medians, print_plan, run_timed  # noqa: E402
from run import ROOT, Servers  # noqa: E402 - bench/ is a directory of scripts

HOOKS = {"tracing", "ledger_batches"}  # the modules whose calls are removed
# The files whose hooks run per request or per ledger operation (app.py's run once, at start-up).
HOT_FILES = ("metergate/proxy/pipeline.py", "metergate/wallet/execution.py", "metergate/wallet/pgcommit.py")


def _uses_hook(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id in HOOKS for n in ast.walk(node))


def _is_hook_call(node: ast.AST) -> bool:
    """``tracing.x(...)`` or ``ledger_batches.x(...)`` itself (not a call that merely contains one)."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id in HOOKS)


class Strip(ast.NodeTransformer):
    """Remove the hook calls (see the module docstring); ``removed`` counts what went."""

    def __init__(self) -> None:
        self.removed = 0
        self.span_names: set[str] = set()

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for stmt in body:
            result = self.visit(stmt)
            out.extend(result if isinstance(result, list) else [] if result is None else [result])
        return out or [ast.Pass()]

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for name in ("body", "orelse", "finalbody"):
            if isinstance(getattr(node, name, None), list) and getattr(node, name):
                setattr(node, name, self._body(getattr(node, name)))
        for handler in getattr(node, "handlers", []):
            handler.body = self._body(handler.body)
        for field, value in ast.iter_fields(node):
            if field in ("body", "orelse", "finalbody", "handlers"):
                continue
            if isinstance(value, list):
                setattr(node, field, [self.visit(v) if isinstance(v, ast.AST) else v for v in value])
            elif isinstance(value, ast.AST):
                setattr(node, field, self.visit(value))
        return node

    def visit_Expr(self, node: ast.Expr) -> ast.AST | None:
        node = self.generic_visit(node)  # first the hook-computed arguments of calls go
        call = node.value
        on_span = (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                   and isinstance(call.func.value, ast.Name) and call.func.value.id in self.span_names)
        # A hook call, or a statement that exists for one (a done callback that calls a hook).
        if _uses_hook(node) or on_span:
            self.removed += 1
            return None
        return node

    def _with(self, node: ast.With | ast.AsyncWith) -> ast.AST | list[ast.stmt]:
        kept = []
        for item in node.items:
            if _is_hook_call(item.context_expr):
                self.removed += 1
                if isinstance(item.optional_vars, ast.Name):
                    self.span_names.add(item.optional_vars.id)
            else:
                kept.append(item)
        node.body = self._body(node.body)
        if kept:
            node.items = kept
            return node
        return node.body

    def visit_With(self, node: ast.With) -> ast.AST | list[ast.stmt]:
        return self._with(node)

    def visit_AsyncWith(self, node: ast.AsyncWith) -> ast.AST | list[ast.stmt]:
        return self._with(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        before = len(node.keywords) + len(node.args)
        node.keywords = [k for k in node.keywords if not _is_hook_call(k.value)]
        # A positional argument computed by a hook (the PostgreSQL job's link) is the last one: drop it too.
        while node.args and _is_hook_call(node.args[-1]):
            node.args.pop()
        self.removed += before - len(node.keywords) - len(node.args)
        return self.generic_visit(node)


def strip(source: str) -> tuple[str, int]:
    tree = ast.parse(source)
    stripper = Strip()
    tree = stripper.visit(tree)
    ast.fix_missing_locations(tree)
    for node in ast.walk(tree):  # what is left may only import the hooks' modules
        if isinstance(node, ast.Name) and node.id in HOOKS:
            raise SystemExit(f"a hook is used in a way this benchmark cannot strip (line {node.lineno})")
    return ast.unparse(tree), stripper.removed


def head_tree(path: Path, *, stripped: bool) -> Path:
    """HEAD's ``metergate`` package in ``path``; ``stripped``: with the hooks removed from ``HOT_FILES``. Both
    targets run such a copy, so that they differ in nothing but the hooks (not in where their files are)."""
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD", "metergate"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(path, filter="data")
    if not stripped:
        return path
    for name in HOT_FILES:
        file = path / name
        text, removed = strip(file.read_text())
        file.write_text(text)
        print(f"stripped: {name}: {removed} hook calls removed", flush=True)
    return path


def hook_costs_ns() -> dict[str, float]:
    """Nanoseconds per call of each hook with tracing off (nothing installed, no request traced)."""
    import timeit

    from metergate.observability import ledger_batches, tracing

    assert not ledger_batches.installed() and tracing.CURRENT.get() is None
    data, batch = b'{"choices":[{"delta":{"content":"word"}}]}', [object()]

    def span() -> None:
        with tracing.span("metergate.settle") as s:
            s.set_attribute("metergate.charged", 1)

    def written() -> None:
        with ledger_batches.batch("sqlite", batch):  # type: ignore[arg-type]
            pass

    calls = {"tracing.event (each upstream event)": lambda: tracing.event(data),
             "with tracing.span() + set_attribute": span,
             "ledger_batches.link (each ledger operation)": lambda: ledger_batches.link(None),
             "with ledger_batches.batch() (each batch)": written,
             "an empty lambda, for scale": lambda: None}
    out = {}
    for name, fn in calls.items():
        number = 200_000
        out[name] = min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ab_parser(__doc__)
    return ab_args(parser, argv)


async def main_async(args: argparse.Namespace) -> int:
    os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    workdir = Path(tempfile.mkdtemp(prefix="metergate-bench-tracing-off-"))
    try:
        trees = {"stripped": head_tree(workdir / "stripped", stripped=True),
                 "off": head_tree(workdir / "off", stripped=False)}
        servers = {name: Servers(workdir / f"{name}-run", args.server_cpus, "WARNING", {"tracing": "off"},
                                 tree=tree) for name, tree in trees.items()}
        print_plan(args)
        cells = await measure_ab(servers, stream=args.stream, concurrency=args.concurrency,
                                 rounds=args.rounds, duration=args.duration)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_medians(cells)
    pairs = list(zip(cells["stripped"], cells["off"], strict=True))
    rps = [b.rps / a.rps for a, b in pairs if a.rps]
    cpu = [(b.proxy_cpu_us or 0) / a.proxy_cpu_us for a, b in pairs if a.proxy_cpu_us]
    print(f"\noff / stripped, per round: req/s {' '.join(f'{r:.3f}' for r in rps)} "
          f"(median x{statistics.median(rps):.3f}); proxy CPU per request {' '.join(f'{r:.3f}' for r in cpu)} "
          f"(median x{statistics.median(cpu):.3f})")
    print("\nthe hooks, off, timed in this process (ns per call, best of 5 x 200,000):")
    for name, ns in hook_costs_ns().items():
        print(f"  {name:<46} {ns:6.0f}")
    errors = sum(c.errors for cs in cells.values() for c in cs)
    return 0 if not errors else 1


def main(argv: list[str] | None = None) -> int:
    return run_timed(main_async, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
