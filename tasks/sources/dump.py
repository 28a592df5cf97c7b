"""Parallel reading of line-oriented dumps (the Wikidata JSON dump layout: a JSON array, one entity a
line, lines ending with ","), plain, gzip or bzip2, the format told by the magic bytes, not the name.

How the work is split, so every core parses and the output equals a serial read:
- plain: byte ranges of `chunk_bytes`; a worker owns the lines that *begin* in its range (it skips to
  the first line start after its range start and reads through the end of the last line it owns), so
  no line is read twice or lost, whatever the file size. Only results cross process boundaries.
- bzip2 / gzip: one decompressor for the whole stream, block-parallel inside its library
  (indexed_bzip2 finds bzip2 blocks by their 48-bit magic and decodes them on N threads; rapidgzip
  decodes deflate blocks speculatively from guessed offsets on N threads and resolves the window
  afterwards), read by the calling process into newline-aligned chunks that worker processes parse.
  gzip on fewer than GZIP_PARALLEL_THREADS cores: one isal thread (faster per core than rapidgzip, so
  the other cores parse). Fallbacks when a library is missing: isal (gzip), the stdlib bz2/gzip.
- results come back in input order through a bounded window of chunks in flight, so line numbers,
  byte offsets and first-seen order are those of a serial read, and memory stays bounded:
  (workers + 3) slots of chunk_bytes + 512 KiB in a /dev/shm ring, through which the decompressed
  chunks reach local workers (one copy each side; a pipe cost the workers more CPU than the parse),
  plus one chunk and its result per worker. Without room in /dev/shm (Docker's default is 64 MB:
  deploy/ sets more) chunks go through pipes, as they do to a Dask cluster's workers.
- workers: a spawn-context process pool (the flow process has engine threads: no fork), or, when the
  reader runs inside a Dask worker (runner.task_runner: dask), the Dask cluster's own executor
  (plain ranges then need the file on a filesystem every worker sees).

A compressed stream that fails mid-way (truncated, corrupt) raises `StreamError` after every chunk
read before the failure has been yielded; the caller decides (the Wikidata source: TruncatedInputError
or, with allow_truncated, a rejection).
"""

from __future__ import annotations

import gc
import io
import itertools
import logging
import mmap
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
PIECE_BYTES = 256 << 10  # a failing read loses at most this much of a truncated compressed stream
FORMATS = ("plain", "gzip", "bz2")
GZIP_PARALLEL_THREADS = 5  # gzip: rapidgzip from this many threads, one isal thread below (see decompressor)


class StreamError(OSError):
    """The compressed stream failed after `lines` complete lines (`nbytes` uncompressed bytes)."""

    def __init__(self, path: Path, cause: BaseException, lines: int, nbytes: int):
        self.path, self.cause, self.lines, self.nbytes = path, cause, lines, nbytes
        super().__init__(f"{path}: {type(cause).__name__}: {cause}")


def detect_format(path: str | Path) -> str:
    """'bz2', 'gzip' or 'plain' from the first bytes (a gzip file named .bz2 is read as gzip)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:3] == b"BZh" and head[3:4].isdigit():
        return "bz2"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    return "plain"


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _CountingFile(io.FileIO):
    """The compressed file, remembering how far into it the decompressor has read (for progress)."""

    high = 0

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        data = super().read(size)
        self.high = max(self.high, self.tell())
        return data

    def readinto(self, b: Any) -> int | None:  # type: ignore[override]
        n = super().readinto(b)
        self.high = max(self.high, self.tell())
        return n


def decompressor(fmt: str, threads: int, parallel: bool = False) -> str:
    """The library that decompresses `fmt` with `threads` threads (what the benchmark compares against).
    gzip below GZIP_PARALLEL_THREADS threads is decoded by one isal thread: isal costs 1.3-1.6 CPU ms
    per MB of JSON, rapidgzip's speculative decoding ~3.8 per thread (benchmarks/source_scale.py), so on
    a few cores one isal thread plus parse workers on the other cores beats rapidgzip on all of them.
    `parallel`: the block-parallel library whatever the threads."""
    if fmt == "bz2":
        try:
            import indexed_bzip2  # noqa: F401

            return f"indexed_bzip2(parallelization={threads})"
        except ImportError:
            return "bz2 (stdlib)"
    if fmt == "gzip":
        if threads > 1 and (parallel or threads >= GZIP_PARALLEL_THREADS):
            try:
                import rapidgzip  # noqa: F401

                return f"rapidgzip(parallelization={threads})"
            except ImportError:
                pass
        try:
            from isal import igzip  # noqa: F401

            return "isal.igzip"
        except ImportError:
            return "gzip (stdlib)"
    return "plain"


@contextmanager
def open_stream(path: str | Path, fmt: str | None = None, threads: int = 1, sequential: bool = False,
                parallel: bool = False) -> Iterator[tuple[Any, _CountingFile]]:
    """(uncompressed binary stream, the raw file) for `path`; raw.high is the compressed bytes read.
    sequential: the stdlib / isal decoders only (they report a cut stream exactly where it is cut);
    parallel: the block-parallel library (see `decompressor`)."""
    fmt = fmt or detect_format(path)
    raw = _CountingFile(str(path), "rb")
    stream: Any = raw
    try:
        name = decompressor(fmt, threads, parallel)
        if sequential and not name.startswith("isal"):
            name = "stdlib"
        if name.startswith("indexed_bzip2"):
            import indexed_bzip2

            stream = indexed_bzip2.open(raw, parallelization=threads)
        elif name.startswith("rapidgzip"):
            import rapidgzip

            stream = rapidgzip.open(raw, parallelization=threads)
        elif name == "isal.igzip":
            from isal import igzip

            stream = igzip.open(raw, "rb")
        elif fmt == "bz2":
            import bz2

            stream = bz2.open(raw, "rb")
        elif fmt == "gzip":
            import gzip

            stream = gzip.open(raw, "rb")
        yield stream, raw
    finally:
        try:
            if stream is not raw:
                stream.close()  # rapidgzip aborts the interpreter at exit if a reader is left open
        finally:
            raw.close()


def _count_lines(data: bytes) -> int:
    """Lines in data. bytes.count of one byte does not use memchr (~0.75 ms per MB); a find per line does
    (~0.1 ms/MB on dump lines of ~13 KB). Where the lines are short, the rest is counted at once."""
    find = data.find
    n, pos = 0, find(b"\n")
    while pos >= 0:
        n += 1
        if n == 1024 and pos < (1 << 20):  # lines under 1 KB: one count beats a call per line
            n += data.count(b"\n", pos + 1)
            break
        pos = find(b"\n", pos + 1)
    return n + (1 if data and not data.endswith(b"\n") else 0)


def read_range(path: str, start: int, end: int) -> tuple[int, bytes]:
    """(offset of the first owned line, the bytes of the lines that begin in [start, end))."""
    with open(path, "rb") as fh:
        if start > 0:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":
                fh.readline()  # the rest of a line that began before `start` belongs to the range before
        first = fh.tell()
        if first >= end:
            return first, b""
        data = fh.read(end - first)
        if data and not data.endswith(b"\n"):
            data += fh.readline()  # the last owned line runs past `end`
    return first, data


@dataclass(frozen=True)
class ChunkRef:
    """A decompressed chunk in the reader's shared-memory ring: `size` bytes at `offset` of `path`."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        ring = _MAPPED.get(self.path)
        if ring is None:
            for old in list(_MAPPED):  # a worker serves one reader: an older ring is gone
                _MAPPED.pop(old).close()
            with open(self.path, "rb") as fh:
                ring = _MAPPED[self.path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return ring[self.offset: self.offset + self.size]


_MAPPED: dict[str, mmap.mmap] = {}  # in a worker: the rings it has mapped


class _ChunkRing:
    """Decompressed chunks handed to local worker processes through one file in /dev/shm (tmpfs): one
    memory copy on each side. Through a pipe the same hand-off costs the worker more CPU than its parse
    (~4 ms per MB, measured: 18 x 16 MiB took 1.2 CPU-s of the workers). Slots are reused once their
    chunk's result is back; a chunk bigger than a slot (one huge line) goes through the pipe. The file is
    reserved with fallocate (no SIGBUS later when tmpfs fills up) and removed when the read ends; one left
    by a killed reader is removed by the next reader. _Chunker fills the slots."""

    DIR = Path("/dev/shm")
    PREFIX = "ditto-chunks-"

    def __init__(self, path: Path, fd: int, slots: int, slot_bytes: int):
        self.path, self.slot_bytes = path, slot_bytes
        self.map = mmap.mmap(fd, slots * slot_bytes)
        os.close(fd)
        self.free = deque(range(slots))

    @classmethod
    def create(cls, slots: int, slot_bytes: int) -> _ChunkRing | None:
        if not cls.DIR.is_dir():
            return None
        for old in cls.DIR.glob(cls.PREFIX + "*"):
            try:
                os.kill(int(old.name[len(cls.PREFIX):].split("-")[0]), 0)
            except ProcessLookupError:
                old.unlink(missing_ok=True)  # its reader was killed
            except (ValueError, OSError):
                pass
        path = cls.DIR / f"{cls.PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return None
        try:
            os.posix_fallocate(fd, 0, slots * slot_bytes)
            return cls(path, fd, slots, slot_bytes)
        except (OSError, ValueError) as exc:
            log.info("no room in %s for %d MB of chunk slots (%s): chunks go through pipes", cls.DIR,
                     slots * slot_bytes >> 20, exc)
            os.close(fd)
            path.unlink(missing_ok=True)
            return None

    def take(self) -> int | None:
        return self.free.popleft() if self.free else None

    def write(self, slot: int, at: int, data: bytes) -> None:
        start = slot * self.slot_bytes + at
        self.map[start: start + len(data)] = data

    def read(self, slot: int, start: int, end: int) -> bytes:
        base = slot * self.slot_bytes
        return self.map[base + start: base + end]

    def rfind(self, slot: int, end: int) -> int:
        """The last newline in the slot's first `end` bytes, relative to the slot; -1 when none."""
        base = slot * self.slot_bytes
        pos = self.map.rfind(b"\n", base, base + end)
        return pos - base if pos >= 0 else -1

    def ref(self, slot: int, size: int) -> ChunkRef:
        return ChunkRef(str(self.path), slot * self.slot_bytes, size)

    def release(self, slot: int | None) -> None:
        if slot is not None:
            self.free.append(slot)

    def close(self) -> None:
        self.map.close()
        self.path.unlink(missing_ok=True)


def _work(parse: Callable[[bytes, Any], Any], source: bytes | tuple[str, int, int] | ChunkRef, params: Any
          ) -> tuple[int | None, int, int, Any]:
    """In a worker: (first byte offset or None when the reader knows it, lines, bytes, parse result)."""
    first: int | None = None
    if isinstance(source, ChunkRef):
        data = source.read()
    elif isinstance(source, tuple):
        first, data = read_range(*source)
    else:
        data = source
    with no_gc():  # a parse allocates ~1M small acyclic objects: the cyclic collector only slows it (~25%)
        return first, _count_lines(data), len(data), parse(data, params)


@contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused (reference counting still frees everything acyclic)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class Progress:
    """Bytes read (of the file as stored), uncompressed bytes, MB/s and ETA; reported every `interval` s."""

    path: str
    total: int
    report: Callable[[dict[str, Any]], None] | None = None
    interval: float = 10.0

    def __post_init__(self) -> None:
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.read = 0
        self.uncompressed = 0

    def update(self, read: int, uncompressed: int, final: bool = False) -> dict[str, Any] | None:
        self.read, self.uncompressed = max(self.read, read), uncompressed
        now = time.perf_counter()
        if not final and now - self.last < self.interval:
            return None
        self.last = now
        info = self.snapshot()
        if final:
            info["eta_s"] = 0.0
        log.info("reading %s: %.0f of %.0f MB (%.0f%%), %.0f MB/s of JSON, ETA %.0f s", Path(self.path).name,
                 info["bytes_read"] / 1e6, info["bytes_total"] / 1e6, 100 * info["fraction"], info["mb_s"],
                 info["eta_s"] if info["eta_s"] is not None else float("nan"))
        if self.report is not None:
            try:
                self.report(info)
            except Exception:  # noqa: BLE001 - a broken progress hook must not stop the read
                pass
        return info

    def snapshot(self) -> dict[str, Any]:
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        fraction = min(1.0, self.read / self.total) if self.total else 1.0
        rate = self.read / seconds
        eta = (self.total - self.read) / rate if rate > 0 and self.total else None
        return {"path": self.path, "bytes_read": self.read, "bytes_total": self.total, "fraction": fraction,
                "json_bytes": self.uncompressed, "seconds": seconds, "mb_s": self.uncompressed / seconds / 1e6,
                "eta_s": eta}


def _dask_executor() -> Any:
    """The Dask cluster's executor when this code runs inside a Dask worker, else None."""
    if "distributed" not in sys.modules:  # a Dask worker has imported it; importing it here costs ~1 s
        return None
    try:
        from distributed import get_worker, worker_client
    except ImportError:
        return None
    try:
        get_worker()
    except ValueError:
        return None
    return worker_client


@contextmanager
def _pool(workers: int) -> Iterator[Executor]:
    wc = _dask_executor()
    if wc is not None:
        with wc() as client:  # secedes from the worker's thread pool while we wait
            yield client.get_executor()
        return
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _gzip_isize(path: Path) -> int | None:
    """The uncompressed size mod 2**32 from the gzip trailer (of the last member)."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() < 18:
            return None
        fh.seek(-4, os.SEEK_END)
        return int.from_bytes(fh.read(4), "little")


class _Pieces:
    """The uncompressed stream as pieces, read by the parallel decoder. When it fails, or a gzip stream
    ends with a size that differs from its trailer (a cut file, or several gzip members), a sequential
    decoder reads the stream again from the start line by line and yields what follows the bytes
    already yielded, so a damaged stream yields exactly the lines a serial line reader yields before
    the damage, whatever the piece and chunk sizes. `exact=False` skips that re-read on a failure (the
    caller only reports the failure) but never on a trailer mismatch, which may be a valid file."""

    def __init__(self, path: Path, fmt: str, threads: int, piece: int = PIECE_BYTES, exact: bool = True):
        self.path, self.fmt, self.threads, self.piece, self.exact = path, fmt, threads, piece, exact
        self.raw: _CountingFile | None = None
        self.stream: Any = None
        self.finished = False

    def position(self) -> int:
        """Compressed bytes consumed so far (the parallel libraries count in bits; they read the file
        through its descriptor, so the counting file does not see their reads)."""
        if self.finished:
            return self.path.stat().st_size
        reader = getattr(getattr(self.stream, "raw", None), "bz2reader", None) or self.stream
        tell = getattr(reader, "tell_compressed", None)
        if tell is not None:
            try:
                return int(tell()) // 8
            except Exception:  # noqa: BLE001 - progress only
                pass
        return self.raw.high if self.raw is not None else 0

    def __iter__(self) -> Iterator[bytes]:
        done = 0
        try:
            with open_stream(self.path, self.fmt, self.threads) as (self.stream, self.raw):
                while piece := self.stream.read(self.piece):
                    done += len(piece)
                    yield piece
            parallel_gzip = decompressor(self.fmt, self.threads).startswith("rapidgzip")
            isize = _gzip_isize(self.path) if parallel_gzip else None
            if isize is None or isize == done % (1 << 32):
                self.finished = True
                return
            log.warning("%s: gzip trailer size differs from the %d bytes decoded in parallel (a cut file or "
                        "several gzip members): reading it again sequentially", self.path, done)
        except Exception as exc:
            if not self.exact:
                raise
            log.warning("%s: decoder failed after %d bytes (%s: %s); reading it again sequentially, line by line",
                        self.path, done, type(exc).__name__, str(exc)[:200])
        with open_stream(self.path, self.fmt, 1, sequential=True) as (stream, self.raw):
            self.stream = stream
            pos = 0
            for line in stream:
                end = pos + len(line)
                if end > done:
                    yield line[max(0, done - pos):]
                pos = end
        self.finished = True


class _Chunker:
    """(uncompressed offset, newline-aligned chunk, ring slot or None) from the decompressed pieces; a
    failing stream raises StreamError after the complete lines read before the failure (read_chunks
    fills in their count). With a `ring` (set once the worker pool is up) each piece is copied once,
    straight into a free slot, and the chunk is a ChunkRef to it; without one, or when no slot is free,
    or for a chunk bigger than a slot (one huge line), the chunk is bytes."""

    def __init__(self, path: Path, pieces: Iterator[bytes], chunk_bytes: int):
        self.path, self.pieces, self.chunk_bytes = path, pieces, chunk_bytes
        self.ring: _ChunkRing | None = None

    def _carry(self, rest: bytes) -> tuple[int | None, int]:
        """(slot, fill) holding the start of the next chunk, or (None, 0) when it stays bytes."""
        ring = self.ring
        if not rest or ring is None or len(rest) > ring.slot_bytes:
            return None, 0
        slot = ring.take()
        if slot is None:
            return None, 0
        ring.write(slot, 0, rest)
        return slot, len(rest)

    def __iter__(self) -> Iterator[tuple[int, bytes | ChunkRef, int | None]]:
        buf: list[bytes] = []  # bytes mode
        have = offset = 0
        slot: int | None = None  # ring mode: `fill` bytes in `slot`
        fill = 0
        it = iter(self.pieces)
        while True:
            try:
                piece = next(it, b"")
            except Exception as exc:  # EOFError, zlib.error, OSError, the libraries' RuntimeError: a failed stream
                if slot is not None:
                    cut = self.ring.rfind(slot, fill) + 1  # a cut last line is dropped, as a serial reader does
                    if cut:
                        yield offset, self.ring.ref(slot, cut), slot
                    else:
                        self.ring.release(slot)
                else:
                    data = b"".join(buf)
                    cut = data.rfind(b"\n") + 1
                    if cut:
                        yield offset, data[:cut], None
                raise StreamError(self.path, exc, -1, offset + cut) from exc
            if not piece:
                if slot is not None:
                    if fill:
                        yield offset, self.ring.ref(slot, fill), slot
                    else:
                        self.ring.release(slot)
                elif have:
                    yield offset, b"".join(buf), None
                return
            ring = self.ring
            if slot is None and not buf and ring is not None:
                slot = ring.take()
            if slot is not None:
                if fill + len(piece) <= ring.slot_bytes:
                    ring.write(slot, fill, piece)
                    fill += len(piece)
                else:  # one line longer than a slot: this chunk goes as bytes
                    buf, have = [ring.read(slot, 0, fill), piece], fill + len(piece)
                    ring.release(slot)
                    slot, fill = None, 0
            else:
                buf.append(piece)
                have += len(piece)
            if slot is not None and fill >= self.chunk_bytes:
                cut = ring.rfind(slot, fill) + 1
                if cut == 0:
                    continue  # keep reading until the line ends (or the slot overflows)
                rest = ring.read(slot, cut, fill)
                yield offset, ring.ref(slot, cut), slot
                offset += cut
                slot, fill = self._carry(rest)
                buf, have = ([rest], len(rest)) if rest and slot is None else ([], 0)
            elif slot is None and have >= self.chunk_bytes:
                data = b"".join(buf)
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    buf, have = [data], len(data)  # one line longer than a chunk: keep reading
                    continue
                chunk, rest = data[:cut], data[cut:]
                yield offset, chunk, None
                offset += len(chunk)
                slot, fill = self._carry(rest)  # the ring came up (or a slot freed): back to it
                buf, have = ([rest], len(rest)) if rest and slot is None else ([], 0)


def _replay(items: list[tuple[int, bytes | ChunkRef, int | None]], error: BaseException
            ) -> Iterator[tuple[int, bytes | ChunkRef, int | None]]:
    yield from items
    raise error


def read_chunks(path: str | Path, parse: Callable[[bytes, Any], Any], params: Any, *, workers: int = 0,
                chunk_bytes: int = CHUNK_BYTES, threads: int | None = None, fmt: str | None = None,
                progress: Callable[[dict[str, Any]], None] | None = None, progress_interval: float = 10.0,
                exact_salvage: bool = True, params_now: Callable[[], Any] | None = None
                ) -> Iterator[tuple[int, int, Any]]:
    """(first line number, 1-based; byte offset of the chunk in the uncompressed stream; parse(chunk, params))
    for every chunk, in input order. `parse` must be a module-level function (it is sent to worker
    processes by reference). workers=0: every available core; 1: in this process, no pool.
    exact_salvage: a damaged compressed stream yields exactly the lines a serial reader keeps (re-read
    sequentially from the start after a failure); False raises at the failure (when only the error matters).
    params_now: when given, each chunk gets what it returns when the chunk is handed out, instead of
    `params` (the caller's state as it consumes the results, e.g. how popular a person must be now to
    enter its pools)."""
    path = Path(path)
    if params_now is None:
        def params_now() -> Any:
            return params
    fmt = fmt or detect_format(path)
    workers = workers or available_cores()
    threads = threads or workers
    size = path.stat().st_size
    prog = Progress(str(path), size, progress, progress_interval)
    line = 1
    done_bytes = 0

    if fmt == "plain":
        sources: Iterator[tuple[int | None, bytes | tuple[str, int, int]]] = (
            (None, (str(path), start, min(size, start + chunk_bytes))) for start in range(0, max(size, 1), chunk_bytes))
        n_sources = max(1, -(-size // chunk_bytes))
    else:
        n_sources = 0  # unknown

    def consume(result: tuple[int | None, int, int, Any], offset: int | None) -> tuple[int, int, Any]:
        nonlocal line, done_bytes
        first, n_lines, nbytes, res = result
        out = (line, first if first is not None else (offset or 0), res)
        line += n_lines
        done_bytes += nbytes
        return out

    def report(final: bool = False) -> None:
        read = source.position() if source is not None else min(size, done_bytes)
        prog.update(size if final and source is None else read, done_bytes, final)

    try:
        chunks: Iterator[tuple[int, bytes | ChunkRef, int | None]] = iter(())
        head: list[tuple[int, bytes | ChunkRef, int | None]] = []
        source: _Pieces | None = None
        chunker: _Chunker | None = None
        if fmt != "plain":
            source = _Pieces(path, fmt, threads, min(PIECE_BYTES, chunk_bytes), exact_salvage)
            chunker = _Chunker(path, source, chunk_bytes)
            chunks = iter(chunker)
            if workers > 1:  # a stream of one chunk is parsed here: no pool to start
                try:
                    for item in chunks:
                        head.append(item)
                        if len(head) == 2:
                            break
                except StreamError as exc:
                    workers = 1  # at most two chunks, then the failure: parsed here, in order
                    chunks, head = _replay(head, exc), []
                else:
                    if len(head) < 2:
                        workers = 1
                        chunks, head = iter(head), []
        if workers <= 1 or (fmt == "plain" and n_sources <= 1):
            if fmt == "plain":
                for _, src in sources:
                    yield consume(_work(parse, src, params_now()), None)
                    report()
            else:
                for offset, chunk, _ in chunks:  # no ring here: bytes
                    yield consume(_work(parse, chunk, params_now()), offset)
                    report()
            report(final=True)
            return

        window = workers + 2
        local = _dask_executor() is None
        # slots: the chunks in flight plus the one being filled
        ring = _ChunkRing.create(window + 1, chunk_bytes + 2 * PIECE_BYTES) if chunker is not None and local else None
        if chunker is not None:
            chunker.ring = ring
        try:
            with _pool(min(workers, n_sources) if n_sources else workers) as ex:
                pending: deque[tuple[int | None, Future, int | None]] = deque()

                def take() -> tuple[int, int, Any]:
                    off, fut, slot = pending.popleft()
                    result = fut.result()
                    if ring is not None:
                        ring.release(slot)
                    return consume(result, off)

                try:
                    if fmt == "plain":
                        for offset, src in sources:
                            pending.append((offset, ex.submit(_work, parse, src, params_now()), None))
                            if len(pending) >= window:
                                yield take()
                                report()
                    else:
                        try:
                            for offset, chunk, slot in itertools.chain(head, chunks):
                                pending.append((offset, ex.submit(_work, parse, chunk, params_now()), slot))
                                del chunk
                                while len(pending) >= window or (pending and pending[0][1].done()):
                                    yield take()
                                    report()
                        except StreamError:
                            while pending:
                                yield take()
                            raise
                    while pending:
                        yield take()
                        report()
                finally:
                    for _, fut, _ in pending:
                        fut.cancel()
        finally:
            if ring is not None:
                ring.close()  # after the pool's shutdown: no worker reads it any more
        report(final=True)

    except StreamError as exc:  # every chunk before the failure has been consumed
        exc.lines = line - 1
        raise

__all__ = ["CHUNK_BYTES", "FORMATS", "Progress", "StreamError", "available_cores", "decompressor", "detect_format",
           "no_gc", "open_stream", "read_chunks", "read_range"]
