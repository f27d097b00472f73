"""The step cache's records in the store, and what gc does with them (no mount: layers are committed from
plain directories)."""

from __future__ import annotations

from pathlib import Path

from support.layers import File, build_layer

from unionfs.image.build.cache import BuildCache, State
from unionfs.image.commit import commit_layer
from unionfs.image.records import HistoryEntry, ImageConfig
from unionfs.image.store import Store


def layer(store: Store, tmp_path: Path, name: str, data: bytes) -> str:
    tree = build_layer({name: File(data)}, tmp_path / name)
    return commit_layer(store, str(tree), parent=None, created_by=f"COPY {name}").digest


def state_of(digest: str) -> State:
    return State((digest,), (HistoryEntry(digest, "", "COPY"),), ImageConfig(cmd=("sh",)))


def test_finished_builds_keep_their_layers_abandoned_ones_lose_them(tmp_path: Path) -> None:
    with Store(str(tmp_path / "store"), writable=True) as store:
        kept, lost, reused = (layer(store, tmp_path, n, n.encode()) for n in ("kept", "lost", "reused"))
        done = BuildCache(store)
        done.begin()
        done.record("k1", state_of(kept))
        done.finish("img")
        done.close()
        abandoned = BuildCache(store)
        abandoned.begin()
        abandoned.record("k2", state_of(lost))
        abandoned.record("k3", state_of(reused))
        abandoned.close()  # never finished: interrupted, failed or killed
        assert abandoned.lookup("k2") == state_of(lost)  # until gc, a retry may use it
        claimer = BuildCache(store)
        claimer.begin()
        assert claimer.lookup("k3") == state_of(reused)
        claimer.finish("other")  # a finished build that reused k3 claims it
        claimer.close()
        report = store.gc()
        assert report.removed_layers == [lost]
        assert report.removed_cache == ["k2"]
        assert store.has_layer(kept) and store.has_layer(reused) and not store.has_layer(lost)
        again = BuildCache(store)
        assert again.lookup("k1") == state_of(kept) and again.lookup("k2") is None
        report = store.gc(build_cache=True)
        assert sorted(report.removed_layers) == sorted([kept, reused])
        assert sorted(report.removed_cache) == ["k1", "k3"]
        assert store.check() == [] and list((tmp_path / "store" / "builds").iterdir()) == []


def test_a_lookup_needs_every_layer(tmp_path: Path) -> None:
    with Store(str(tmp_path / "store"), writable=True) as store:
        digest = layer(store, tmp_path, "f", b"x")
        cache = BuildCache(store)
        cache.begin()
        cache.record("k", state_of(digest))
        cache.finish("x")
        cache.close()
        (tmp_path / "store" / "layers" / f"{digest}.json").unlink()
        assert BuildCache(store).lookup("k") is None
