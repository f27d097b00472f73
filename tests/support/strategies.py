"""Hypothesis strategies for overlay layers and the operations the differential state machine applies.

Layers are ``support.layers`` specs (``{name: node}`` mappings), so a generated stack can be pasted into a
fixed scenario as it is printed. The name alphabet is tiny (``NAMES``) on purpose: the same name then
appears in several layers with different types (a file over a dir, a dir over a file, a whiteout over
either, an opaque dir over a merged one), which is where a union filesystem goes wrong.

Safety: the state machine runs these against real mounts as root, so nothing generated may lead outside
the test's own directory. Symbolic link targets are therefore limited to: names of the alphabet (relative,
possibly looping or dangling), at most ONE ``..`` (from the mount root that is the side's own base dir,
never shared), ``.``, and absolute targets below a directory that does not exist (``DANGLING_ROOT``), so
no operation through them can create or change anything on the host. No device nodes other than whiteouts
are generated (opening a block device is not harmless).
"""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Mapping
from typing import Any

from hypothesis import strategies as st

from support.layers import WHITEOUT, Dir, Fifo, File, Hardlink, Node, Symlink

NAMES = ("a", "b", "c")
"""Every name in every generated layer and operation path: three names make collisions the rule."""

MAX_DEPTH = 3
"""Paths have at most this many components (layer trees: directories at depths 1 and 2, leaves up to 3)."""

DANGLING_ROOT = "/nonexistent-unionfs-test"
"""Absolute symlinks point below this directory, which must not exist: they dangle, and stay harmless."""

class Pattern(bytes):
    """Long generated data whose repr is its name, so that failing examples print (and paste) short."""

    name: str

    def __new__(cls, data: bytes, name: str) -> Pattern:
        self = super().__new__(cls, data)
        self.name = name
        return self

    def __repr__(self) -> str:
        return self.name


BIG_CONTENT = Pattern(bytes(range(256)) * 40, "BIG_CONTENT")
"""10 KiB: more than a page (``support.strategies.BIG_CONTENT`` in printed examples)."""
BIG_WRITE = Pattern(bytes(range(256)) * 20, "BIG_WRITE")
"""5 KiB written at once: crosses a page boundary at most offsets."""

CONTENTS: tuple[bytes, ...] = (
    b"",
    b"x",
    b"lower data\n",
    b"\0\0\0\0sparse-ish\0",
    BIG_CONTENT,
)
FILE_MODES = (0o644, 0o600, 0o755, 0o640, 0o444, 0o000, 0o4755, 0o2750, 0o1644)
DIR_MODES = (0o755, 0o700, 0o777, 0o1777, 0o750, 0o2775, 0o555)
OWNERS = (0, 1000, 65534)
XATTR_NAMES = ("user.a", "user.b")
XATTR_VALUES = (b"", b"1", b"value", b"\0binary\xff")
SYMLINK_TARGETS: tuple[str, ...] = (
    *NAMES,
    "a/b",
    "b/c/a",
    ".",
    "missing",
    *(f"../{n}" for n in NAMES),
    f"{DANGLING_ROOT}/a",
    DANGLING_ROOT,
)

WRITE_OFFSETS = (0, 1, 5, 4095, 4096, 10_000, 70_000)
TRUNCATE_LENGTHS = (0, 1, 5, 4096, 10_241, 100_000)
WRITE_DATA: tuple[bytes, ...] = (b"", b"W", b"written\n", BIG_WRITE)

# --- layer trees -----------------------------------------------------------------------------------------

_LEAF_KINDS = ("file", "file", "file", "symlink", "fifo", "whiteout", "whiteout", "hardlink")
_KINDS = ("file", "dir", "file", "dir", "dir", "symlink", "fifo", "whiteout", "whiteout", "hardlink")
"""Repetition weights the choice; shrinking goes towards the first (a plain file)."""


@st.composite
def xattr_maps(draw: st.DrawFn) -> dict[str, bytes]:
    """Zero to two ``user.*`` xattrs."""
    names = draw(st.lists(st.sampled_from(XATTR_NAMES), unique=True, max_size=2))
    return {n: draw(st.sampled_from(XATTR_VALUES)) for n in names}


@st.composite
def files(draw: st.DrawFn) -> File:
    """A regular file: one of a few contents (empty, tiny, more than a page), any mode, a few owners."""
    return File(data=draw(st.sampled_from(CONTENTS)), mode=draw(st.sampled_from(FILE_MODES)),
                uid=draw(st.sampled_from(OWNERS)), gid=draw(st.sampled_from(OWNERS)), xattrs=draw(xattr_maps()))


@st.composite
def symlinks(draw: st.DrawFn) -> Symlink:
    """A symlink: relative (maybe looping or dangling), ``../name``, ``.``, or absolute and dangling."""
    return Symlink(draw(st.sampled_from(SYMLINK_TARGETS)), uid=draw(st.sampled_from(OWNERS)),
                   gid=draw(st.sampled_from(OWNERS)))


class _HardlinkSlot:
    """A placeholder for a hard link, resolved once the whole layer (and its files) is known."""


@st.composite
def _tree(draw: st.DrawFn, depth: int) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=len(NAMES)))
    out: dict[str, Any] = {}
    for name in names:
        kind = draw(st.sampled_from(_KINDS if depth < MAX_DEPTH - 1 else _LEAF_KINDS))
        if kind == "file":
            out[name] = draw(files())
        elif kind == "dir":
            out[name] = Dir(draw(_tree(depth + 1)), mode=draw(st.sampled_from(DIR_MODES)),
                            uid=draw(st.sampled_from(OWNERS)), gid=draw(st.sampled_from(OWNERS)),
                            xattrs=draw(xattr_maps()), opaque=draw(st.booleans()))
        elif kind == "symlink":
            out[name] = draw(symlinks())
        elif kind == "fifo":
            out[name] = Fifo(mode=draw(st.sampled_from((0o644, 0o600, 0o666))), uid=draw(st.sampled_from(OWNERS)),
                             gid=draw(st.sampled_from(OWNERS)))
        elif kind == "whiteout":
            out[name] = WHITEOUT
        else:
            out[name] = _HardlinkSlot()
    return out


def _file_paths(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    found = []
    for name, node in tree.items():
        if isinstance(node, File):
            found.append(prefix + name)
        elif isinstance(node, Dir):
            found.extend(_file_paths(node.entries, f"{prefix}{name}/"))
    return found


def _resolve_hardlinks(draw: st.DrawFn, tree: Mapping[str, Any], targets: list[str]) -> dict[str, Node]:
    out: dict[str, Node] = {}
    for name, node in tree.items():
        if isinstance(node, _HardlinkSlot):
            out[name] = Hardlink(draw(st.sampled_from(targets))) if targets else File(b"no file to link to")
        elif isinstance(node, Dir):
            out[name] = Dir(_resolve_hardlinks(draw, node.entries, targets), mode=node.mode, uid=node.uid,
                            gid=node.gid, xattrs=node.xattrs, opaque=node.opaque)
        else:
            out[name] = node
    return out


@st.composite
def layer_trees(draw: st.DrawFn) -> dict[str, Node]:
    """One layer: a small random tree over ``NAMES`` (files, dirs — empty, opaque or not —, symlinks,
    fifos, kernel-format whiteouts, hard links between the layer's own files)."""
    tree = draw(_tree(0))
    return _resolve_hardlinks(draw, tree, _file_paths(tree))


def layer_stacks(max_layers: int = 4) -> st.SearchStrategy[tuple[dict[str, Node], ...]]:
    """1 to ``max_layers`` lower layers, the TOP one first (overlay order)."""
    return st.lists(layer_trees(), min_size=1, max_size=max_layers).map(tuple)


# --- operation arguments ---------------------------------------------------------------------------------

ALL_PATHS: tuple[str, ...] = tuple(
    "/".join(parts)
    for depth in range(1, MAX_DEPTH + 1)
    for parts in itertools.product(NAMES, repeat=depth)
)


def paths() -> st.SearchStrategy[str]:
    """A path of 1 to ``MAX_DEPTH`` components over ``NAMES`` (shallow ones more often: they exist)."""
    return st.one_of(
        st.sampled_from(NAMES),
        st.sampled_from([p for p in ALL_PATHS if p.count("/") == 1]),
        st.sampled_from([p for p in ALL_PATHS if p.count("/") == 2]),
    )


def dir_paths() -> st.SearchStrategy[str]:
    """A path to list or stat: also the root (``"."``)."""
    return st.one_of(st.just("."), paths())


file_modes = st.sampled_from(FILE_MODES)
dir_modes = st.sampled_from(DIR_MODES)
owners = st.sampled_from(OWNERS)
offsets = st.sampled_from(WRITE_OFFSETS)
lengths = st.sampled_from(TRUNCATE_LENGTHS)
write_data = st.sampled_from(WRITE_DATA)
symlink_targets = st.sampled_from(SYMLINK_TARGETS)
xattr_names = st.sampled_from(XATTR_NAMES)
xattr_values = st.sampled_from(XATTR_VALUES)
xattr_flags = st.sampled_from((0, os.XATTR_CREATE, os.XATTR_REPLACE))
OLD_TIME_NS = 1_500_000_000 * 10**9
times = st.sampled_from((None, (OLD_TIME_NS, OLD_TIME_NS), (OLD_TIME_NS + 1, OLD_TIME_NS + 7_000_000_123)))
"""``None`` is "now" (snapshots show it as NEW); the others are exact, old nanosecond times."""

OPEN_FLAGS = {
    "rdonly": os.O_RDONLY,
    "rdwr": os.O_RDWR,
    "wronly-append": os.O_WRONLY | os.O_APPEND,
    "rdwr-creat": os.O_RDWR | os.O_CREAT,
    "wronly-trunc": os.O_WRONLY | os.O_TRUNC,
}
open_flags = st.sampled_from(sorted(OPEN_FLAGS))


def describe_mode(mode: int) -> str:
    """``0o644`` as text, for labels."""
    return f"{stat.S_IMODE(mode):o}"
