"""Hostile layers: nothing outside the layer, upper and work dirs is read or written on the host.

The layers hold absolute symlinks and ``../../..`` symlinks into a canary dir, fifos and devices, names with a
newline and with invalid UTF-8, a 4096-byte path; the lower root is given as a symlink (podman does that);
and a lower dir whose upper copy is swapped for a symlink to the canary behind the daemon's back.
Every kind of operation runs over all of it through the mount. The proof is double:

- the canary dir is untouched: same names, contents, mtimes and ctimes, and atimes (set older than the mtimes,
  so ``relatime`` would record any read);
- ``strace -f -y -e trace=%file`` attached to the running daemon (so the interpreter's start-up is not in
  the log) shows no path outside the layers, the upper and work dirs, the mountpoint and the interpreter's
  own files, and no ``..`` component walked from a layer descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kit import alive, pid_of, wait_for
from support.mounts import unionfs_mount

pytestmark = pytest.mark.mounted

LONG_COMPONENT = 250
DEPTH = 16  # 16 x (250 + 1) bytes: a path of 4016 bytes + the file name > 4096 bytes from the layer root
ODD_NAMES = [b"new\nline", b"bad\xff\xfeutf8", b" lead space", b"tab\tname"]


def canary_state(root: Path) -> dict[bytes, tuple[object, ...]]:
    out: dict[bytes, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in ["", *dirnames, *filenames]:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            data = b""
            if stat.S_ISREG(st.st_mode):  # O_NOATIME: our own look must not update the atime
                fd = os.open(p, os.O_RDONLY | os.O_NOATIME)
                data = os.read(fd, 1 << 20)
                os.close(fd)
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_atime_ns, data)
    return out


def make_canary(outside: Path) -> None:
    (outside / "dir").mkdir(parents=True)
    (outside / "secret").write_bytes(b"canary secret\n")
    (outside / "dir" / "inner").write_bytes(b"canary inner\n")
    old = time.time_ns() - 100 * 86400 * 10**9
    recent = time.time_ns() - 10 * 10**9
    for p in (outside / "dir" / "inner", outside / "secret", outside / "dir", outside):
        os.utime(p, ns=(old, recent))  # atime < mtime: relatime updates the atime on any read


def long_path_create(root_fd: int, leaf: bytes, data: bytes) -> None:
    """Create DEPTH nested long-named dirs under ``root_fd`` and a file in the last one (by descriptors)."""
    fd = os.dup(root_fd)
    try:
        for i in range(DEPTH):
            name = (b"%02d" % i) + b"L" * (LONG_COMPONENT - 2)
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        f = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
        os.write(f, data)
        os.close(f)
    finally:
        os.close(fd)


def build_layers(base: Path, outside: Path) -> tuple[Path, Path, Path]:
    lower = base / "lower-real"
    lower.mkdir()
    (lower / "abs").symlink_to(outside)
    (lower / "absfile").symlink_to(outside / "secret")
    depth = len(lower.parts) + 3
    (lower / "rel").symlink_to("../" * depth + str(outside).lstrip("/"))
    (lower / "relfile").symlink_to("../" * depth + str(outside / "secret").lstrip("/"))
    (lower / "dotdot").symlink_to("../../..")
    (lower / "d").mkdir()
    (lower / "d" / "a").write_bytes(b"lower a\n")
    (lower / "swapped").mkdir()
    (lower / "swapped" / "a").write_bytes(b"lower a\n")
    (lower / "file").write_bytes(b"lower file\n")
    os.mkfifo(lower / "fifo")
    os.mknod(lower / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(lower / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    for name in ODD_NAMES:
        with open(os.fsencode(lower) + b"/" + name, "wb") as f:
            f.write(b"odd " + name)
    fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY)
    long_path_create(fd, b"deep", b"deep lower\n")
    os.close(fd)
    link = base / "lower-link"
    link.symlink_to(lower)  # a symlinked layer root: allowed
    upper = base / "upper"
    upper.mkdir()
    (upper / "d").symlink_to(outside)  # a symlink where a lower has a directory
    return link, upper, lower


@contextlib.contextmanager
def straced(pid: int, log: Path):
    """strace -f -y -e trace=%file attached to ``pid``; detached (SIGINT) on exit."""
    proc = subprocess.Popen(["strace", "-f", "-y", "-qq", "-s", "5000", "-e", "trace=%file", "-o", str(log),
                             "-p", str(pid)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        # strace is attached once the daemon's syscalls appear: poke the mount until the log grows
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CALL = re.compile(r"^(?:\[pid\s+\d+\]\s+)?(?:\d+\s+)?(\w+)\((.*)$")
FD_PATH = re.compile(r"\d+<([^>]*)>")
PAIR = re.compile(r'(AT_FDCWD|\d+<[^>]*>),\s+"((?:[^"\\]|\\.)*)"')
FIRST_STRING = re.compile(r'^"((?:[^"\\]|\\.)*)"')


def _unescape(s: str) -> str:
    return s.encode("latin-1", "backslashreplace").decode("unicode_escape", "replace")


def outside_paths(log_text: str, allowed: list[str]) -> list[str]:
    """Lines of a ``strace -y`` log that name a host path outside ``allowed`` (prefixes)."""
    def ok(path: str) -> bool:
        return any(path == a or path.startswith(a.rstrip("/") + "/") for a in allowed)

    bad: list[str] = []
    for line in log_text.splitlines():
        m = CALL.match(line)
        if not m:
            continue
        name, args = m.groups()
        for fd_path in FD_PATH.findall(args):
            if fd_path.startswith("/") and not ok(fd_path):
                bad.append(line)
        for base, rel in PAIR.findall(args):
            rel = _unescape(rel)
            if base == "AT_FDCWD":
                if not ok(rel if rel.startswith("/") else "/" + rel):  # the daemon's cwd is /
                    bad.append(line)
            elif (rel.startswith("/") and not ok(rel)) or (".." in rel.split("/") and "= -1" not in line):
                bad.append(line)
        first = FIRST_STRING.match(args)
        if first and name not in ("symlink", "symlinkat"):
            path = _unescape(first.group(1))
            if not ok(path if path.startswith("/") else "/" + path):
                bad.append(line)
    return list(dict.fromkeys(bad))


def exercise(mnt: Path, upper: Path) -> dict[str, object]:
    """Every kind of operation over the hostile entries; returns what was seen (for the failure message)."""
    seen: dict[str, object] = {}

    def attempt(what: str, fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        try:
            seen[what] = fn(*args, **kwargs)
        except OSError as exc:
            seen[what] = errno.errorcode.get(exc.errno or 0, exc.errno)

    bmnt = os.fsencode(mnt)
    for dirpath, dirnames, filenames in os.walk(bmnt):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                attempt(f"readlink {p!r}", os.readlink, p)
                attempt(f"nofollow {p!r}", os.open, p, os.O_RDONLY | os.O_NOFOLLOW)
                attempt(f"lchown {p!r}", os.chown, p, 1, 1, follow_symlinks=False)
                attempt(f"lgetxattr {p!r}", os.listxattr, p, follow_symlinks=False)
                attempt(f"lsetxattr {p!r}", os.setxattr, p, "trusted.x", b"1", follow_symlinks=False)
                attempt(f"lutime {p!r}", os.utime, p, (1, 1), follow_symlinks=False)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    seen[f"read {p!r}"] = f.read(64)
    for entry in os.scandir(bmnt):
        attempt(f"stat-type {entry.name!r}", lambda e: stat.filemode(e.stat(follow_symlinks=False).st_mode), entry)
    # writes: copy-up of a file, of odd names, of devices and the fifo (chmod), of the deep file
    with open(mnt / "file", "ab") as f:
        f.write(b"appended\n")
    for name in ODD_NAMES:
        p = bmnt + b"/" + name
        attempt(f"append {name!r}", lambda q: open(q, "ab").write(b"+"), p)  # noqa: SIM115
        attempt(f"rename {name!r}", os.rename, p, p + b".renamed")
        attempt(f"unlink {name!r}", os.unlink, p + b".renamed")
    for name in ("fifo", "null", "blk"):
        attempt(f"chmod {name}", os.chmod, mnt / name, 0o600)
        attempt(f"lchown {name}", os.chown, mnt / name, 2, 2, follow_symlinks=False)
    for name in ("abs", "absfile", "rel", "relfile", "dotdot"):
        attempt(f"rename link {name}", os.rename, mnt / name, mnt / (name + ".moved"))
        attempt(f"link link {name}", os.link, mnt / (name + ".moved"), mnt / (name + ".hard"),
                follow_symlinks=False)
        attempt(f"unlink link {name}", os.unlink, mnt / (name + ".moved"))
    attempt("mknod", os.mknod, mnt / "newdev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    attempt("symlink out", os.symlink, "/etc/passwd", mnt / "newlink")
    # the 4096-byte path: write the deep lower file and create a sibling, walking by descriptors
    root_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        attempt("deep create", long_path_create, root_fd, b"deep", b"deep through the mount\n")
        attempt("deep new", long_path_create, root_fd, b"new", b"new deep\n")
    finally:
        os.close(root_fd)
    # "swapped": the daemon has seen a lower dir; then its upper copy becomes a symlink to the canary
    os.listdir(mnt / "swapped")
    os.stat(mnt / "swapped" / "a")
    (upper / "swapped").symlink_to(seen.setdefault("_outside", str(outside_of(upper))))
    attempt("create under swapped", lambda q: open(q, "wb").write(b"x"), mnt / "swapped" / "x")  # noqa: SIM115
    attempt("write under swapped", lambda q: open(q, "ab").write(b"x"), mnt / "swapped" / "a")  # noqa: SIM115
    attempt("mkdir under swapped", os.mkdir, mnt / "swapped" / "sub")
    attempt("unlink under swapped", os.unlink, mnt / "swapped" / "a")
    attempt("rmdir swapped", os.rmdir, mnt / "swapped")
    return seen


def outside_of(upper: Path) -> Path:
    return upper.parent / "outside"


def test_nothing_outside_the_layers_is_touched(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make_canary(outside)
    before = canary_state(outside)
    lower_link, upper, lower_real = build_layers(tmp_path, outside)
    work, mnt, log = tmp_path / "work", tmp_path / "mnt", tmp_path / "strace.log"
    work.mkdir()
    mnt.mkdir()
    with unionfs_mount([lower_link], upper, work, mnt) as m:
        pid = pid_of(m)
        with straced(pid, log):
            # lookups may be answered from caches: a create always reaches the daemon's syscalls
            assert wait_for(lambda: (os.close(os.open(m / "probe", os.O_CREAT | os.O_WRONLY, 0o644)),
                                     log.exists() and log.stat().st_size > 0)[1], 20), "strace did not attach"
            os.unlink(m / "probe")
            # (upper d -> canary hides the lower dir d, as with the kernel: a symlink in the union)
            assert stat.S_ISLNK(os.lstat(m / "d").st_mode)
            seen = exercise(m, upper)
        assert alive(pid), "the daemon died"
        assert sorted(os.listdir(m))  # and still serves
    assert canary_state(outside) == before, f"the canary dir was touched; operations saw {seen}"
    allowed = [str(lower_real), str(lower_link), str(upper), str(work), str(mnt), "/dev/fuse", "/dev/null",
               sys.prefix, sys.base_prefix, "/usr/lib", "/usr/local/lib", "/proc/self", f"/proc/{pid}",
               "/etc/localtime", "/run/unionfs"]
    text = log.read_text(errors="replace")
    bad = outside_paths(text, allowed)
    assert bad == [], "the daemon named paths outside its dirs:\n" + "\n".join(bad[:20])


def test_the_strace_check_catches_an_escape() -> None:
    log = ('123 openat(AT_FDCWD, "/etc/passwd", O_RDONLY) = 3</etc/passwd>\n'
           '123 openat2(5</tmp/l>, "a/b", {flags=O_RDONLY}, 24) = 6</tmp/l/a/b>\n'
           '123 newfstatat(5</tmp/l>, "../x", {}, AT_SYMLINK_NOFOLLOW) = 0\n'
           '123 symlinkat("/etc/passwd", 7</tmp/u>, "n") = 0\n')
    assert [line.split()[1][:6] for line in outside_paths(log, ["/tmp/l", "/tmp/u"])] == ["openat", "newfst"]
