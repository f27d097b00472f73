"""The image transfer subcommands of ``unionfs``: pull, push, tag.

References use skopeo's transport syntax (:mod:`unionfs.image.transport`).  Progress (layers, bytes) is
drawn on stderr when it is a terminal; ``--json`` prints the result as JSON.  Exit status: 0 done; 1 failed
(one line on stderr, ``unionfs: error: …``; the store is left as it was); 2 a wrong command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mountd.cli.images import USER_ERRORS, _print_json, _store, guarded
from unionfs import progress as progress_mod
from unionfs.image import pull as pull_mod
from unionfs.image import push as push_mod
from unionfs.image.blobio import COMPRESSIONS, BlobError
from unionfs.image.endpoints import open_destination, open_source
from unionfs.image.oci import OciError, Platform
from unionfs.image.ocistore import OciRecords
from unionfs.image.records import Image
from unionfs.image.store import check_name, short
from unionfs.image.tarlayer import LayerError
from unionfs.image.transfer import TransferError
from unionfs.image.transport import BadReference, Reference, parse

TRANSFER_ERRORS = (*USER_ERRORS, pull_mod.PullError, push_mod.PushError, TransferError, OciError, BlobError,
                   LayerError, BadReference)


def _default_name(ref: Reference) -> str:
    """The store name a pull uses without ``--image``: the reference's repository or file name, and tag."""
    if ref.transport == "docker":
        base = ref.repo.rsplit("/", 1)[-1]
        return check_name(f"{base}:{ref.tag}" if ref.tag else base)
    if ref.transport == "docker-archive" and ref.tag:
        name, _, tag = ref.tag.rpartition(":")
        return check_name(f"{name.rsplit('/', 1)[-1]}:{tag}")
    base = os.path.basename(ref.path.rstrip("/")).split(".")[0] or "image"
    return check_name(f"{base}:{ref.tag}" if ref.tag and ref.transport != "docker-archive" else base)


def cmd_pull(args: argparse.Namespace) -> int:
    """``pull SOURCE [--image NAME]``"""
    ref = parse(args.source)
    name = args.image or _default_name(ref)
    check_name(name)
    platform = Platform.parse(args.platform) if args.platform else Platform.host()
    source = open_source(ref, insecure=args.insecure)
    try:
        with _store(args, writable=True) as store:
            result = pull_mod.pull(store, source, name=name, platform=platform,
                                   progress=progress_mod.for_stream(sys.stderr, unit="layers"))
    finally:
        source.close()
    if args.json:
        _print_json({"image": result.image.name, "id": result.image.id, "manifest": result.manifest_digest,
                     "config": result.config_digest, "layers": result.layers, "new_layers": result.new_layers,
                     "downloaded": result.downloaded, "seconds": round(result.seconds, 3)})
    else:
        print(pull_mod.describe(result))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """``push IMAGE DEST``"""
    ref = parse(args.dest)
    check_name(args.image)
    with _store(args, writable=True) as store:
        store.image(args.image)  # a clear error before a destination is created
        dest = open_destination(ref, image=args.image, insecure=args.insecure)
        result = push_mod.push(store, args.image, dest, compression=args.compression,
                               progress=progress_mod.for_stream(sys.stderr, unit="layers"))
    if args.json:
        _print_json({"image": args.image, "destination": str(ref), "manifest": result.manifest_digest,
                     "config": result.config_digest, "layers": result.layers, "reused": result.reused,
                     "seconds": round(result.seconds, 3)})
    else:
        print(f"{args.image} -> {ref} {result.manifest_digest} ({result.layers} layers, "
              f"{result.reused} as pulled)")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    """``tag IMAGE NAME``: another name for the same image (same layers, config and digests)."""
    check_name(args.name)
    with _store(args, writable=True) as store, store.locked():
        image = store.image(args.image)
        tagged = Image(args.name, image.layers, image.history, image.config, image.created)
        store.put_image(tagged)
        records = OciRecords(store)
        record = records.image_record(image.name, image.id)
        if record is not None:
            records.put_image_record(args.name, record)
        else:
            records.remove_image_record(args.name)
    if args.json:
        _print_json({"image": args.name, "id": tagged.id, "manifest": record.manifest if record else None})
    else:
        print(f"{args.name} {short(tagged.id)}")
    return 0


def manifest_digests(store: Any) -> dict[str, str]:
    """Image name → the sha256 manifest digest recorded by its last pull or push (images never pulled
    nor pushed have none yet: the digest depends on the compression they are pushed with)."""
    records = OciRecords(store) if store.host is not None else None
    out = {}
    for image in store.images():
        record = records.image_record(image.name, image.id) if records is not None else None
        if record is not None:
            out[image.name] = record.manifest
    return out


def add_commands(sub: Any) -> None:
    """Register pull, push and tag on ``sub``."""
    def add(name: str, handler: Any, helptext: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--store", metavar="DIR", help="the store (default: $UNIONFS_STORE, else "
                       "/var/lib/unionfs as root, ~/.local/share/unionfs otherwise)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=guarded(handler, TRANSFER_ERRORS))
        return p

    p = add("pull", cmd_pull, "copy an image into the store (oci:, oci-archive:, docker-archive:, docker://)")
    p.add_argument("source", metavar="SOURCE", help="oci:DIR[:TAG], oci-archive:FILE[:TAG], "
                   "docker-archive:FILE[:NAME:TAG] or docker://HOST[:PORT]/REPO[:TAG|@DIGEST]")
    p.add_argument("--image", metavar="NAME", help="the store's name for it (default: from SOURCE)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="which image of a multi-platform index "
                   "(default: this machine's)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to a registry that is not on loopback")

    p = add("push", cmd_push, "copy an image of the store out (oci:, oci-archive:, docker-archive:, docker://)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("dest", metavar="DEST", help="oci:DIR[:TAG], oci-archive:FILE[:TAG], "
                   "docker-archive:FILE[:NAME:TAG] or docker://HOST[:PORT]/REPO[:TAG]")
    p.add_argument("--compression", choices=COMPRESSIONS, default=None,
                   help="layer compression (default: gzip; a layer pulled before is sent as it was pulled)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to a registry that is not on loopback")

    p = add("tag", cmd_tag, "give an image another name")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("name", metavar="NAME")

