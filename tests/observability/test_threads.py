"""The SQLite store's threads carry names the kernel shows (``top -H``, /proc), so that the ledger's CPU can be
told from the event loop's; bench/run.py reads the writer's CPU by that name."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path

import pytest

from metergate.observability.threads import name_os_thread
from metergate.wallet.execution import CHECKPOINT_THREAD, READER_THREAD, WRITER_THREAD
from metergate.wallet.sql import SqlWalletStore

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names are read from /proc")


def kernel_thread_names() -> list[str]:
    names = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append((task / "comm").read_text().strip())
    return names


def test_a_thread_gets_its_name_cut_to_what_the_kernel_keeps() -> None:
    seen: list[str] = []

    def run() -> None:
        assert name_os_thread()
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())

    thread = threading.Thread(target=run, name="metergate-a-very-long-name")
    thread.start()
    thread.join()
    assert seen == ["metergate-a-ver"]  # 15 bytes


async def test_the_sqlite_stores_threads_are_named(tmp_path: Path) -> None:
    store = SqlWalletStore(f"sqlite:///{tmp_path / 'wallet.db'}")
    await store.open()
    try:
        await store.create_customer("test", "acme", "Acme")  # a write: the writer thread runs
        await store.balance("test", "acme", "USD")  # a read: a reader thread runs
        names = kernel_thread_names()
        assert names.count(WRITER_THREAD) == 1
        assert names.count(CHECKPOINT_THREAD) == 1
        assert any(name.startswith(READER_THREAD) for name in names)
    finally:
        await store.close()
    assert WRITER_THREAD not in kernel_thread_names()  # closed with the store
