"""Image references in skopeo's transport syntax (containers-transports(5)).

* ``oci:DIR[:TAG]`` — an OCI image layout directory; the tag is the ``org.opencontainers.image.ref.name``
  annotation of an index entry (a pull without a tag takes the only image; a push without one writes
  ``latest``);
* ``oci-archive:FILE[:TAG]`` — the same layout in a tar file;
* ``docker-archive:FILE[:NAME:TAG]`` — ``docker save`` / ``podman save`` archives (``manifest.json``);
* ``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`` — a registry (HTTP API v2); the host is required (no implied
  docker.io), the tag defaults to ``latest``.

:func:`parse` returns a :class:`Reference` or raises :class:`BadReference` with one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TRANSPORTS = ("oci", "oci-archive", "docker-archive", "docker")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_REPO_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_HOST_RE = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


class BadReference(ValueError):
    """A reference that cannot be parsed; ``str()`` is one line meant for the user."""


@dataclass(frozen=True)
class Reference:
    transport: str
    path: str = ""
    """The directory or file (local transports)."""
    tag: str = ""
    """The tag (``oci``, ``oci-archive``, ``docker``) or ``NAME:TAG`` (``docker-archive``); may be empty."""
    host: str = ""
    repo: str = ""
    digest: str = ""

    def __str__(self) -> str:
        if self.transport == "docker":
            ref = f"@{self.digest}" if self.digest else f":{self.tag}"
            return f"docker://{self.host}/{self.repo}{ref}"
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")


def _split_local(rest: str, transport: str) -> tuple[str, str]:
    """PATH[:TAG] with the tag after the last colon (a path may not hold ':' then, as in skopeo)."""
    path, sep, tag = rest.partition(":")
    if not path:
        raise BadReference(f"{transport}: reference without a path")
    if sep and transport == "docker-archive":
        name_tag = tag
        name, colon, version = name_tag.rpartition(":")
        if not colon or not name or not _TAG_RE.fullmatch(version):
            raise BadReference(f"docker-archive:{rest}: expected FILE[:NAME:TAG]")
        return path, name_tag
    if sep and not _TAG_RE.fullmatch(tag):
        raise BadReference(f"{transport}:{rest}: invalid tag {tag!r}")
    return path, tag


def _parse_docker(rest: str) -> Reference:
    if not rest.startswith("//"):
        raise BadReference(f"docker:{rest}: expected docker://HOST[:PORT]/REPO[:TAG|@DIGEST]")
    body = rest[2:]
    host, slash, path = body.partition("/")
    if not slash or not _HOST_RE.fullmatch(host) or ("." not in host and ":" not in host and host != "localhost"):
        raise BadReference(f"docker://{body}: the reference must start with a registry host "
                             "(HOST[:PORT]/REPO, e.g. localhost:5000/app)")
    digest = tag = ""
    if "@" in path:
        path, _, digest = path.partition("@")
        if not _DIGEST_RE.fullmatch(digest):
            raise BadReference(f"docker://{body}: invalid digest {digest!r}")
    else:
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, _, tag = path.rpartition(":")
            if not _TAG_RE.fullmatch(tag):
                raise BadReference(f"docker://{body}: invalid tag {tag!r}")
    if not _REPO_RE.fullmatch(path):
        raise BadReference(f"docker://{body}: invalid repository name {path!r} (lowercase letters, digits, "
                             "separators)")
    return Reference("docker", host=host, repo=path, tag=tag or ("" if digest else "latest"), digest=digest)


def parse(text: str) -> Reference:
    """Parse ``TRANSPORT:DETAILS`` (see the module doc)."""
    transport, sep, rest = text.partition(":")
    if not sep or transport not in TRANSPORTS:
        raise BadReference(f"{text!r}: unknown transport; use one of oci:, oci-archive:, docker-archive:, "
                             "docker://")
    if transport == "docker":
        return _parse_docker(rest)
    path, tag = _split_local(rest, transport)
    return Reference(transport, path=path, tag=tag)


def is_loopback(host: str) -> bool:
    """Is ``HOST[:PORT]`` a loopback address (where plain HTTP is allowed without ``--insecure``)?"""
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:host.index("]")]
    return name in ("localhost", "::1") or name.startswith("127.")
