"""What a pull reads from and a push writes to, whatever the transport.

A :class:`Source` resolves a reference to a :class:`Resolved` image (manifest, config, layer blobs) and
opens layer blobs as streams; a :class:`Destination` takes blobs and finally the manifest.  The transports
(:mod:`unionfs.image.layout`, :mod:`unionfs.image.archive`, :mod:`unionfs.image.registry`) implement them;
:func:`open_source` / :func:`open_destination` pick one from a parsed reference.

Every small document a source hands out (index, manifest, config) has been checked against the digest and
size that named it; layer blobs are checked while they stream (:mod:`unionfs.image.pull`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from unionfs.image.oci import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    Descriptor,
    Manifest,
    OciError,
    Platform,
    choose,
    digest_of,
    document_type,
    load_json,
    parse_index,
)

MAX_INDEX_DEPTH = 4


class TransferError(Exception):
    """A source or destination that cannot be used; ``str()`` is one line meant for the user."""


@dataclass(frozen=True)
class LayerRef:
    """A layer blob of a source: its digest and size where the source declares them (a docker-archive
    declares neither: they are computed), its media type, and a name for messages."""

    digest: str | None
    size: int | None
    media_type: str
    name: str


@dataclass(frozen=True)
class Resolved:
    manifest: bytes | None
    """The manifest's bytes (None for a docker-archive, which has none)."""
    manifest_digest: str | None
    config: bytes
    config_digest: str
    layers: tuple[LayerRef, ...]


class Source(Protocol):
    def resolve(self, platform: Platform) -> Resolved: ...
    def has_layer(self, layer: LayerRef) -> bool: ...
    def open_layer(self, layer: LayerRef) -> AbstractContextManager[BinaryIO]: ...
    def close(self) -> None: ...


class Destination(Protocol):
    def has_blob(self, digest: str) -> bool: ...
    def put_blob(self, path: str, digest: str, size: int, *, movable: bool = False) -> None:
        """Store the blob in host file ``path``; ``movable``: the file is a staged copy that the
        destination may take by renaming it (else it is left as it is)."""

    def put_bytes(self, data: bytes, digest: str) -> None: ...
    def put_manifest(self, data: bytes, digest: str, manifest: Manifest) -> None: ...
    def finish(self) -> None:
        """Make what was written visible (archives are renamed into place here)."""

    def abort(self) -> None: ...


def checked(data: bytes, desc: Descriptor, what: str) -> bytes:
    """``data`` if it has ``desc``'s size and digest; TransferError otherwise."""
    if len(data) != desc.size:
        raise TransferError(f"{what}: size {len(data)} differs from its descriptor's {desc.size}")
    actual = digest_of(data)
    if actual != desc.digest:
        raise TransferError(f"{what}: digest mismatch: expected {desc.digest}, got {actual}")
    return data


def resolve_manifest(data: bytes, fetch: Callable[[Descriptor, str], bytes], platform: Platform,
                     what: str, digest: str | None = None) -> Resolved:
    """From an index or manifest document to a :class:`Resolved` image: an index is followed to the entry
    for ``platform`` (nested indexes too); ``fetch(desc, what)`` returns a document's checked bytes."""
    for _ in range(MAX_INDEX_DEPTH):
        media_type = document_type(load_json(data, what))
        if media_type in INDEX_TYPES:
            entry = choose(parse_index(data, what), platform, what)
            if entry.media_type not in (*INDEX_TYPES, *MANIFEST_TYPES):
                raise OciError(f"{what}: entry of type {entry.media_type!r} is not a manifest")
            data, digest, what = fetch(entry, f"manifest {entry.digest[:19]}"), entry.digest, \
                f"manifest {entry.digest[:19]}"
            continue
        manifest = Manifest.parse(data, what)
        config = fetch(manifest.config, f"config {manifest.config.digest[:19]}")
        layers = tuple(LayerRef(d.digest, d.size, d.media_type, f"layer {d.digest[7:19]}") for d in manifest.layers)
        return Resolved(data, digest or digest_of(data), config, manifest.config.digest, layers)
    raise OciError(f"{what}: indexes nested deeper than {MAX_INDEX_DEPTH}")
