"""podman build and buildah bud of a layered Containerfile through a mount program."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from e2e_support import BASE_IMAGE, Storage

pytestmark = pytest.mark.e2e

GREETING = "Hello from an image built on a union filesystem"
HELLO_C = f'#include <stdio.h>\nint main(void) {{ puts("{GREETING}"); return 0; }}\n'
CONTAINERFILE = f"""\
FROM {BASE_IMAGE}
COPY hello.c /src/hello.c
RUN gcc -O2 -o /hello /src/hello.c
RUN rm -rf /src /usr/share/common-licenses /etc/issue
CMD ["/hello"]
"""
STEPS = 5
CHECK_DELETED = "for p in /src /usr/share/common-licenses /etc/issue; do test -e $p && echo left: $p; done; echo ok"


def build_context(tmp_path: Path) -> Path:
    """A build context with hello.c and the Containerfile."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "hello.c").write_text(HELLO_C)
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    return ctx


def cached_steps(output: str) -> int:
    """How many build steps reported ``Using cache``."""
    return len(re.findall(r"^--> Using cache [0-9a-f]+", output, re.MULTILINE))


def check_image(storage: Storage, image: str) -> None:
    """The image prints its greeting and lacks what its last RUN deleted."""
    assert storage.podman("run", "--rm", image).stdout.strip() == GREETING
    assert storage.podman("run", "--rm", image, "sh", "-c", CHECK_DELETED).stdout.strip() == "ok"


def test_podman_build(storage: Storage, tmp_path: Path) -> None:
    """A fresh build runs every step; the image works; a second build takes every step from the cache."""
    ctx = build_context(tmp_path)
    image = "localhost/hello-podman"
    first = storage.podman("build", "--no-cache", "-t", image, str(ctx)).stdout
    assert cached_steps(first) == 0
    assert f"STEP {STEPS}/{STEPS}" in first
    check_image(storage, image)
    second = storage.podman("build", "-t", image, str(ctx)).stdout
    assert cached_steps(second) == STEPS - 1, second   # every step after FROM
    storage.podman("rmi", image)


def test_buildah_bud_layers(storage: Storage, tmp_path: Path) -> None:
    """The same with ``buildah bud --layers``."""
    ctx = build_context(tmp_path)
    image = "localhost/hello-buildah"
    first = storage.buildah("bud", "--layers", "--no-cache", "-t", image, str(ctx)).stdout
    assert cached_steps(first) == 0
    check_image(storage, image)
    second = storage.buildah("bud", "--layers", "-t", image, str(ctx)).stdout
    assert cached_steps(second) == STEPS - 1, second
    storage.buildah("rmi", image)
