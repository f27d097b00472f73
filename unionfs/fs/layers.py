"""Layers and the layer stack: which host directories make up a union, validated before anything is touched.

Order is top-down everywhere: index 0 is the upper layer when there is one, then the lowers in the order of
``lowerdir=A:B:C`` (A is the top lower, as for the kernel's overlayfs and fuse-overlayfs).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from unionfs.fs.fsio import HostDir, resolve_root

WORK_SUBDIR = "work"
"""The staging directory inside the workdir; the kernel's overlayfs uses the same name and empties it too."""


class LayerError(ValueError):
    """A layer configuration that cannot be mounted; the message is one line meant for the user."""


class Layer:
    """One directory of the stack.  ``index`` is its position top-down (0 = upper when writable)."""

    __slots__ = ("host", "index", "writable")

    def __init__(self, index: int, host: HostDir, writable: bool) -> None:
        self.index = index
        self.host = host
        self.writable = writable

    def __repr__(self) -> str:
        return f"Layer(index={self.index}, path={self.path!r}, writable={self.writable})"

    @property
    def path(self) -> str:
        return self.host.path


class LayerStack:
    """The upper (optional), the lowers (at least one) and the work dir, all opened and validated."""

    __slots__ = ("_lock_fd", "lowers", "upper", "work")

    def __init__(self, lowers: list[Layer], upper: Layer | None = None, work: HostDir | None = None) -> None:
        self.lowers = lowers
        self.upper = upper
        self.work = work
        self._lock_fd = -1

    def __repr__(self) -> str:
        return f"LayerStack(lowers={self.lowers!r}, upper={self.upper!r}, work={self.work!r})"

    @property
    def layers(self) -> list[Layer]:
        """All layers top-down: the upper first (when present), then the lowers."""
        return ([self.upper] if self.upper else []) + self.lowers

    @property
    def lower_indices(self) -> tuple[int, ...]:
        return tuple(layer.index for layer in self.lowers)

    @property
    def single_device(self) -> bool:
        """True when every layer lives on one filesystem (inode numbers are then unique as they are)."""
        return len({layer.host.dev for layer in self.layers}) == 1

    def close(self) -> None:
        for layer in self.layers:
            layer.host.close()
        if self.work:
            self.work.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @classmethod
    def open(cls, *, lowers: Sequence[str], upper: str | None, work: str | None,
             mountpoint: str | None = None) -> LayerStack:
        """Validate and open a stack.  Raises :class:`LayerError` with a one-line message on bad input.

        ``lowers`` top-down, at least one.  ``upper`` and ``work`` come together or not at all (no upper is a
        read-only union).  No two of the dirs and the mountpoint may overlap (one inside the other), the
        workdir must be on the upper's filesystem, and no other mount may be using the workdir.
        """
        if not lowers:
            raise LayerError("lowerdir: at least one lower directory is required")
        if (upper is None) != (work is None):
            raise LayerError("upperdir and workdir must be given together")
        named: list[tuple[str, str]] = []
        devs: dict[str, int] = {}
        given = [(f"lowerdir '{lower}'", lower) for lower in lowers]
        if upper is not None and work is not None:
            given += [(f"upperdir '{upper}'", upper), (f"workdir '{work}'", work)]
        if mountpoint is not None:
            given.append((f"mountpoint '{mountpoint}'", mountpoint))
        for what, path in given:
            real, devs[what] = _real_dir(what, path)
            named.append((what, real))
        _check_overlaps(named)
        if upper is not None and work is not None \
                and devs[f"upperdir '{upper}'"] != devs[f"workdir '{work}'"]:
            raise LayerError(f"workdir '{work}' is not on the same filesystem as upperdir '{upper}'")

        opened: list[HostDir] = []
        try:
            offset = 0 if upper is None else 1
            lower_layers = []
            for i in range(len(lowers)):
                # a budget of about 2048 cached directory descriptors for the whole stack
                host = HostDir(named[i][1], immutable=True, dir_cache=max(2, 2048 // len(lowers)))
                opened.append(host)
                lower_layers.append(Layer(i + offset, host, False))
            stack = cls(lower_layers)
            if upper is not None:
                up = HostDir(named[len(lowers)][1], keep_dirs=True, dir_cache=256)
                opened.append(up)
                wk = HostDir(named[len(lowers) + 1][1])
                opened.append(wk)
                stack.upper = Layer(0, up, True)
                stack.work = wk
                stack._lock_fd = _lock_workdir(wk, work or "")
            return stack
        except OSError as exc:
            for host in opened:
                host.close()
            raise LayerError(f"cannot open layer: {exc.strerror}: {exc.filename}") from exc


def _real_dir(what: str, path: str) -> tuple[str, int]:
    if not path:
        raise LayerError(f"{what}: empty path")
    try:
        return resolve_root(path)
    except FileNotFoundError:
        raise LayerError(f"{what}: no such directory") from None
    except NotADirectoryError:
        raise LayerError(f"{what}: not a directory") from None
    except OSError as exc:
        raise LayerError(f"{what}: {exc.strerror}") from None


def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _check_overlaps(named: list[tuple[str, str]]) -> None:
    """LayerError for the first pair (in the order given) of which one is the other or lies inside it.

    ``named`` holds (what, real path) with normalised absolute paths.  Each path's ancestors are looked up
    in a table of the paths, so 500 layers cost 500 short walks up, not 125,000 comparisons."""
    index: dict[str, list[int]] = {}
    for i, (_, path) in enumerate(named):
        index.setdefault(path, []).append(i)
    pairs: list[tuple[int, int]] = []
    for i, (_, path) in enumerate(named):
        pairs.extend((i, j) for j in index[path] if j > i)
        parent = path
        while (up := os.path.dirname(parent)) != parent:
            parent = up
            pairs.extend((min(i, j), max(i, j)) for j in index.get(parent, ()))
    if not pairs:
        return
    first, second = min(pairs)
    (what_a, a), (what_b, b) = named[first], named[second]
    if a == b:
        raise LayerError(f"{what_a} and {what_b} are the same directory")
    if _inside(a, b):
        raise LayerError(f"{what_a} is inside {what_b}")
    raise LayerError(f"{what_b} is inside {what_a}")


def _lock_workdir(work: HostDir, name: str) -> int:
    try:
        return work.lock_exclusive()
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise LayerError(f"workdir '{name}' is in use by another mount") from None
        raise
