"""Streams of image blobs: sha256 while reading or writing, exact sizes, and the three layer compressions.

A pull reads each blob once through a chain of these: the raw blob (:class:`DigestReader`, which refuses a
blob longer or shorter than its descriptor says and hashes what it passes on) → the decompressor
(:func:`decompressed`) → a second :class:`DigestReader` (the diff_id of the uncompressed tar) → the tar
reader.  A push writes through the mirror image: tar writer → :class:`DigestWriter` (diff_id) →
compressor (:func:`compressor`) → :class:`DigestWriter` (blob digest) → a file.

Compression is stdlib ``gzip`` (written with a fixed header: no name, mtime 0, level :data:`GZIP_LEVEL`, so
the same tar gives the same blob everywhere) and ``zstandard`` (imported when first needed).  Errors are
:class:`BlobError` with one line for the user.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO

CHUNK = 1 << 20
GZIP_LEVEL = 6
"""Part of what a written blob's bytes are: changing it changes every exported digest."""
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


class _Compressor(io.RawIOBase):
    def __init__(self, sink: BinaryIO, compression: str) -> None:
        super().__init__()
        self.sink = sink
        self.compression = compression
        self.inner: Any
        if compression == "gzip":
            self.inner = gzip.GzipFile(filename="", mode="wb", fileobj=sink, compresslevel=GZIP_LEVEL, mtime=0)
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
            self.inner.close()
        elif self.compression == "zstd":
            self.inner.flush(_zstd().FLUSH_FRAME)


def compressor(sink: BinaryIO, compression: str) -> _Compressor:
    """A writer that compresses into ``sink``; call ``finish()`` when done (``sink`` is not closed)."""
    return _Compressor(sink, compression)
