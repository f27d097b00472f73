"""The OCI image layout directory (image-spec image-layout.md) as a pull source and a push destination.

``DIR/oci-layout`` (``{"imageLayoutVersion":"1.0.0"}``), ``DIR/index.json`` and ``DIR/blobs/sha256/<hex>``.
Reading goes through :class:`unionfs.fs.fsio.HostDir`: no symlink inside the layout is followed.  A
push writes each blob in ``blobs/sha256/`` under a temporary name and renames it, then rewrites
``index.json`` atomically with the tag's entry replaced, so a reader never sees a half-written layout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from typing import Any, BinaryIO

from unionfs.fs.fsio import HostDir, join
from unionfs.image.blobio import check_digest
from unionfs.image.oci import (
    MAX_DOCUMENT,
    MT_OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    Manifest,
    Platform,
    canonical_json,
    load_json,
    parse_index,
)
from unionfs.image.transfer import LayerRef, Resolved, TransferError, checked, resolve_manifest

LAYOUT_FILE = "oci-layout"
INDEX = "index.json"
BLOBS = "blobs/sha256"
LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'


def blob_rel(digest: str) -> str:
    return join(BLOBS, check_digest(digest))


def read_small(host: HostDir, rel: str, what: str, limit: int = MAX_DOCUMENT) -> bytes:
    try:
        fd = host.open(rel, os.O_RDONLY)
    except FileNotFoundError:
        raise TransferError(f"{what} is missing ({rel})") from None
    except OSError as exc:
        raise TransferError(f"cannot read {what} ({rel}): {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TransferError(f"{what} is larger than {limit} bytes")
    return data


def pick_by_tag(entries: list[Descriptor], tag: str, where: str) -> Descriptor:
    """The index entry named ``tag`` (the only entry when ``tag`` is empty)."""
    if tag:
        found = [e for e in entries if e.annotations.get(REF_NAME) == tag]
        if not found:
            raise TransferError(f"{where}: no image tagged {tag!r}")
        return found[-1]
    if len(entries) != 1:
        raise TransferError(f"{where} holds {len(entries)} images: give a tag ({where}:TAG)")
    return entries[0]


class LayoutSource:
    def __init__(self, path: str, tag: str) -> None:
        self.path = path
        self.tag = tag
        try:
            self.host = HostDir(os.path.realpath(path))
        except OSError as exc:
            raise TransferError(f"oci:{path}: {exc.strerror}") from None

    def close(self) -> None:
        self.host.close()

    def _fetch(self, desc: Descriptor, what: str) -> bytes:
        return checked(read_small(self.host, blob_rel(desc.digest), what), desc, what)

    def resolve(self, platform: Platform) -> Resolved:
        where = f"oci:{self.path}"
        layout = read_small(self.host, LAYOUT_FILE, f"{where}: oci-layout")
        version = load_json(layout, f"{where}: oci-layout").get("imageLayoutVersion")
        if version != "1.0.0":
            raise TransferError(f"{where}: unsupported imageLayoutVersion {version!r}")
        entries = parse_index(read_small(self.host, INDEX, f"{where}: index.json"), f"{where}: index.json")
        entry = pick_by_tag(entries, self.tag, where)
        data = self._fetch(entry, f"{where}: manifest")
        return resolve_manifest(data, self._fetch, platform, f"{where}: manifest {entry.digest[:19]}", entry.digest)

    def has_layer(self, layer: LayerRef) -> bool:
        st = self.host.try_lstat(blob_rel(layer.digest or ""))
        return st is not None

    @contextlib.contextmanager
    def open_layer(self, layer: LayerRef) -> Iterator[BinaryIO]:
        try:
            fd = self.host.open(blob_rel(layer.digest or ""), os.O_RDONLY)
        except OSError as exc:
            raise TransferError(f"{layer.name}: cannot open its blob: {exc.strerror}") from None
        with os.fdopen(fd, "rb", buffering=0) as f:
            yield f  # type: ignore[misc]


class LayoutDestination:
    """Writes into the layout ``path`` (created when missing), under ``tag`` (default ``latest``)."""

    def __init__(self, path: str, tag: str) -> None:
        self.path = path
        self.tag = tag or "latest"
        try:
            os.makedirs(path, exist_ok=True)
            self.host = HostDir(os.path.realpath(path))
            for sub in ("blobs", BLOBS):
                with contextlib.suppress(FileExistsError):
                    self.host.mkdir(sub, 0o755)
        except OSError as exc:
            raise TransferError(f"oci:{path}: cannot create the layout: {exc.strerror}") from None
        self.index: list[dict[str, Any]] = []
        if self.host.try_lstat(INDEX) is not None:
            doc = load_json(read_small(self.host, INDEX, f"oci:{path}: index.json"), f"oci:{path}: index.json")
            self.index = [m for m in doc.get("manifests") or [] if isinstance(m, dict)]

    def has_blob(self, digest: str) -> bool:
        return self.host.try_lstat(blob_rel(digest)) is not None

    def _install(self, write: Any, digest: str) -> None:
        tmp = join(BLOBS, f".tmp-{os.getpid()}-{os.urandom(4).hex()}")
        fd = self.host.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            self.host.rename(tmp, blob_rel(digest))
        except BaseException:
            with contextlib.suppress(OSError):
                self.host.unlink(tmp)
            raise

    def put_blob(self, path: str, digest: str, size: int, *, movable: bool = False) -> None:
        if self.has_blob(digest):
            return
        if movable and self._move(path, digest):
            return

        def copy(f: BinaryIO) -> None:
            with open(path, "rb") as src:  # a file of the store (kept blob or staged export)
                shutil.copyfileobj(src, f, 1 << 20)
        self._install(copy, digest)

    def _move(self, path: str, digest: str) -> bool:
        """Take the staged file ``path`` by a rename into ``blobs/sha256/`` (False across filesystems)."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self.host.dirfd(BLOBS) as dfd:
            try:
                os.rename(path, check_digest(digest), dst_dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    return False
                raise
        return True

    def put_bytes(self, data: bytes, digest: str) -> None:
        if not self.has_blob(digest):
            self._install(lambda f: f.write(data), digest)

    def put_manifest(self, data: bytes, digest: str, manifest: Manifest) -> None:
        self.put_bytes(data, digest)
        desc = Descriptor(MT_OCI_MANIFEST, digest, len(data), {REF_NAME: self.tag})
        self.index = [m for m in self.index
                      if (m.get("annotations") or {}).get(REF_NAME) != self.tag] + [desc.to_json()]
        index = dict(schemaVersion=2, mediaType="application/vnd.oci.image.index.v1+json", manifests=self.index)
        self._replace(LAYOUT_FILE, LAYOUT_VERSION)
        self._replace(INDEX, canonical_json(index))

    def _replace(self, rel: str, data: bytes) -> None:
        tmp = f".{rel}.tmp-{os.getpid()}"
        fd = self.host.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.host.rename(tmp, rel)

    def finish(self) -> None:
        self.host.close()

    def abort(self) -> None:
        self.host.close()

