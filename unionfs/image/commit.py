"""Commit an upper dir (or import a plain directory) into a new layer of the store and a new image.

Two passes over the source, like ``docker commit`` but without a tar in between:

1. **read**: :func:`unionfs.image.digest.scan` reads the tree as an overlay does and gives its manifest and digest.
   If the store already has that layer, nothing is written (deduplication): only the image json.
2. **stage**: the manifest is rebuilt in ``STORE/tmp/`` — data (holes kept), owner, mode, xattrs other than
   overlay-private ones, times; hard links as hard links; devices and fifos as such; sockets skipped (as
   ``docker commit`` does); every whiteout written as a char 0/0 device and every opaque dir marked with
   ``trusted.overlay.opaque=y`` (``user.overlay.opaque=y`` where ``trusted.*`` is refused).  File data is
   hashed again while it is copied: if it differs from pass 1 the source changed under us and the commit
   fails, so the staged tree always matches its digest.  Small files (up to 256 KiB each, 256 MiB in all)
   are not read twice: pass 1 keeps the bytes it hashed and pass 2 writes those.  Then
   :meth:`Store.publish_layer` (sync, rename).

A directory renamed with ``redirect_dir=on`` (a redirect xattr: its lower copies are elsewhere) is
flattened on the base's layers: the layer holds a full, opaque copy of what the union showed there, read from
the layers that showed it, and the whiteout at its old name; so no committed layer (and nothing exported from
one) depends on a redirect.  Likewise a file copied up through the inode index (``index=on``) whose other
names are still only in the layers below, in plain directories or below a renamed one: the layer carries
those names as hard links of the copy (:func:`unionfs.image.digest.scan`).  Without a known base such an
upper is refused, and so is one whose link count does not match the names the layers below show.

The source must be still: an upper in use by a running mount is refused ("upper is mounted; …") — pausing a
live mount through its control channel is not done yet.  Errors are :class:`CommitError` (one line) or
:class:`unionfs.image.store.StoreError`; a failed commit leaves nothing in the store but ``tmp/`` leftovers, which
it removes itself unless it is killed.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from unionfs.control import ControlClient
from unionfs.fs.fsio import HostDir, split
from unionfs.fs.whiteout import KERNEL_OPAQUE_XATTR, write_opaque_xattr
from unionfs.image import inuse
from unionfs.image.digest import Entry, Manifest, hash_file, scan
from unionfs.image.inuse import CONTROL_TIMEOUT
from unionfs.image.records import HistoryEntry, Image, ImageConfig, LayerMeta, now
from unionfs.image.store import CONTAINERS, Store, StoreError, check_name
from unionfs.image.walk import DirCache, OpenDir
from unionfs.progress import Progress

MOUNTED_MESSAGE = "upper is mounted by something that cannot be paused (the kernel's overlayfs, or a daemon " \
    "without a control channel); unmount it first"
KEEP_BYTES = 256 << 20
"""How much small-file data the read pass keeps for the copy pass (which then need not read it again)."""
_KIND_BITS = {"fifo": stat_mod.S_IFIFO, "chr": stat_mod.S_IFCHR, "blk": stat_mod.S_IFBLK}


class CommitError(Exception):
    """A commit that cannot be done; ``str()`` is one line meant for the user."""


@dataclass(frozen=True)
class ConfigChanges:
    """Changes to the base image's config (see :meth:`ImageConfig.merged`)."""

    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    workdir: str | None = None
    labels: tuple[tuple[str, str], ...] = ()

    def apply(self, config: ImageConfig) -> ImageConfig:
        return config.merged(cmd=self.cmd, env=self.env, workdir=self.workdir, labels=self.labels)


@dataclass(frozen=True)
class Base:
    """What a new layer sits on: layers bottom-up, their history, the config to start from."""

    layers: tuple[str, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
    config: ImageConfig = field(default_factory=ImageConfig)


@dataclass(frozen=True)
class CommitResult:
    """The outcome: the layer's digest, the image written, and whether layer data was written
    (``new_layer`` False: the store already had it)."""

    digest: str
    image: Image
    new_layer: bool
    files: int
    nbytes: int
    entries: int
    sockets: tuple[str, ...]
    seconds: float


# -- sources -------------------------------------------------------------------------------------------------

def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def source_dir(path: str, store: Store, *, what: str) -> str:
    """The real path of directory ``path``; CommitError if it is missing, not a directory, or overlaps the
    store (an upper dir that ``unionfs mount IMAGE`` made inside the store's ``containers/`` is fine)."""
    real = os.path.realpath(path)
    if not os.path.lexists(real):
        raise CommitError(f"{what} {path}: no such directory")
    if not os.path.isdir(real) or os.path.islink(real):
        raise CommitError(f"{what} {path}: not a directory")
    containers = os.path.join(store.root, CONTAINERS)
    fresh_upper = _inside(real, containers) and real != containers  # made by ``unionfs mount IMAGE``
    if _inside(store.root, real) or (_inside(real, store.root) and not fresh_upper):
        raise CommitError(f"{what} {path} overlaps the store {store.root}")
    return real


def union_at(store: Store, path: str) -> inuse.UnionMount | None:
    """The union mounted at ``path`` (see :func:`unionfs.image.inuse.mount_at`); where its daemon does not say
    which dirs it serves, the record ``unionfs mount IMAGE`` left for that mountpoint does, provided the
    recorded workdir is locked by a running daemon."""
    mount = inuse.mount_at(path)
    if mount is None or mount.upper is not None or mount.lowers:
        return mount
    record = store.container_at(mount.mountpoint)
    if record is None or not inuse.workdir_locked(record.work):
        return mount
    lowers = tuple(store.layer_path(d) for d in Image("", record.layers).mount_layers())
    return inuse.UnionMount(mount.mountpoint, mount.fstype, lowers, record.upper, record.work, mount.pid)


def _pausable(mount: inuse.UnionMount) -> bool:
    """Does the daemon of ``mount`` answer on its control channel (so that it can be paused)?"""
    if not mount.mountpoint or mount.fstype == "overlay":
        return False
    try:
        with ControlClient(mount.mountpoint, timeout=CONTROL_TIMEOUT) as client:
            return bool(client.request("info").get("ok"))
    except (OSError, ValueError):
        return False


def resolve_upper(path: str, store: Store) -> tuple[str, str | None]:
    """The upper dir to commit for ``path`` (an upper dir, or the mountpoint of a union), and the mountpoint
    of the unionfs mount serving it, if one does (its daemon is paused during the commit).

    Refuses (CommitError) an upper that a mount which cannot be paused uses (the kernel's overlayfs, another
    program), and a read-only union mount (it has no upper).
    """
    mount = union_at(store, path)
    if mount is not None:
        if mount.upper is None and mount.lowers:
            raise CommitError(f"{path} is a read-only union mount: it has no upper dir to commit")
        if mount.upper is not None and _pausable(mount):
            return source_dir(mount.upper, store, what="upper"), mount.mountpoint
        upper = mount.upper or "unknown"
        raise CommitError(f"{path} is a union mount (upper {upper}): {MOUNTED_MESSAGE}")
    real = source_dir(path, store, what="upper")
    record = store.container_for(real)
    users = inuse.users_of_upper(real, work=record.work if record else None)
    if len(users) == 1 and _pausable(users[0]):
        return real, users[0].mountpoint
    if users:
        raise CommitError(f"upper {path} is in use by {users[0].describe()}: {MOUNTED_MESSAGE}")
    return real, None


@contextmanager
def paused(mountpoint: str | None) -> Iterator[None]:
    """Hold every change to a live union back (``docker commit``'s pause) for the duration; nothing for None.
    Dirty pages of the mount are flushed first, so the upper dir holds everything written before."""
    if mountpoint is None:
        yield
        return
    os.sync()
    try:
        client = ControlClient(mountpoint, timeout=CONTROL_TIMEOUT)
    except OSError as exc:
        raise CommitError(f"{mountpoint}: cannot reach the daemon to pause it ({exc.strerror or exc})") from None
    with client:
        answer = client.request("pause")
        if not answer.get("ok"):
            raise CommitError(f"{mountpoint}: the daemon could not pause ({answer.get('error', 'refused')})")
        try:
            yield
        finally:
            client.request("resume")


def base_from_image(store: Store, name: str) -> Base:
    """The base that ``--from NAME`` names (StoreError for an unknown image)."""
    image = store.image(name)
    return Base(image.layers, _history(store, image.layers, image.history), image.config)


def base_for_upper(store: Store, upper: str) -> Base | None:
    """The base recorded for an upper made by ``unionfs mount IMAGE`` (None if there is no record).

    The recorded layers are the truth; history and config come from the recorded image while it still has
    those layers, else from the layers' own metadata.
    """
    record = store.container_for(upper)
    if record is None:
        return None
    history: tuple[HistoryEntry, ...] = ()
    config = ImageConfig()
    try:
        image = store.image(record.image)
    except StoreError:
        image = None
    if image is not None and image.layers == record.layers:
        history, config = image.history, image.config
    return Base(record.layers, _history(store, record.layers, history), config)


def _history(store: Store, layers: Sequence[str], known: Sequence[HistoryEntry]) -> tuple[HistoryEntry, ...]:
    """One history entry per layer (plus the image's config-only entries): the image's own where it has them,
    else from layer metadata."""
    layered = [h for h in known if not h.empty_layer]
    if len(layered) == len(layers) and all(h.layer == d for h, d in zip(layered, layers, strict=True)):
        return tuple(known)
    out = []
    for digest in layers:
        meta = store.layer(digest)
        out.append(HistoryEntry(digest, meta.created, meta.created_by, meta.comment))
    return tuple(out)


# -- staging -------------------------------------------------------------------------------------------------

class _Stager:
    """Rebuilds a manifest's tree from ``src`` into the empty staging dir ``dst``."""

    def __init__(self, manifest: Manifest, src: HostDir, dst: HostDir, progress: Progress,
                 sources: Sequence[HostDir] = ()) -> None:
        self.manifest = manifest
        self.src = src
        self.sources = list(sources)
        """The layers below ``src`` that flattened entries are read from (``Entry.source``)."""
        self.source_dirs: dict[int, DirCache] = {}
        self.dst = dst
        self.progress = progress
        self.dirs: list[Entry] = []
        self.buf = bytearray(1 << 20)
        self.opaque_xattr = KERNEL_OPAQUE_XATTR
        self.ids = (os.geteuid(), os.getegid())
        """Who owns what this process creates (a file created by us needs no chown to these)."""

    def run(self) -> None:
        try:
            with DirCache(self.src) as sdirs, DirCache(self.dst) as ddirs:
                for entry in self.manifest.entries:
                    self._one(entry, sdirs, ddirs)
                    self.progress.advance(1, entry.size)
        finally:
            for cache in self.source_dirs.values():
                cache.close()
        for entry in reversed(self.dirs):  # children before parents
            self._finish_dir(entry)

    def _one(self, e: Entry, sdirs: DirCache, ddirs: DirCache) -> None:
        if e.path == "":
            self.dirs.append(e)
            return
        parent, name = split(e.path)
        d = ddirs.get(parent)
        kind = e.kind
        if kind == "dir":
            d.mkdir(name, 0o700)
            self.dirs.append(e)
        elif kind == "file":
            data = self.manifest.data.get(e.path)
            if data is None and e.source is not None:  # flattened: read from the layer that shows it
                index, where = e.source
                cache = self.source_dirs.get(index)
                if cache is None:
                    cache = self.source_dirs[index] = DirCache(self.sources[index])
                source_parent, source_name = split(where)
                self._file(e, cache.get(source_parent), d, name, source_name)
            elif data is None:
                self._file(e, sdirs.get(parent), d, name)
            else:
                self._kept_file(e, data, d, name)
        elif kind == "symlink":
            d.symlink(e.target, name)
            self._finish_other(d, name, e, chmod=False)
        elif kind in _KIND_BITS:
            d.mknod(name, _KIND_BITS[kind] | e.mode, os.makedev(*e.rdev))
            self._finish_other(d, name, e, chmod=True)
        elif kind == "whiteout":
            d.mknod(name, stat_mod.S_IFCHR, 0)
        elif kind == "link":
            self.dst.link(e.target, e.path)
        else:  # pragma: no cover - scan() yields only the kinds above
            raise CommitError(f"{e.path}: cannot commit an entry of kind {kind}")

    def _file(self, e: Entry, s: OpenDir, d: OpenDir, name: str, source_name: str | None = None) -> None:
        sfd = s.open(source_name or name, os.O_RDONLY)
        try:
            dfd = d.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                content, seen = hash_file(sfd, e.size, sink=dfd, buf=self.buf, sparse=e.sparse)
                if seen != e.size or content != e.content or os.fstat(sfd).st_size != e.size:
                    raise CommitError(f"{e.path} changed while it was being committed; try again")
                if e.sparse:  # a trailing hole is not written
                    os.ftruncate(dfd, e.size)
                self._file_attrs(dfd, e)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def _kept_file(self, e: Entry, data: bytes, d: OpenDir, name: str) -> None:
        """A small file whose data was kept by the read pass: written as it was hashed."""
        dfd = d.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(dfd, view):]
            self._file_attrs(dfd, e)
        finally:
            os.close(dfd)

    def _file_attrs(self, dfd: int, e: Entry) -> None:
        if (e.uid, e.gid) != self.ids:
            os.fchown(dfd, e.uid, e.gid)  # before chmod: chown clears set-id bits
        os.fchmod(dfd, e.mode)
        for attr, value in e.xattrs:  # after chown: it clears security.capability
            os.setxattr(dfd, attr, value)
        os.utime(dfd, ns=(e.atime_ns, e.mtime_ns))

    @staticmethod
    def _finish_other(d: OpenDir, name: str, e: Entry, *, chmod: bool) -> None:
        d.chown(name, e.uid, e.gid)
        if chmod:
            d.chmod(name, e.mode)
        for attr, value in e.xattrs:
            d.setxattr(name, attr, value)
        d.utime(name, (e.atime_ns, e.mtime_ns))

    def _finish_dir(self, e: Entry) -> None:
        with OpenDir(self.dst, e.path) as d:
            os.fchown(d.fd, e.uid, e.gid)
            os.fchmod(d.fd, e.mode)
            for attr, value in e.xattrs:
                d.setxattr("", attr, value)
            if e.opaque:
                self._mark_opaque(d)
            os.utime(d.fd, ns=(e.atime_ns, e.mtime_ns))

    def _mark_opaque(self, d: OpenDir) -> None:
        self.opaque_xattr = write_opaque_xattr(lambda attr, value: d.setxattr("", attr, value), self.opaque_xattr)


# -- the commit ----------------------------------------------------------------------------------------------

def _read(src: str, what: str, progress: Progress, below: Sequence[str] = ()) -> Manifest:
    host = HostDir(src)
    try:
        progress.phase("reading")
        manifest = scan(host, progress=progress.advance, keep=KEEP_BYTES, below=below)
    except OSError as exc:
        where = os.path.join(src, exc.filename) if isinstance(exc.filename, str) else src
        if exc.errno == errno.EXDEV:
            raise CommitError(f"{where}: another filesystem is mounted inside the {what}; unmount it first") \
                from None
        if exc.errno == errno.ESTALE:
            raise CommitError(f"{where} changed while it was being committed; try again") from None
        raise CommitError(f"cannot read {what} {src}: {exc.strerror}: {where}") from None
    finally:
        host.close()
    if manifest.overlay_only and not below:
        raise CommitError(f"{what} {src} is not a self-contained overlay upper: {manifest.overlay_only[0]} "
                          "carries an overlay redirect/metacopy xattr (mounted with redirect_dir or metacopy) "
                          "and the layers it was mounted over are not known (commit it with --from IMAGE), "
                          "or is a hard link copied up with index=on whose other names are only in the "
                          "lower layers (commit it with --from IMAGE, or change each name once through the "
                          "mount first)")
    if manifest.overlay_only:
        raise CommitError(f"{what} {src} is not a self-contained overlay upper: {manifest.overlay_only[0]} "
                          "carries an overlay metacopy xattr (mounted with metacopy), or is a hard link "
                          "copied up with index=on whose link count does not match the names of it that the "
                          "layers below show (change each name once through the mount first)")
    return manifest


def _stage_and_publish(store: Store, src: str, manifest: Manifest, meta: LayerMeta, progress: Progress) -> bool:
    """Write the layer unless the store has it; True when data was written."""
    if store.has_layer(manifest.digest):
        return False
    if store.tree_exists(manifest.digest):  # a whole tree whose publish was interrupted before its json
        store.adopt_layer(meta)
        return False
    staging = store.new_staging()
    published = False
    try:
        progress.phase("copying", files=len(manifest.entries), nbytes=manifest.counts.size)
        src_host = HostDir(src)
        dst_host = HostDir(os.path.join(store.root, staging))
        sources = [HostDir(path) for path in manifest.sources]
        try:
            _Stager(manifest, src_host, dst_host, progress, sources).run()
        except OSError as exc:
            raise CommitError(f"cannot write layer: {exc.strerror}: {exc.filename}") from None
        finally:
            src_host.close()
            dst_host.close()
            for host in sources:
                host.close()
        published = store.publish_layer(staging, meta)
    finally:
        if not published:
            store.discard(staging)
    return published


@dataclass(frozen=True)
class LayerResult:
    """A committed layer: its digest, whether data was written, what it holds, how long it took."""

    digest: str
    new_layer: bool
    manifest: Manifest
    seconds: float


def commit_layer(store: Store, src: str, *, parent: str | None, created_by: str = "", comment: str = "",
                 progress: Progress | None = None, what: str = "upper", below: Sequence[str] = ()) -> LayerResult:
    """Commit the still directory ``src`` (a real path the caller checked: an upper no mount uses any more)
    as a layer of the store and nothing else: no image is written (``unionfs build`` records its steps
    itself).  ``below``: the host paths of the layers ``src`` was mounted over, top first, on which a
    directory renamed with a redirect is flattened (see the module doc).  The caller may hold the store lock
    (shared) through its own handle; this takes it too."""
    progress = progress or Progress()
    started = time.monotonic()
    with store.locked():
        manifest = _read(src, what, progress, below)
        meta = LayerMeta.from_manifest(manifest, parent=parent, created_by=created_by, comment=comment)
        try:
            new_layer = _stage_and_publish(store, src, manifest, meta, progress)
        finally:
            progress.done()
    return LayerResult(manifest.digest, new_layer, manifest, time.monotonic() - started)


def commit_tree(store: Store, src: str, *, image: str, base: Base, comment: str = "", created_by: str = "",
                changes: ConfigChanges | None = None, progress: Progress | None = None,
                what: str = "upper") -> CommitResult:
    """Commit the still directory ``src`` (a real path, checked by the caller) as a layer on ``base``, and
    write image ``image``.  The store must be writable.  See the module doc for the passes."""
    check_name(image)
    progress = progress or Progress()
    started = time.monotonic()
    with store.locked():
        below = [store.layer_path(digest) for digest in reversed(base.layers)]
        manifest = _read(src, what, progress, below)
        parent = base.layers[-1] if base.layers else None
        meta = LayerMeta.from_manifest(manifest, parent=parent, created_by=created_by, comment=comment)
        try:
            new_layer = _stage_and_publish(store, src, manifest, meta, progress)
        finally:
            progress.done()
        entry = HistoryEntry(manifest.digest, now(), created_by, comment)
        config = (changes or ConfigChanges()).apply(base.config)
        result = Image(image, (*base.layers, manifest.digest), (*base.history, entry), config, now())
        store.put_image(result)
    return CommitResult(manifest.digest, result, new_layer, manifest.counts.files, manifest.counts.size,
                        len(manifest.entries), tuple(manifest.sockets), time.monotonic() - started)


def commit_upper(store: Store, upper: str, *, image: str, base_image: str | None = None, comment: str = "",
                 created_by: str = "", changes: ConfigChanges | None = None,
                 progress: Progress | None = None) -> CommitResult:
    """``unionfs commit UPPER --image NAME [--from IMAGE]``: the base is ``--from``, else the one recorded
    when ``unionfs mount`` made the upper, else none (a one-layer image)."""
    check_name(image)
    base = base_from_image(store, base_image) if base_image else None
    real, live = resolve_upper(upper, store)
    if base is None:
        base = base_for_upper(store, real) or Base()
    with paused(live):
        return commit_tree(store, real, image=image, base=base, comment=comment,
                           created_by=created_by or f"unionfs commit {real}", changes=changes, progress=progress)


def import_dir(store: Store, path: str, *, image: str, comment: str = "", created_by: str = "",
               changes: ConfigChanges | None = None, progress: Progress | None = None) -> CommitResult:
    """``unionfs import-dir DIR --image NAME``: a base image of one layer from a plain directory."""
    check_name(image)
    real = source_dir(path, store, what="directory")
    return commit_tree(store, real, image=image, base=Base(), comment=comment,
                       created_by=created_by or f"unionfs import-dir {real}", changes=changes,
                       progress=progress, what="directory")
