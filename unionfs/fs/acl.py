"""POSIX ACLs of new objects: what a directory's default ACL makes of a new child's mode.

The host filesystem applies a parent's default ACL itself when an object is created in that parent.  An
object built elsewhere (in the work dir, to replace a whiteout atomically) must be given it explicitly, as the
kernel's overlayfs does: the child's access ACL is the parent's default ACL with its owner, mask (or owning
group) and other entries narrowed by the requested mode (``posix_acl_create``), and a new directory also
inherits the default ACL itself.  Values are the kernel's ``system.posix_acl_*`` xattr format: a little-endian
version (2), then (tag u16, permissions u16, id u32) per entry.
"""

from __future__ import annotations

import stat as stat_mod
import struct

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"
_VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_USER_OBJ, _GROUP_OBJ, _MASK, _OTHER = 0x01, 0x04, 0x10, 0x20


def _entries(value: bytes) -> dict[int, int]:
    """Permissions of the owner, owning group, mask and other entries of an ACL value (ValueError if it is
    not one)."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise ValueError("not a POSIX ACL xattr value")
    (version,) = _HEADER.unpack_from(value)
    if version != _VERSION:
        raise ValueError(f"POSIX ACL version {version}")
    perms: dict[int, int] = {}
    for offset in range(_HEADER.size, len(value), _ENTRY.size):
        tag, perm, _ = _ENTRY.unpack_from(value, offset)
        if tag in (_USER_OBJ, _GROUP_OBJ, _MASK, _OTHER):
            perms[tag] = perm & 0o7
    if not all(t in perms for t in (_USER_OBJ, _GROUP_OBJ, _OTHER)):
        raise ValueError("POSIX ACL without its owner, group or other entry")
    return perms


def inherited_mode(default_acl: bytes, mode: int) -> int:
    """The mode of a new object created with ``mode`` under a parent whose default ACL is ``default_acl``:
    each class keeps what both allow (the group class is the mask where there is one); the umask plays no
    part.  Setting ``default_acl`` as the object's access ACL and then chmod to this mode gives the ACL the
    kernel would have made."""
    perms = _entries(default_acl)
    group_class = perms.get(_MASK, perms[_GROUP_OBJ])
    bits = ((perms[_USER_OBJ] & (mode >> 6) & 0o7) << 6) | ((group_class & (mode >> 3) & 0o7) << 3) \
        | (perms[_OTHER] & mode & 0o7)
    return bits | (mode & (stat_mod.S_ISUID | stat_mod.S_ISGID | stat_mod.S_ISVTX))
