"""The step cache of ``unionfs build``: cache keys, and the records that map a key to what its step made.

**Key.**  The key of FROM is a hash of the base image's id (``scratch``: a constant).  The key of each later
step is a hash of its parent's key, the step's instruction *after* ARG/ENV expansion, the image config after
the step (so ENV, WORKDIR, USER and SHELL, which change how later steps run, are in every later key), the
build args it depends on (for RUN: every build arg in scope, which RUN sees as environment), and for COPY and
ADD the content digest of the sources (:meth:`unionfs.image.build.context.Context.digest`: names, modes,
bytes, link targets; not mtimes).  Equal keys mean equal inputs, so a hit may reuse the state.

**Records** (in the store, see :mod:`unionfs.image.store`): ``cache/<key>.json`` holds the image state after
the step (layers bottom-up, history, config) and the build that made it; ``builds/<id>.json`` a build, marked
``done`` at its end.  A build holds the store lock (shared) from start to end on a descriptor of its own, so
``gc`` (exclusive) never runs beside one and never sees a layer a build made but has not recorded yet; what
``gc`` then finds of a build that is not ``done`` was abandoned, and is removed.  A finished build claims the
entries it used that an abandoned build had made, so they stay.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from unionfs.fs.fsio import join
from unionfs.image.build.plan import Step
from unionfs.image.records import HistoryEntry, Image, ImageConfig, now
from unionfs.image.store import BUILDS, CACHE, LOCK, Store

KEY_VERSION = 1
"""Changes whenever the key's recipe changes, so old entries are never taken for new ones."""


def base_key(image_id: str | None) -> str:
    """The key of FROM: the base image's id, or ``scratch`` (None)."""
    return xxhash.xxh3_128_hexdigest(f"v{KEY_VERSION}\0FROM\0{image_id or 'scratch'}".encode())


def step_key(parent: str, step: Step, content: str = "") -> str:
    """The key of ``step`` on top of the state whose key is ``parent``; ``content`` is the COPY/ADD source
    digest."""
    canon = json.dumps({"v": KEY_VERSION, "parent": parent, "keyword": step.keyword, "text": step.text,
                        "argv": list(step.argv), "args": [list(a) for a in step.args_used],
                        "config": step.config.to_json(), "content": content,
                        "chown": step.chown, "chmod": step.chmod}, sort_keys=True, separators=(",", ":"))
    return xxhash.xxh3_128_hexdigest(canon.encode())


@dataclass(frozen=True)
class State:
    """An image in the making: layers bottom-up, one history entry per step, the config."""

    layers: tuple[str, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
    config: ImageConfig = field(default_factory=ImageConfig)

    def image(self, name: str = "") -> Image:
        return Image(name, self.layers, self.history, self.config, now())

    @property
    def id(self) -> str:
        """The id the image would have (layers and config)."""
        return self.image().id

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "history": [asdict(h) for h in self.history],
                "config": self.config.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        return cls(tuple(data["layers"]), tuple(HistoryEntry(**h) for h in data.get("history", ())),
                   ImageConfig.from_json(data.get("config", {})))


class BuildCache:
    """The cache records of one build in ``store`` (writable).  :meth:`begin` starts the build (takes the
    shared lock, writes its record); :meth:`finish` marks it done; :meth:`close` releases the lock."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.build_id = f"{now().replace(':', '')}-{os.getpid()}-{os.urandom(4).hex()}"
        self._lock_fd = -1
        self._claim: list[str] = []

    def begin(self) -> None:
        host = self.store.host
        assert host is not None
        for sub in (CACHE, BUILDS):
            with contextlib.suppress(FileExistsError):
                host.mkdir(sub, 0o755)
        self._lock_fd = host.open(LOCK, os.O_RDWR)
        # inheritable on purpose: a mount daemon forked by a step closes every inherited descriptor, so it never
        # keeps the build's lock (and gc waiting) after the build has gone
        os.set_inheritable(self._lock_fd, True)
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        self.store.write_json(join(BUILDS, self.build_id + ".json"),
                              {"id": self.build_id, "pid": os.getpid(), "started": now(), "done": False})

    def lookup(self, key: str) -> State | None:
        """The state a step with ``key`` made, when it is recorded and all its layers still exist."""
        try:
            data = self.store.read_json(join(CACHE, key + ".json"))
            state = State.from_json(data)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not all(self.store.has_layer(d) for d in state.layers):
            return None
        if not self._build_done(str(data.get("build", ""))):
            self._claim.append(key)
        return state

    def _build_done(self, build: str) -> bool:
        try:
            return bool(self.store.read_json(join(BUILDS, build + ".json")).get("done"))
        except (OSError, ValueError):
            return False

    def record(self, key: str, state: State) -> None:
        """Remember that the step with ``key`` made ``state`` (this build's entry)."""
        self.store.write_json(join(CACHE, key + ".json"),
                              {"key": key, "build": self.build_id, "created": now(), **state.to_json()})

    def finish(self, image: str) -> None:
        """The build is done: claim the entries it reused from abandoned builds, and mark it done."""
        for key in self._claim:
            with contextlib.suppress(OSError, ValueError):
                data = self.store.read_json(join(CACHE, key + ".json"))
                data["build"] = self.build_id
                self.store.write_json(join(CACHE, key + ".json"), data)
        self.store.write_json(join(BUILDS, self.build_id + ".json"),
                              {"id": self.build_id, "pid": os.getpid(), "done": True, "image": image,
                               "finished": now()})

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
