"""``unionfs push``: an image of the store to a :class:`unionfs.image.transfer.Destination`.

Per layer, in order:

* a blob the store kept from a pull (``blobs/sha256/``) is sent as it is — so an image pulled and pushed
  unchanged keeps every digest, its config and its manifest, byte for byte — unless ``compression`` asks
  for another compression than the kept blob has;
* otherwise the layer's canonical tar (:func:`unionfs.image.tarlayer.write_tar`) is written once through
  sha256 (diff_id) → compressor → sha256 (blob digest) into a staged file in ``STORE/tmp/`` and sent from
  there.  The canonical tar, a fixed gzip header and canonical JSON make a second push of the same image give
  the same digests.

The config is the original one (kept from the pull) while the image is unchanged — with new diff_ids
where its layers are sent as other tars (another compression) —, else built from the image
(:func:`unionfs.image.oci.build_config`; times clamped to ``SOURCE_DATE_EPOCH`` when set).  The manifest
and config are kept in the store and recorded, so ``unionfs images`` shows the manifest digest.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

from unionfs.image.blobio import DigestWriter, Pipelined, compressor
from unionfs.image.oci import (
    LAYER_TYPES,
    MT_OCI_CONFIG,
    MT_OCI_MANIFEST,
    Descriptor,
    Manifest,
    build_config,
    build_manifest,
    canonical_json,
    digest_of,
    load_json,
)
from unionfs.image.ocistore import ImageRecord, LayerForm, OciRecords
from unionfs.image.records import Image
from unionfs.image.store import Store
from unionfs.image.tarlayer import export, source_date_epoch
from unionfs.image.transfer import Destination
from unionfs.progress import Progress

DEFAULT_COMPRESSION = "gzip"


class PushError(Exception):
    """A push that failed; ``str()`` is one line meant for the user."""


@dataclass(frozen=True)
class PushResult:
    image: Image
    manifest_digest: str
    config_digest: str
    layers: int
    reused: int
    """Layers sent as the blob kept from a pull."""
    seconds: float


def export_layer(store: Store, records: OciRecords, layer: str, compression: str, clamp: int | None,
                 progress: Progress) -> tuple[LayerForm, str]:
    """The canonical blob of ``layer`` in a staged file: (its form, the file's store-relative path)."""
    rel, f = records.new_blob_file()
    try:
        with f:
            blob = DigestWriter(f, progress=lambda n: progress.advance(0, n))  # type: ignore[arg-type]
            if compression == "none":  # the blob is the tar
                export(store.layer_path(layer), blob, clamp=clamp)  # type: ignore[arg-type]
                return LayerForm(blob.digest, blob.digest, blob.count, LAYER_TYPES["none"], "none"), rel
            packer = compressor(blob, compression)  # type: ignore[arg-type]
            # gzip compresses on a thread pool of its own; zstd runs on a thread beside the tar writer
            pipe = Pipelined(packer) if compression == "zstd" else None
            tar = DigestWriter(pipe or packer)  # type: ignore[arg-type]
            try:
                export(store.layer_path(layer), tar, clamp=clamp)  # type: ignore[arg-type]
            finally:
                if pipe is not None:
                    pipe.finish()
            packer.finish()
    except BaseException:
        with contextlib.suppress(OSError):
            store.discard(rel)
        raise
    return LayerForm(tar.digest, blob.digest, blob.count, LAYER_TYPES[compression], compression), rel


def push(store: Store, name: str, dest: Destination, *, compression: str | None = None,
         progress: Progress | None = None) -> PushResult:
    """Push image ``name`` to ``dest``; ``compression`` None keeps kept blobs as they are and writes new
    layers with gzip."""
    progress = progress or Progress()
    started = time.monotonic()
    clamp = source_date_epoch()
    image = store.image(name)
    staged: list[str] = []
    with store.locked():
        records = OciRecords(store)
        record = records.image_record(name, image.id)
        forms: list[LayerForm] = []
        reused = 0
        try:
            progress.phase("pushing", files=len(image.layers))
            for i, layer in enumerate(image.layers):
                if not store.has_layer(layer):
                    raise PushError(f"image {name!r}: layer {layer[:12]} is missing")
                form = None
                if record is not None and len(record.layers) == len(image.layers):
                    kept = record.layers[i]
                    if (compression is None or kept.compression == compression) and records.has_blob(kept.digest):
                        form = kept
                form = form or records.kept_form(layer, compression)
                movable = form is None
                if form is not None:
                    reused += 1
                    path = records.blob_path(form.digest)
                else:
                    form, rel = export_layer(store, records, layer, compression or DEFAULT_COMPRESSION, clamp,
                                             progress)
                    staged.append(rel)
                    path = os.path.join(store.root, rel)
                if not dest.has_blob(form.digest):
                    dest.put_blob(path, form.digest, form.size, movable=movable)
                forms.append(form)
                progress.advance(1, 0)
            config, manifest = _documents(records, record, image, forms, clamp)
            config_digest, manifest_digest = digest_of(config), digest_of(manifest)
            dest.put_bytes(config, config_digest)
            dest.put_manifest(manifest, manifest_digest, Manifest.parse(manifest))
            dest.finish()
        except BaseException:
            dest.abort()
            raise
        finally:
            progress.done()
            for rel in staged:
                with contextlib.suppress(OSError):
                    store.discard(rel)
        records.put_bytes(config, config_digest)
        records.put_bytes(manifest, manifest_digest)
        records.put_image_record(name, ImageRecord(image.id, manifest_digest, len(manifest), config_digest,
                                                   tuple(forms)))
    return PushResult(image, manifest_digest, config_digest, len(forms), reused, time.monotonic() - started)


def _documents(records: OciRecords, record: ImageRecord | None, image: Image, forms: list[LayerForm],
               clamp: int | None) -> tuple[bytes, bytes]:
    """The config and manifest to push: the recorded ones where they still describe these layers (the same
    diff_ids, for the config; the same blobs and an OCI manifest, for the manifest), else new ones."""
    config = None
    if record is not None and records.has_blob(record.config):
        config = records.read_blob(record.config)
        if [f.diff_id for f in record.layers] != [f.diff_id for f in forms]:
            # the same image in other tars (another compression): the original config, new diff_ids
            doc = load_json(config, "config")
            doc["rootfs"] = {"type": "layers", "diff_ids": [f.diff_id for f in forms]}
            config = canonical_json(doc)
        elif tuple(forms) == record.layers and records.has_blob(record.manifest):
            manifest = records.read_blob(record.manifest)
            if load_json(manifest, "manifest").get("mediaType") == MT_OCI_MANIFEST:
                return config, manifest
    if config is None:
        config = build_config(image.config, [f.diff_id for f in forms], image.history, image.created, clamp=clamp)
    layers = [Descriptor(LAYER_TYPES[f.compression], f.digest, f.size) for f in forms]
    manifest = build_manifest(Descriptor(MT_OCI_CONFIG, digest_of(config), len(config)), layers)
    return config, manifest

