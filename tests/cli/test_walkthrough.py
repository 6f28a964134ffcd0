"""The README's walkthrough runs as written: the test takes its blocks from README.md itself, so the two
cannot drift apart.

Method: every fenced block whose info string is ``<language> walkthrough [file]`` is extracted in order; a
block naming a file is written to that file, and the ``$ `` lines of the ``console`` blocks are run by one
``bash`` in an empty temporary directory, each checked for its exit code (0, or the ``# exit code N`` its
comment promises) and its output kept for the assertions. The only change made to the text is the two
ports, 8080 and 9000, replaced by free ones (the machine is shared). Background commands (``&``) and everything
they start share the shell's process group, which the test ends when it is done. Then the results are read
back through the admin API: the two requests, each charged exactly what the price version in force when it
started says.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from metergate_client import Client
from tests.cli.server import ROOT
from tests.conftest import free_port

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w+) walkthrough(?: ([\w.-]+))?[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
EXPECTED_EXIT = re.compile(r"#\s*exit code (\d+)")
BACKGROUND = re.compile(r"&\s*(#.*)?$")
PORTS = ("8080", "9000")  # the server's and the mock upstream's, as the README writes them
RUN_TIMEOUT_S = 120  # a bound on a hung walkthrough, not a speed assertion
STOP_TIMEOUT_S = 30


@dataclass(frozen=True, slots=True)
class Block:
    language: str
    file: str | None
    text: str


def walkthrough_blocks(markdown: str) -> list[Block]:
    return [Block(m.group(1), m.group(2), m.group(3)) for m in FENCE.finditer(markdown)]


def commands(blocks: list[Block]) -> list[str]:
    return [line[2:].strip() for b in blocks if b.language == "console" for line in b.text.splitlines()
            if line.startswith("$ ")]


def script(steps: list[str], out: Path) -> str:
    """One bash script: each step's output to ``out/NN.out|err``; a wrong exit code stops it (exit 99)."""
    lines = ["set -u"]
    for number, step in enumerate(steps, 1):
        files = f"> {out}/{number:02d}.out 2> {out}/{number:02d}.err"
        if BACKGROUND.search(step):
            lines.append(f"{{ {BACKGROUND.sub('', step)}\n}} {files} &")
            continue
        expected = int(m.group(1)) if (m := EXPECTED_EXIT.search(step)) else 0
        quoted = step.replace("'", "'\\''")
        lines += [f"{{ {step}\n}} {files}", "rc=$?",
                  f"if [ $rc -ne {expected} ]; then echo 'step {number} exited '$rc' (expected {expected}): "
                  f"{quoted}' >&2; exit 99; fi"]
    return "\n".join(lines) + "\n"


def stop_group(pgid: int) -> None:
    """End the walkthrough's background processes: the process group this test started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # raises ProcessLookupError once every member has exited
            time.sleep(0.1)
        os.killpg(pgid, signal.SIGKILL)


def expected_charge(record: dict[str, object], output_rate: str) -> str:
    """gpt-4o-mini at 0.30 per million input tokens and ``output_rate`` per million output tokens, rounded
    half-up to the micro-dollar once."""
    micros = (Decimal(str(record["tokens_input"])) * Decimal("0.30")
              + Decimal(str(record["tokens_output"])) * Decimal(output_rate))
    return str(micros.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    blocks = walkthrough_blocks(README.read_text(encoding="utf-8"))
    steps = commands(blocks)
    # The walkthrough shows what it promises, with the CLI only.
    assert {b.file for b in blocks if b.file} == {"metergate.yaml", "request.py"}
    for needed in ("metergate serve", "metergate customers create", "metergate credit", "metergate keys issue",
                   "python request.py", "metergate usage tail", "metergate prices pull", "metergate prices diff",
                   "metergate prices push"):
        assert any(needed in step for step in steps), needed
    assert not any("curl" in b.text for b in blocks)
    everything = "".join(b.text for b in blocks)
    assert all(port in everything for port in PORTS)  # else the test would reach a port it does not own

    ports = {port: str(free_port()) for port in PORTS}

    def local(text: str) -> str:
        for port, free in ports.items():
            text = text.replace(port, free)
        return text

    work = tmp_path / "walkthrough"
    out = tmp_path / "output"
    work.mkdir()
    out.mkdir()
    for block in blocks:
        if block.file:
            (work / block.file).write_text(local(block.text), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERGATE_", "OPENAI_"))}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    key = re.search(r"METERGATE_ADMIN_KEY=(\S+)", " ".join(steps))
    assert key is not None
    shell = subprocess.Popen(["bash", "-c", local(script(steps, out))], cwd=work, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records: list[dict[str, object]] = []
    try:
        _, failure = shell.communicate(timeout=RUN_TIMEOUT_S)
        if shell.returncode == 0:  # the walkthrough's server still runs: read what it recorded
            with Client(f"http://127.0.0.1:{ports['8080']}", key.group(1)) as admin:
                records = sorted((u.raw for u in admin.usage("acme").data), key=lambda r: int(str(r["created_at_ms"])))
    finally:
        shell.kill()
        stop_group(shell.pid)
    logs = {name: (work / name).read_text() if (work / name).exists() else "" for name in ("serve.log",
                                                                                           "upstream.log")}
    assert shell.returncode == 0, (failure, {p.name: p.read_text() for p in sorted(out.iterdir())}, logs)

    def output(command: str, nth: int = 0) -> str:
        numbers = [i for i, step in enumerate(steps, 1) if step.startswith(command)]
        return (out / f"{numbers[nth]:02d}.out").read_text()

    diff = output("metergate prices diff").splitlines()
    assert '~ config0:gpt-4o-mini.rates.output_tokens: "1.20" -> "1.50"' in diff
    [acme] = [line.split() for line in diff if line.startswith("acme ")]
    assert acme[1] == "USD" and Decimal(acme[3]) > Decimal(acme[2]) and acme[4].startswith("+")
    assert output("metergate prices push").startswith("published pv_")
    assert len(output("metergate usage tail", 0).strip().splitlines()) == 2  # the header and one request
    assert len(output("metergate usage tail", 1).strip().splitlines()) == 3  # and then two
    assert "tokens in," in output("python request.py")

    # What was recorded: two requests, each charged exactly what the version in force when it started says.
    first, second = records
    assert (first["model"], second["model"]) == ("gpt-4o-mini", "gpt-4o-mini")
    assert str(first["charged_amount"]) == expected_charge(first, "1.20")  # the settings file's version 0
    assert str(second["charged_amount"]) == expected_charge(second, "1.50")  # the version pushed
    assert int(str(second["charged_amount"])) > int(str(first["charged_amount"]))
    # The prose around the blocks quotes this run's numbers: they must be the ones a run gives.
    prose = README.read_text(encoding="utf-8")
    assert f"{first['tokens_input']} tokens in at $0.30 and {first['tokens_output']} out at $1.20" in prose
    assert f"acme      USD    {first['charged_decimal']}  {second['charged_decimal']}" in prose
