"""The OCI runtime config of a RUN step and the unshare+chroot fallback's command (nothing is run here)."""

from __future__ import annotations

from pathlib import Path

from mountd.build.runtime import Container, Process, describe_status, oci_config


def test_oci_config_isolates_and_carries_the_step() -> None:
    proc = Process(("/bin/sh", "-c", "make"), ("PATH=/bin", "A=1"), "/src", 1000, 50, (50, 60))
    config = oci_config("/mnt/root", proc, hosts=None)
    assert sorted(n["type"] for n in config["linux"]["namespaces"]) == ["ipc", "mount", "network", "pid", "uts"]
    p = config["process"]
    assert (p["args"], p["env"], p["cwd"]) == (["/bin/sh", "-c", "make"], ["PATH=/bin", "A=1"], "/src")
    assert p["user"] == {"uid": 1000, "gid": 50, "additionalGids": [50, 60]}
    assert "CAP_SYS_ADMIN" not in p["capabilities"]["bounding"] and "CAP_CHOWN" in p["capabilities"]["bounding"]
    assert config["root"] == {"path": "/mnt/root", "readonly": False}
    destinations = [m["destination"] for m in config["mounts"]]
    assert destinations[:2] == ["/proc", "/dev"] and "/sys" in destinations and "/etc/hosts" not in destinations
    with_hosts = oci_config("/mnt/root", proc, hosts="/bundle/hosts")
    [hosts] = [m for m in with_hosts["mounts"] if m["destination"] == "/etc/hosts"]
    assert hosts["source"] == "/bundle/hosts" and "ro" in hosts["options"]


def test_prepare_and_cleanup_leave_the_root_as_it_was(tmp_path: Path) -> None:
    root, bundle = tmp_path / "root", tmp_path / "bundle"
    (root / "etc").mkdir(parents=True)
    (root / "proc").mkdir()
    bundle.mkdir()
    container = Container(root=str(root), bundle=str(bundle), name="t", isolation="oci")
    container.prepare()
    assert sorted(p.name for p in root.iterdir()) == ["dev", "etc", "proc", "sys"]
    assert container.hosts is False  # the image has no /etc/hosts: nothing is bound (or created) there
    container.cleanup()
    assert sorted(p.name for p in root.iterdir()) == ["etc", "proc"]
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    container.prepare()
    assert container.hosts is True and (bundle / "hosts").read_text().startswith("127.0.0.1")


def test_chroot_command_runs_the_step_inside_the_root(tmp_path: Path) -> None:
    container = Container(root=str(tmp_path), bundle=str(tmp_path), name="t", isolation="chroot")
    argv = container._chroot_argv(Process(("echo", "hi there"), ("A=1",), "/w", 7, 8))
    assert argv[:8] == ["unshare", "--mount", "--pid", "--fork", "--ipc", "--uts", "--net", "--kill-child"]
    script = argv[-1]
    assert f"mount -t proc -o nosuid,nodev,noexec proc {tmp_path}/proc" in script
    assert script.splitlines()[-1].startswith(f"exec env -i A=1 chroot --userspec=7:8 --groups=8 {tmp_path} ")
    assert script.endswith("/w echo 'hi there'")


def test_describe_status() -> None:
    assert describe_status(3) == "exit status 3"
    assert describe_status(137) == "killed by signal SIGKILL"
