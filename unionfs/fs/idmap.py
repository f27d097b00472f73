"""Owner mapping of a mount (fuse-overlayfs's ``uidmapping=``/``gidmapping=``/``squash_to_*``).

The layers store *container* ids; the mount shows *host* ids: for a range ``(container, host, size)`` the
stored id ``container + i`` is shown as ``host + i``.  Stored ids outside every range are shown as the
overflow id (65534).  Ids given by callers (chown, the owner of a new file) go the other way; an id outside
every range is stored as the overflow id too (as fuse-overlayfs does: container storage creates files in a
mapped root filesystem as the host's root).  Squashing shows every object as owned by one uid and/or gid (root
for ``squash_to_root``) and leaves what is stored unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

OVERFLOW_ID = 65534


class IdRange(NamedTuple):
    """One range of a ``uidmapping=``/``gidmapping=`` option (fuse-overlayfs syntax ``CONTAINERID:HOSTID:SIZE``):
    the layers store ``container_id + i``, the mount shows ``host_id + i``, for ``0 <= i < size``."""

    container_id: int
    host_id: int
    size: int


def _to_shown(ranges: Sequence[IdRange], stored: int) -> int:
    for container, host, size in ranges:
        if container <= stored < container + size:
            return host + stored - container
    return OVERFLOW_ID


def _to_stored(ranges: Sequence[IdRange], shown: int) -> int:
    for container, host, size in ranges:
        if host <= shown < host + size:
            return container + shown - host
    return OVERFLOW_ID


class IdMap(NamedTuple):
    """``uids``/``gids``: mapping ranges (empty: ids pass unchanged); ``squash_uid``/``squash_gid``: the one
    owner every object is shown with (None: no squashing)."""

    uids: tuple[IdRange, ...] = ()
    gids: tuple[IdRange, ...] = ()
    squash_uid: int | None = None
    squash_gid: int | None = None

    @property
    def identity(self) -> bool:
        return not (self.uids or self.gids) and self.squash_uid is None and self.squash_gid is None

    def shown(self, uid: int, gid: int) -> tuple[int, int]:
        """The owner the mount shows for a stored owner."""
        if self.squash_uid is not None:
            uid = self.squash_uid
        elif self.uids:
            uid = _to_shown(self.uids, uid)
        if self.squash_gid is not None:
            gid = self.squash_gid
        elif self.gids:
            gid = _to_shown(self.gids, gid)
        return uid, gid

    def stored(self, uid: int, gid: int) -> tuple[int, int]:
        """The owner to store for one given through the mount (-1 keeps "unchanged"; unmapped → overflow)."""
        if uid != -1 and self.uids:
            uid = _to_stored(self.uids, uid)
        if gid != -1 and self.gids:
            gid = _to_stored(self.gids, gid)
        return uid, gid
