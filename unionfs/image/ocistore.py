"""The store's sha256 side: kept blobs, the tar forms of each layer, and each image's manifest.

Additions to the layout of :mod:`unionfs.image.store`::

    blobs/sha256/<hex>          blobs kept as they were pulled (compressed layers, configs, manifests), so a
                                layer pulled and pushed unchanged keeps its digest
    oci/layers/<xxh3>.json      {"forms": [LayerForm…]}: the tars known to hold that layer (diff_id, blob
                                digest, size, media type, compression)
    oci/blobs/<hex>.json        {"layer": xxh3, …}: which stored layer a pulled blob unpacked to (a blob pulled
                                again is not downloaded again)
    oci/images/<name>.json      :class:`ImageRecord`: the manifest and config digests of the image as last
                                pulled or pushed, valid while the image's id is the one recorded

Writes use the store's own atomic json writes and staging dir; blobs are written in ``tmp/``, fsynced and
renamed into ``blobs/sha256/``.  Callers hold the store lock.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

from unionfs.fs.fsio import join
from unionfs.image.blobio import check_digest
from unionfs.image.store import TMP, Store, StoreError, check_name

BLOBS = "blobs/sha256"
OCI = "oci"
OCI_LAYERS = "oci/layers"
OCI_BLOBS = "oci/blobs"
OCI_IMAGES = "oci/images"


@dataclass(frozen=True)
class LayerForm:
    """One tar of a layer: the uncompressed tar's sha256 (``diff_id``) and the blob as stored."""

    diff_id: str
    digest: str
    size: int
    media_type: str
    compression: str


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    manifest: str
    manifest_size: int
    config: str
    layers: tuple[LayerForm, ...]

    def to_json(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "manifest": self.manifest, "manifest_size": self.manifest_size,
                "config": self.config, "layers": [asdict(f) for f in self.layers]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRecord:
        return cls(str(data["image_id"]), str(data["manifest"]), int(data["manifest_size"]), str(data["config"]),
                   tuple(LayerForm(**f) for f in data["layers"]))


class OciRecords:
    """The sha256 side of ``store`` (opened writable by the caller)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        host = store._host()
        if store.writable:
            for sub in ("blobs", BLOBS, OCI, OCI_LAYERS, OCI_BLOBS, OCI_IMAGES):
                with contextlib.suppress(FileExistsError):
                    host.mkdir(sub, 0o755)

    # -- blobs -----------------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> str:
        return os.path.join(self.store.root, BLOBS, check_digest(digest))

    def has_blob(self, digest: str) -> bool:
        host = self.store.host
        return host is not None and host.try_lstat(join(BLOBS, check_digest(digest))) is not None

    def open_blob(self, digest: str) -> BinaryIO:
        fd = self.store._host().open(join(BLOBS, check_digest(digest)), os.O_RDONLY)
        return os.fdopen(fd, "rb")

    def read_blob(self, digest: str) -> bytes:
        with self.open_blob(digest) as f:
            return f.read()

    def new_blob_file(self) -> tuple[str, BinaryIO]:
        """A new empty file in the staging dir: (store-relative path, file open for writing)."""
        rel = join(TMP, f"blob-{os.getpid()}-{os.urandom(6).hex()}")
        fd = self.store._host().open(rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        return rel, os.fdopen(fd, "wb")

    def publish_blob(self, rel: str, digest: str) -> None:
        """Move the staged (and fsynced) blob ``rel`` to ``blobs/sha256/`` (dropped if that blob is there)."""
        host = self.store._host()
        final = join(BLOBS, check_digest(digest))
        if host.try_lstat(final) is not None:
            host.unlink(rel)
            return
        host.rename(rel, final)
        self.store._fsync_dir(BLOBS)

    def put_bytes(self, data: bytes, digest: str) -> None:
        """Keep a small blob (a config or manifest) whose digest the caller computed."""
        if self.has_blob(digest):
            return
        rel, f = self.new_blob_file()
        try:
            with f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.publish_blob(rel, digest)
        except BaseException:
            with contextlib.suppress(OSError):
                self.store._host().unlink(rel)
            raise

    # -- layers ----------------------------------------------------------------------------------------
    def forms(self, layer: str) -> list[LayerForm]:
        try:
            data = self.store._read_json(join(OCI_LAYERS, layer + ".json"))
            return [LayerForm(**f) for f in data.get("forms", [])]
        except (FileNotFoundError, StoreError):
            return []
        except (OSError, ValueError, TypeError):
            return []

    def add_form(self, layer: str, form: LayerForm) -> None:
        forms = self.forms(layer)
        if form not in forms:
            forms.append(form)
            self.store._write_json(join(OCI_LAYERS, layer + ".json"), {"forms": [asdict(f) for f in forms]})
        self.store._write_json(join(OCI_BLOBS, check_digest(form.digest) + ".json"),
                               {"layer": layer, **asdict(form)})

    def layer_for_blob(self, digest: str) -> tuple[str, LayerForm] | None:
        """The stored layer a kept blob unpacked to, with its form (None if unknown or gone)."""
        try:
            data = self.store._read_json(join(OCI_BLOBS, check_digest(digest) + ".json"))
            layer = str(data.pop("layer"))
            form = LayerForm(**data)
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if not self.store.has_layer(layer) or not self.has_blob(digest):
            return None
        return layer, form

    def kept_form(self, layer: str, compression: str | None) -> LayerForm | None:
        """A form of ``layer`` whose blob is kept (of ``compression``, any when None)."""
        for form in self.forms(layer):
            if (compression is None or form.compression == compression) and self.has_blob(form.digest):
                return form
        return None

    # -- images ----------------------------------------------------------------------------------------
    def image_record(self, name: str, image_id: str) -> ImageRecord | None:
        """The record of image ``name`` if it still describes that image (same id)."""
        check_name(name)
        try:
            record = ImageRecord.from_json(self.store._read_json(join(OCI_IMAGES, name + ".json")))
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return record if record.image_id == image_id else None

    def put_image_record(self, name: str, record: ImageRecord) -> None:
        check_name(name)
        self.store._write_json(join(OCI_IMAGES, name + ".json"), record.to_json())

    def remove_image_record(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.store._host().unlink(join(OCI_IMAGES, check_name(name) + ".json"))

    # -- gc --------------------------------------------------------------------------------------------
    def gc(self, *, dry_run: bool = False) -> list[str]:
        """Remove blobs and records of layers that are gone and images that are gone; the blob digests
        removed.  The caller holds the store lock exclusively."""
        host = self.store._host()
        images = {img.name: img for img in self.store.images()}
        keep: set[str] = set()
        for name, _k, _i in host.scandir(OCI_IMAGES):
            image = images.get(name[:-5]) if name.endswith(".json") else None
            record = self.image_record(image.name, image.id) if image is not None else None
            if record is None:
                if not dry_run:
                    host.unlink(join(OCI_IMAGES, name))
                continue
            keep.update((record.manifest, record.config))
        for name, _k, _i in host.scandir(OCI_LAYERS):
            layer = name[:-5]
            if self.store.has_layer(layer):
                keep.update(f.digest for f in self.forms(layer))
            elif not dry_run:
                host.unlink(join(OCI_LAYERS, name))
        removed = []
        for name, _k, _i in host.scandir(BLOBS):
            digest = f"sha256:{name}"
            if digest in keep:
                continue
            removed.append(digest)
            if not dry_run:
                host.remove_tree(join(BLOBS, name))
                with contextlib.suppress(FileNotFoundError):
                    host.unlink(join(OCI_BLOBS, name + ".json"))
        return sorted(removed)
