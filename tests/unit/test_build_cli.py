"""The ``unionfs build`` command line around the builder: isolation choice, errors, output (no mount)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mountd.cli.build as cli_build
from mountd.build.executor import Builder, BuildError
from mountd.cli.main import main


@pytest.fixture(autouse=True)
def store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UNIONFS_STORE", str(tmp_path / "store"))


def test_without_runc_the_fallback_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli_build, "default_isolation", lambda: "chroot")
    monkeypatch.setattr(cli_build, "isolation_available", lambda name: name == "chroot")
    seen: list[str] = []

    def fake_run(self: Builder) -> None:
        seen.append(self.options.isolation)
        raise BuildError("stopped here")

    monkeypatch.setattr(Builder, "run", fake_run)
    assert main(["build", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "warning: runc is not installed: RUN steps run with unshare + chroot" in err
    assert err.strip().endswith("unionfs: error: stopped here")
    assert seen == ["chroot"]
    assert main(["build", "--isolation", "oci", str(tmp_path)]) == 1
    assert "--isolation oci: runc is not installed" in capsys.readouterr().err


def test_errors_before_any_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "Dockerfile").write_text("FROM scratch\nRUN\n")
    assert main(["build", "--json", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"event": "error", "message": "Dockerfile:2: RUN: needs a command"}
    assert err == "unionfs: error: Dockerfile:2: RUN: needs a command\n"
    assert main(["build", "-t", "bad name", str(tmp_path)]) == 1
    assert "invalid image name 'bad name'" in capsys.readouterr().err
    assert main(["build", "--build-arg", "=x", str(tmp_path)]) == 1
    assert "--build-arg '=x': expected KEY=VALUE" in capsys.readouterr().err


def test_config_only_build_needs_no_mount(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "Containerfile").write_text("FROM scratch\nENV A=1\nLABEL x=y\nCMD [\"/app\"]\n")
    assert main(["build", "-t", "meta", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "STEP 4/4: CMD [\"/app\"]" in out and "Successfully tagged meta" in out
    assert main(["build", "-t", "meta", "--json", str(tmp_path)]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["cached"] for e in events if e["event"] == "step"] == [False, True, True, True]
    assert events[-1]["event"] == "done" and events[-1]["images"] == ["meta"] and events[-1]["layers"] == []
    assert main(["history", "meta"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[2] for line in lines] == ["CMD", "LABEL", "ENV"]
