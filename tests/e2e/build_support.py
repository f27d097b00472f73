"""Helpers of the ``unionfs build`` tests: a store with base images, the ``unionfs`` command, image trees.

Two bases: ``bb``, a busybox-static tree (a second to make, for the many cache tests), and ``e2e-base``, the
cached Debian tarball of :mod:`e2e_support` unpacked and imported (about ten seconds), for the Containerfile
that compiles C and for the comparison with ``podman build``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from e2e_support import run

from unionfs.mountinfo import mounts

BUSYBOX = "/bin/busybox"
BB_APPLETS = ("sh", "echo", "cat", "ls", "mkdir", "rm", "touch", "env", "id", "chmod", "sleep", "true", "false",
              "test", "printf", "cp", "mv")
UNIONFS = str(Path(sys.prefix) / "bin" / "unionfs")


def make_busybox_tree(root: Path) -> None:
    """A tiny root: busybox-static and its applets in /bin, /etc/passwd and /etc/group, /tmp (1777)."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in BB_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)


@dataclass
class BuildStore:
    """A unionfs store for build tests and the ``unionfs`` command on it."""

    root: Path

    def unionfs(self, *args: str, check: bool = True, cwd: Path | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "UNIONFS_STORE": str(self.root)}
        return run([UNIONFS, *args], env=env, check=check, cwd=cwd, timeout=timeout)

    def build(self, ctx: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``unionfs build ARGS CTX``."""
        return self.unionfs("build", *args, str(ctx), check=check)

    def build_events(self, ctx: Path, *args: str) -> list[dict[str, object]]:
        """``unionfs build --json``: the step events (the ``done`` event last)."""
        out = self.build(ctx, "--json", *args).stdout
        return [e for e in map(json.loads, out.splitlines()) if e["event"] in ("step", "done")]

    def state(self) -> dict[str, object]:
        """What a failed build must leave as it was: the images (name → id), the layers, the cache."""
        images = json.loads(self.unionfs("images", "--json").stdout)
        layers = sorted(p.name for p in (self.root / "layers").iterdir()) if (self.root / "layers").exists() else []
        cache = self.root / "cache"
        return {"images": {i["name"]: i["id"] for i in images}, "layers": layers,
                "cache": sorted(p.name for p in cache.iterdir()) if cache.exists() else []}

    def leftovers(self) -> list[str]:
        """Mounts under the store and entries in its tmp/ (a build leaves neither)."""
        prefix = str(self.root) + "/"
        found = [m.mountpoint for m in mounts() if m.mountpoint.startswith(prefix)]
        tmp = self.root / "tmp"
        return found + ([f"tmp/{p.name}" for p in tmp.iterdir()] if tmp.exists() else [])

    @contextlib.contextmanager
    def mounted(self, image: str) -> Iterator[Path]:
        """The image mounted read-only; always unmounted."""
        mnt = Path(tempfile.mkdtemp(prefix="unionfs-build-mnt-"))
        try:
            self.unionfs("mount", image, str(mnt), "--ro")
            try:
                yield mnt
            finally:
                self.unionfs("umount", str(mnt), check=False)
        finally:
            with contextlib.suppress(OSError):
                mnt.rmdir()


def tree(root: Path, *, ignore: frozenset[str] = frozenset()) -> dict[str, tuple[object, ...]]:
    """path → (type, mode, uid, gid, content hash or link target) of everything under ``root`` (no mtimes),
    without the paths in ``ignore`` and what is under them."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in ignore or any(rel.startswith(i + "/") for i in ignore):
                if name in dirnames:
                    dirnames.remove(name)
                continue
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    detail: object = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                detail = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                detail = st.st_rdev
            else:
                detail = ""
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, detail)
    return out


def cached_flags(events: list[dict[str, object]]) -> list[bool]:
    """Per step after FROM: was it a cache hit?"""
    return [bool(e["cached"]) for e in events if e["event"] == "step" and e["step"] != 1]
