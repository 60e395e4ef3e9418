"""Reading trace text: files or standard input, plain, gzip or zstd, in newline-aligned chunks.

Everything here is about bytes, not about what the lines mean (that is ``audit.py`` and ``reference.py``).  A reader
yields chunks that end on a line boundary, so that a chunk can be split into whole lines and parsed
on its own, in constant memory whatever the size of the input; only the last chunk of an input may
end without a newline (a truncated last line, as left by an interrupted ``cat trace_pipe``).

Bad input is reported as :class:`TraceInputError` with one line of text naming the input: a missing
file, a directory, an empty input, a binary file (a NUL byte in the first block), or a compressed
stream that does not decompress.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import mmap
import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

#: bytes read from the (decompressed) input per chunk
CHUNK_SIZE = 4 << 20
#: a "line" longer than this is not trace text
MAX_LINE = 1 << 20
#: how much of the start is checked for NUL bytes
BINARY_PROBE = 64 << 10


class TraceInputError(Exception):
    """Input that cannot be read as trace text; the message is one line for the user."""


@dataclass
class Chunk:
    """Whole lines of one input; ``truncated`` is set on the last chunk when the input does not
    end with a newline.  (Lines are not counted here: the parser counts them for free.)"""

    data: bytes | bytearray | memoryview
    truncated: bool = False
    #: where the chunk ends in a mapped file (:meth:`Source.release`)
    end: int = 0


class Source:
    """One input (a path, or ``-`` for standard input), opened and decompressed if needed.

    ``compression`` is ``none``, ``gzip`` or ``zstd``, found from the magic bytes, not the name.
    ``size`` is the on-disk size when known; :meth:`position` is how much of it has been read,
    for progress reports."""

    def __init__(self, path: str):
        self.name = "<stdin>" if path == "-" else path
        self._raw: BinaryIO = _open_raw(path)
        self.size: int | None = _size_of(self._raw)
        #: a plain file, mapped: its chunks are views of the page cache, never copied
        self.mapped: mmap.mmap | None = None
        self._mapped_at = 0
        try:
            head = self._raw.peek(4)[:4] if hasattr(self._raw, "peek") else b""
        except OSError as e:  # a file that cannot be read (/proc/self/mem): one line
            self.close()
            raise TraceInputError(f"{self.name}: cannot read: {e.strerror or e}") from None
        self.compression = "gzip" if head.startswith(GZIP_MAGIC) else "zstd" if head.startswith(ZSTD_MAGIC) else "none"
        self._stream: BinaryIO = _decompressing(self._raw, self.compression)
        if self.compression == "none" and path != "-" and self.size:
            self.mapped = _map(self._raw)

    def position(self) -> int:
        if self.mapped is not None:
            return self._mapped_at
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return 0

    def release(self, start: int, end: int) -> None:
        """The mapped bytes ``start:end`` were parsed: drop them from this process's memory (the
        page cache keeps them), so that memory does not grow with the input."""
        if self.mapped is None:
            return
        page = mmap.PAGESIZE
        a, b = -(-start // page) * page, end // page * page
        if b > a:
            self.mapped.madvise(mmap.MADV_DONTNEED, a, b - a)

    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` as far as the input goes (a pipe or a decompressor may return less per
        call); the number of bytes read, 0 at the end."""
        got = 0
        try:
            while got < len(buf):
                n = self._stream.readinto(buf[got:])
                if not n:
                    break
                got += n
            return got
        except (OSError, EOFError, zlib.error) as e:  # gzip/zstd corruption, a stream that ends early
            if self.compression == "none":
                raise TraceInputError(f"{self.name}: cannot read: {e.strerror or e}") from None
            raise TraceInputError(f"{self.name}: cannot decompress {self.compression} data: {e}") from None
        except Exception as e:  # zstandard.ZstdError is not an OSError
            if type(e).__name__ == "ZstdError":
                raise TraceInputError(f"{self.name}: cannot decompress zstd data: {e}") from None
            raise

    def close(self) -> None:
        if self.mapped is not None:
            with contextlib.suppress(BufferError):  # a view of it is still alive: freed with the last one
                self.mapped.close()
            self.mapped = None
        if sys.stdin is None or self._raw is not sys.stdin.buffer:
            self._raw.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_raw(path: str) -> BinaryIO:
    if path == "-":
        if sys.stdin is None:  # started with standard input closed (`<&-`)
            raise TraceInputError("<stdin>: standard input is closed; give a file, or pipe a trace in")
        return sys.stdin.buffer
    if os.path.isdir(path):
        raise TraceInputError(f"{path}: is a directory, expected a trace file")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise TraceInputError(f"{path}: no such file") from None
    except OSError as e:
        raise TraceInputError(f"{path}: cannot open: {e.strerror}") from None


def _map(f: BinaryIO) -> mmap.mmap | None:
    """The file mapped for reading, or None when it cannot be (a special file: read it)."""
    try:
        if not os.path.isfile(getattr(f, "name", "")):
            return None
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    if hasattr(mmap, "MADV_SEQUENTIAL"):
        m.madvise(mmap.MADV_SEQUENTIAL)
    return m


def _size_of(f: BinaryIO) -> int | None:
    try:
        st = os.fstat(f.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    return st.st_size if st.st_size > 0 or os.path.isfile(getattr(f, "name", "")) else None


def _decompressing(raw: BinaryIO, compression: str) -> BinaryIO:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        return _ZstdReader(raw)  # type: ignore[return-value]
    return raw


class _ZstdReader:
    """A zstd stream of one or more frames, decompressed; ``EOFError`` when the input ends inside a
    frame (a truncated file: zstandard's own ``stream_reader`` then just stops, data lost silently).

    Each frame is fed to a ``decompressobj`` that says when the frame is complete (``eof``); its
    ``unused_data`` starts the next frame."""

    #: compressed bytes read at a time (trace text decompresses about tenfold)
    BLOCK = 256 << 10

    def __init__(self, raw: BinaryIO):
        import zstandard  # imported only when needed

        self._raw = raw
        self._zstd = zstandard.ZstdDecompressor()
        self._frame = self._zstd.decompressobj()
        self._in_frame = False  # some bytes of the current frame were read, not its end
        self._out = b""
        self._at = 0

    def readinto(self, buf: memoryview) -> int:
        while self._at == len(self._out):
            data = self._raw.read(self.BLOCK)
            if not data:
                if self._in_frame:
                    raise EOFError("the zstd stream ends inside a frame: the file is truncated")
                return 0
            self._out, self._at = self._decompress(data), 0
        n = min(len(buf), len(self._out) - self._at)
        buf[:n] = self._out[self._at : self._at + n]
        self._at += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            self._in_frame = True
            out.append(self._frame.decompress(data))
            if not self._frame.eof:
                break
            data = self._frame.unused_data  # the next frame, if any
            self._frame, self._in_frame = self._zstd.decompressobj(), False
        return b"".join(out)


def chunks(src: Source, size: int = CHUNK_SIZE) -> Iterator[Chunk]:
    """The input in newline-aligned chunks; raises :class:`TraceInputError` for an empty or
    binary input, or when a chunk ends in a partial line longer than :data:`MAX_LINE` (text whose
    lines run on for megabytes is not a trace; a long line that ends within a chunk is parsed).

    Each chunk is its own ``bytearray``: the previous chunk's partial line, then the input read
    straight into it (``readinto``: a compressed file's or a pipe's bytes are copied once, from the
    kernel); a plain file's chunks are views of its mapping (:func:`_mapped_chunks`)."""
    if src.mapped is not None:
        yield from _mapped_chunks(src, src.mapped, size)
        return
    rest = b""
    first = True
    while True:
        buf = bytearray(len(rest) + size)
        buf[: len(rest)] = rest
        got = src.readinto(memoryview(buf)[len(rest) :])
        if first:
            _check_start(src, bytes(buf[: min(got, BINARY_PROBE)]))
            first = False
        if not got:
            break
        end = len(rest) + got
        cut = buf.rfind(b"\n", len(rest), end) + 1
        if cut == 0:
            rest = bytes(buf[:end])
            if len(rest) > MAX_LINE:
                raise TraceInputError(f"{src.name}: a line longer than {MAX_LINE >> 20} MiB: not trace text")
            continue
        rest = bytes(buf[cut:end])
        if len(rest) > MAX_LINE:
            raise TraceInputError(f"{src.name}: a line longer than {MAX_LINE >> 20} MiB: not trace text")
        del buf[cut:]  # shrinks in place
        yield Chunk(buf)
    if rest:
        yield Chunk(rest, truncated=True)


def _mapped_chunks(src: Source, mm: mmap.mmap, size: int) -> Iterator[Chunk]:
    """:func:`chunks` over a mapped file: the same cuts (``size`` bytes after the previous cut's
    partial line, cut at the last newline), each chunk a view of the mapping."""
    view = memoryview(mm)
    n = len(mm)
    at = end = 0  # the current chunk starts at `at`; bytes up to `end` were "read"
    _check_start(src, mm[: min(n, BINARY_PROBE)])
    while end < n:
        new_end = min(end + size, n)
        cut = mm.rfind(b"\n", end, new_end) + 1
        end = src._mapped_at = new_end
        if cut == 0:
            if end - at > MAX_LINE:
                raise TraceInputError(f"{src.name}: a line longer than {MAX_LINE >> 20} MiB: not trace text")
            continue
        if end - cut > MAX_LINE:
            raise TraceInputError(f"{src.name}: a line longer than {MAX_LINE >> 20} MiB: not trace text")
        yield Chunk(view[at:cut], end=cut)
        at = cut
    if at < n:
        yield Chunk(view[at:n], truncated=True, end=n)


def _check_start(src: Source, data: bytes) -> None:
    if not data:
        raise TraceInputError(f"{src.name}: empty input, expected kvm_exit trace text")
    if b"\x00" in data[:BINARY_PROBE]:
        what = f"{src.compression}-compressed " if src.compression != "none" else ""
        raise TraceInputError(
            f"{src.name}: {what}binary data (NUL bytes), expected trace text "
            "(ftrace, trace-cmd report or perf script output)"
        )
