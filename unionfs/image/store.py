"""The layer store: content-addressed layers and named images (docs/architecture.md, "The layer store").

Layout under the store root::

    layers/<digest>/        a layer tree in lowerdir format: whiteouts are char 0/0 devices, opaque dirs carry
                            trusted.overlay.opaque=y (user.overlay.opaque=y where trusted.* is not allowed),
                            so a layer mounts as a lowerdir under unionfs, the kernel and fuse-overlayfs alike
    layers/<digest>.json    its metadata (:class:`LayerMeta`): parent, created, created_by, comment, counts
    images/<name>.json      an image (:class:`Image`): its layers BOTTOM-UP (base first, as OCI's
                            rootfs.diff_ids; :meth:`Image.mount_layers` gives the top-down lowerdir order), one
                            history entry per layer, and the config (cmd, env, workdir, labels)
    containers/<id>.json    a mount made from an image (:class:`ContainerRecord`): its upper, work and base
                            layers, so that ``diff``/``commit`` of that upper know what it sits on
    containers/<id>/        the fresh upper and work dirs of such a mount when the user gave none
    cache/<key>.json        ``unionfs build``'s step cache: the image state (layers, history, config) a step
                            with that cache key made, and the build that made it (:mod:`unionfs.image.build.cache`)
    builds/<id>.json        a build: started, and ``done`` once it finished; a build that never finished
                            (failed, interrupted, killed) is *abandoned*, and ``gc`` drops its cache entries
    tmp/                    staging: layer trees being built, json being written
    lock                    flock: shared by writers (commit, import, mount), exclusive for gc

Crash safety (a crash at any instant leaves the old state or the new one, never a partial object):

* a layer tree is built in ``tmp/``, the whole filesystem is flushed (``syncfs``), then it is renamed to
  ``layers/<digest>`` and the parent synced.  Nothing appears under ``layers/<digest>/`` any other way, so
  such a directory is always whole.  Its json is written next (below); a layer *exists* once its json does.
  A tree without json (a crash in between) is adopted by the next commit of the same digest, or removed by
  ``gc`` when no image uses it;
* every json file is written in ``tmp/``, fsynced, renamed into place and the directory fsynced: readers see
  the old file or the new one;
* an image's json is written only after all its layers exist;
* ``gc`` removes a layer json before its tree, and moves the tree into ``tmp/`` before deleting it.

Leftovers of a crash (``tmp/`` entries, trees without json) are not damage: ``gc`` removes them.  *Broken*
means an image naming a layer that does not exist, a layer json without its tree, unreadable json, or (with
``verify``) a tree whose digest is not its name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from unionfs.fs.fsio import HostDir, join
from unionfs.image import inuse
from unionfs.image.digest import scan
from unionfs.image.records import (
    ContainerRecord,
    GcReport,
    Image,
    LayerMeta,
    container_id,
)

STORE_ENV = "UNIONFS_STORE"
LAYERS = "layers"
IMAGES = "images"
CONTAINERS = "containers"
TMP = "tmp"
LOCK = "lock"
CACHE = "cache"
BUILDS = "builds"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(:[A-Za-z0-9._-]{1,128})?")
_DIGEST_RE = re.compile(r"[0-9a-f]{32}")
_libc = ctypes.CDLL(None, use_errno=True)


class StoreError(Exception):
    """A store operation that cannot be done; ``str()`` is one line meant for the user."""


def default_root() -> str:
    """``$UNIONFS_STORE``, else ``/var/lib/unionfs`` for root, else ``$XDG_DATA_HOME/unionfs``
    (``~/.local/share/unionfs``)."""
    env = os.environ.get(STORE_ENV)
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/unionfs"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "unionfs")


def check_name(name: str) -> str:
    """``name`` if it is a valid image name (``NAME`` or ``NAME:TAG``, letters, digits, ``._-``), else
    StoreError."""
    if not _NAME_RE.fullmatch(name):
        raise StoreError(f"invalid image name {name!r}: use letters, digits, '.', '_', '-' (and one ':TAG')")
    return name


def short(digest: str) -> str:
    """The 12-digit form of a digest or id shown in listings."""
    return digest[:12]


# -- the store ---------------------------------------------------------------------------------------------

class Store:
    """A store rooted at ``root``.  ``writable=True`` creates the layout if needed and fails with
    :class:`StoreError` ("store ROOT is not writable: …") where it cannot write; a read-only store that does
    not exist yet behaves as an empty one.  Close it (it is a context manager)."""

    def __init__(self, root: str | None = None, *, writable: bool = False) -> None:
        self.root = os.path.abspath(root or default_root())
        self.writable = writable
        self.host: HostDir | None = None
        self._lock_fd = -1
        if writable:
            self._create()
        elif os.path.isdir(self.root):
            self.host = HostDir(self.root)

    def _create(self) -> None:
        try:
            os.makedirs(self.root, mode=0o755, exist_ok=True)
            self.host = HostDir(self.root)
            for sub in (LAYERS, IMAGES, CONTAINERS, TMP):
                with contextlib.suppress(FileExistsError):
                    self.host.mkdir(sub, 0o755 if sub != TMP else 0o700)
            self._lock_fd = self.host.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            probe = self.host.open(join(TMP, f".probe-{os.getpid()}"), os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(probe)
            self.host.unlink(join(TMP, f".probe-{os.getpid()}"))
        except OSError as exc:
            self.close()
            raise StoreError(f"store {self.root} is not writable: {exc.strerror}") from None

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self.host is not None:
            self.host.close()
            self.host = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _host(self) -> HostDir:
        if self.host is None:
            raise StoreError(f"store {self.root} does not exist")
        return self.host

    @contextlib.contextmanager
    def locked(self, *, exclusive: bool = False) -> Iterator[None]:
        """Hold the store lock: shared for writers that add things, exclusive for ``gc``."""
        if self._lock_fd < 0:
            raise StoreError("the store was not opened for writing")
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- files -------------------------------------------------------------------------------------------
    def _read_json(self, rel: str) -> dict[str, Any]:
        data = json.loads(self._host().read_bytes(rel))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data

    def _write_json(self, rel: str, data: dict[str, Any]) -> None:
        """Atomically replace ``rel`` with ``data``: written in ``tmp/``, fsynced, renamed, dir fsynced."""
        host = self._host()
        tmp = join(TMP, f"json-{os.getpid()}-{os.urandom(4).hex()}")
        payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        fd = host.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            host.rename(tmp, rel)
        except BaseException:
            with contextlib.suppress(OSError):
                host.unlink(tmp)
            raise
        self._fsync_dir(os.path.dirname(rel))

    def read_json(self, rel: str) -> dict[str, Any]:
        """A json record under the store (OSError, ValueError where it is missing or unreadable)."""
        return self._read_json(rel)

    def write_json(self, rel: str, data: dict[str, Any]) -> None:
        """Atomically write a json record under the store (its directory must exist)."""
        self._write_json(rel, data)

    def _fsync_dir(self, rel: str) -> None:
        fd = self._host().open(rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def syncfs(self) -> None:
        """Flush everything written to the store's filesystem (staged trees before they are published)."""
        if _libc.syncfs(ctypes.c_int(self._host().fd)) != 0:
            os.sync()

    # -- layers ------------------------------------------------------------------------------------------
    def layer_path(self, digest: str) -> str:
        """The host path of a layer's tree (usable as a lowerdir)."""
        return os.path.join(self.root, LAYERS, digest)

    def has_layer(self, digest: str) -> bool:
        """True when the layer exists: its json is there (and so, by construction, its whole tree)."""
        return self.host is not None and self.host.try_lstat(join(LAYERS, digest + ".json")) is not None

    def layer(self, digest: str) -> LayerMeta:
        """The metadata of a layer; StoreError when it is missing or unreadable."""
        try:
            return LayerMeta.from_json(self._read_json(join(LAYERS, digest + ".json")))
        except FileNotFoundError:
            raise StoreError(f"layer {short(digest)} is not in the store") from None
        except (OSError, ValueError, TypeError) as exc:
            raise StoreError(f"layer {short(digest)}: unreadable metadata: {exc}") from None

    def layer_digests(self) -> list[str]:
        """Every layer that exists (has its json), sorted."""
        if self.host is None:
            return []
        return sorted(n[:-5] for n, _k, _i in self.host.scandir(LAYERS)
                      if n.endswith(".json") and _DIGEST_RE.fullmatch(n[:-5]))

    def new_staging(self, kind: str = "layer") -> str:
        """A fresh empty directory under ``tmp/`` (mode 0700); returns its store-relative path."""
        rel = join(TMP, f"{kind}-{os.getpid()}-{os.urandom(6).hex()}")
        self._host().mkdir(rel, 0o700)
        return rel

    def discard(self, rel: str) -> None:
        """Remove a staged tree (or anything under the store) completely."""
        self._host().remove_tree(rel)

    def publish_layer(self, staging: str, meta: LayerMeta) -> bool:
        """Publish the staged tree ``staging`` as layer ``meta.digest`` and write its json.

        Returns True when the tree was moved into place, False when that digest's tree was already there
        (the staged copy is then removed).  The caller holds the store lock (shared).
        """
        host = self._host()
        final = join(LAYERS, meta.digest)
        self.syncfs()
        try:
            host.rename(staging, final, 1)  # RENAME_NOREPLACE
            moved = True
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            moved = False
        if moved:
            self._fsync_dir(LAYERS)
        else:
            self.discard(staging)
        if not self.has_layer(meta.digest):
            self._write_json(final + ".json", asdict(meta))
        return moved

    def tree_exists(self, digest: str) -> bool:
        """True when ``layers/<digest>/`` is there (whole, by construction), with or without its json."""
        return self.host is not None and self.host.try_lstat(join(LAYERS, digest)) is not None

    def adopt_layer(self, meta: LayerMeta) -> None:
        """Write the json of a tree left without one by an interrupted publish (the tree is whole)."""
        self._write_json(join(LAYERS, meta.digest + ".json"), asdict(meta))

    # -- images ------------------------------------------------------------------------------------------
    def image(self, name: str) -> Image:
        """The image ``name``; StoreError "unknown image NAME" when there is none."""
        check_name(name)
        if self.host is None:
            raise StoreError(f"unknown image {name!r}")
        try:
            return Image.from_json(self._read_json(join(IMAGES, name + ".json")))
        except FileNotFoundError:
            raise StoreError(f"unknown image {name!r}") from None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"image {name!r}: unreadable: {exc}") from None

    def images(self) -> list[Image]:
        """Every readable image, sorted by name (unreadable ones are reported by :meth:`check`)."""
        out = []
        for name in self._image_names():
            with contextlib.suppress(StoreError):
                out.append(self.image(name))
        return out

    def _image_names(self) -> list[str]:
        if self.host is None:
            return []
        return sorted(n[:-5] for n, _k, _i in self.host.scandir(IMAGES)
                      if n.endswith(".json") and _NAME_RE.fullmatch(n[:-5]))

    def put_image(self, image: Image) -> None:
        """Write (or replace) an image; every layer it names must exist (else StoreError)."""
        check_name(image.name)
        missing = [d for d in image.layers if not self.has_layer(d)]
        if missing:
            raise StoreError(f"image {image.name!r}: layer {short(missing[0])} is not in the store")
        self._write_json(join(IMAGES, image.name + ".json"), image.to_json())

    def remove_image(self, name: str) -> Image:
        """Remove the image ``name`` (its layers stay until ``gc``); returns what was removed."""
        image = self.image(name)
        self._host().unlink(join(IMAGES, name + ".json"))
        self._fsync_dir(IMAGES)
        return image

    # -- containers ----------------------------------------------------------------------------------------
    def container_for(self, upper: str) -> ContainerRecord | None:
        """The record of the mount made with upper dir ``upper``, or None."""
        if self.host is None:
            return None
        try:
            return ContainerRecord.from_json(self._read_json(join(CONTAINERS, container_id(upper) + ".json")))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def put_container(self, record: ContainerRecord) -> None:
        self._write_json(join(CONTAINERS, record.id + ".json"), asdict(record))

    def container_at(self, mountpoint: str) -> ContainerRecord | None:
        """The newest record of a mount made at ``mountpoint`` (a real path), or None."""
        found = [r for r in self.containers() if r.mountpoint == mountpoint]
        return max(found, key=lambda r: r.created) if found else None

    def remove_container(self, cid: str) -> None:
        """Forget the record ``cid`` (nothing happens if there is none)."""
        with contextlib.suppress(FileNotFoundError):
            self._host().unlink(join(CONTAINERS, cid + ".json"))

    def containers(self) -> list[ContainerRecord]:
        if self.host is None:
            return []
        out = []
        for name, _k, _i in self.host.scandir(CONTAINERS):
            if name.endswith(".json"):
                with contextlib.suppress(OSError, ValueError, TypeError):
                    out.append(ContainerRecord.from_json(self._read_json(join(CONTAINERS, name))))
        return sorted(out, key=lambda r: r.id)

    def new_container_dirs(self) -> tuple[str, str]:
        """Create ``containers/c-RANDOM/{upper,work}`` for a fresh mount; returns their host paths."""
        base = join(CONTAINERS, f"c-{os.urandom(6).hex()}")
        host = self._host()
        host.mkdir(base, 0o700)
        host.mkdir(join(base, "upper"), 0o755)
        host.mkdir(join(base, "work"), 0o700)
        return os.path.join(self.root, base, "upper"), os.path.join(self.root, base, "work")

    # -- consistency -------------------------------------------------------------------------------------
    def check(self, *, verify: bool = False) -> list[str]:
        """Damage in the store, one line each (empty when consistent).  ``verify`` also re-digests every
        layer tree (reads all data)."""
        if self.host is None:
            return []
        broken = []
        for name in self._image_names():
            try:
                image = self.image(name)
            except StoreError as exc:
                broken.append(str(exc))
                continue
            broken += [f"image {name!r}: layer {short(d)} is missing" for d in image.layers
                       if not self.has_layer(d)]
        for digest in self.layer_digests():
            try:
                self.layer(digest)
            except StoreError as exc:
                broken.append(str(exc))
            if not self.tree_exists(digest):
                broken.append(f"layer {short(digest)}: metadata without its tree")
            elif verify:
                broken += self._verify(digest)
        return broken

    def _verify(self, digest: str) -> list[str]:
        host = HostDir(self.layer_path(digest))
        try:
            actual = scan(host).digest
        except OSError as exc:
            return [f"layer {short(digest)}: unreadable: {exc.strerror}: {exc.filename}"]
        finally:
            host.close()
        return [] if actual == digest else [f"layer {short(digest)}: content digest is {short(actual)}"]

    def layers_in_use(self) -> set[str]:
        """Layers a running mount uses (mounted without an image record, e.g. ``--ro``, or by hand)."""
        prefix = os.path.realpath(os.path.join(self.root, LAYERS))
        return {os.path.relpath(p, prefix).split("/")[0] for p in inuse.paths_in_use(prefix)}

    def build_cache(self, *, drop_all: bool = False) -> tuple[dict[str, list[str]], list[str], list[str]]:
        """The step cache as ``gc`` sees it: layers of each entry made or claimed by a finished build (by
        entry), the entries to remove (of abandoned builds; every entry with ``drop_all``), and the build
        records to remove (abandoned builds, and finished ones no entry names).  Only meaningful under the
        exclusive lock (a running build holds the shared lock from start to end)."""
        if self.host is None or self.host.try_lstat(CACHE) is None:
            return {}, [], []
        done, abandoned_builds = set(), []
        if self.host.try_lstat(BUILDS) is not None:
            for name, _k, _i in self.host.scandir(BUILDS):
                try:
                    record = self._read_json(join(BUILDS, name))
                except (OSError, ValueError):
                    abandoned_builds.append(name)
                    continue
                if record.get("done"):
                    done.add(str(record.get("id")))
                else:
                    abandoned_builds.append(name)
        kept: dict[str, list[str]] = {}
        abandoned = []
        named: set[str] = set()
        for name, _k, _i in self.host.scandir(CACHE):
            try:
                entry = self._read_json(join(CACHE, name))
            except (OSError, ValueError):
                abandoned.append(name)
                continue
            if entry.get("build") in done and not drop_all:
                kept[name] = [str(d) for d in entry.get("layers", ())]
                named.add(str(entry.get("build")))
            else:
                abandoned.append(name)
        # a finished build no entry names any more is history: its record goes too
        abandoned_builds += [f"{build}.json" for build in sorted(done - named)]
        return kept, abandoned, abandoned_builds

    def used_layers(self, *, drop_build_cache: bool = False) -> set[str]:
        """Layers some image, some live container record, some running mount or the step cache of a
        finished build uses (not the step cache with ``drop_build_cache``)."""
        used = self.layers_in_use()
        for layers in self.build_cache(drop_all=drop_build_cache)[0].values():
            used.update(layers)
        for image in self.images():
            used.update(image.layers)
        for record in self.containers():
            if os.path.isdir(record.upper):
                used.update(record.layers)
        return used

    def gc(self, *, dry_run: bool = False, verify: bool = False, build_cache: bool = False) -> GcReport:
        """Remove layers no image, live container record, running mount or finished build's step cache uses,
        staging leftovers, trees without json, records of uppers that are gone and the step cache of
        abandoned builds (``build_cache``: the whole step cache); report damage.  Holds the store lock
        exclusively."""
        report = GcReport()
        host = self._host()
        with self.locked(exclusive=True):
            report.broken = self.check(verify=verify)
            used = self.used_layers(drop_build_cache=build_cache)
            for name, _k, _i in host.scandir(TMP):
                report.removed_staging.append(name)
                if not dry_run:
                    host.remove_tree(join(TMP, name))
            for record in self.containers():
                if not os.path.isdir(record.upper):
                    report.removed_records.append(record.id)
                    if not dry_run:
                        host.unlink(join(CONTAINERS, record.id + ".json"))
            _kept, abandoned, abandoned_builds = self.build_cache(drop_all=build_cache)
            report.removed_cache = sorted(name[:-5] for name in abandoned)
            if not dry_run:
                for name in abandoned:
                    host.unlink(join(CACHE, name))
                for name in abandoned_builds:
                    host.unlink(join(BUILDS, name))
            for name, _k, _i in host.scandir(LAYERS):
                digest = name[:-5] if name.endswith(".json") else name
                if not _DIGEST_RE.fullmatch(digest) or digest in used or digest in report.removed_layers:
                    continue
                report.freed_bytes += self._layer_size(digest)
                report.removed_layers.append(digest)
                if not dry_run:
                    self._remove_layer(digest)
        report.removed_layers.sort()
        return report

    def _layer_size(self, digest: str) -> int:
        try:
            return self.layer(digest).size
        except StoreError:
            return 0

    def _remove_layer(self, digest: str) -> None:
        """json first (the layer stops existing), then the tree, moved to tmp/ before it is deleted."""
        host = self._host()
        with contextlib.suppress(FileNotFoundError):
            host.unlink(join(LAYERS, digest + ".json"))
            self._fsync_dir(LAYERS)
        if host.try_lstat(join(LAYERS, digest)) is not None:
            doomed = join(TMP, f"gc-{digest}-{os.urandom(4).hex()}")
            host.rename(join(LAYERS, digest), doomed)
            host.remove_tree(doomed)
