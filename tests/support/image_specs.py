"""Hypothesis strategies for layer specs (see ``support.layers``) used by the image-store tests.

Names come from a small alphabet so that an upper and the layer below it collide often: that is where
whiteouts, opaque directories and replacements matter.  ``layer_specs(upper=True)`` may hold whiteouts and
opaque directories; any spec may hold files (with modes, owners, ``user.*`` xattrs, fixed or varied mtimes),
symlinks, fifos, device nodes, directories and hard links to its own files.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from support.layers import FIXED_MTIME_NS, WHITEOUT, Device, Dir, Fifo, File, Hardlink, Node, Symlink

NAMES = ("a", "b", "c", "d", "e")
MODES = (0o644, 0o600, 0o755, 0o444, 0o4755, 0o2750, 0o1777)
IDS = (0, 1000, 65534)

_xattrs = st.dictionaries(st.sampled_from(["user.a", "user.b", "user.mime_type"]),
                          st.binary(min_size=0, max_size=8), max_size=2)
_mtimes = st.sampled_from([FIXED_MTIME_NS, FIXED_MTIME_NS + 1, 1_000_000_000 * 10**9 + 123])
_data = st.one_of(st.binary(max_size=40), st.builds(lambda n, b: bytes([b]) * n,
                                                     st.integers(0, 200_000), st.integers(0, 255)))

files = st.builds(File, data=_data, mode=st.sampled_from(MODES), uid=st.sampled_from(IDS),
                  gid=st.sampled_from(IDS), xattrs=_xattrs, mtime_ns=_mtimes)
symlinks = st.builds(Symlink, target=st.sampled_from(["a", "../b", "/etc/passwd", "dangling", "d/e"]),
                     uid=st.sampled_from(IDS), mtime_ns=_mtimes)
fifos = st.builds(Fifo, mode=st.sampled_from((0o644, 0o600)), uid=st.sampled_from(IDS))
devices = st.builds(Device, major=st.integers(1, 10), minor=st.integers(1, 10),
                    kind=st.sampled_from(["c", "b"]), mode=st.sampled_from((0o600, 0o666)))


def _dirs(children: st.SearchStrategy[Any], *, upper: bool) -> st.SearchStrategy[Dir]:
    return st.builds(Dir, entries=st.dictionaries(st.sampled_from(NAMES), children, max_size=4),
                     mode=st.sampled_from((0o755, 0o700, 0o555, 0o1777)), uid=st.sampled_from(IDS),
                     xattrs=_xattrs, opaque=st.booleans() if upper else st.just(False))


def _tree(*, upper: bool) -> st.SearchStrategy[dict[str, Node]]:
    leaves = st.one_of(files, files, symlinks, fifos, devices, *([st.just(WHITEOUT)] * 2 if upper else []))
    nodes = st.recursive(leaves, lambda kids: _dirs(kids, upper=upper), max_leaves=14)
    return st.dictionaries(st.sampled_from(NAMES), nodes, max_size=5)


def file_paths(spec: Any, prefix: str = "") -> list[str]:
    """The paths of the regular files in a spec (hard-link targets)."""
    out = []
    for name, node in spec.items():
        path = f"{prefix}{name}"
        if isinstance(node, File | str | bytes):
            out.append(path)
        elif isinstance(node, Dir):
            out += file_paths(node.entries, path + "/")
        elif isinstance(node, dict):
            out += file_paths(node, path + "/")
    return out


@st.composite
def layer_specs(draw: st.DrawFn, *, upper: bool = False) -> dict[str, Node]:
    """A layer spec; hard links ``hl0``/``hl1`` at the root point at some of its files."""
    spec: dict[str, Node] = dict(draw(_tree(upper=upper)))
    targets = file_paths(spec)
    if targets:
        for i in range(draw(st.integers(0, 2))):
            spec[f"hl{i}"] = Hardlink(draw(st.sampled_from(targets)))
    return spec
