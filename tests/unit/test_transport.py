"""Image references in skopeo's transport syntax: what each form parses to, and the one-line refusals."""

from __future__ import annotations

import pytest

from unionfs.image.transport import BadReference, Reference, is_loopback, parse

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "expected"), [
    ("oci:/srv/layout", Reference("oci", path="/srv/layout")),
    ("oci:/srv/layout:1.0", Reference("oci", path="/srv/layout", tag="1.0")),
    ("oci-archive:img.tar:latest", Reference("oci-archive", path="img.tar", tag="latest")),
    ("docker-archive:img.tar", Reference("docker-archive", path="img.tar")),
    ("docker-archive:img.tar:localhost/app:v1", Reference("docker-archive", path="img.tar", tag="localhost/app:v1")),
    ("docker://localhost:5000/team/app", Reference("docker", host="localhost:5000", repo="team/app", tag="latest")),
    ("docker://127.0.0.1:5000/app:v2", Reference("docker", host="127.0.0.1:5000", repo="app", tag="v2")),
    (f"docker://registry.example.com/app@{DIGEST}",
     Reference("docker", host="registry.example.com", repo="app", digest=DIGEST)),
])
def test_references_parse(text: str, expected: Reference) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("layout", "unknown transport"),
    ("ftp://x/y", "unknown transport"),
    ("oci:", "without a path"),
    ("oci:/srv/x:bad tag", "invalid tag"),
    ("docker-archive:a.tar:notag", "FILE[:NAME:TAG]"),
    ("docker:app", "docker://"),
    ("docker://app", "registry host"),
    ("docker://ubuntu/app:1", "registry host"),
    ("docker://localhost:5000/App", "invalid repository name"),
    ("docker://localhost:5000/app@sha256:12", "invalid digest"),
])
def test_bad_references_are_refused(text: str, message: str) -> None:
    with pytest.raises(BadReference, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(text)


def test_only_loopback_hosts_count_as_loopback() -> None:
    assert is_loopback("localhost:5000") and is_loopback("127.0.0.1:1") and is_loopback("[::1]:5000")
    assert not is_loopback("registry.example.com") and not is_loopback("10.0.0.1:5000")
