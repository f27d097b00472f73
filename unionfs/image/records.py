"""The store's records: what its json files hold (docs/architecture.md, "The layer store").

``layers/<digest>.json`` is a :class:`LayerMeta`, ``images/<name>.json`` an :class:`Image` (with its
:class:`HistoryEntry` list and :class:`ImageConfig`), ``containers/<id>.json`` a :class:`ContainerRecord`;
``gc`` answers with a :class:`GcReport`.  Plain values: reading and writing them is :mod:`unionfs.image.store`'s.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import xxhash

from unionfs.image.digest import DIGEST_ALGORITHM, LayerCounts, Manifest


def now() -> str:
    """The current time as the store writes it (RFC 3339, UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class LayerMeta(LayerCounts):
    """What ``layers/<digest>.json`` holds.  ``parent`` is the layer below it in the image it was first
    committed for (a layer shared by images with different bases keeps the first one); ``size`` counts
    file data bytes, each hard-link group once."""

    digest: str
    parent: str | None = None
    created: str = ""
    created_by: str = ""
    comment: str = ""
    algorithm: str = DIGEST_ALGORITHM

    @classmethod
    def from_manifest(cls, manifest: Manifest, *, parent: str | None, created_by: str,
                      comment: str) -> LayerMeta:
        return cls(digest=manifest.digest, parent=parent, created=now(), created_by=created_by,
                   comment=comment, **asdict(manifest.counts))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerMeta:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class HistoryEntry:
    """One layer's line of an image's history (who made it, when, why) — kept per image, because a
    deduplicated layer can be reached by commits with different messages."""

    layer: str
    created: str = ""
    created_by: str = ""
    comment: str = ""
    empty_layer: bool = False
    """A step that changed only the config (ENV, CMD, LABEL, …): ``layer`` is the layer below it, and the
    entry is not one of the image's layers (OCI's ``empty_layer``)."""


@dataclass(frozen=True)
class ImageConfig:
    """How to run the image (informational for unionfs; exported as the OCI config)."""

    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    workdir: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    entrypoint: tuple[str, ...] = ()
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    stop_signal: str = ""
    shell: tuple[str, ...] = ()
    """``SHELL`` of a build (empty: ``/bin/sh -c``)."""

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("entrypoint", "user", "exposed_ports", "stop_signal", "shell")
    """Written only when set, so that the json (and the id) of an image that does not use them is unchanged."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cmd": list(self.cmd), "env": list(self.env), "workdir": self.workdir,
                               "labels": dict(self.labels)}
        for name in self._OPTIONAL:
            value = getattr(self, name)
            if value:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageConfig:
        return cls(cmd=tuple(data.get("cmd", ())), env=tuple(data.get("env", ())),
                   workdir=str(data.get("workdir", "")),
                   labels=tuple(sorted(dict(data.get("labels", {})).items())),
                   entrypoint=tuple(data.get("entrypoint", ())), user=str(data.get("user", "")),
                   exposed_ports=tuple(data.get("exposed_ports", ())),
                   stop_signal=str(data.get("stop_signal", "")), shell=tuple(data.get("shell", ())))

    def env_dict(self) -> dict[str, str]:
        """The environment as a mapping (a later entry for the same name wins)."""
        out: dict[str, str] = {}
        for item in self.env:
            key, _, value = item.partition("=")
            out[key] = value
        return out

    def merged(self, *, cmd: Sequence[str] | None = None, env: Sequence[str] = (), workdir: str | None = None,
               labels: Sequence[tuple[str, str]] = ()) -> ImageConfig:
        """This config with changes: ``cmd``/``workdir`` replace, ``env`` entries replace the same
        variable or are appended, ``labels`` replace the same key or are added."""
        new_env = list(self.env)
        for item in env:
            key = item.partition("=")[0]
            new_env = [e for e in new_env if e.partition("=")[0] != key] + [item]
        new_labels = dict(self.labels)
        new_labels.update(labels)
        return replace(self, cmd=tuple(cmd) if cmd is not None else self.cmd, env=tuple(new_env),
                       workdir=self.workdir if workdir is None else workdir,
                       labels=tuple(sorted(new_labels.items())))


@dataclass(frozen=True)
class Image:
    """A named image: layers bottom-up (``layers[0]`` is the base), a history entry per layer, a config."""

    name: str
    layers: tuple[str, ...]
    history: tuple[HistoryEntry, ...] = ()
    config: ImageConfig = field(default_factory=ImageConfig)
    created: str = ""

    @property
    def id(self) -> str:
        """xxh3-128 of the layer list and config: the same image under two names has one id."""
        canon = json.dumps({"layers": list(self.layers), "config": self.config.to_json()}, sort_keys=True,
                           separators=(",", ":"))
        return xxhash.xxh3_128_hexdigest(canon.encode())

    def mount_layers(self) -> list[str]:
        """The layers to mount, top first, each once (the topmost occurrence kept).

        An image may hold one layer twice (two commits of the same content, e.g. two empty ones), and
        overlays refuse a lowerdir given twice.  Dropping the lower copies changes nothing visible: every
        entry of a layer is already visible through its top copy (its parents are directories of that same
        layer, above anything else), so a lower copy only adds names and attributes the top copy shows.
        """
        seen: set[str] = set()
        out = []
        for digest in reversed(self.layers):
            if digest not in seen:
                seen.add(digest)
                out.append(digest)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "created": self.created, "layers": list(self.layers),
                "history": [asdict(h) for h in self.history], "config": self.config.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Image:
        return cls(name=str(data["name"]), layers=tuple(data["layers"]),
                   history=tuple(HistoryEntry(**h) for h in data.get("history", ())),
                   config=ImageConfig.from_json(data.get("config", {})), created=str(data.get("created", "")))


@dataclass(frozen=True)
class ContainerRecord:
    """A mount made from an image: which upper sits on which layers (bottom-up)."""

    id: str
    image: str
    layers: tuple[str, ...]
    upper: str
    work: str
    mountpoint: str = ""
    created: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ContainerRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["layers"] = tuple(known.get("layers", ()))
        return cls(**known)


def container_id(upper: str) -> str:
    """The record id of an upper dir: a hash of its real path."""
    return xxhash.xxh3_64_hexdigest(os.fsencode(os.path.realpath(upper)))


@dataclass
class GcReport:
    """What ``gc`` found and did.  ``broken`` is damage (see the module doc); the rest is housekeeping."""

    removed_layers: list[str] = field(default_factory=list)
    removed_staging: list[str] = field(default_factory=list)
    removed_records: list[str] = field(default_factory=list)
    removed_cache: list[str] = field(default_factory=list)
    """Step-cache entries of abandoned builds (their layers go too when nothing else uses them)."""
    freed_bytes: int = 0
    broken: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
