"""Host paths are touched only through ``unionfs/fs/fsio.py``, the one safe door (docs/architecture.md,
"Habits").

The rule, applied to every runtime module of a mount (the union's core and the FUSE adapter) except fsio.py,
by an AST scan: no call to

- the builtin ``open``, ``io.open``, ``os.fdopen`` of a name;
- ``os.<f>`` for any ``f`` that takes a path (``os.open``, ``os.stat``, ``os.lstat``, ``os.listdir``, ``os.scandir``,
  ``os.mkdir``, ``os.unlink``, ``os.rename`` … the full list is ``PATH_FUNCTIONS``) — with or without ``dir_fd``:
  a ``dir_fd`` call outside fsio is still a host access that skips fsio's ``openat2`` checks;
- ``os.path.<f>`` that reads the filesystem (``exists``, ``isdir``, ``realpath`` …);
- anything in ``shutil``, ``glob``, ``tempfile``, and ``pathlib.Path`` / ``Path(...)``.

Calls on descriptors (``os.fstat``, ``os.pread``, ``os.pwrite``, ``os.close``, ``os.fsync`` …) are fine: a
descriptor comes from fsio. No mount needed: this runs in milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_MODULES = ["unionfs/fs/union.py", "unionfs/fs/upper.py", "unionfs/fs/inodes.py", "unionfs/fs/lookup.py",
                   "unionfs/fs/dirstate.py", "unionfs/fs/cache.py", "unionfs/fs/attr.py", "unionfs/fs/copyup.py",
                   "unionfs/fs/whiteout.py", "unionfs/fs/layers.py", "mountd/highlevel/operations.py"]
SAFE_DOOR = "unionfs/fs/fsio.py"

PATH_FUNCTIONS = frozenset({
    "open", "stat", "lstat", "listdir", "scandir", "mkdir", "makedirs", "unlink", "remove", "rmdir",
    "removedirs", "rename", "renames", "replace", "link", "symlink", "readlink", "chmod", "lchmod", "chown",
    "lchown", "utime", "truncate", "access", "mknod", "mkfifo", "getxattr", "setxattr", "listxattr",
    "removexattr", "walk", "fwalk", "statvfs", "chdir", "chroot", "opendir", "startfile",
})
OS_PATH_FUNCTIONS = frozenset({"exists", "lexists", "isdir", "isfile", "islink", "ismount", "realpath",
                               "getsize", "getmtime", "getatime", "getctime", "samefile"})
FORBIDDEN_MODULES = frozenset({"shutil", "glob", "tempfile", "pathlib"})


def dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def host_path_calls(source: str) -> list[str]:
    """``line: call`` for every call that breaks the rule in ``source``."""
    tree = ast.parse(source)
    imported_names: dict[str, str] = {}  # from os import stat -> {"stat": "os.stat"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imported_names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        name = imported_names.get(name, name) if "." not in name else name
        head, _, rest = name.partition(".")
        bad = (name in ("open", "io.open", "builtins.open", "Path", "pathlib.Path", "PurePath")
               or (head == "os" and rest in PATH_FUNCTIONS)
               or (name.startswith("os.path.") and name.removeprefix("os.path.") in OS_PATH_FUNCTIONS)
               or head in FORBIDDEN_MODULES)
        if bad:
            found.append((node.lineno, f"{node.lineno}: {ast.unparse(node)[:100]}"))
    return [text for _, text in sorted(found)]


def test_the_scan_finds_what_it_should() -> None:
    sample = ("import os, shutil\nfrom os import lstat\nfrom pathlib import Path\n"
              "open('x')\nos.open('a', 0)\nos.lstat('b', dir_fd=3)\nlstat('c')\nshutil.rmtree('d')\n"
              "Path('e').read_text()\nos.path.exists('f')\nos.fstat(3)\nos.pread(3, 1, 0)\nos.path.join('a')\n")
    assert [line.split(":")[0] for line in host_path_calls(sample)] == ["4", "5", "6", "7", "8", "9", "10"]


@pytest.mark.parametrize("module", RUNTIME_MODULES)
def test_host_paths_only_through_fsio(module: str) -> None:
    found = host_path_calls((ROOT / module).read_text())
    assert found == [], f"{module} touches host paths outside {SAFE_DOOR}:\n" + "\n".join(found)


def test_the_safe_door_exists_and_uses_openat2() -> None:
    source = (ROOT / SAFE_DOOR).read_text()
    assert "openat2" in source and "RESOLVE_BENEATH" in source
