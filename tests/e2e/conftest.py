"""End-to-end fixtures: podman and buildah in private storage roots, one per overlay driver.

``program`` parametrises a test over the mount programs in ``$UNIONFS_E2E_PROGRAMS`` (default
``unionfs,fuse-overlayfs``); ``kernel_storage`` is the reference (the kernel's overlayfs, no mount program).
Each storage root is made once per test run with the base image imported, and always torn down: containers
removed, storage reset, anything still mounted below it unmounted, daemons gone, files deleted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import E2EError, Storage, ensure_base_tarball, missing_requirements, program_path

PROGRAMS_ENV = "UNIONFS_E2E_PROGRAMS"


def selected_programs() -> list[str]:
    """The mount programs the parametrised tests run on."""
    names = os.environ.get(PROGRAMS_ENV, "unionfs,fuse-overlayfs")
    return [n.strip() for n in names.split(",") if n.strip()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``program`` parametrises a test over the selected mount programs."""
    if "program" in metafunc.fixturenames:
        metafunc.parametrize("program", selected_programs())


@pytest.fixture(scope="session")
def base_tarball() -> Path:
    """The cached base tarball (built once per machine). Skips, or under CI fails, without the container programs."""
    missing = missing_requirements()
    if missing:
        message = f"end-to-end tests need {', '.join(missing)} (Makefile APT_PACKAGES)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return ensure_base_tarball()


class StoragePool:
    """One storage root per driver name for the whole test run, each with the base image imported."""

    def __init__(self, top: Path, tarball: Path) -> None:
        self.top = top
        self.tarball = tarball
        self.roots: dict[str, Storage] = {}
        self.import_seconds: dict[str, float] = {}
        self.failed: dict[str, str] = {}

    def get(self, name: str) -> Storage:
        """The root for ``name`` (``kernel`` or a program name); the first call makes it and imports the base."""
        if name in self.failed:
            pytest.fail(f"the {name} storage root could not be set up:\n{self.failed[name]}")
        if name not in self.roots:
            try:
                program = program_path(name)
            except E2EError as exc:
                pytest.skip(str(exc))
            storage = Storage(name=name, program=program, home=self.top / name)
            self.roots[name] = storage
            start = time.monotonic()
            try:
                storage.import_base(self.tarball)
            except E2EError as exc:
                self.failed[name] = str(exc)
                raise
            self.import_seconds[name] = time.monotonic() - start
        return self.roots[name]

    def destroy(self) -> list[str]:
        """Destroy every root; return what was left behind (mounts, processes), described."""
        problems: list[str] = []
        for storage in self.roots.values():
            mounts, pids = storage.destroy()
            problems += [f"{storage.name}: still mounted after reset: {m}" for m in mounts]
            problems += [f"{storage.name}: process {p} still running after reset (killed)" for p in pids]
        return problems


@pytest.fixture(scope="session")
def storage_pool(base_tarball: Path) -> Iterator[StoragePool]:
    """Storage roots by driver name; torn down (containers, images, mounts, files) at the end."""
    top = Path(tempfile.mkdtemp(prefix="unionfs-e2e-"))
    pool = StoragePool(top, base_tarball)
    try:
        yield pool
    finally:
        problems = pool.destroy()
        shutil.rmtree(top, ignore_errors=True)
        assert not problems, "\n".join(problems)


@pytest.fixture
def kernel_storage(storage_pool: StoragePool) -> Storage:
    """The reference: the overlay driver on the kernel's overlayfs."""
    return storage_pool.get("kernel")


@pytest.fixture
def storage(storage_pool: StoragePool, program: str) -> Storage:
    """The overlay driver through the mount program ``program``."""
    return storage_pool.get(program)
