"""Streams of image blobs: sha256 while reading or writing, exact sizes, and the three layer compressions.

A pull reads each blob once through a chain of these: the raw blob (:class:`DigestReader`, which refuses a
blob longer or shorter than its descriptor says and hashes what it passes on) → the decompressor
(:func:`decompressed`) → a second :class:`DigestReader` (the diff_id of the uncompressed tar) → the tar
reader.  A push writes through the mirror image: tar writer → :class:`DigestWriter` (diff_id) →
compressor (:func:`compressor`) → :class:`DigestWriter` (blob digest) → a file.

Compression is gzip through stdlib ``zlib`` (written as :class:`ParallelGzip`: a fixed header, level
:data:`GZIP_LEVEL`, blocks of :data:`GZIP_BLOCK`, so the same tar gives the same blob everywhere) and
``zstandard`` (imported when first needed).  Errors are
:class:`BlobError` with one line for the user.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import queue
import struct
import threading
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO

CHUNK = 1 << 20
GZIP_LEVEL = 1
GZIP_BLOCK = 1 << 20
"""Both are part of what a written blob's bytes are: changing one changes every exported digest."""
ZSTD_LEVEL = 3

COMPRESSIONS = ("gzip", "zstd", "none")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class BlobError(Exception):
    """A blob that cannot be read or written as asked; ``str()`` is one line meant for the user."""


def sha256_digest(hexdigest: str) -> str:
    return f"sha256:{hexdigest}"


def check_digest(digest: str) -> str:
    """The hex part of a ``sha256:HEX`` digest; BlobError for anything else (other algorithms, bad hex)."""
    algo, sep, hexpart = digest.partition(":")
    if algo != "sha256" or not sep or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise BlobError(f"unsupported or malformed digest {digest!r} (expected sha256:<64 hex digits>)")
    return hexpart


class DigestReader(io.RawIOBase):
    """Reads ``raw`` and hashes what it returns.

    ``size`` (when known) is the exact length the blob must have: reading past it is refused ("bigger than
    its declared size") as soon as a byte more arrives, and :meth:`finish` refuses a shorter one
    ("truncated").  ``progress(n)`` is called with every chunk's length; ``tee`` gets a copy of every byte.
    """

    def __init__(self, raw: BinaryIO, *, size: int | None = None, what: str = "blob",
                 progress: Callable[[int], None] | None = None, tee: BinaryIO | None = None) -> None:
        super().__init__()
        self.raw = raw
        self.tee = tee
        self.size = size
        self.what = what
        self.count = 0
        self.sha = hashlib.sha256()
        self.progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = len(view)
        if self.size is not None:
            # read one byte beyond the declared end, if there is one, to notice an oversized blob
            want = min(want, self.size - self.count + 1)
            if want <= 0:
                want = 1
        data = self.raw.read(want)
        if not data:
            return 0
        n = len(data)
        if self.size is not None and self.count + n > self.size:
            raise BlobError(f"{self.what} is bigger than its declared size {self.size}")
        view[:n] = data
        self.sha.update(view[:n])
        if self.tee is not None:
            self.tee.write(view[:n])
        self.count += n
        if self.progress is not None:
            self.progress(n)
        return n

    def drain(self) -> None:
        """Read (and hash) whatever is left."""
        while self.read(CHUNK):
            pass

    def finish(self, expected: str | None = None) -> str:
        """Drain, check the length and (when given) the digest; return ``sha256:HEX`` of everything read."""
        self.drain()
        if self.size is not None and self.count != self.size:
            raise BlobError(f"{self.what} is truncated: {self.count} of {self.size} bytes")
        digest = sha256_digest(self.sha.hexdigest())
        if expected is not None and digest != expected:
            raise BlobError(f"{self.what}: digest mismatch: expected {expected}, got {digest}")
        return digest


class DigestWriter(io.RawIOBase):
    """Writes to ``raw`` (None: nowhere) and hashes and counts what passes."""

    def __init__(self, raw: BinaryIO | None, *, progress: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.raw = raw
        self.count = 0
        self.sha = hashlib.sha256()
        self.progress = progress

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.count

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        if self.raw is not None:
            self.raw.write(view)
        self.count += len(view)
        if self.progress is not None:
            self.progress(len(view))
        return len(view)

    @property
    def digest(self) -> str:
        return sha256_digest(self.sha.hexdigest())


def sniff(head: bytes) -> str:
    """The compression of a blob that starts with ``head`` (``gzip``, ``zstd`` or ``none``)."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return "none"


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - a dependency of the package
        raise BlobError("zstd layers need the Python package 'zstandard' (pip install zstandard)") from None
    return zstandard


class _Peeked(io.RawIOBase):
    """``head`` (already read) followed by the rest of ``raw``."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        super().__init__()
        self.head = head
        self.raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self.head:
            n = min(len(view), len(self.head))
            view[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.raw.read(len(view))
        view[:len(data)] = data
        return len(data)


class _Gunzip(io.RawIOBase):
    """A gzip stream (several members allowed) decoded with zlib; corrupt or truncated data is BlobError."""

    def __init__(self, raw: BinaryIO, what: str) -> None:
        super().__init__()
        self.raw = raw
        self.what = what
        self.dec = zlib.decompressobj(wbits=31)
        self.fed = False
        """Has the current member's decoder been given input (so that an end of input now truncates it)?"""
        self.left = b""
        self.pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while not self.pending:
            if self.dec.eof:  # a member ended: what follows must be another member
                self.left = self.dec.unused_data
                self.dec = zlib.decompressobj(wbits=31)
                self.fed = False
            if self.dec.unconsumed_tail:
                src = self.dec.unconsumed_tail
            elif self.left:
                src, self.left = self.left, b""
            else:
                src = self.raw.read(CHUNK)
            if not src:
                if self.fed:
                    raise BlobError(f"{self.what}: truncated gzip data")
                return
            self.fed = True
            try:
                self.pending = memoryview(self.dec.decompress(src, CHUNK))
            except zlib.error as exc:
                raise BlobError(f"{self.what}: corrupt gzip data ({exc})") from None

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        self._fill()
        n = min(len(view), len(self.pending))
        view[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


class _Unzstd(io.RawIOBase):
    def __init__(self, raw: BinaryIO, what: str) -> None:
        super().__init__()
        self.what = what
        self.reader = _zstd().ZstdDecompressor().stream_reader(raw, read_across_frames=True)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self.reader.read(len(view))
        except Exception as exc:  # zstandard.ZstdError and friends
            raise BlobError(f"{self.what}: corrupt zstd data ({exc})") from None
        view[:len(data)] = data
        return len(data)


def decompressed(raw: BinaryIO, *, what: str = "layer") -> tuple[BinaryIO, str]:
    """A reader of the uncompressed bytes of ``raw`` (compression sniffed from its first bytes) and the
    compression found."""
    head = raw.read(4)
    kind = sniff(head)
    peeked = io.BufferedReader(_Peeked(head, raw), CHUNK)
    if kind == "gzip":
        return io.BufferedReader(_Gunzip(peeked, what), CHUNK), kind  # type: ignore[arg-type]
    if kind == "zstd":
        return io.BufferedReader(_Unzstd(peeked, what), CHUNK), kind  # type: ignore[arg-type]
    return peeked, kind  # type: ignore[return-value]


def _deflate(block: bytes, zdict: bytes, final: bool) -> bytes:
    """One block of a parallel gzip stream: raw deflate primed with the previous 32 KiB of input, ended with
    a sync flush (byte-aligned, not final) or, for the last block, the final flush."""
    if zdict:
        c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, zdict)
    else:
        c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY)
    return c.compress(block) + c.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


class ParallelGzip(io.RawIOBase):
    """A gzip stream compressed in :data:`GZIP_BLOCK` blocks on several threads, as pigz does: each block
    is deflated with the 32 KiB before it as its dictionary, so the output is one valid gzip member whose
    bytes depend on the data, the level and the block size only — never on the number of threads.  The
    header is fixed (no name, mtime 0, OS unknown).  Call :meth:`finish` for the last block and the trailer
    (``sink`` stays open)."""

    def __init__(self, sink: BinaryIO, *, workers: int | None = None) -> None:
        super().__init__()
        self.sink = sink
        count = workers or min(4, os.cpu_count() or 1)
        self.pool = concurrent.futures.ThreadPoolExecutor(count)
        self.window = 2 * count
        self.pending: list[Any] = []
        self.buf = bytearray()
        self.zdict = b""
        self.crc = 0
        self.size = 0
        sink.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        self.buf += view
        while len(self.buf) >= GZIP_BLOCK:
            block = bytes(self.buf[:GZIP_BLOCK])
            del self.buf[:GZIP_BLOCK]
            self._submit(block, final=False)
        return len(view)

    def _submit(self, block: bytes, *, final: bool) -> None:
        self.pending.append(self.pool.submit(_deflate, block, self.zdict, final))
        self.zdict = block[-32768:]
        while len(self.pending) > self.window:
            self.sink.write(self.pending.pop(0).result())

    def finish(self) -> None:
        try:
            self._submit(bytes(self.buf), final=True)
            self.buf.clear()
            for future in self.pending:
                self.sink.write(future.result())
            self.pending.clear()
            self.sink.write(struct.pack("<II", self.crc & 0xFFFFFFFF, self.size & 0xFFFFFFFF))
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Compressor(io.RawIOBase):
    def __init__(self, sink: BinaryIO, compression: str) -> None:
        super().__init__()
        self.sink = sink
        self.compression = compression
        self.inner: Any
        if compression == "gzip":
            self.inner = ParallelGzip(sink)
        elif compression == "zstd":
            cctx = _zstd().ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False, write_content_size=False)
            self.inner = cctx.stream_writer(sink, closefd=False)
        elif compression == "none":
            self.inner = None
        else:
            raise BlobError(f"unknown compression {compression!r} (use {', '.join(COMPRESSIONS)})")

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.inner is None:
            return int(self.sink.write(data))
        self.inner.write(data)
        return len(memoryview(data))

    def finish(self) -> None:
        """Write the compressor's trailer (the sink stays open)."""
        if self.compression == "gzip":
            self.inner.finish()
        elif self.compression == "zstd":
            self.inner.flush(_zstd().FLUSH_FRAME)


def compressor(sink: BinaryIO, compression: str) -> _Compressor:
    """A writer that compresses into ``sink``; call ``finish()`` when done (``sink`` is not closed)."""
    return _Compressor(sink, compression)


class Pipelined(io.RawIOBase):
    """Hands what is written to ``sink`` on another thread (at most ``depth`` chunks queued), so that
    compressing and hashing (both release the GIL) overlap with producing the data.  :meth:`finish` waits
    for the thread and raises what it raised."""

    def __init__(self, sink: Any, *, depth: int = 4) -> None:
        super().__init__()
        self.sink = sink
        self.queue: queue.Queue[bytes | None] = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="blob-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (chunk := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.sink.write(chunk)
                except BaseException as exc:  # handed to the writer in write()/finish()
                    self.error = exc

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.error is not None:
            raise self.error
        chunk = bytes(data)
        self.queue.put(chunk)
        return len(chunk)

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class Prefetched(io.RawIOBase):
    """Reads ``source`` to its end on another thread, ``depth`` chunks ahead of the reader, so that
    decompressing and hashing (both release the GIL) overlap with what the reader does with the data.
    An error of the thread is raised to the reader where the data ends; :meth:`finish` reads on to the end
    of ``source`` (so that everything is hashed), waits for the thread and raises its error; :meth:`stop`
    makes the thread give up (after a failure of the reader)."""

    def __init__(self, source: Any, *, depth: int = 8) -> None:
        super().__init__()
        self.source = source
        self.queue: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
        self.stopped = threading.Event()
        self.pending = memoryview(b"")
        self.ended = False
        self.thread = threading.Thread(target=self._run, name="blob-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                chunk = self.source.read(CHUNK)
                if not chunk:
                    break
                self._put(chunk)
            self._put(None)
        except BaseException as exc:  # handed to the reader
            self._put(exc)

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not self.pending:
            if self.ended:
                return 0
            item = self.queue.get()
            if item is None:
                self.ended = True
                return 0
            if isinstance(item, BaseException):
                self.ended = True
                raise item
            self.pending = memoryview(item)
        n = min(len(view), len(self.pending))
        view[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def finish(self) -> None:
        while self.readinto(bytearray(CHUNK)):
            pass
        self.thread.join()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
