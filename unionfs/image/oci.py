"""OCI image documents: descriptors, manifests, indexes and configs (opencontainers/image-spec).

Reading accepts the OCI and the Docker schema-2 media types (manifest, manifest list, config, layers);
writing always uses the OCI ones (umoci refuses the Docker ones).  Every parse checks what later steps rely
on (digest syntax, sizes, one config, a diff_id per layer) and raises :class:`OciError` with one line.
Documents we write are canonical JSON (sorted keys, no spaces), so the same image gives the same digests.
"""

from __future__ import annotations

import hashlib
import json
import platform as platform_mod
from dataclasses import dataclass, field
from typing import Any

from unionfs.image.blobio import BlobError, check_digest, sha256_digest
from unionfs.image.records import HistoryEntry, ImageConfig

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
CONFIG_TYPES = (MT_OCI_CONFIG, MT_DOCKER_CONFIG)
REF_NAME = "org.opencontainers.image.ref.name"
MAX_DOCUMENT = 4 << 20
"""The largest manifest, index or config read (registries refuse bigger manifests too)."""

LAYER_TYPES = {"none": MT_OCI_LAYER, "gzip": MT_OCI_LAYER + "+gzip", "zstd": MT_OCI_LAYER + "+zstd"}
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


class OciError(Exception):
    """An image document that cannot be used; ``str()`` is one line meant for the user."""


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest_of(data: bytes) -> str:
    return sha256_digest(hashlib.sha256(data).hexdigest())


def layer_compression(media_type: str) -> str | None:
    """``gzip``/``zstd``/``none`` for a layer media type, None for a type that is not a layer we read."""
    if media_type in (MT_OCI_LAYER, MT_DOCKER_LAYER):
        return "none"
    if media_type in (MT_OCI_LAYER + "+gzip", MT_DOCKER_LAYER + ".gzip"):
        return "gzip"
    if media_type in (MT_OCI_LAYER + "+zstd", MT_DOCKER_LAYER + ".zstd"):
        return "zstd"
    return None


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``OS/ARCH[/VARIANT]`` (e.g. ``linux/arm64/v8``); OciError otherwise."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise OciError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> Platform:
        machine = platform_mod.machine()
        return cls("linux", _ARCH.get(machine, machine))

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, data: dict[str, Any]) -> bool:
        if data.get("os") != self.os or data.get("architecture") != self.architecture:
            return False
        return not self.variant or data.get("variant", "") == self.variant


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False)
    platform: dict[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, data: Any, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise OciError(f"{what}: a descriptor is not a JSON object")
        digest, size, media_type = data.get("digest"), data.get("size"), data.get("mediaType", "")
        if not isinstance(digest, str) or not isinstance(size, int) or size < 0 or not isinstance(media_type, str):
            raise OciError(f"{what}: descriptor without a valid digest, size or mediaType")
        try:
            check_digest(digest)
        except BlobError as exc:
            raise OciError(f"{what}: {exc}") from None
        annotations = data.get("annotations") or {}
        plat = data.get("platform")
        return cls(media_type, digest, size, dict(annotations) if isinstance(annotations, dict) else {},
                   plat if isinstance(plat, dict) else None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out


def load_json(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_DOCUMENT:
        raise OciError(f"{what} is larger than {MAX_DOCUMENT} bytes")
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OciError(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise OciError(f"{what} is not a JSON object")
    return parsed


def document_type(data: dict[str, Any]) -> str:
    """The media type a manifest or index says it is (guessed from its fields where it says nothing)."""
    media_type = data.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    return MT_OCI_INDEX if "manifests" in data else MT_OCI_MANIFEST


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, data: bytes, what: str = "manifest") -> Manifest:
        doc = load_json(data, what)
        media_type = document_type(doc)
        if media_type not in MANIFEST_TYPES or doc.get("schemaVersion") != 2:
            raise OciError(f"{what}: unsupported manifest type {media_type!r} (schema 2 OCI or Docker only)")
        config = Descriptor.from_json(doc.get("config"), f"{what} config")
        if config.media_type not in CONFIG_TYPES:
            raise OciError(f"{what}: config of type {config.media_type!r} is not an image config")
        layers_doc = doc.get("layers")
        if not isinstance(layers_doc, list):
            raise OciError(f"{what}: no layer list")
        layers = tuple(Descriptor.from_json(d, f"{what} layer {i}") for i, d in enumerate(layers_doc))
        for i, layer in enumerate(layers):
            if layer_compression(layer.media_type) is None:
                raise OciError(f"{what}: layer {i} has unsupported media type {layer.media_type!r}")
        return cls(media_type, config, layers)


def parse_index(data: bytes, what: str = "index") -> list[Descriptor]:
    doc = load_json(data, what)
    items = doc.get("manifests")
    if not isinstance(items, list):
        raise OciError(f"{what}: no manifest list")
    return [Descriptor.from_json(d, f"{what} entry {i}") for i, d in enumerate(items)]


def _platform_name(data: dict[str, Any]) -> str:
    return str(Platform(str(data.get("os", "?")), str(data.get("architecture", "?")), str(data.get("variant", ""))))


def choose(entries: list[Descriptor], platform: Platform, what: str) -> Descriptor:
    """The entry of an index for ``platform`` (an entry without a platform matches when it is the only
    one)."""
    found = [e for e in entries if e.platform is not None and platform.matches(e.platform)]
    if found:
        return found[0]
    if len(entries) == 1 and entries[0].platform is None:
        return entries[0]
    have = ", ".join(sorted({_platform_name(e.platform) for e in entries if e.platform})) or "none"
    raise OciError(f"{what}: no image for platform {platform} (has: {have}); choose one with --platform")


@dataclass(frozen=True)
class Config:
    """What unionfs uses of an image config: its diff_ids, the history of non-empty layers, the run config."""

    diff_ids: tuple[str, ...]
    history: tuple[dict[str, Any], ...]
    run: ImageConfig
    created: str
    os: str
    architecture: str

    @classmethod
    def parse(cls, data: bytes, what: str = "config") -> Config:
        doc = load_json(data, what)
        rootfs = doc.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
            raise OciError(f"{what}: no rootfs.diff_ids")
        for d in diff_ids:
            try:
                check_digest(d)
            except BlobError as exc:
                raise OciError(f"{what}: {exc}") from None
        history = [h for h in doc.get("history") or [] if isinstance(h, dict) and not h.get("empty_layer")]
        found = doc.get("config")
        run: dict[str, Any] = found if isinstance(found, dict) else {}
        labels = run.get("Labels") or {}
        image_config = ImageConfig(
            cmd=tuple(str(c) for c in run.get("Cmd") or ()), env=tuple(str(e) for e in run.get("Env") or ()),
            workdir=str(run.get("WorkingDir") or ""),
            labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())) if isinstance(labels, dict) else ())
        return cls(tuple(diff_ids), tuple(history), image_config, str(doc.get("created") or ""),
                   str(doc.get("os") or ""), str(doc.get("architecture") or ""))

    def history_entries(self, layers: tuple[str, ...]) -> tuple[HistoryEntry, ...]:
        """A store history entry per layer (from the config's non-empty history where it has one each)."""
        if len(self.history) != len(layers):
            return tuple(HistoryEntry(layer, self.created) for layer in layers)
        return tuple(HistoryEntry(layer, str(h.get("created") or ""), str(h.get("created_by") or ""),
                                  str(h.get("comment") or "")) for layer, h in zip(layers, self.history, strict=True))


def _clamp_time(stamp: str, clamp: int | None) -> str:
    if clamp is None:
        return stamp
    import time
    clamped = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clamp))
    return min(stamp, clamped) if stamp else clamped


def build_config(run: ImageConfig, diff_ids: list[str], history: tuple[HistoryEntry, ...], created: str, *,
                 clamp: int | None = None, platform: Platform | None = None) -> bytes:
    """The OCI config of an image (canonical JSON): platform, run config, diff_ids, one history entry per
    layer.  Times are clamped to ``clamp`` (SOURCE_DATE_EPOCH) when given."""
    plat = platform or Platform.host()
    run_doc: dict[str, Any] = {}
    if run.cmd:
        run_doc["Cmd"] = list(run.cmd)
    if run.env:
        run_doc["Env"] = list(run.env)
    if run.workdir:
        run_doc["WorkingDir"] = run.workdir
    if run.labels:
        run_doc["Labels"] = dict(run.labels)
    hist = []
    for entry in history:
        item = {"created": _clamp_time(entry.created, clamp)}
        if entry.created_by:
            item["created_by"] = entry.created_by
        if entry.comment:
            item["comment"] = entry.comment
        hist.append(item)
    doc: dict[str, Any] = {"architecture": plat.architecture, "os": plat.os, "config": run_doc,
                           "rootfs": {"type": "layers", "diff_ids": diff_ids}, "history": hist}
    if created:
        doc["created"] = _clamp_time(created, clamp)
    if plat.variant:
        doc["variant"] = plat.variant
    return canonical_json(doc)


def build_manifest(config: Descriptor, layers: list[Descriptor]) -> bytes:
    return canonical_json({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "config": config.to_json(),
                           "layers": [d.to_json() for d in layers]})


def build_index(manifests: list[Descriptor]) -> bytes:
    return canonical_json({"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
                           "manifests": [d.to_json() for d in manifests]})
