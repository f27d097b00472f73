"""Image-transfer fixtures: a store per test, the real tools (or a skip — a failure under CI), a private
podman with a small image built once per module, and mounts of store images through the test fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from images_support import Podman, missing_tools, run, tiny_rootfs


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/images/" in str(item.fspath):
            item.add_marker(pytest.mark.images)


@pytest.fixture(scope="session")
def tools() -> None:
    missing = missing_tools()
    if missing or os.geteuid() != 0:
        message = f"image tests need root and {', '.join(missing)} (Makefile APT_PACKAGES)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture(scope="module")
def podman(tools: None) -> Iterator[Podman]:
    """A private podman with ``localhost/tiny:1`` (imported from :func:`tiny_rootfs`) and
    ``localhost/tiny:2`` (built on it: a deleted hard link, a deleted and recreated dir, a CMD)."""
    home = Path(tempfile.mkdtemp(prefix="unionfs-images-podman-"))
    p = Podman(home)
    try:
        root = home / "rootfs"
        tiny_rootfs(root)
        run(["tar", "-C", str(root), "--xattrs", "--xattrs-include=*", "--numeric-owner", "-cf",
             str(home / "tiny.tar"), "."])
        p("import", "--quiet", "--change", 'CMD ["/bin/sh"]', str(home / "tiny.tar"), "localhost/tiny:1")
        (home / "Containerfile").write_text(
            "FROM localhost/tiny:1\n"
            "RUN rm /etc/a2 && rm -rf /usr/share/doc && mkdir -p /usr/share/doc/new && echo n > /usr/share/doc/new/f\n"
            'CMD ["/bin/echo", "hello from tiny"]\n')
        p("build", "--quiet", "-t", "localhost/tiny:2", str(home))
        yield p
    finally:
        p.destroy()
        shutil.rmtree(home, ignore_errors=True)
