"""The image subcommands of ``unionfs``: commit, import-dir, images, history, diff, inspect, rmi, gc.

:func:`add_commands` registers them on the ``unionfs`` argument parser; each sets ``func`` to a handler that
takes the parsed arguments and returns the exit status.  Every command takes ``--store DIR`` (default
``$UNIONFS_STORE``, else ``/var/lib/unionfs`` as root, ``~/.local/share/unionfs`` otherwise); every listing
takes ``--json``.  Exit status: 0 done; 1 failed (one line on stderr, ``unionfs: error: …``) — or, for
``gc``, damage found; 2 a wrong command line (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mountd.cli.exits import EXIT_FAILURE, error
from unionfs import progress as progress_mod
from unionfs.image import changes as changes_mod
from unionfs.image import commit as commit_mod
from unionfs.image.records import ContainerRecord, Image, container_id, now
from unionfs.image.store import Store, StoreError, default_root, short
from unionfs.mountopts import split_lowerdir
from unionfs.progress import human_bytes

PROG = "unionfs"
USER_ERRORS = (StoreError, commit_mod.CommitError, changes_mod.ChangesError)

Handler = Callable[[argparse.Namespace], int]


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _table(rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns separated by three spaces (the last column is not padded)."""
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        print("   ".join(cells).rstrip())


def _store(args: argparse.Namespace, *, writable: bool) -> Store:
    return Store(args.store or default_root(), writable=writable)


def guarded(handler: Handler, errors: tuple[type[Exception], ...] = USER_ERRORS) -> Handler:
    """Turns the user errors of the image modules (``errors``) into one line on stderr and exit status 1."""
    def run(args: argparse.Namespace) -> int:
        # names in a layer are bytes: print them as they are, even where they are not UTF-8
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(errors="surrogateescape")
        try:
            return handler(args)
        except errors as exc:
            error(PROG, exc)
            return EXIT_FAILURE
        except KeyboardInterrupt:
            error(PROG, "interrupted")
            return 130
    run.__doc__ = handler.__doc__
    return run


def _key_values(items: Sequence[str], what: str) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StoreError(f"{what} {item!r}: expected KEY=VALUE")
        out.append((key, value))
    return tuple(out)


def _config_changes(args: argparse.Namespace) -> commit_mod.ConfigChanges:
    env = tuple(f"{k}={v}" for k, v in _key_values(args.env, "--env"))
    return commit_mod.ConfigChanges(cmd=tuple(args.cmd) if args.cmd is not None else None, env=env,
                                    workdir=args.workdir, labels=_key_values(args.label, "--label"))


# -- handlers ------------------------------------------------------------------------------------------------

def _report_commit(args: argparse.Namespace, result: commit_mod.CommitResult) -> int:
    if args.json:
        _print_json({"image": result.image.name, "id": result.image.id, "layer": result.digest,
                     "new_layer": result.new_layer, "files": result.files, "bytes": result.nbytes,
                     "entries": result.entries, "skipped_sockets": list(result.sockets),
                     "seconds": round(result.seconds, 3)})
        return 0
    for path in result.sockets:
        print(f"{PROG}: skipped socket /{path}", file=sys.stderr)
    note = "" if result.new_layer else "  (layer already in the store: no data written)"
    print(f"{result.image.name} {result.digest}{note}")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    """``commit UPPER --image NAME``"""
    with _store(args, writable=True) as store:
        result = commit_mod.commit_upper(
            store, args.upper, image=args.image, base_image=args.base, comment=args.message,
            created_by=args.created_by, changes=_config_changes(args),
            progress=progress_mod.for_stream(sys.stderr))
    return _report_commit(args, result)


def cmd_import_dir(args: argparse.Namespace) -> int:
    """``import-dir DIR --image NAME``"""
    with _store(args, writable=True) as store:
        result = commit_mod.import_dir(store, args.dir, image=args.image, comment=args.message,
                                       created_by=args.created_by, changes=_config_changes(args),
                                       progress=progress_mod.for_stream(sys.stderr))
    return _report_commit(args, result)


def _image_size(store: Store, image: Image) -> int:
    return sum(store.layer(d).size for d in image.layers if store.has_layer(d))


def cmd_images(args: argparse.Namespace) -> int:
    """``images``: name, id, layers, size, created — like ``docker image ls``."""
    from mountd.cli.transfer import manifest_digests

    with _store(args, writable=False) as store:
        images = [(img, _image_size(store, img)) for img in store.images()]
        digests = manifest_digests(store)
    if args.json:
        _print_json([{"name": img.name, "id": img.id, "layers": len(img.layers), "size": size,
                      "created": img.created, "digest": digests.get(img.name)} for img, size in images])
        return 0
    rows = [["NAME", "ID", "DIGEST", "LAYERS", "SIZE", "CREATED"]]
    rows += [[img.name, short(img.id), digests.get(img.name, "-"), str(len(img.layers)), human_bytes(size),
              img.created] for img, size in images]
    _table(rows)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """``history IMAGE``: per layer (and per config-only build step), newest first: digest, created,
    created_by, size, comment."""
    with _store(args, writable=False) as store:
        image = store.image(args.image)
        lines: list[dict[str, Any]] = []
        layered = [h for h in image.history if not h.empty_layer]
        if [h.layer for h in layered] == list(image.layers):  # one line per step, config-only ones too
            for h in reversed(image.history):
                size = 0 if h.empty_layer else store.layer(h.layer).size
                line = {"layer": "" if h.empty_layer else h.layer, "created": h.created,
                        "created_by": h.created_by, "comment": h.comment, "size": size}
                lines.append({**line, "empty_layer": True} if h.empty_layer else line)
        else:
            history = {h.layer: h for h in layered}
            for digest in reversed(image.layers):
                meta = store.layer(digest)
                known = history.get(digest)
                lines.append({"layer": digest, "created": known.created if known else meta.created,
                              "created_by": known.created_by if known else meta.created_by,
                              "comment": known.comment if known else meta.comment, "size": meta.size})
    if args.json:
        _print_json(lines)
        return 0
    rows = [["LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT"]]
    rows += [[short(h["layer"]) if h["layer"] else "<none>", h["created"], h["created_by"], human_bytes(h["size"]),
              h["comment"]] for h in lines]
    _table(rows)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """``diff UPPER|MOUNTPOINT``: A/C/D lines — like ``docker diff``."""
    lowerdirs = None
    if args.lowerdir is not None:
        lowerdirs = [d for d in split_lowerdir(args.lowerdir) if d]
    with _store(args, writable=False) as store:
        source = changes_mod.diff_source(store, args.path, base_image=args.base, lowerdirs=lowerdirs)
    found = changes_mod.diff_paths(source)
    if args.json:
        _print_json([{"kind": c.kind, "path": c.path} for c in found])
    else:
        for change in found:
            print(change.line())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """``inspect IMAGE``: per layer changes, bytes and waste; the efficiency score — like ``dive``.  With
    ``--ci``: dive's CI rules (:mod:`mountd.cli.inspect_ci`)."""
    if args.ci:
        from mountd.cli import inspect_ci

        with _store(args, writable=False) as store:
            return inspect_ci.run(args, store, store.image(args.image))
    with _store(args, writable=False) as store:
        report = changes_mod.inspect_image(store, store.image(args.image))
    if args.json:
        _print_json(report.to_json())
        return 0
    print(f"image {report.image}  id {short(report.id)}")
    rows = [["LAYER", "SIZE", "ADDED", "MODIFIED", "REMOVED", "WASTED", "CREATED BY"]]
    rows += [[short(r.digest), human_bytes(r.size), str(r.added), str(r.modified), str(r.removed),
              human_bytes(r.wasted), r.created_by] for r in report.layers]
    _table(rows)
    print(f"total {human_bytes(report.total_bytes)}, wasted {human_bytes(report.wasted_bytes)}, "
          f"efficiency {report.efficiency * 100:.1f} %")
    if report.wasted_paths:
        print("largest wasted paths:")
        _table([["BYTES", "LAYER", "PATH"]] + [[human_bytes(n), short(d), p]
                                                for p, d, n in report.wasted_paths[:10]])
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    """``rmi IMAGE…``: remove images (their layers stay until ``gc``)."""
    with _store(args, writable=True) as store:
        for name in args.images:
            image = store.remove_image(name)
            print(f"removed {image.name} ({short(image.id)})")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """``gc``: remove unused layers and leftovers; report damage (exit 1 when there is any)."""
    from unionfs.image.ocistore import OciRecords

    with _store(args, writable=True) as store:
        report = store.gc(dry_run=args.dry_run, verify=args.verify, build_cache=args.build_cache)
        with store.locked(exclusive=True):
            blobs = OciRecords(store).gc(dry_run=args.dry_run)
    if args.json:
        _print_json({**report.to_json(), "removed_blobs": blobs})
    else:
        verb = "would remove" if args.dry_run else "removed"
        for digest in report.removed_layers:
            print(f"{verb} layer {short(digest)}")
        for name in report.removed_staging:
            print(f"{verb} staging leftover tmp/{name}")
        for cid in report.removed_records:
            print(f"{verb} record of a gone upper {cid}")
        for digest in blobs:
            print(f"{verb} blob {digest}")
        if report.removed_cache:
            print(f"{verb} {len(report.removed_cache)} build cache entries")
        for line in report.broken:
            print(f"broken: {line}")
        print(f"{len(report.removed_layers)} layers, {human_bytes(report.freed_bytes)} "
              f"{'to free' if args.dry_run else 'freed'}; {len(report.broken)} problems")
    if report.broken:
        error(PROG, f"the store has {len(report.broken)} problems (listed above)")
        return EXIT_FAILURE
    return 0


# -- mount IMAGE ---------------------------------------------------------------------------------------------

def default_workdir(upper: str) -> str:
    """The workdir used with ``--upper DIR`` when none is given: ``.NAME.work`` next to it (same filesystem)."""
    real = os.path.realpath(upper)
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.work")


def prepare_image_mount(args: argparse.Namespace) -> None:
    """For ``unionfs mount IMAGE MOUNTPOINT``: fill ``args.lower`` with the image's layers (top first) and
    ``args.upper``/``args.work`` with the given dirs (created if missing; the workdir defaults to
    :func:`default_workdir`) or with fresh ones in the store, and record which layers the upper sits on (so
    ``diff``/``commit`` of it know its base).  ``--ro`` without ``--upper`` mounts the image read-only.
    Raises StoreError (unknown image, ``--lower`` given too, store not writable …)."""
    if args.lower or any("lowerdir=" in opt for opt in args.options):
        raise StoreError("give an image or lower dirs (--lower, -o lowerdir=), not both")
    if args.work is not None and args.upper is None:
        raise StoreError("--work needs --upper")
    with _store(args, writable=True) as store, store.locked():
        image = store.image(args.image)
        missing = [d for d in image.layers if not store.has_layer(d)]
        if missing:
            raise StoreError(f"image {image.name!r}: layer {short(missing[0])} is missing")
        args.lower = [store.layer_path(d) for d in image.mount_layers()]
        if args.upper is None and args.ro:
            return
        args.created_dirs = []
        if args.upper is None:
            args.upper, args.work = store.new_container_dirs()
            args.created_dirs = [os.path.dirname(args.upper)]
        else:
            args.work = args.work or default_workdir(args.upper)
            for path in (args.upper, args.work):
                if not os.path.isdir(path):
                    try:
                        os.mkdir(path, 0o755 if path == args.upper else 0o700)
                    except OSError as exc:
                        raise StoreError(f"cannot create {path}: {exc.strerror}") from None
                    args.created_dirs.append(path)
        upper = os.path.realpath(args.upper)
        store.put_container(ContainerRecord(container_id(upper), image.name, image.layers, upper,
                                            os.path.realpath(args.work), os.path.abspath(args.mountpoint), now()))


def abandon_image_mount(args: argparse.Namespace) -> None:
    """After a failed ``mount IMAGE``: remove the record and the dirs :func:`prepare_image_mount` created
    (only while they are still empty)."""
    if getattr(args, "upper", None) is None or not getattr(args, "created_dirs", None):
        return
    with _store(args, writable=True) as store, store.locked():
        store.remove_container(container_id(os.path.realpath(args.upper)))
        for path in reversed(args.created_dirs):
            if os.path.realpath(path).startswith(store.root + os.sep):
                store.discard(os.path.relpath(os.path.realpath(path), store.root))
            else:
                with contextlib.suppress(OSError):
                    os.rmdir(path)


def add_mount_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments ``unionfs mount`` takes for images (add before MOUNTPOINT)."""
    p.add_argument("image", nargs="?", metavar="IMAGE",
                   help="mount this image of the store (instead of --lower); without --upper a fresh upper "
                        "dir is made in the store; --upper DIR uses DIR (and .DIR.work next to it)")
    p.add_argument("--store", metavar="DIR", help="the store for IMAGE (default: $UNIONFS_STORE, else "
                   "/var/lib/unionfs as root, ~/.local/share/unionfs otherwise)")


# -- registration --------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, *, listing: bool) -> None:
    p.add_argument("--store", metavar="DIR", help="the store (default: $UNIONFS_STORE, else "
                   "/var/lib/unionfs as root, ~/.local/share/unionfs otherwise)")
    if listing:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def _commit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, metavar="NAME", help="name of the image to write")
    p.add_argument("-m", "--message", default="", metavar="MSG", help="comment for the new layer")
    p.add_argument("--created-by", default="", metavar="CMD", help="what made the layer (for history)")
    p.add_argument("--cmd", nargs="+", default=None, metavar="ARG", help="the image's command")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set a variable")
    p.add_argument("--workdir", default=None, metavar="DIR", help="the image's working directory")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="set a label")


def add_commands(sub: Any) -> None:
    """Register the image subcommands on ``sub`` (the ``add_subparsers()`` object of ``unionfs``)."""
    def add(name: str, handler: Handler, helptext: str, *, listing: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=helptext, description=helptext)
        _common(p, listing=listing)
        p.set_defaults(func=guarded(handler))
        return p

    p = add("commit", cmd_commit, "freeze an upper dir into a new layer and image")
    p.add_argument("upper", metavar="UPPER", help="the upper dir (of an unmounted union)")
    p.add_argument("--from", dest="base", metavar="IMAGE",
                   help="the image the upper sits on (default: the one it was mounted from)")
    _commit_options(p)

    p = add("import-dir", cmd_import_dir, "make a one-layer image from a plain directory")
    p.add_argument("dir", metavar="DIR")
    _commit_options(p)

    add("images", cmd_images, "list images")
    p = add("history", cmd_history, "the layers of an image, newest first")
    p.add_argument("image", metavar="IMAGE")

    p = add("diff", cmd_diff, "what an upper dir changes (A added, C changed, D deleted)")
    p.add_argument("path", metavar="UPPER|MOUNTPOINT")
    p.add_argument("--from", dest="base", metavar="IMAGE", help="the image the upper sits on")
    p.add_argument("--lowerdir", metavar="L1:L2", help="the lower dirs, top first (instead of --from)")

    p = add("inspect", cmd_inspect, "per-layer changes, wasted bytes and efficiency of an image")
    p.add_argument("image", metavar="IMAGE")
    from mountd.cli import inspect_ci

    inspect_ci.add_arguments(p)

    p = add("rmi", cmd_rmi, "remove images (layers stay until gc)", listing=False)
    p.add_argument("images", nargs="+", metavar="IMAGE")

    p = add("gc", cmd_gc, "remove layers no image uses and leftovers of interrupted commits")
    p.add_argument("--dry-run", action="store_true", help="report only")
    p.add_argument("--verify", action="store_true", help="also re-digest every layer (reads all data)")
    p.add_argument("--build-cache", action="store_true",
                   help="also drop the step cache of unionfs build (and the layers only it kept)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one image subcommand (the same as ``unionfs SUBCOMMAND …``); return the exit status."""
    parser = argparse.ArgumentParser(prog=PROG)
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
