"""Image archives: ``oci-archive`` (an OCI layout in a tar) and ``docker-archive`` (``docker save``).

Reading opens the archive as an uncompressed tar with random access: members are found by name and read in
place, nothing is unpacked to disk.  A ``docker-archive`` is read through its ``manifest.json`` (``Config``,
``RepoTags``, ``Layers``); its layers carry no digests, so the pull computes them and checks the diff_ids of
the config (whose file name, ``<hex>.json``, must be its own sha256 where it has that form).

Writing produces one tar that every consumer reads: an OCI layout (``oci-layout``, ``index.json``,
``blobs/sha256/…``) and, for ``docker-archive``, also the ``manifest.json`` of ``docker load`` with
``Config``/``Layers`` pointing into ``blobs/sha256/`` (the form Docker ≥ 25 writes).  Members are written in
a fixed order with fixed attributes (mode 0644, owner 0:0, mtime 0), so the same image gives the same
archive.  The archive is written next to its final name and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from unionfs.image.layout import LAYOUT_FILE, LAYOUT_VERSION, pick_by_tag
from unionfs.image.oci import (
    MAX_DOCUMENT,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    Manifest,
    Platform,
    canonical_json,
    digest_of,
    load_json,
    parse_index,
)
from unionfs.image.transfer import LayerRef, Resolved, TransferError, checked, resolve_manifest

_HEX_JSON = re.compile(r"(?:.*/)?([0-9a-f]{64})(?:\.json)?")
_CHUNK = 1 << 20


def _clean(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


class _Archive:
    """A tar file read in place: members by cleaned name."""

    def __init__(self, path: str, what: str) -> None:
        self.what = what
        try:
            self.tar = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            raise TransferError(f"{what}: no such file") from None
        except IsADirectoryError:
            raise TransferError(f"{what}: is a directory, not an archive") from None
        except OSError as exc:
            raise TransferError(f"{what}: {exc.strerror}") from None
        except tarfile.TarError:
            raise TransferError(f"{what}: not an uncompressed tar archive (decompress it first)") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            for member in self.tar.getmembers():
                self.members[_clean(member.name)] = member
        except (tarfile.TarError, EOFError) as exc:
            self.tar.close()
            raise TransferError(f"{what}: broken archive ({exc})") from None

    def close(self) -> None:
        self.tar.close()

    def exists(self, name: str) -> bool:
        member = self.members.get(_clean(name))
        return member is not None and (member.isreg() or member.issym() or member.islnk())

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        member = self.members.get(_clean(name))
        if member is None:
            raise TransferError(f"{self.what}: {name} is missing")
        try:
            f = self.tar.extractfile(member)
        except (KeyError, tarfile.TarError) as exc:
            raise TransferError(f"{self.what}: cannot read {name} ({exc})") from None
        if f is None:
            raise TransferError(f"{self.what}: {name} is not a file")
        with f:
            yield f  # type: ignore[misc]

    def read_small(self, name: str, what: str) -> bytes:
        with self.open(name) as f:
            data = f.read(MAX_DOCUMENT + 1)
        if len(data) > MAX_DOCUMENT:
            raise TransferError(f"{what} is larger than {MAX_DOCUMENT} bytes")
        return data


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.partition(":")[2]


class OciArchiveSource:
    def __init__(self, path: str, tag: str) -> None:
        self.where = f"oci-archive:{path}"
        self.tag = tag
        self.archive = _Archive(path, self.where)

    def close(self) -> None:
        self.archive.close()

    def _fetch(self, desc: Descriptor, what: str) -> bytes:
        return checked(self.archive.read_small(_blob_name(desc.digest), what), desc, what)

    def resolve(self, platform: Platform) -> Resolved:
        layout = load_json(self.archive.read_small(LAYOUT_FILE, f"{self.where}: oci-layout"), "oci-layout")
        if layout.get("imageLayoutVersion") != "1.0.0":
            raise TransferError(f"{self.where}: unsupported imageLayoutVersion")
        index = self.archive.read_small("index.json", f"{self.where}: index.json")
        entry = pick_by_tag(parse_index(index, f"{self.where}: index.json"), self.tag, self.where)
        data = self._fetch(entry, f"{self.where}: manifest")
        return resolve_manifest(data, self._fetch, platform, f"{self.where}: manifest {entry.digest[:19]}",
                                entry.digest)

    def has_layer(self, layer: LayerRef) -> bool:
        return self.archive.exists(_blob_name(layer.digest or ""))

    def open_layer(self, layer: LayerRef) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.archive.open(_blob_name(layer.digest or ""))


class DockerArchiveSource:
    """``docker-archive:FILE[:NAME:TAG]``: the image tagged NAME:TAG, or the only image of the archive."""

    def __init__(self, path: str, name_tag: str) -> None:
        self.where = f"docker-archive:{path}"
        self.name_tag = name_tag
        self.archive = _Archive(path, self.where)

    def close(self) -> None:
        self.archive.close()

    def _entry(self) -> dict[str, Any]:
        data = self.archive.read_small("manifest.json", f"{self.where}: manifest.json")
        try:
            entries = json.loads(data)
        except ValueError as exc:
            raise TransferError(f"{self.where}: manifest.json is not valid JSON ({exc})") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) or not entries:
            raise TransferError(f"{self.where}: manifest.json lists no images")
        if self.name_tag:
            found = [e for e in entries if self.name_tag in (e.get("RepoTags") or [])
                     or f"localhost/{self.name_tag}" in (e.get("RepoTags") or [])]
            if not found:
                raise TransferError(f"{self.where}: no image tagged {self.name_tag!r}")
            chosen: dict[str, Any] = found[0]
            return chosen
        if len(entries) != 1:
            raise TransferError(f"{self.where} holds {len(entries)} images: give NAME:TAG")
        only: dict[str, Any] = entries[0]
        return only

    def resolve(self, platform: Platform) -> Resolved:
        entry = self._entry()
        config_name, layers = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layers, list) or \
                not all(isinstance(name, str) for name in layers):
            raise TransferError(f"{self.where}: manifest.json entry without Config or Layers")
        config = self.archive.read_small(config_name, f"{self.where}: config")
        digest = digest_of(config)
        named = _HEX_JSON.fullmatch(config_name)
        if named and f"sha256:{named.group(1)}" != digest:
            raise TransferError(f"{self.where}: config {config_name} does not match its digest ({digest})")
        refs = []
        for i, name in enumerate(layers):
            member = self.archive.members.get(_clean(name))
            size = member.size if member is not None and member.isreg() else None
            refs.append(LayerRef(None, size, "", f"layer {i} ({name})"))
        return Resolved(None, None, config, digest, tuple(refs))

    def _layer_name(self, layer: LayerRef) -> str:
        return layer.name.partition("(")[2][:-1]

    def has_layer(self, layer: LayerRef) -> bool:
        return self.archive.exists(self._layer_name(layer))

    def open_layer(self, layer: LayerRef) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.archive.open(self._layer_name(layer))


class ArchiveDestination:
    """Writes ``oci-archive`` (``docker=False``) or the dual ``docker-archive`` form to ``path``."""

    def __init__(self, path: str, *, tag: str, docker: bool, repo_tag: str = "") -> None:
        self.path = os.path.abspath(path)
        self.tag = tag
        self.docker = docker
        self.repo_tag = repo_tag
        self.tmp = os.path.join(os.path.dirname(self.path), f".{os.path.basename(self.path)}.tmp-{os.getpid()}")
        self.blobs: set[str] = set()
        self.manifest: tuple[bytes, str, Manifest] | None = None
        try:
            self.file = open(self.tmp, "xb")  # noqa: SIM115 - closed in finish/abort
        except OSError as exc:
            raise TransferError(f"cannot write {path}: {exc.strerror}") from None
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        for name in ("blobs", "blobs/sha256"):
            self.tar.addfile(self._info(name, 0, tarfile.DIRTYPE))

    @staticmethod
    def _info(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = size
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        info.mtime = 0
        info.uname = info.gname = ""
        return info

    def has_blob(self, digest: str) -> bool:
        return digest in self.blobs

    def put_blob(self, path: str, digest: str, size: int, *, movable: bool = False) -> None:
        if digest in self.blobs:
            return
        with open(path, "rb") as src:  # a file of the store (kept blob or staged export)
            self.tar.addfile(self._info(_blob_name(digest), size), src)
        self.blobs.add(digest)

    def _add_bytes(self, name: str, data: bytes) -> None:
        self.tar.addfile(self._info(name, len(data)), io.BytesIO(data))

    def put_bytes(self, data: bytes, digest: str) -> None:
        if digest not in self.blobs:
            self._add_bytes(_blob_name(digest), data)
            self.blobs.add(digest)

    def put_manifest(self, data: bytes, digest: str, manifest: Manifest) -> None:
        self.put_bytes(data, digest)
        self.manifest = (data, digest, manifest)

    def finish(self) -> None:
        if self.manifest is None:  # pragma: no cover - push always writes a manifest
            raise TransferError("nothing to write")
        data, digest, manifest = self.manifest
        annotations = {REF_NAME: self.tag}
        if self.docker and self.repo_tag:
            annotations["io.containerd.image.name"] = self.repo_tag
        index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
                 "manifests": [Descriptor(MT_OCI_MANIFEST, digest, len(data), annotations).to_json()]}
        self._add_bytes(LAYOUT_FILE, LAYOUT_VERSION)
        self._add_bytes("index.json", canonical_json(index))
        if self.docker:
            entry = {"Config": _blob_name(manifest.config.digest),
                     "RepoTags": [self.repo_tag] if self.repo_tag else [],
                     "Layers": [_blob_name(d.digest) for d in manifest.layers]}
            self._add_bytes("manifest.json", canonical_json([entry]))
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.rename(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(OSError, tarfile.TarError):
            self.tar.close()
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
