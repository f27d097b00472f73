"""From a parsed reference to the :class:`~unionfs.image.transfer.Source` or
:class:`~unionfs.image.transfer.Destination` of its transport."""

from __future__ import annotations

from unionfs.image.archive import ArchiveDestination, DockerArchiveSource, OciArchiveSource
from unionfs.image.layout import LayoutDestination, LayoutSource
from unionfs.image.registry import RegistryDestination, RegistrySource
from unionfs.image.transfer import Destination, Source
from unionfs.image.transport import Reference


def open_source(ref: Reference, *, insecure: bool = False) -> Source:
    """The source ``ref`` names (TransferError where it cannot be opened)."""
    if ref.transport == "oci":
        return LayoutSource(ref.path, ref.tag)
    if ref.transport == "oci-archive":
        return OciArchiveSource(ref.path, ref.tag)
    if ref.transport == "docker-archive":
        return DockerArchiveSource(ref.path, ref.tag)
    return RegistrySource(ref, insecure=insecure)


def open_destination(ref: Reference, *, image: str, insecure: bool = False) -> Destination:
    """The destination ``ref`` names; ``image`` (the store's name of what is pushed) gives the default tag
    of an archive."""
    if ref.transport == "oci":
        return LayoutDestination(ref.path, ref.tag)
    if ref.transport == "oci-archive":
        return ArchiveDestination(ref.path, tag=ref.tag or "latest", docker=False)
    if ref.transport == "docker-archive":
        repo_tag = ref.tag or (image if ":" in image else f"{image}:latest")
        return ArchiveDestination(ref.path, tag=repo_tag.rpartition(":")[2], docker=True, repo_tag=repo_tag)
    return RegistryDestination(ref, insecure=insecure)
