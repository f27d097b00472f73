"""Helpers of the image-transfer tests: the ``unionfs`` command, a private podman, a loopback registry,
tree listings to compare, and hand-made OCI layouts (no pytest in here).

Real tools only: podman (runc, cgroupfs, no network, private storage under a temp dir, as in
``tests/e2e``), skopeo, umoci, Debian's ``docker-registry``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from support.mounts import unionfs_mount

UNIONFS = str(Path(sys.executable).with_name("unionfs"))
TIMEOUT = 300
BUSYBOX = "/bin/busybox"
REQUIRED = ("podman", "runc", "skopeo", "umoci", "docker-registry", BUSYBOX)


def missing_tools() -> list[str]:
    return [t for t in REQUIRED if shutil.which(t) is None and not os.path.exists(t)]


@dataclass
class Result:
    code: int
    out: str
    err: str


def unionfs(store: Path, *args: str, env: dict[str, str] | None = None, prefix: Sequence[str] = (),
            timeout: float = TIMEOUT) -> Result:
    """Run the ``unionfs`` command on ``store``."""
    full_env = {**os.environ, "UNIONFS_STORE": str(store), **(env or {})}
    proc = subprocess.run([*prefix, UNIONFS, *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ok(store: Path, *args: str, **kwargs: object) -> str:
    """``unionfs ARGS`` that must succeed; its stdout."""
    result = unionfs(store, *args, **kwargs)  # type: ignore[arg-type]
    assert result.code == 0, f"unionfs {' '.join(args)} failed ({result.code}):\n{result.err}"
    return result.out


def run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = TIMEOUT,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# -- trees ---------------------------------------------------------------------------------------------------

def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def tree(root: Path, *, mtimes: bool = True) -> dict[str, tuple[object, ...]]:
    """Every path below ``root`` (the root itself excluded: its attributes are the container tool's) →
    (type, mode, uid, gid, size or content digest, link target, device, xattrs, hard-link group, mtime).
    The hard-link group is the first path of the visible paths sharing the inode (None when it is alone:
    a link count that counts a deleted name is not compared)."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = _digest(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISCHR(st.st_mode) or \
                stat.S_ISBLK(st.st_mode) else None
            xattrs: tuple[tuple[str, bytes], ...] = ()
            with contextlib.suppress(OSError):
                xattrs = tuple(sorted((a, os.getxattr(path, a, follow_symlinks=False))
                                      for a in os.listxattr(path, follow_symlinks=False)
                                      if not a.startswith(("trusted.overlay.", "user.overlay."))))
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, []).append(rel)
            mtime = st.st_mtime_ns if mtimes and not stat.S_ISDIR(st.st_mode) else None
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content, target, rdev, xattrs,
                        None, mtime)
    for group in inodes.values():
        if len(group) > 1:
            for rel in group:
                out[rel] = (*out[rel][:8], min(group), out[rel][9])
    return out


def tree_diff(a: dict[str, tuple[object, ...]], b: dict[str, tuple[object, ...]]) -> list[str]:
    lines = []
    for path in sorted(a.keys() | b.keys()):
        if a.get(path) != b.get(path):
            lines.append(f"{path}: {a.get(path)} != {b.get(path)}")
    return lines


def store_state(store: Path) -> dict[str, object]:
    """Everything in the store except the lock and the staging dir's absence/presence: path → (type,
    content digest or link target).  Two equal states mean the store was left as it was."""
    state: dict[str, object] = {}
    if not store.exists():
        return state
    for dirpath, dirnames, filenames in os.walk(store):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(store))
            if rel == "lock" or rel.startswith("tmp/"):
                continue
            st = os.lstat(path)
            state[rel] = _digest(path) if stat.S_ISREG(st.st_mode) else stat.S_IFMT(st.st_mode)
    leftovers = sorted(os.listdir(store / "tmp")) if (store / "tmp").exists() else []
    state["tmp leftovers"] = leftovers
    return state


# -- hand-made layouts -----------------------------------------------------------------------------------------

def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_bytes(members: Sequence[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, *, linkname: str = "",
           mode: int = 0o644, major: int = 0, minor: int = 0) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    info.mtime = 1_700_000_000
    info.devmajor, info.devminor = major, minor
    if kind == tarfile.REGTYPE:
        info.size = len(data or b"")
    return info, data if kind == tarfile.REGTYPE else None


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


@dataclass
class LayoutSpec:
    """An OCI layout to write: layer blobs (as stored) with their diff_ids, and what the manifest says."""

    blobs: list[bytes]
    diff_ids: list[str] | None = None
    declared: list[tuple[str, int]] | None = None
    """(digest, size) per layer as the manifest declares it (default: the real ones)."""
    skip_blobs: set[int] = field(default_factory=set)
    """Layers whose blob is not written."""


def write_layout(path: Path, spec: LayoutSpec, tag: str = "t") -> None:
    (path / "blobs" / "sha256").mkdir(parents=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(data: bytes) -> str:
        digest = sha(data)
        (path / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return digest

    layers = []
    for i, blob in enumerate(spec.blobs):
        digest, size = spec.declared[i] if spec.declared else (sha(blob), len(blob))
        if i not in spec.skip_blobs:  # stored under the name the manifest gives it
            (path / "blobs" / "sha256" / digest[7:]).write_bytes(blob)
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if blob[:2] == b"\x1f\x8b" else "")
        layers.append({"mediaType": media, "digest": digest, "size": size})
    diff_ids = spec.diff_ids if spec.diff_ids is not None else [
        sha(gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b) for b in spec.blobs]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
                         "diff_ids": diff_ids}, "config": {"Cmd": ["/bin/sh"]}}).encode()
    cdigest = put(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest,
                                      "size": len(config)}, "layers": layers}).encode()
    mdigest = put(manifest)
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                "digest": mdigest, "size": len(manifest),
                                                "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (path / "index.json").write_text(json.dumps(index))


# -- podman ------------------------------------------------------------------------------------------------

class Podman:
    """podman on a private storage root under ``home`` (kernel overlay driver, runc, cgroupfs, no network)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        for sub in ("root", "runroot", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        (home / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{home}/root"\nrunroot = "{home}/runroot"\n')
        (home / "containers.conf").write_text("\n".join([
            "[containers]", 'netns = "none"', 'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]',
            "[engine]", 'runtime = "runc"', 'cgroup_manager = "cgroupfs"', 'events_logger = "file"',
            f'events_logfile_path = "{home}/events.log"', f'tmp_dir = "{home}/tmp"',
            f'static_dir = "{home}/root/libpod"', f'volume_path = "{home}/root/volumes"']) + "\n")
        self.env = {**os.environ, "CONTAINERS_CONF": str(home / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(home / "storage.conf")}

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["podman", *args], env=self.env, check=check)

    def destroy(self) -> None:
        for argv in (["podman", "rm", "--all", "--force", "--time", "0"], ["podman", "system", "reset", "--force"]):
            run(argv, env=self.env, check=False, timeout=120)
        prefix = str(self.home) + "/"
        with open("/proc/self/mountinfo") as f:
            mounted = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
        for mnt in sorted(mounted, key=len, reverse=True):
            run(["umount", "-l", mnt], check=False)
        shutil.rmtree(self.home, ignore_errors=True)


def tiny_rootfs(root: Path) -> None:
    """A small runnable rootfs: static busybox as /bin/sh, and every kind of entry a layer can hold."""
    for d in ("bin", "etc/sub", "usr/share/doc/x", "dev", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    os.symlink("busybox", root / "bin" / "echo")
    (root / "etc" / "a").write_text("a\n")
    os.link(root / "etc" / "a", root / "etc" / "a2")
    os.setxattr(root / "etc" / "a", "user.k", b"v")
    (root / "usr" / "share" / "doc" / "x" / "f").write_text("keep\n")
    os.mkfifo(root / "etc" / "fifo")
    os.mknod(root / "dev" / "null2", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    shutil.copy(BUSYBOX, root / "bin" / "ping")
    os.chmod(root / "bin" / "ping", 0o4755)
    os.setxattr(root / "bin" / "ping", "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))
    os.chown(root / "etc" / "sub", 12, 34)
    os.chmod(root / "tmp", 0o1777)
    long_dir = root / ("d" * 120)
    long_dir.mkdir()
    (long_dir / ("f" * 120)).write_text("long\n")


# -- mounts ------------------------------------------------------------------------------------------------

def image_layers(store: Path, name: str) -> list[Path]:
    """The layer dirs of image ``name``, top first, each once (as ``unionfs mount IMAGE`` stacks them)."""
    data = json.loads((store / "images" / f"{name}.json").read_text())
    seen: list[str] = []
    for digest in reversed(data["layers"]):
        if digest not in seen:
            seen.append(digest)
    return [store / "layers" / d for d in seen]


@contextlib.contextmanager
def mounted_image(store: Path, name: str, mnt: Path) -> Iterator[Path]:
    """The image read-only through the unionfs mount program; always unmounted."""
    mnt.mkdir(exist_ok=True)
    with unionfs_mount(image_layers(store, name), None, None, mnt) as root:
        yield root


# -- registry ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def registry(home: Path) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 (a free port), storage and config in ``home``; yields
    ``HOST:PORT``; always stopped."""
    port = free_port()
    (home / "data").mkdir(parents=True, exist_ok=True)
    config = home / "config.yml"
    config.write_text("\n".join([
        "version: 0.1", "log:", "  level: warn", "storage:", "  filesystem:", f"    rootdirectory: {home}/data",
        "  delete:", "    enabled: true", "http:", f"  addr: 127.0.0.1:{port}"]) + "\n")
    log = open(home / "registry.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"docker-registry did not start:\n{(home / 'registry.log').read_text()}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
