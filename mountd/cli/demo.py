"""``make demo``: a three-layer sample image, mounted with unionfs, changed, and seen again through the
kernel's overlayfs.  Generates everything it uses (no downloads); needs root, /dev/fuse and overlayfs.

Run: ``python -m mountd.cli.demo [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mountd.cli.exits import EXIT_FAILURE, error
from unionfs.mountinfo import find_mount

LAYERS: dict[str, dict[str, str]] = {
    # bottom layer first, as an image is built
    "base": {"etc/os-release": "NAME=demo\nVERSION=1\n", "etc/motd": "welcome to the base layer\n",
             "usr/bin/tool": "#!/bin/sh\necho tool v1\n", "var/log/base.log": "base log\n"},
    "app": {"usr/bin/tool": "#!/bin/sh\necho tool v2\n", "srv/app/config.ini": "[app]\nmode=prod\n"},
    "patch": {"etc/motd": "welcome to the patched image\n", "srv/app/notes.txt": "patched\n"},
}


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def _run(*cmd: str) -> str:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out


def _show_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        st = path.lstat()
        if path.is_symlink():
            kind = "symlink"
        elif path.is_dir():
            kind = "dir"
        elif (st.st_mode & 0o170000) == 0o020000:
            kind = f"char {os.major(st.st_rdev)}/{os.minor(st.st_rdev)}  <- whiteout"
        else:
            kind = f"file {st.st_size}B"
        xattrs = ""
        try:
            names = [n for n in os.listxattr(path, follow_symlinks=False) if "overlay" in n]
            if names:
                xattrs = "  [" + ", ".join(names) + "]"
        except OSError:
            pass
        print(f"   {rel}  ({kind}){xattrs}")


def _wait_gone(mnt: Path) -> None:
    for _ in range(100):
        if find_mount(mnt) is None:
            return
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="build the demo in this directory and keep it")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        error("demo", "needs root (FUSE allow_other and the kernel's overlayfs)")
        return EXIT_FAILURE
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="unionfs-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    mnt = root / "merged"
    prog = shutil.which("unionfs-mount") or str(Path(sys.executable).parent / "unionfs-mount")
    try:
        _say(f"building a 3-layer image in {root}")
        lowers: list[str] = []
        for name, files in LAYERS.items():
            layer = root / "layers" / name
            for rel, content in files.items():
                (layer / rel).parent.mkdir(parents=True, exist_ok=True)
                (layer / rel).write_text(content)
            lowers.insert(0, str(layer))  # top-most first, as lowerdir= wants
            print(f"   layer {name}: {', '.join(sorted(files))}")
        upper, work = root / "upper", root / "work"
        for d in (upper, work, mnt):
            d.mkdir(exist_ok=True)
        opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"

        _say(f"unionfs-mount -o {opts} {mnt}")
        subprocess.run([prog, "-o", opts, str(mnt)], check=True)
        print(_run("findmnt", "-n", str(mnt)).strip())
        print(f"   /etc/motd says: {(mnt / 'etc/motd').read_text().strip()}  (from the top layer)")
        print(f"   tool says: {(mnt / 'usr/bin/tool').read_text().splitlines()[1]}  (app layer hides base)")

        _say("delete a lower file (var/log/base.log), edit another (srv/app/config.ini)")
        (mnt / "var/log/base.log").unlink()
        with open(mnt / "srv/app/config.ini", "a") as fh:
            fh.write("debug=true\n")
        print("   merged view now:")
        _show_tree(mnt)

        _say("the upper dir: a whiteout and the copied-up file, nothing else")
        _show_tree(upper)

        _say("unmount")
        subprocess.run(["umount", str(mnt)], check=True)
        _wait_gone(mnt)

        _say("the same upper dir through the kernel's overlayfs")
        work2 = root / "work-kernel"
        work2.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work2}", str(mnt)], check=True)
        try:
            _show_tree(mnt)
            print(f"   config.ini through the kernel:\n{(mnt / 'srv/app/config.ini').read_text()}")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        _say("done")
        return 0
    finally:
        if find_mount(mnt) is not None:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
