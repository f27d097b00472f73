"""``unionfs pull``: an image from a :class:`unionfs.image.transfer.Source` into the store.

Each layer blob is read once: its bytes are hashed and sized against the manifest's descriptor, copied to a
staged blob file, decompressed (gzip, zstd or none, sniffed), hashed again (the diff_id, checked against the
config) and unpacked by :class:`unionfs.image.tarlayer.Extractor` into a staging dir of the store; memory
stays flat whatever the layer's size.  Everything is staged in ``STORE/tmp/`` first; only when every layer
has been verified are the trees published (renamed to ``layers/<xxh3>``), the blobs kept (renamed to
``blobs/sha256/``) and the image written.  Any failure — a digest mismatch, a truncated or oversized blob, a
hostile tar, a manifest naming a missing blob — discards the staging and leaves the store as it was.

A blob pulled before (the same sha256 and a layer still in the store) is not read again; a layer whose tree
the store already has (same xxh3) is not stored twice.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from dataclasses import dataclass

from unionfs.fs.fsio import HostDir
from unionfs.image.blobio import CHUNK, BlobError, DigestReader, Prefetched, decompressed
from unionfs.image.digest import scan
from unionfs.image.oci import (
    LAYER_TYPES,
    MT_OCI_CONFIG,
    Config,
    Descriptor,
    OciError,
    Platform,
    build_manifest,
    digest_of,
)
from unionfs.image.ocistore import ImageRecord, LayerForm, OciRecords
from unionfs.image.records import Image, LayerMeta
from unionfs.image.store import Store, check_name, short
from unionfs.image.tarlayer import Extractor, LayerError
from unionfs.image.transfer import LayerRef, Source, TransferError
from unionfs.progress import Progress


class PullError(Exception):
    """A pull that failed (nothing was stored); ``str()`` is one line meant for the user."""


@dataclass(frozen=True)
class PullResult:
    image: Image
    manifest_digest: str
    config_digest: str
    layers: int
    new_layers: int
    downloaded: int
    seconds: float


@dataclass
class _Staged:
    layer: str
    form: LayerForm
    meta: LayerMeta | None = None
    tree: str | None = None
    blob: str | None = None


def _stage_layer(store: Store, records: OciRecords, source: Source, ref: LayerRef, diff_id: str,
                 parent: str | None, progress: Progress, into: list[_Staged]) -> _Staged:
    """Read, verify and unpack one layer into the staging dir; appended to ``into`` at once, so that the
    caller discards its staging whatever happens."""
    staged = _Staged("", LayerForm(diff_id, "", 0, "", ""))
    into.append(staged)
    staged.tree = store.new_staging("pull")
    staged.blob, blob_file = records.new_blob_file()
    tree_path = os.path.join(store.root, staged.tree)
    with blob_file, source.open_layer(ref) as raw:
        outer = DigestReader(raw, size=ref.size, what=ref.name, tee=blob_file,  # type: ignore[arg-type]
                             progress=lambda n: progress.advance(0, n))
        inner, compression = decompressed(outer, what=ref.name)  # type: ignore[arg-type]
        tar = DigestReader(inner, what=f"{ref.name} (uncompressed tar)")
        ahead = Prefetched(tar)  # reading, decompressing and hashing run beside the unpacking
        host = HostDir(tree_path)
        extractor = Extractor(host)
        try:
            extractor.run(io.BufferedReader(ahead, CHUNK))  # type: ignore[arg-type]
            ahead.finish()
        finally:
            ahead.stop()
            host.close()
        actual_diff_id = tar.finish()
        if actual_diff_id != diff_id:
            raise PullError(f"{ref.name}: diff_id mismatch: the config says {diff_id}, the tar is "
                            f"{actual_diff_id}")
        blob_digest = outer.finish(expected=ref.digest)
        blob_file.flush()
        os.fsync(blob_file.fileno())
    media_type = ref.media_type if ref.digest else LAYER_TYPES[compression]
    staged.form = LayerForm(diff_id, blob_digest, outer.count, media_type, compression)
    host = HostDir(tree_path)
    try:
        manifest = scan(host, known=extractor.hashes)  # file contents were hashed as they were written
    finally:
        host.close()
    staged.layer = manifest.digest
    staged.meta = LayerMeta.from_manifest(manifest, parent=parent, created_by=f"unionfs pull ({ref.name})",
                                          comment="")
    progress.advance(1, 0)
    return staged


def pull(store: Store, source: Source, *, name: str, platform: Platform | None = None,
         progress: Progress | None = None) -> PullResult:
    """Pull the image ``source`` resolves to (for ``platform``, default the host's) as image ``name``."""
    check_name(name)
    progress = progress or Progress()
    platform = platform or Platform.host()
    started = time.monotonic()
    staged: list[_Staged] = []
    try:
        with store.locked():
            records = OciRecords(store)
            try:
                resolved = source.resolve(platform)
                config = Config.parse(resolved.config, f"config {resolved.config_digest[:19]}")
            except (OciError, BlobError) as exc:
                raise PullError(str(exc)) from None
            if len(config.diff_ids) != len(resolved.layers):
                raise PullError(f"the manifest has {len(resolved.layers)} layers, the config "
                                f"{len(config.diff_ids)} diff_ids")
            for ref in resolved.layers:
                if not source.has_layer(ref):
                    raise PullError(f"the manifest names a missing blob {ref.digest or ref.name}")
            total = sum(r.size or 0 for r in resolved.layers)
            progress.phase("pulling", files=len(resolved.layers), nbytes=total or None)
            downloaded = 0
            parent: str | None = None
            for ref, diff_id in zip(resolved.layers, config.diff_ids, strict=True):
                known = records.layer_for_blob(ref.digest) if ref.digest else None
                if known is not None and known[1].diff_id == diff_id:
                    staged.append(_Staged(known[0], known[1]))
                    progress.advance(1, ref.size or 0)
                else:
                    try:
                        one = _stage_layer(store, records, source, ref, diff_id, parent, progress, staged)
                    except (BlobError, LayerError, OciError) as exc:
                        raise PullError(str(exc)) from None
                    except OSError as exc:
                        raise PullError(f"{ref.name}: {exc.strerror or exc}") from None
                    downloaded += one.form.size
                parent = staged[-1].layer
            progress.done()
            # every layer is verified: publish
            new_layers = 0
            for one in staged:
                if one.tree is not None and one.meta is not None:
                    if store.has_layer(one.layer):
                        store.discard(one.tree)
                    else:
                        new_layers += store.publish_layer(one.tree, one.meta)
                    one.tree = None
                if one.blob is not None:
                    records.publish_blob(one.blob, one.form.digest)
                    one.blob = None
                records.add_form(one.layer, one.form)
            records.put_bytes(resolved.config, resolved.config_digest)
            manifest = resolved.manifest
            if manifest is None:  # a docker-archive: the manifest of what was read
                manifest = build_manifest(
                    Descriptor(MT_OCI_CONFIG, resolved.config_digest, len(resolved.config)),
                    [Descriptor(s.form.media_type, s.form.digest, s.form.size) for s in staged])
            manifest_digest = resolved.manifest_digest or digest_of(manifest)
            records.put_bytes(manifest, manifest_digest)
            layers = tuple(s.layer for s in staged)
            image = Image(name, layers, config.history_entries(layers), config.run, config.created)
            store.put_image(image)
            records.put_image_record(name, ImageRecord(image.id, manifest_digest, len(manifest),
                                                       resolved.config_digest, tuple(s.form for s in staged)))
    except TransferError as exc:
        raise PullError(str(exc)) from None
    finally:
        progress.done()
        for one in staged:
            for rel in (one.tree, one.blob):
                if rel is not None:
                    with contextlib.suppress(OSError):
                        store.discard(rel)
    return PullResult(image, manifest_digest, resolved.config_digest, len(layers), new_layers, downloaded,
                      time.monotonic() - started)


def describe(result: PullResult) -> str:
    return (f"{result.image.name} {result.manifest_digest} ({result.layers} layers, {result.new_layers} new, "
            f"id {short(result.image.id)})")
