"""Property: an image committed from random layers, pushed to an OCI layout and pulled back, mounts as the
same tree as the original (every entry kind, whiteouts and opaque dirs in any layer)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import given, settings
from images_support import mounted_image
from support.layers import Node, build_layer
from support.snapshot import diff_snapshots, snapshot
from support.strategies import layer_stacks

from unionfs.image import commit as commit_mod
from unionfs.image import pull as pull_mod
from unionfs.image import push as push_mod
from unionfs.image.layout import LayoutDestination, LayoutSource
from unionfs.image.store import Store


@settings(max_examples=20)
@given(stack=layer_stacks(max_layers=3))
def test_commit_push_pull_mounts_the_same_tree(tools: None, stack: tuple[dict[str, Node], ...]) -> None:
    work = Path(tempfile.mkdtemp(prefix="unionfs-images-prop-"))
    try:
        store_dir = work / "store"
        with Store(str(store_dir), writable=True) as store:
            base = commit_mod.Base()
            for i, spec in enumerate(reversed(stack)):  # bottom layer first
                layer = build_layer(spec, work / f"l{i}")
                result = commit_mod.commit_tree(store, str(layer), image="orig", base=base)
                base = commit_mod.base_from_image(store, "orig")
                assert result.image.layers == base.layers
            push_mod.push(store, "orig", LayoutDestination(str(work / "layout"), "t"))
            source = LayoutSource(str(work / "layout"), "t")
            try:
                pulled = pull_mod.pull(store, source, name="copy")
            finally:
                source.close()
            assert len(pulled.image.layers) == len(stack)
        with mounted_image(store_dir, "orig", work / "m1") as m1:
            expected = snapshot(m1)
        with mounted_image(store_dir, "copy", work / "m2") as m2:
            actual = snapshot(m2)
        assert diff_snapshots(expected, actual, names=("original", "pulled")) == []
    finally:
        shutil.rmtree(work, ignore_errors=True)
