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
  about (workers + 2) x chunk_bytes in the reading process plus one chunk and its result per worker.
- workers: a spawn-context process pool (the flow process has engine threads: no fork), or, when the
  reader runs inside a Dask worker (runner.task_runner: dask), the Dask cluster's own executor
  (plain ranges then need the file on a filesystem every worker sees).

A compressed stream that fails mid-way (truncated, corrupt) raises `StreamError` after every chunk
read before the failure has been yielded; the caller decides (the Wikidata source: TruncatedInputError
or, with allow_truncated, a rejection).
"""

from __future__ import annotations

import io
import itertools
import logging
import multiprocessing
import os
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
    gzip below GZIP_PARALLEL_THREADS threads is decoded by one isal thread: isal decodes about 2.3x
    faster per core than rapidgzip's speculative decoding (1.6 vs 3.8 CPU ms per MB of JSON, measured
    by benchmarks/source_scale.py), so on a few cores one isal thread plus parse workers on the other
    cores beats rapidgzip on all of them. `parallel`: the block-parallel library whatever the threads."""
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
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


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


def _work(parse: Callable[[bytes, Any], Any], source: bytes | tuple[str, int, int], params: Any
          ) -> tuple[int | None, int, int, Any]:
    """In a worker: (first byte offset or None when the reader knows it, lines, bytes, parse result)."""
    first: int | None = None
    if isinstance(source, tuple):
        first, data = read_range(*source)
    else:
        data = source
    return first, _count_lines(data), len(data), parse(data, params)


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
    import sys

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


def _compressed_chunks(path: Path, pieces: Iterator[bytes], chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(uncompressed offset, newline-aligned chunk); a failing stream raises StreamError after the
    complete lines read before the failure (read_chunks fills in their count)."""
    buf: list[bytes] = []
    have = offset = 0
    it = iter(pieces)
    while True:
        try:
            piece = next(it, b"")
        except Exception as exc:  # EOFError, zlib.error, OSError, the libraries' RuntimeError: a failed stream
            data = b"".join(buf)
            cut = data.rfind(b"\n") + 1  # a cut last line is dropped, as a serial line reader does
            if cut:
                yield offset, data[:cut]
            raise StreamError(path, exc, -1, offset + cut) from exc
        if not piece:
            if have:
                yield offset, b"".join(buf)
            return
        buf.append(piece)
        have += len(piece)
        if have >= chunk_bytes:
            data = b"".join(buf)
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                buf, have = [data], len(data)  # one line longer than a chunk: keep reading
                continue
            chunk, rest = data[:cut], data[cut:]
            yield offset, chunk
            offset += len(chunk)
            buf, have = ([rest], len(rest)) if rest else ([], 0)


def _replay(items: list[tuple[int, bytes]], error: BaseException) -> Iterator[tuple[int, bytes]]:
    yield from items
    raise error


def read_chunks(path: str | Path, parse: Callable[[bytes, Any], Any], params: Any, *, workers: int = 0,
                chunk_bytes: int = CHUNK_BYTES, threads: int | None = None, fmt: str | None = None,
                progress: Callable[[dict[str, Any]], None] | None = None, progress_interval: float = 10.0,
                exact_salvage: bool = True) -> Iterator[tuple[int, int, Any]]:
    """(first line number, 1-based; byte offset of the chunk in the uncompressed stream; parse(chunk, params))
    for every chunk, in input order. `parse` must be a module-level function (it is sent to worker
    processes by reference). workers=0: every available core; 1: in this process, no pool.
    exact_salvage: a damaged compressed stream yields exactly the lines a serial reader keeps (re-read
    sequentially from the start after a failure); False raises at the failure (when only the error matters)."""
    path = Path(path)
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
        chunks: Iterator[tuple[int, bytes]] = iter(())
        head: list[tuple[int, bytes]] = []
        source: _Pieces | None = None
        if fmt != "plain":
            source = _Pieces(path, fmt, threads, min(PIECE_BYTES, chunk_bytes), exact_salvage)
            chunks = _compressed_chunks(path, source, chunk_bytes)
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
                    yield consume(_work(parse, src, params), None)
                    report()
            else:
                for offset, chunk in chunks:
                    yield consume(_work(parse, chunk, params), offset)
                    report()
            report(final=True)
            return

        window = workers + 2
        with _pool(min(workers, n_sources) if n_sources else workers) as ex:
            pending: deque[tuple[int | None, Future]] = deque()
            try:
                if fmt == "plain":
                    for offset, src in sources:
                        pending.append((offset, ex.submit(_work, parse, src, params)))
                        if len(pending) >= window:
                            off, fut = pending.popleft()
                            yield consume(fut.result(), off)
                            report()
                else:
                    try:
                        for offset, chunk in itertools.chain(head, chunks):
                            pending.append((offset, ex.submit(_work, parse, chunk, params)))
                            while len(pending) >= window or (pending and pending[0][1].done()):
                                off, fut = pending.popleft()
                                yield consume(fut.result(), off)
                                report()
                    except StreamError:
                        while pending:
                            off, fut = pending.popleft()
                            yield consume(fut.result(), off)
                        raise
                while pending:
                    off, fut = pending.popleft()
                    yield consume(fut.result(), off)
                    report()
            finally:
                for _, fut in pending:
                    fut.cancel()
        report(final=True)

    except StreamError as exc:  # every chunk before the failure has been consumed
        exc.lines = line - 1
        raise

__all__ = ["CHUNK_BYTES", "FORMATS", "Progress", "StreamError", "available_cores", "decompressor", "detect_format",
           "open_stream", "read_chunks", "read_range"]
