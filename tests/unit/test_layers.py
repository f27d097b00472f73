"""LayerStack.open: validation before anything is touched, layer order, the workdir lock."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from unionfs.fs.layers import LayerError, LayerStack


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    """Three lowers, an upper and a workdir, side by side."""
    out = {}
    for name in ("l0", "l1", "l2", "upper", "work"):
        out[name] = tmp_path / name
        out[name].mkdir()
    return out


def test_order_is_top_down_with_upper_first(dirs: dict[str, Path]) -> None:
    """Index 0 is the upper; the lowers follow in lowerdir order (the first named is the top lower)."""
    stack = LayerStack.open(lowers=[str(dirs["l0"]), str(dirs["l1"]), str(dirs["l2"])], upper=str(dirs["upper"]),
                            work=str(dirs["work"]))
    try:
        assert stack.upper is not None and stack.upper.index == 0 and stack.upper.writable
        assert [layer.path for layer in stack.lowers] == [str(dirs[n]) for n in ("l0", "l1", "l2")]
        assert stack.lower_indices == (1, 2, 3)
        assert [layer.index for layer in stack.layers] == [0, 1, 2, 3]
        assert not any(layer.writable for layer in stack.lowers)
        assert stack.single_device
    finally:
        stack.close()


def test_lowers_only_is_a_read_only_stack(dirs: dict[str, Path]) -> None:
    """Without upper and work the stack has no writable layer; the top lower is index 0."""
    stack = LayerStack.open(lowers=[str(dirs["l0"]), str(dirs["l1"])], upper=None, work=None)
    try:
        assert stack.upper is None and stack.work is None
        assert stack.lower_indices == (0, 1)
    finally:
        stack.close()


def test_a_symlinked_layer_dir_is_resolved(dirs: dict[str, Path], tmp_path: Path) -> None:
    """containers/storage passes lowerdirs as symlinks (``l/SHORTID``): the stack opens their targets."""
    (tmp_path / "l").mkdir()
    os.symlink(dirs["l0"], tmp_path / "l" / "short")
    stack = LayerStack.open(lowers=[str(tmp_path / "l" / "short")], upper=str(dirs["upper"]), work=str(dirs["work"]))
    try:
        assert stack.lowers[0].path == str(dirs["l0"])
    finally:
        stack.close()


def test_no_lowers_is_rejected(dirs: dict[str, Path]) -> None:
    with pytest.raises(LayerError, match="lower"):
        LayerStack.open(lowers=[], upper=str(dirs["upper"]), work=str(dirs["work"]))


@pytest.mark.parametrize("missing", ["l0", "upper", "work"])
def test_missing_dir_is_rejected(dirs: dict[str, Path], missing: str) -> None:
    """A lowerdir, upperdir or workdir that does not exist: LayerError naming it."""
    paths = {k: str(v) for k, v in dirs.items()}
    paths[missing] = str(dirs[missing]) + "-gone"
    with pytest.raises(LayerError, match="no such directory") as info:
        LayerStack.open(lowers=[paths["l0"]], upper=paths["upper"], work=paths["work"])
    assert paths[missing] in str(info.value)


def test_file_instead_of_dir_is_rejected(dirs: dict[str, Path]) -> None:
    (dirs["l1"] / "f").write_text("x")
    with pytest.raises(LayerError, match="not a directory"):
        LayerStack.open(lowers=[str(dirs["l1"] / "f")], upper=None, work=None)


def test_empty_path_is_rejected(dirs: dict[str, Path]) -> None:
    with pytest.raises(LayerError):
        LayerStack.open(lowers=[""], upper=None, work=None)


@pytest.mark.parametrize(("upper", "work"), [("upper", None), (None, "work")])
def test_upper_and_work_come_together(dirs: dict[str, Path], upper: str | None, work: str | None) -> None:
    """An upper without a workdir (or a workdir without an upper) is refused."""
    with pytest.raises(LayerError, match="together"):
        LayerStack.open(lowers=[str(dirs["l0"])], upper=str(dirs[upper]) if upper else None,
                        work=str(dirs[work]) if work else None)


def _nested(dirs: dict[str, Path], inner: str, outer: str) -> dict[str, str]:
    """The paths with ``inner`` moved inside ``outer``."""
    paths = {k: str(v) for k, v in dirs.items()}
    nested = dirs[outer] / "nested"
    nested.mkdir()
    paths[inner] = str(nested)
    return paths


@pytest.mark.parametrize(("inner", "outer"), [
    ("upper", "l0"), ("upper", "l1"), ("l0", "upper"), ("work", "upper"), ("upper", "work"),
    ("work", "l0"), ("l1", "l0"), ("l0", "l1"), ("l0", "work"),
])
def test_overlapping_dirs_are_rejected(dirs: dict[str, Path], inner: str, outer: str) -> None:
    """No dir may lie inside another one of the stack (fuse-overlayfs hangs on these; we refuse clearly)."""
    paths = _nested(dirs, inner, outer)
    with pytest.raises(LayerError, match="inside"):
        LayerStack.open(lowers=[paths["l0"], paths["l1"]], upper=paths["upper"], work=paths["work"])


@pytest.mark.parametrize(("a", "b"), [("l0", "l1"), ("upper", "l0"), ("work", "upper"), ("work", "l1")])
def test_the_same_dir_twice_is_rejected(dirs: dict[str, Path], a: str, b: str) -> None:
    paths = {k: str(v) for k, v in dirs.items()}
    paths[a] = paths[b]
    with pytest.raises(LayerError, match="same directory"):
        LayerStack.open(lowers=[paths["l0"], paths["l1"]], upper=paths["upper"], work=paths["work"])


def test_in_a_deep_stack_the_first_overlapping_pair_is_named(tmp_path: Path) -> None:
    """600 layers: the overlaps are found without comparing every pair, and the message names the first
    offending pair in the order given (here the 3rd layer, which holds the 500th, and not the later pair)."""
    lowers = [tmp_path / f"l{i}" for i in range(600)]
    for lower in lowers:
        lower.mkdir()
    (lowers[2] / "deep").mkdir()
    lowers[500] = lowers[2] / "deep"
    lowers[550] = lowers[10]
    with pytest.raises(LayerError) as info:
        LayerStack.open(lowers=[str(p) for p in lowers], upper=None, work=None)
    assert str(info.value) == f"lowerdir '{lowers[500]}' is inside lowerdir '{lowers[2]}'"
    lowers[500] = tmp_path / "l500"
    with pytest.raises(LayerError) as info:
        LayerStack.open(lowers=[str(p) for p in lowers], upper=None, work=None)
    assert str(info.value) == f"lowerdir '{lowers[10]}' and lowerdir '{lowers[550]}' are the same directory"


def test_overlap_through_a_symlink_is_seen(dirs: dict[str, Path], tmp_path: Path) -> None:
    """Overlap is judged on real paths: an upper reached through a symlink into a lower is refused."""
    (dirs["l0"] / "inner").mkdir()
    os.symlink(dirs["l0"] / "inner", tmp_path / "sneaky")
    with pytest.raises(LayerError, match="inside"):
        LayerStack.open(lowers=[str(dirs["l0"])], upper=str(tmp_path / "sneaky"), work=str(dirs["work"]))


@pytest.mark.parametrize("which", ["upper", "l0"])
def test_mountpoint_inside_a_layer_is_rejected(dirs: dict[str, Path], which: str) -> None:
    (dirs[which] / "mnt").mkdir()
    with pytest.raises(LayerError, match="inside"):
        LayerStack.open(lowers=[str(dirs["l0"])], upper=str(dirs["upper"]), work=str(dirs["work"]),
                        mountpoint=str(dirs[which] / "mnt"))


def test_layer_inside_the_mountpoint_is_rejected(dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(LayerError, match="inside"):
        LayerStack.open(lowers=[str(dirs["l0"])], upper=str(dirs["upper"]), work=str(dirs["work"]),
                        mountpoint=str(tmp_path))


def test_separate_mountpoint_is_accepted(dirs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    stack = LayerStack.open(lowers=[str(dirs["l0"])], upper=str(dirs["upper"]), work=str(dirs["work"]),
                            mountpoint=str(tmp_path / "mnt"))
    stack.close()


def test_workdir_in_use_is_rejected_until_released(dirs: dict[str, Path]) -> None:
    """Two stacks may not share a workdir; once the first is closed the workdir is free again."""
    first = LayerStack.open(lowers=[str(dirs["l0"])], upper=str(dirs["upper"]), work=str(dirs["work"]))
    try:
        with pytest.raises(LayerError, match="in use"):
            LayerStack.open(lowers=[str(dirs["l1"])], upper=str(dirs["upper"]), work=str(dirs["work"]))
    finally:
        first.close()
    LayerStack.open(lowers=[str(dirs["l1"])], upper=str(dirs["upper"]), work=str(dirs["work"])).close()


def test_close_is_idempotent(dirs: dict[str, Path]) -> None:
    stack = LayerStack.open(lowers=[str(dirs["l0"])], upper=str(dirs["upper"]), work=str(dirs["work"]))
    stack.close()
    stack.close()


def test_workdir_on_another_filesystem_is_rejected(dirs: dict[str, Path]) -> None:
    """The workdir must be on the upper's filesystem (copy-up publishes by rename)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(dirs["upper"]).st_dev:
        pytest.skip("no second filesystem to put a workdir on")
    with tempfile.TemporaryDirectory(dir=shm) as other, pytest.raises(LayerError, match="same filesystem"):
        LayerStack.open(lowers=[str(dirs["l0"])], upper=str(dirs["upper"]), work=other)
