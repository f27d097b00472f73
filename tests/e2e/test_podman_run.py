"""podman run, diff and commit on a mount program give what they give on the kernel's overlayfs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_support import BASE_IMAGE, Storage

pytestmark = pytest.mark.e2e

CHANGES = r"""
set -e
mkdir -p /new/dir && echo created > /new/dir/file          # create
echo overwritten > /etc/issue.net                          # overwrite a lower file
echo appended >> /etc/debian_version                       # append to a lower file
chmod 600 /etc/shells                                      # metadata-only change of a lower file
rm /etc/motd                                               # delete a lower file
rm -rf /usr/share/common-licenses                          # delete a lower directory tree
mv /etc/issue /etc/issue.renamed                           # rename a lower file
mv /usr/share/debconf /usr/share/debconf.renamed           # rename a lower directory
mv /new/dir/file /new/dir/file.renamed                     # rename an upper file
rm -rf /var/log && mkdir /var/log && echo fresh > /var/log/only   # replace a lower dir by a new one
ln -s /etc/issue.renamed /new/link                         # symlink
ln /etc/host.conf /etc/host.conf.link                      # hard link to a lower file
touch /etc/gone && rm /etc/gone                            # create and delete: no trace
"""

REPORT = r"""
cd /
cat /new/dir/file.renamed /etc/issue.net /etc/debian_version /etc/issue.renamed /var/log/only
readlink /new/link
stat -c '%n %a %h' /etc/shells /etc/host.conf /etc/host.conf.link
ls -a /var/log /new /new/dir
for p in /etc/motd /etc/issue /usr/share/common-licenses /usr/share/debconf /etc/gone; do
  test -e "$p" && echo "still there: $p"
done
ls /usr/share/debconf.renamed | head -3
echo report-done
"""


@dataclass(frozen=True)
class Changed:
    """A stopped container that ran CHANGES then REPORT."""

    name: str
    report: str
    diff: list[str]
    """``podman diff`` of the container, sorted."""


_CHANGED: dict[Path, Changed] = {}


def changed_container(storage: Storage) -> Changed:
    """Run CHANGES then REPORT in a new container, once per storage root per test run."""
    if storage.home not in _CHANGED:
        name = f"changes-{uuid.uuid4().hex[:8]}"
        report = storage.podman("run", "--name", name, BASE_IMAGE, "sh", "-c", CHANGES + REPORT).stdout
        diff = sorted(storage.podman("diff", name).stdout.splitlines())
        _CHANGED[storage.home] = Changed(name=name, report=report, diff=diff)
    return _CHANGED[storage.home]


def test_run_changes_and_diff_match_kernel(storage: Storage, kernel_storage: Storage) -> None:
    """Create, overwrite, delete, rename: the container sees the same files and ``podman diff`` is the same."""
    ours, kernel = changed_container(storage), changed_container(kernel_storage)
    assert ours.report.endswith("report-done\n")
    assert "still there" not in ours.report
    assert ours.report.splitlines() == kernel.report.splitlines()
    assert ours.diff == kernel.diff
    assert "D /usr/share/common-licenses" in ours.diff and "A /new/dir/file.renamed" in ours.diff


_COMMITTED: dict[Path, str] = {}


def commit_and_report(storage: Storage) -> str:
    """Commit the changed container of ``storage`` and run REPORT in the image (once per root); the report."""
    if storage.home not in _COMMITTED:
        changed = changed_container(storage)
        image = f"localhost/committed-{changed.name}"
        storage.podman("commit", "--quiet", changed.name, image)
        _COMMITTED[storage.home] = storage.podman("run", "--rm", image, "sh", "-c", REPORT).stdout
        storage.podman("rmi", image)
    return _COMMITTED[storage.home]


def test_commit_then_run(storage: Storage, kernel_storage: Storage) -> None:
    """``podman commit`` of the changed container gives an image with every change, as on the kernel.

    (The image is compared with the kernel's image, not with the container: a hard link whose other name was
    not changed is committed as a plain file by the tree-comparing diff that every mount program gets.)
    """
    report = commit_and_report(storage)
    assert report.endswith("report-done\n")
    assert "still there" not in report
    assert report.splitlines() == commit_and_report(kernel_storage).splitlines()
