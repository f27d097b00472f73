"""Top-down resolution and merged listings over 1-4 lowers (and an upper), through Resolver and UnionFS."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

import pytest
from support.layers import Dir, File, Symlink
from unitkit import Env, assert_errno, names, read_all, visible_tree

from unionfs.fs.attr import Attr, compact, from_compact
from unionfs.fs.cache import LookupCache
from unionfs.fs.dirstate import DirState, LowerEntry
from unionfs.fs.lookup import Resolver


def layer_spec(i: int) -> dict[str, object]:
    """Layer ``i`` of a stack: its own file, a shared file, its own entry in merged dirs ``d`` and ``d/e``."""
    return {
        f"only{i}": f"only in layer {i}\n",
        "shared": File(f"layer {i} wins\n", mode=0o600 + i),
        f"d/f{i}": f"d/f{i}\n",
        f"d/e/g{i}": f"g{i}\n",
        "d/common": f"common from {i}\n",
    }


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("with_upper", [False, True])
def test_resolution_over_n_lowers(mkenv: Callable[..., Env], depth: int, with_upper: bool) -> None:
    """The highest layer's copy of a name wins; directories merge the names of every layer."""
    env = mkenv([layer_spec(i) for i in range(depth)], readonly=not with_upper)
    fs = env.open()
    assert names(fs) == sorted(["d", "shared", *(f"only{i}" for i in range(depth))])
    assert read_all(fs, "shared") == b"layer 0 wins\n"
    assert stat.S_IMODE(fs.getattr("shared").st_mode) == 0o600
    for i in range(depth):
        assert read_all(fs, f"only{i}") == f"only in layer {i}\n".encode()
        assert read_all(fs, f"d/f{i}") == f"d/f{i}\n".encode()
    assert names(fs, "d") == sorted(["common", "e", *(f"f{i}" for i in range(depth))])
    assert names(fs, "d/e") == sorted(f"g{i}" for i in range(depth))
    assert read_all(fs, "d/common") == b"common from 0\n"


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_name_resolves_in_the_highest_layer_that_has_it(mkenv: Callable[..., Env], depth: int) -> None:
    """A name present only in layers k..depth-1 resolves in layer k (Resolver reports the layer index)."""
    specs: list[dict[str, object]] = [{} for _ in range(depth)]
    for k in range(depth):
        for j in range(k, depth):
            specs[j][f"from{k}"] = f"layer {j}\n"
    env = mkenv(specs, readonly=True)
    fs = env.open()
    for k in range(depth):
        node = fs.resolver.lookup(f"from{k}")
        assert node is not None and node.layer == k and not node.in_upper
        assert read_all(fs, f"from{k}") == f"layer {k}\n".encode()


def test_a_file_hides_a_directory_below(mkenv: Callable[..., Env]) -> None:
    """A non-directory in a higher layer hides a directory of the same name and its subtree."""
    env = mkenv([{"x": "a file\n"}, {"x/inner": "hidden\n", "x/sub/deep": "hidden\n"}])
    fs = env.open()
    assert stat.S_ISREG(fs.getattr("x").st_mode)
    assert read_all(fs, "x") == b"a file\n"
    assert_errno(errno.ENOTDIR, fs.getattr, "x/inner")
    assert_errno(errno.ENOTDIR, fs.readdir, "x")


def test_a_symlink_hides_a_directory_below(mkenv: Callable[..., Env]) -> None:
    env = mkenv([{"x": Symlink("elsewhere")}, {"x/inner": "hidden\n"}])
    fs = env.open()
    assert stat.S_ISLNK(fs.getattr("x").st_mode)
    assert fs.readlink("x") == "elsewhere"
    assert_errno(errno.ENOTDIR, fs.getattr, "x/inner")


def test_a_directory_hides_a_file_below(mkenv: Callable[..., Env]) -> None:
    """A directory in a higher layer hides a non-directory below, and the merge stops there: a directory
    further down is not merged through the file."""
    env = mkenv([{"x/top": "t\n"}, {"x": "a file\n"}, {"x/bottom": "b\n"}])
    fs = env.open()
    assert stat.S_ISDIR(fs.getattr("x").st_mode)
    assert names(fs, "x") == ["top"]
    assert_errno(errno.ENOENT, fs.getattr, "x/bottom")


def test_upper_file_hides_lower_directory(mkenv: Callable[..., Env]) -> None:
    env = mkenv([{"x/inner": "hidden\n"}], upper={"x": "upper file\n"})
    fs = env.open()
    assert read_all(fs, "x") == b"upper file\n"
    assert_errno(errno.ENOTDIR, fs.readdir, "x")


def test_upper_directory_hides_lower_file(mkenv: Callable[..., Env]) -> None:
    env = mkenv([{"x": "lower file\n"}], upper={"x/mine": "m\n"})
    fs = env.open()
    assert names(fs, "x") == ["mine"]


def test_merged_directory_metadata_comes_from_its_highest_copy(mkenv: Callable[..., Env]) -> None:
    """Mode, owner and mtime of a merged directory are those of the top copy."""
    env = mkenv([{"d": Dir({"a": "a"}, mode=0o711, uid=1000, gid=1001, mtime_ns=5 * 10**9)},
                 {"d": Dir({"b": "b"}, mode=0o755, uid=0, gid=0)}], readonly=True)
    fs = env.open()
    attrs = fs.getattr("d")
    assert stat.S_IMODE(attrs.st_mode) == 0o711
    assert (attrs.st_uid, attrs.st_gid, attrs.st_mtime_ns) == (1000, 1001, 5 * 10**9)
    assert names(fs, "d") == ["a", "b"]


def test_opaque_directory_in_a_middle_layer_stops_the_merge(mkenv: Callable[..., Env]) -> None:
    """top d{a} + middle opaque d{b} + bottom d{c} shows a and b only."""
    env = mkenv([{"d/a": "a"}, {"d": Dir({"b": "b"}, opaque=True)}, {"d/c": "c"}], readonly=True)
    fs = env.open()
    assert names(fs, "d") == ["a", "b"]
    assert_errno(errno.ENOENT, fs.getattr, "d/c")


def test_deep_paths_spread_over_layers(mkenv: Callable[..., Env]) -> None:
    """Each component of a deep path may come from a different layer."""
    env = mkenv([{"a/b/c/top": "1"}, {"a/b/mid": "2"}, {"a/b/c/d/bottom": "3"}, {"a/x": "4"}], readonly=True)
    fs = env.open()
    assert names(fs, "a") == ["b", "x"]
    assert names(fs, "a/b") == ["c", "mid"]
    assert names(fs, "a/b/c") == ["d", "top"]
    assert read_all(fs, "a/b/c/d/bottom") == b"3"


def test_missing_paths(mkenv: Callable[..., Env]) -> None:
    """Missing names are ENOENT; so are children of missing names; children of files ENOTDIR."""
    env = mkenv([{"f": "f", "d": {}}])
    fs = env.open()
    assert_errno(errno.ENOENT, fs.getattr, "nope")
    assert_errno(errno.ENOENT, fs.getattr, "nope/child")
    assert_errno(errno.ENOENT, fs.getattr, "d/nope")
    assert_errno(errno.ENOENT, fs.readdir, "nope")
    assert_errno(errno.ENOTDIR, fs.getattr, "f/child")
    assert fs.resolver.lookup("nope") is None
    assert fs.resolver.lookup("nope/child") is None
    assert fs.resolver.listdir("f") is None


def test_listing_has_no_duplicates_and_right_types(mkenv: Callable[..., Env]) -> None:
    """A name in several layers is listed once, with the type and inode number of its visible copy."""
    env = mkenv([{"x": "file", "s": Symlink("t"), "d/a": "a"}, {"x": "below", "s/in": "dir below", "d/b": "b"}])
    fs = env.open()
    entries = fs.readdir("")
    assert sorted(n for n, _k, _i in entries) == ["d", "s", "x"]
    kinds = {n: k for n, k, _i in entries}
    assert kinds == {"d": stat.S_IFDIR, "s": stat.S_IFLNK, "x": stat.S_IFREG}
    for name, _kind, ino in entries:
        assert ino == fs.getattr(name).st_ino
    assert fs.getattr("x").st_ino == os.lstat(env.lowers[0] / "x").st_ino


def test_a_merged_directory_reports_nlink_one(mkenv: Callable[..., Env]) -> None:
    """A directory merged from several layers has no meaningful link count: 1, as overlayfs reports; a
    directory from one layer keeps its own count."""
    env = mkenv([{"m/a/x": "1", "one/b/y": "2"}, {"m/c/z": "3"}], readonly=True)
    fs = env.open()
    assert fs.getattr("m").st_nlink == 1
    assert fs.getattr("one").st_nlink == os.lstat(env.lowers[0] / "one").st_nlink


@pytest.mark.parametrize("case", ["upper+lower", "opaque-upper", "one-lower", "two-lowers", "opaque-top-lower"])
def test_the_root_link_count_needs_no_scan_of_every_layer(mkenv: Callable[..., Env], case: str) -> None:
    """The first stat of a new mount asks for the root's st_nlink: it is the one a built root state gives
    (1 where merged, as the kernel reports), found without reading the root of every layer."""
    lower = {"a": "a"}
    if case == "upper+lower":
        env = mkenv([lower], upper={"u": "u"})
    elif case == "opaque-upper":
        env = mkenv([lower], upper={"u": "u"})
        assert env.upper is not None
        os.setxattr(env.upper, "trusted.overlay.opaque", b"y")
    elif case == "one-lower":
        env = mkenv([lower], readonly=True)
    elif case == "two-lowers":
        env = mkenv([lower, {"b": "b"}], readonly=True)
    else:
        env = mkenv([{".wh..wh..opq": "", "a": "a"}, {"b": "b"}], readonly=True)
    fs = env.open()
    first = fs.getattr("").st_nlink
    assert fs.cache.peek_dir("") is None  # answered without building the root's merged state
    fs.readdir("")
    assert fs.cache.peek_dir("") is not None
    fresh = env.remount(fs)
    fresh.readdir("")
    assert fresh.getattr("").st_nlink == first
    assert (first == 1) is (case in ("upper+lower", "two-lowers"))  # an unmerged directory has 2 links or more


def test_cache_answers_repeat_lookups(mkenv: Callable[..., Env]) -> None:
    """A second lookup in a directory is a cache hit; the answers do not change."""
    env = mkenv([{"d/a": "a", "d/b": "b"}, {"d/c": "c"}], readonly=True)
    fs = env.open()
    first = visible_tree(fs)
    hits = fs.cache.stats.hits
    assert visible_tree(fs) == first
    assert fs.cache.stats.hits > hits
    snap = fs.cache.snapshot()
    assert snap["dirs"] >= 2 and snap["entries"] > 0


@pytest.mark.parametrize("bound", [1, 3, 8])
def test_a_tiny_cache_gives_the_same_answers(mkenv: Callable[..., Env], bound: int) -> None:
    """With a cache bound far below the tree size, evictions happen and every answer stays the same."""
    spec = {f"d{i}/f{j}": f"{i}{j}" for i in range(4) for j in range(4)}
    env = mkenv([spec, {f"d{i}/g": "g" for i in range(4)}], readonly=True)
    reference = visible_tree(env.open())
    fs = env.open(cache_entries=bound)
    assert visible_tree(fs) == reference
    assert visible_tree(fs) == reference
    assert fs.cache.stats.evictions > 0
    assert fs.cache.entries <= max(bound, max(s.size for s in fs.cache.dirs.values()) if fs.cache.dirs else 0)


def test_resolver_nodes(mkenv: Callable[..., Env]) -> None:
    """Resolver.lookup: the root is an upper directory chaining every lower; an upper name reports
    upper=True; a merged directory chains the lower layers holding it, top-down."""
    env = mkenv([{"d/a": "a", "f": "f"}, {"d/b": "b"}, {"x": "x"}], upper={"u": "u", "d/c": "c"})
    stack = env.open().stack
    resolver = Resolver.of_stack(stack, LookupCache())
    root = resolver.lookup("")
    assert root is not None and root.is_dir and root.in_upper and root.merge_layers == (1, 2, 3)
    u = resolver.lookup("u")
    assert u is not None and u.in_upper and u.layer == 0
    d = resolver.lookup("d")
    assert d is not None and d.in_upper and d.merge_layers == (1, 2)
    f = resolver.lookup("f")
    assert f is not None and not f.in_upper and f.layer == 1 and f.merge_layers == ()
    x = resolver.lookup("x")
    assert x is not None and x.layer == 3
    assert sorted(resolver.listdir("d") or []) == ["a", "b", "c"]
    assert resolver.lookup("d/nope") is None


# --- LookupCache on its own -------------------------------------------------------------------------------

def _state(path: str, names: tuple[str, ...] = ()) -> DirState:
    return DirState(path, None, set(), False, (1,), {n: LowerEntry(stat.S_IFREG, 1, ()) for n in names})


def _attr(ino: int) -> Attr:
    return Attr(stat.S_IFREG | 0o644, ino, 1, 0, 0, 0, 0, 0, 4096, 0, 0, 0)


def test_invalidate_subtree_drops_the_path_and_below_only() -> None:
    """``a`` and ``a/…`` go; ``ab`` (same prefix, not below) and ``b`` stay; counters say how many went."""
    cache = LookupCache()
    for path in ("a", "a/b", "a/b/c", "ab", "b"):
        cache.put_dir(_state(path, ("x",)))
        cache.put_attrs(path, _attr(1))
    cache.invalidate_subtree("a")
    assert sorted(cache.dirs) == ["ab", "b"]
    assert sorted(cache.attrs) == ["ab", "b"]
    assert cache.stats.invalidations == 6
    assert cache.entries == sum(s.size for s in cache.dirs.values()) + len(cache.attrs)
    cache.invalidate_subtree("")
    assert not cache.dirs and not cache.attrs and cache.entries == 0


def test_cache_counts_hits_and_misses() -> None:
    cache = LookupCache()
    assert cache.get_dir("d") is None and cache.get_attrs("d") is None
    cache.put_dir(_state("d"))
    cache.put_attrs("d", _attr(7))
    assert cache.get_dir("d") is not None and cache.get_attrs("d") == _attr(7)
    assert cache.peek_dir("d") is not None
    snap = cache.snapshot()
    assert (snap["hits"], snap["misses"]) == (2, 2)


def test_cache_stays_within_its_bound() -> None:
    """Entries (names in tables + attribute dicts) never exceed the bound once more than one item is held;
    the least recently used directory goes first."""
    cache = LookupCache(max_entries=10)
    for i in range(20):
        cache.put_dir(_state(f"d{i}", ("x", "y")))
        cache.put_attrs(f"f{i}", _attr(i))
        assert cache.entries <= 10
    assert cache.stats.evictions > 0
    cache.get_dir("d19")
    cache.put_dir(_state("new", ("x", "y")))
    assert "d19" in cache.dirs
    cache.drop_attrs("f19")
    cache.drop_attrs("never-there")
    assert cache.entries == sum(s.size for s in cache.dirs.values()) + len(cache.attrs)


def test_attributes_live_in_their_directory_table_and_go_with_it() -> None:
    """A lower object's record is kept (compact) in its cached directory's table, counted in that directory's
    size; dropping it, invalidating its path or its directory, or evicting the directory forgets it, and the
    count of entries stays the sum of what is held."""
    cache = LookupCache(max_entries=100)
    cache.put_dir(_state("d", ("a", "b")))
    cache.put_attrs("d/a", _attr(5))
    cache.put_attrs("d/b", _attr(6))
    assert not cache.attrs  # not in the path-keyed table
    state = cache.peek_dir("d")
    assert state is not None and state.size == 1 + 2 + 2
    assert cache.get_attrs("d/a") == _attr(5) and cache.get_attrs("d/b") == _attr(6)
    assert cache.get_attrs("d/a") is not cache.get_attrs("d/a")  # made again from the compact record
    cache.drop_attrs("d/a")
    assert cache.get_attrs("d/a") is None and cache.entries == 1 + 2 + 1
    cache.invalidate_subtree("d/b")  # the object's own path: its record goes, its directory stays
    assert cache.get_attrs("d/b") is None and cache.peek_dir("d") is not None and cache.entries == 3
    cache.put_attrs("d/b", _attr(7))
    before = cache.stats.invalidations
    cache.invalidate_subtree("d")
    assert cache.stats.invalidations == before + 2 and cache.entries == 0
    assert cache.get_attrs("d/b") is None
    small = LookupCache(max_entries=6)
    small.put_dir(_state("x", ("a",)))
    small.put_attrs("x/a", _attr(1))
    small.put_dir(_state("y", ("a", "b")))
    small.put_attrs("y/a", _attr(2))  # 3 + 4 entries > 6: the least recently used directory goes, record and all
    assert small.peek_dir("x") is None and small.get_attrs("x/a") is None and small.get_attrs("y/a") == _attr(2)
    kept = small.peek_dir("y")
    assert kept is not None and small.entries == kept.size == 4 and small.stats.evictions == 1


def test_the_compact_record_keeps_every_field() -> None:
    """64-bit inode and device numbers, sizes past 4 GiB, negative times: the record made again is equal."""
    attr = Attr(stat.S_IFCHR | 0o620, (1 << 64) - 1, 7, 65534, 4_000_000_000, (1 << 63) + 9, 1 << 40, 1 << 33,
                1 << 20, -1_500_000_000_000_000_001, 0, (1 << 62) + 3)
    record = compact(attr)
    assert record is not None and from_compact(record) == attr
    assert compact(attr.replace(st_nlink=1 << 32)) is None and compact(attr.replace(st_gid=-1)) is None


def test_a_record_out_of_the_compact_ranges_is_not_cached() -> None:
    cache = LookupCache()
    cache.put_dir(_state("d", ("a",)))
    cache.put_attrs("d/a", _attr(1).replace(st_uid=-5))
    assert cache.get_attrs("d/a") is None and cache.entries == 2


def test_replacing_a_directory_state_keeps_the_count_right() -> None:
    cache = LookupCache()
    cache.put_dir(_state("d", ("a", "b", "c")))
    cache.put_dir(_state("d", ("a",)))
    assert cache.entries == 2
    cache.clear()
    assert cache.entries == 0


def test_dir_state_updates() -> None:
    """upper_set / upper_remove / upper_whiteout keep the merged listing right without touching the disk."""
    state = _state("d", ("low1", "low2"))
    assert sorted(state.visible_names()) == ["low1", "low2"]
    state.upper_set("new", stat.S_IFREG)
    state.upper_whiteout("low1")
    assert sorted(state.visible_names()) == ["low2", "new"]
    state.upper_set("low1", stat.S_IFDIR)
    assert sorted(state.visible_names()) == ["low1", "low2", "new"]
    state.upper_remove("new")
    state.upper_opaque = True
    assert sorted(state.visible_names()) == ["low1"]
