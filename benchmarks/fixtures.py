"""The layers the workloads run on: built once, deterministically, and reused by later runs.

Each fixture lives in ``SCRATCH/fixtures/NAME-PARAMS/`` and is published by renaming a finished temporary
directory, with a ``.done`` stamp beside it: an interrupted build is never mistaken for a finished one.
Lower layers are never written to once built (every system gets its own upper directory per run).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

CHUNK = 1 << 20
SEED = 20240601


def _block() -> bytes:
    """One MiB of incompressible, reproducible bytes."""
    return random.Random(SEED).randbytes(CHUNK)


class Fixtures:
    """Builds and caches the layer trees. Paths returned are absolute and stay valid for the whole run."""

    def __init__(self, root: Path, *, rebuild: bool = False, log: Callable[[str], None] = print) -> None:
        self.root = root
        self.rebuild = rebuild
        self.log = log
        self.root.mkdir(parents=True, exist_ok=True)

    def _cached(self, name: str, build: Callable[[Path], None], **params: int) -> Path:
        key = "-".join([name, *(f"{k}{v}" for k, v in sorted(params.items()))])
        path, stamp, tmp = self.root / key, self.root / f"{key}.done", self.root / f"{key}.tmp"
        if stamp.exists() and path.exists() and not self.rebuild:
            return path
        self.log(f"building fixture {key}")
        stamp.unlink(missing_ok=True)
        for p in (path, tmp):
            if p.exists():
                shutil.rmtree(p)
        tmp.mkdir()
        build(tmp)
        os.sync()
        tmp.rename(path)
        stamp.write_text(json.dumps(params) + "\n")
        return path

    def empty(self) -> Path:
        """A layer with nothing in it."""
        return self._cached("empty", lambda p: None)

    def tree(self, files: int) -> Path:
        """``files`` small files (0–3.5 KiB) under 10 top dirs × 10 subdirs: the stat/find/ls -lR tree."""
        def build(root: Path) -> None:
            block = _block()
            per_dir = max(1, files // 100)
            n = 0
            for top in range(10):
                for sub in range(10):
                    d = root / f"t{top}" / f"s{sub}"
                    d.mkdir(parents=True)
                    for i in range(per_dir):
                        size = (n % 8) * 512
                        (d / f"f{i:05d}").write_bytes(block[n % 1000: n % 1000 + size])
                        n += 1
        return self._cached("tree", build, files=files)

    def bigdir(self, entries: int) -> Path:
        """A layer whose directory ``big/`` holds ``entries`` empty files."""
        def build(root: Path) -> None:
            d = root / "big"
            d.mkdir()
            _mknods(d, (f"entry-{i:06d}" for i in range(entries)))
        return self._cached("bigdir", build, entries=entries)

    def big_file(self, nbytes: int) -> Path:
        """A layer holding one file ``big.bin`` of ``nbytes`` incompressible bytes."""
        def build(root: Path) -> None:
            block = _block()
            with open(root / "big.bin", "wb") as f:
                left = nbytes
                while left > 0:
                    left -= f.write(block[: min(left, CHUNK)])
        return self._cached("bigfile", build, bytes=nbytes)

    def small_files(self, count: int) -> Path:
        """A layer whose directory ``small/`` holds ``count`` files of 4 KiB."""
        def build(root: Path) -> None:
            block = _block()
            d = root / "small"
            d.mkdir()
            for i in range(count):
                (d / f"f{i:05d}").write_bytes(block[i: i + 4096])
        return self._cached("small", build, count=count)

    def tarball(self, files: int) -> Path:
        """``tree.tar`` with ``files`` regular files (rootfs-like sizes), their dirs and 5 % symlinks."""
        def build(root: Path) -> None:
            block = _block()
            rng = random.Random(SEED)
            sizes = [0, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536]
            weights = [5, 10, 15, 15, 15, 15, 10, 8, 5, 2]
            with tarfile.open(root / "tree.tar", "w", format=tarfile.GNU_FORMAT) as tar:
                seen: set[str] = set()
                for i in range(files):
                    d = f"d{i // 1000:03d}/s{(i // 100) % 10}"
                    for parent in (d.split("/")[0], d):
                        if parent not in seen:
                            seen.add(parent)
                            tar.addfile(_tarinfo(parent, tarfile.DIRTYPE, 0o755))
                    name = f"{d}/f{i:06d}"
                    if i % 20 == 19:
                        info = _tarinfo(name, tarfile.SYMTYPE, 0o777)
                        info.linkname = f"f{i - 1:06d}"
                        tar.addfile(info)
                        continue
                    size = rng.choices(sizes, weights)[0]
                    off = rng.randrange(0, CHUNK - size)
                    info = _tarinfo(name, tarfile.REGTYPE, 0o755 if i % 10 == 0 else 0o644)
                    info.size = size
                    tar.addfile(info, io.BytesIO(block[off: off + size]))
        return self._cached("tarball", build, files=files) / "tree.tar"

    def depth_layers(self, layers: int, dirs: int, paths: int, files_per_dir: int) -> tuple[list[Path], list[str]]:
        """Layers ``0`` (bottom) … ``layers-1``, all with the same ``dirs`` directories ``a/b/d00``….

        The bottom layer holds the ``paths`` target files; every other layer adds ``files_per_dir`` files of
        its own to each shared directory. Returns the layer dirs (index = layer number) and the targets'
        relative paths.
        """
        ndirs = dirs
        per_dir = max(1, paths // ndirs)
        targets = [f"a/b/d{j:02d}/target-{i:05d}" for j in range(ndirs) for i in range(per_dir)]

        def build(root: Path) -> None:
            for k in range(layers):
                for j in range(ndirs):
                    d = root / str(k) / "a" / "b" / f"d{j:02d}"
                    d.mkdir(parents=True)
                    if k == 0:
                        _mknods(d, (f"target-{i:05d}" for i in range(per_dir)))
                    else:
                        _mknods(d, (f"layer{k}-{i}" for i in range(files_per_dir)))
        base = self._cached("depth", build, layers=layers, paths=paths, dirs=dirs, perdir=files_per_dir)
        return [base / str(k) for k in range(layers)], targets

    def walk_tree(self, files: int) -> Path:
        """``files`` empty files, 1000 per directory: the tree walked before reading the daemon's RSS."""
        def build(root: Path) -> None:
            for start in range(0, files, 1000):
                d = root / f"d{start // 1000:04d}"
                d.mkdir()
                _mknods(d, (f"f{i:04d}" for i in range(min(1000, files - start))))
        return self._cached("walk", build, files=files)


def _mknods(d: Path, names: Iterator[str]) -> None:
    """Create empty regular files quickly (one mknod each, relative to an open dir fd)."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.mknod(name, 0o644 | stat.S_IFREG, dir_fd=fd)
    finally:
        os.close(fd)


def _tarinfo(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_700_000_000
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def walk_files(root: Path) -> list[str]:
    """Relative paths of every non-directory under ``root``, sorted (a native walk: untimed set-up)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        out.extend(name if rel == "." else f"{rel}/{name}" for name in sorted(filenames))
    return out


def warm(path: Path, *, read_data: bool = False) -> None:
    """Pull a layer into the host caches: lstat everything, and read file data if asked."""
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            p = os.path.join(dirpath, name)
            os.lstat(p)
            if read_data:
                with open(p, "rb", buffering=0) as f:
                    while f.read(CHUNK):
                        pass
