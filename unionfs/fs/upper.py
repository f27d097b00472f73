"""The write side of the union: the upper and work dirs, copy-up, whiteouts and the placement of new objects.

An :class:`Upper` exists only for a writable mount (a union without upper dir holds None, and every change
answers EROFS there).  It does what changes the upper layer and keeps the merged-directory model in step
(``DirState.upper_*``) and the lookup cache with it; the checks of POSIX (EEXIST, ENOTEMPTY, EXDEV …) stay
with the operations in :mod:`unionfs.fs.union`, which call it with the union's lock held.

Every state change is atomic: an object is built in the work dir and renamed into place (copy-up, a new
object over a whiteout, a whiteout over an object), so a crash leaves the old state or the new one
(docs/architecture.md, "Atomic changes").  Paths are union paths (``""`` the root); errors are ``OSError``.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections.abc import Callable
from typing import NamedTuple

from unionfs.fs import acl, copyup
from unionfs.fs.cache import LookupCache
from unionfs.fs.dirstate import DirState
from unionfs.fs.fsio import RENAME_EXCHANGE, RENAME_NOREPLACE, HostDir, join, split
from unionfs.fs.index import NLINK_XATTR, ORIGIN_XATTR, InodeIndex, format_nlink
from unionfs.fs.inodes import ORIGIN_TRUSTED, ORIGIN_USER, Inodes
from unionfs.fs.layers import WORK_SUBDIR, LayerStack
from unionfs.fs.lookup import Node, Resolver, path_error
from unionfs.fs.whiteout import REDIRECT_XATTRS, WhiteoutFormat, WhiteoutWriter, probe_kernel_format

S_IFDIR = stat_mod.S_IFDIR


class UpperFormat(NamedTuple):
    """What a mount decided about its upper dir: the whiteout writer and the name of the origin xattr."""

    writer: WhiteoutWriter
    origin_xattr: str


class Upper:
    """The upper layer of a writable union (see the module docstring).

    ``dir`` is the upper dir, ``work`` the work dir, ``writer`` writes whiteouts and opaque marks in the
    mount's format.  ``notify`` is told the union path of an object whose attributes the kernel may hold
    stale (after a copy-up), or of a directory whose listing it may hold stale."""

    def __init__(self, stack: LayerStack, fmt: UpperFormat, *, resolver: Resolver, cache: LookupCache,
                 inodes: Inodes, volatile: bool, notify: Callable[[str], None]) -> None:
        if stack.upper is None or stack.work is None:
            raise ValueError("an upper layer needs an upper dir and a work dir")
        self.dir: HostDir = stack.upper.host
        self.work: HostDir = stack.work
        self.writer = fmt.writer
        self.origin_xattr = fmt.origin_xattr
        self.redirect_xattr = REDIRECT_XATTRS[0] if fmt.origin_xattr == ORIGIN_TRUSTED else REDIRECT_XATTRS[1]
        """Where a renamed directory records its redirect: ``trusted.overlay.redirect`` where the daemon
        may write trusted xattrs (the kernel's), else ``user.overlay.redirect`` (its ``userxattr`` one)."""
        self.resolver = resolver
        self.cache = cache
        self.inodes = inodes
        self.volatile = volatile
        self.notify = notify
        self.opaque_new_dirs = False
        self.index: InodeIndex | None = None
        """The inode index (``index=on``): copy-up of a lower hard link goes through it."""
        """Mark a directory made in a merged directory opaque, as the kernel does once a feature that
        forbids offline changes of the lower layers is on (``redirect_dir=on``, ``index=on``)."""

    @staticmethod
    def prepare(stack: LayerStack, *, whiteout: str) -> UpperFormat | None:
        """Mount-time work on the upper side of ``stack`` (None where it has none): empty the work dir, probe
        whether the kernel's whiteout format can be written there and pick the format (``whiteout`` is
        ``auto``, ``kernel`` or ``oci``) and the origin xattr.  ValueError for another ``whiteout``; EPERM
        for ``kernel`` where it cannot be written."""
        if stack.upper is None or stack.work is None:
            return None
        copyup.clean_workdir(stack.work, WORK_SUBDIR)
        if whiteout not in ("auto", "kernel", "oci"):
            raise ValueError(f"whiteout={whiteout}: expected auto, kernel or oci")
        kernel_ok = probe_kernel_format(stack.work, WORK_SUBDIR)
        if whiteout == "kernel" and not kernel_ok:
            raise OSError(errno.EPERM, "whiteout=kernel needs mknod and trusted.* xattrs in the workdir")
        fmt = WhiteoutFormat.KERNEL if (whiteout == "kernel" or (whiteout == "auto" and kernel_ok)) \
            else WhiteoutFormat.OCI
        writer = WhiteoutWriter(fmt, stack.upper.host, stack.work, WORK_SUBDIR)
        return UpperFormat(writer, ORIGIN_TRUSTED if kernel_ok else ORIGIN_USER)

    # ================================================================== copy-up
    def copy_up(self, path: str, *, data_limit: int | None = None, truncate_to: int | None = None) -> Node:
        """Make sure ``path`` has its top copy in the upper layer (parents first); returns its node.

        ``data_limit`` and ``truncate_to`` as for :func:`copyup.stage_copy`.  A copied-up object keeps its
        st_ino (the origin xattr), except a lower hard link, which copy-up breaks (as the kernel's ``index=off`` does).
        """
        node = self.resolver.require(path)
        if node.in_upper:
            return node
        parent_path, name = split(path)
        parent = self.ensure_dir(parent_path)
        host = self.resolver.hosts[node.layer]
        st = host.lstat(node.source)
        if self.index is not None and not node.is_dir and st.st_nlink > 1:
            self._copy_up_indexed(path, node, host, st, data_limit=data_limit, truncate_to=truncate_to)
            parent.upper_set(name, node.kind)
            return Node(node.kind, True, 0, node.merge_layers, path)
        keeps_origin = node.is_dir or st.st_nlink == 1
        origin = str(self.inodes.ino(node.layer, st.st_ino)).encode()
        tmp = join(WORK_SUBDIR, copyup.temp_name("copyup"))
        work = self.work

        def mark(rel: str) -> None:
            if not keeps_origin:
                return
            try:
                work.setxattr(rel, self.origin_xattr, origin)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP):
                    raise

        copyup.stage_copy(host, node.source, st, work, tmp, data_limit=data_limit, sync=not self.volatile, mark=mark,
                          truncate_to=truncate_to)
        parent_times = self.dir.lstat(parent_path)
        try:
            copyup.publish(work, tmp, self.dir, path)
        except BaseException:
            work.remove_tree(tmp)
            raise
        # the parent's times stay as they were: a copy-up is not a change of the directory
        self.dir.utime(parent_path, (parent_times.st_atime_ns, parent_times.st_mtime_ns))
        self.cache.drop_ino(path)
        parent.upper_set(name, node.kind)
        own = self.cache.peek_dir(path)
        if own is not None:
            own.upper_kinds = {}
        self.cache.drop_attrs(path)
        # st_nlink may change with the copy (a merged dir reports 1, a broken hard link its own count)
        self.notify(path)
        if not keeps_origin:
            # a copy that breaks a lower hard link shows its own st_ino: the parent's listing (d_ino) changed
            self.notify(parent_path)
        return Node(node.kind, True, 0, node.merge_layers, path)

    def _copy_up_indexed(self, path: str, node: Node, host: HostDir, st: os.stat_result, *,
                         data_limit: int | None, truncate_to: int | None) -> None:
        """Copy-up of a name of a lower hard link through the inode index (docs/semantics.md, ``index``): the
        first one copies the file into the work dir and publishes it as its index entry; every one then
        links the entry to its upper name, and the union's link count is recorded relative to the upper
        inode's (``trusted.overlay.nlink``).  The other names the kernel may hold see the new file."""
        index = self.index
        assert index is not None
        work = self.work
        name = index.name_of(node.layer, node.source, st, path)
        rel = index.rel(name)
        entry = index.entry_stat(name)
        parent_path = split(path)[0]
        parent_times = self.dir.lstat(parent_path)
        if entry is None:
            origin = str(self.inodes.ino(node.layer, st.st_ino)).encode()
            fh = bytes.fromhex(name)

            def mark(tmp_rel: str) -> None:
                work.setxattr(tmp_rel, ORIGIN_XATTR, fh)
                work.setxattr(tmp_rel, self.origin_xattr, origin)
                work.setxattr(tmp_rel, NLINK_XATTR, format_nlink(st.st_nlink, 1))

            tmp = join(WORK_SUBDIR, copyup.temp_name("copyup"))
            copyup.stage_copy(host, node.source, st, work, tmp, data_limit=data_limit, sync=not self.volatile,
                              mark=mark, truncate_to=truncate_to)
            try:
                work.rename(tmp, rel, RENAME_NOREPLACE)
            except BaseException:
                work.remove_tree(tmp)
                raise
            index.entries.add(name)
            union_nlink = st.st_nlink
        else:
            union_nlink = index.nlink_of_entry(name, entry, st.st_nlink)
        self.dir.link(rel, path, src_dir=work)
        try:
            linked = work.lstat(rel)
            work.setxattr(rel, NLINK_XATTR, format_nlink(union_nlink, linked.st_nlink))
            if entry is not None and truncate_to is not None:
                self.dir.truncate(path, truncate_to)
        except BaseException:
            self.dir.unlink(path)
            raise
        self.dir.utime(parent_path, (parent_times.st_atime_ns, parent_times.st_mtime_ns))
        self.cache.drop_ino(path)
        self.cache.drop_attrs(path)
        key = (linked.st_dev, linked.st_ino)
        for other in index.seen.get(name, ()):  # every name the kernel may hold shows the indexed file now
            self.inodes.links.setdefault(key, set()).add(other)
            self.cache.drop_attrs(other)
            self.notify(other)
        self.inodes.note_links(path, linked)
        self.notify(path)

    def ensure_dir(self, path: str) -> DirState:
        """Copy up directory ``path`` and its parents as needed; returns its (updated) state.  ENOTDIR."""
        node = self.resolver.require(path)
        if not node.is_dir:
            raise path_error(errno.ENOTDIR, path)
        if not node.in_upper:
            if path:
                self.ensure_dir(split(path)[0])
            self.copy_up(path)
        state = self.resolver.dir_state(path)
        assert state is not None  # a visible directory has a state
        if state.upper_kinds is None:
            state.upper_kinds = {}
        return state

    # ================================================================== whiteouts and removal
    def replace_with_whiteout(self, path: str, *, is_dir: bool) -> None:
        """Atomically turn upper ``path`` (an object or nothing) into a whiteout."""
        upper, work, writer = self.dir, self.work, self.writer
        present = upper.try_lstat(path) is not None
        if writer.format is WhiteoutFormat.KERNEL:
            tmp = writer.make_whiteout_in_work(copyup.temp_name("wh"))
            if not present:
                work.rename(tmp, path, RENAME_NOREPLACE, dst_dir=upper)
            elif is_dir:
                work.rename(tmp, path, RENAME_EXCHANGE, dst_dir=upper)
                work.remove_tree(tmp)
            else:
                work.rename(tmp, path, dst_dir=upper)
            return
        wh = writer.whiteout_rel(path)
        if upper.try_lstat(wh) is None:
            tmp = writer.make_whiteout_in_work(copyup.temp_name("wh"))
            work.rename(tmp, wh, RENAME_NOREPLACE, dst_dir=upper)
        if present:
            self.remove(path, is_dir=is_dir)

    def remove(self, path: str, *, is_dir: bool) -> None:
        """Remove upper ``path``; a directory is first moved into the work dir, then removed there."""
        if is_dir:
            tmp = join(WORK_SUBDIR, copyup.temp_name("rm"))
            self.dir.rename(path, tmp, dst_dir=self.work)
            self.work.remove_tree(tmp)
        else:
            self.dir.unlink(path)

    # ================================================================== new objects
    def place_new(self, path: str, parent: DirState, build: Callable[[HostDir, str], None], kind: int,
                  mode: int | None = None, *, new_inode: bool = True) -> None:
        """Create a new object at ``path`` with ``build(host, rel)``; over a whiteout it is built in the
        work dir (made opaque if it is a directory), given what the parent would have given it (the group
        of a set-gid parent, the ACLs its default ACL makes of ``mode``; None: a symlink, which has no
        ACLs) and swapped in atomically.  ``new_inode`` False (a hard link): the name is new, its object is
        not, and keeps its group and mode."""
        upper, work, writer = self.dir, self.work, self.writer
        name = split(path)[1]
        self.cache.drop_ino(path)
        if name not in parent.upper_wh:
            build(upper, path)
            if kind == S_IFDIR and self.opaque_new_dirs and parent.lower_layers:
                writer.mark_opaque(upper, path)  # as the kernel marks it, "just an optimization" there
            parent.upper_set(name, kind)
            return
        tmp = join(WORK_SUBDIR, copyup.temp_name("new"))
        build(work, tmp)
        try:
            parent_st = upper.lstat(split(path)[0])
            if new_inode and parent_st.st_mode & stat_mod.S_ISGID:  # what the host does there, done here
                bits = stat_mod.S_IMODE(work.lstat(tmp).st_mode)
                work.chown(tmp, -1, parent_st.st_gid)  # (which clears set-id bits: given back below)
                if kind == S_IFDIR:
                    work.chmod(tmp, bits | stat_mod.S_ISGID)
                elif kind != stat_mod.S_IFLNK and bits & (stat_mod.S_ISUID | stat_mod.S_ISGID):
                    work.chmod(tmp, bits)
            default_acl = self.parent_default_acl(path) if mode is not None else None
            if default_acl is not None and mode is not None:
                work.setxattr(tmp, acl.ACCESS, default_acl)
                if kind == S_IFDIR:
                    work.setxattr(tmp, acl.DEFAULT, default_acl)
                kept = stat_mod.S_IMODE(work.lstat(tmp).st_mode) & stat_mod.S_ISGID
                work.chmod(tmp, acl.inherited_mode(default_acl, mode) | kept)
            if kind == S_IFDIR:
                writer.mark_opaque(work, tmp)
            if upper.try_lstat(path) is not None:  # a kernel-format whiteout, whatever format we write
                work.rename(tmp, path, RENAME_EXCHANGE, dst_dir=upper)
                work.unlink(tmp)
            else:
                work.rename(tmp, path, RENAME_NOREPLACE, dst_dir=upper)
        except BaseException:
            work.remove_tree(tmp)
            raise
        if writer.format is WhiteoutFormat.OCI:
            writer.remove_whiteout(path)
        parent.upper_set(name, kind)
        if kind == S_IFDIR:
            self.cache.invalidate_subtree(path)

    def parent_default_acl(self, path: str) -> bytes | None:
        """The default ACL of the upper copy of ``path``'s parent, if it has one."""
        return self.dir.try_getxattr(split(path)[0], acl.DEFAULT)

    @staticmethod
    def give_owner(host: HostDir, rel: str, uid: int, gid: int) -> None:
        """Give a new object its owner (already as stored); a set-gid parent keeps its group, as the host
        filesystem already gave it."""
        if uid == 0 and gid == 0:
            return
        parent_st = host.lstat(split(rel)[0])
        if parent_st.st_mode & stat_mod.S_ISGID:
            gid = -1
        host.chown(rel, uid, gid)
