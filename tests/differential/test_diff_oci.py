"""Layers with OCI whiteouts (``.wh.NAME``, ``.wh..wh..opq``) on the program under test, while the kernel gets
the same layers converted to its own format (char 0/0, ``trusted.overlay.opaque=y``): same results."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.differential import Catalog, Recorder, Scenario, assert_same_as_kernel
from support.layers import WHITEOUT, Dir

CASES = Catalog(family="oci")

BOTTOM = {
    "a": "bottom a\n",
    "b": "bottom b\n",
    "d/x": "bottom d/x\n",
    "d/y": "bottom d/y\n",
    "d/sub/z": "bottom z\n",
    "tree/t1/deep": "deep\n",
    "tree/t2": "t2\n",
    "keep/k": "k\n",
}
TOP = {
    "a": WHITEOUT,
    "d": Dir({"top": "top d/top\n"}, opaque=True),
    "tree": WHITEOUT,
    "keep/new": "new\n",
    "keep/k2": WHITEOUT,  # whiteout of a name no layer below has: harmless
}


@CASES.scenario(TOP, BOTTOM)
def oci_whiteout_hides_lower_file(r: Recorder) -> None:
    """A ``.wh.a`` file in a higher layer hides ``a`` below; the marker itself is never visible."""
    r.stat("stat a", "a")
    r.stat("stat .wh.a", ".wh.a")
    r.read("read b", "b")
    r.listdir("ls .")
    r.listdir("ls keep", "keep")


@CASES.scenario(TOP, BOTTOM)
def oci_opaque_dir_hides_lower_entries(r: Recorder) -> None:
    """A ``.wh..wh..opq`` file makes its dir opaque: only that layer's entries show; the marker never does."""
    r.listdir("ls d", "d")
    r.stat("stat d/x", "d/x")
    r.stat("stat d/sub/z", "d/sub/z")
    r.stat("stat d/.wh..wh..opq", "d/.wh..wh..opq")
    r.read("read d/top", "d/top")


@CASES.scenario(TOP, BOTTOM)
def oci_whiteout_of_a_dir(r: Recorder) -> None:
    """``.wh.tree`` hides a whole lower dir; mkdir of the name gives an empty dir; the old subtree stays gone."""
    r.stat("stat tree", "tree")
    r.stat("stat tree/t2", "tree/t2")
    r.call("mkdir tree", os.mkdir, "tree")
    r.listdir("ls tree", "tree")
    r.stat("stat tree/t1", "tree/t1")
    r.write("create tree/t2", "tree/t2", b"new t2")
    r.listdir("ls tree after", "tree")


@CASES.scenario({"top": "t"}, {"a": WHITEOUT, "d": Dir({"m": "middle"}, opaque=True)}, BOTTOM)
def oci_markers_in_a_middle_layer(r: Recorder) -> None:
    """OCI markers in a middle layer act on the layers below them only."""
    r.listdir("ls .")
    r.listdir("ls d", "d")
    r.stat("stat a", "a")
    r.write("create a", "a", b"again")
    r.read("read a", "a")


@CASES.scenario({"d/b": WHITEOUT, "d/c": "c top"}, {"d": Dir({"b": "b mid"}, opaque=True)},
                {"d/a": "a bottom", "d/b": "b bottom"})
def oci_opaque_then_whiteout_above(r: Recorder) -> None:
    """Opaque in the middle, whiteout on top: only the top layer's own names survive in the merged dir."""
    r.listdir("ls d", "d")
    r.stat("stat d/a", "d/a")
    r.stat("stat d/b", "d/b")
    r.call("rmdir d (not empty)", os.rmdir, "d")
    r.call("unlink d/c", os.unlink, "d/c")
    r.call("rmdir d", os.rmdir, "d")
    r.listdir("ls .")


@CASES.scenario(TOP, BOTTOM)
def oci_recreate_and_delete_in_whited_out_places(r: Recorder) -> None:
    """Creating a whited-out name, deleting inside an opaque dir, and rm -rf of an opaque dir all behave."""
    r.write("create a", "a", b"recreated", flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    r.read("read a", "a")
    r.call("unlink d/top", os.unlink, "d/top")
    r.listdir("ls d", "d")
    r.call("rmdir d", os.rmdir, "d")
    r.stat("stat d", "d")
    r.call("mkdir d", os.mkdir, "d")
    r.listdir("ls d again", "d")
    r.call("rename b a", os.rename, "b", "a")
    r.listdir("ls .")


@CASES.scenario({"f": "f"}, BOTTOM, upper={"a": WHITEOUT, "d": Dir({"u": "upper u"}, opaque=True), "up": "up"})
def oci_whiteouts_in_an_existing_upper(r: Recorder) -> None:
    """An upper dir holding OCI markers is read like one holding kernel markers, and can be changed."""
    r.listdir("ls .")
    r.listdir("ls d", "d")
    r.write("create a", "a", b"over the upper whiteout")
    r.call("unlink d/u", os.unlink, "d/u")
    r.listdir("ls d after", "d")
    r.call("unlink b", os.unlink, "b")
    r.listdir("ls . after")


@CASES.scenario(TOP, BOTTOM)
def oci_readdir_never_shows_markers(r: Recorder) -> None:
    """Listings at every level (with scandir types) never contain ``.wh.`` names."""
    for d in (".", "d", "keep"):
        r.value(f"scandir {d}", lambda d=d: sorted((e.name, e.is_dir(follow_symlinks=False))
                                                   for e in os.scandir(d)))


@pytest.mark.mounted
@pytest.mark.differential
@pytest.mark.parametrize("case", CASES.params(), ids=str)
def test_same_as_kernel_with_oci_layers(case: Scenario, tmp_path: Path) -> None:
    """The program under test reading OCI-format layers matches the kernel reading the converted layers."""
    assert_same_as_kernel(case, tmp_path)
