"""``inspect --ci``: dive's rule names and file, our reclaimable waste and dive's arithmetic side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.layers import WHITEOUT, File, build_layer

from mountd.cli.images import main
from unionfs.image import ci


@pytest.fixture
def app_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """base: a 1500-byte file and a 2048-byte file; app: the first overwritten by 8 bytes, the second deleted."""
    monkeypatch.setenv("UNIONFS_STORE", str(tmp_path / "store"))
    base = build_layer({"etc/passwd": File(b"x" * 1500), "tmp/junk": File(b"j" * 2048)}, tmp_path / "base")
    upper = build_layer({"etc/passwd": "12345678", "tmp": {"junk": WHITEOUT}}, tmp_path / "upper")
    assert main(["import-dir", str(base), "--image", "base"]) == 0
    assert main(["commit", str(upper), "--image", "app", "--from", "base"]) == 0
    capsys.readouterr()


def ci_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    code = main(["inspect", "app", "--ci", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_reclaimable_and_dive_metrics(app_image: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, ours = ci_json(capsys, "--lowest-efficiency", "0", "--highest-user-wasted-percent", "disabled")
    assert code == 0 and ours["passed"] is True
    assert ours["wasted_bytes"] == 1500 + 2048  # what a squash would save
    assert ours["efficiency"] == pytest.approx(1 - 3548 / 3556)
    assert ours["user_wasted_percent"] == pytest.approx(3548 / 8)
    code, dive = ci_json(capsys, "--metric", "dive", "--lowest-efficiency", "0", "--highest-user-wasted-percent",
                         "off")
    assert code == 0
    assert dive["wasted_bytes"] == (1500 + 8) + (2048 + 2048)  # every copy, and the whiteout the size it removes
    assert dive["efficiency"] == pytest.approx((8 + 2048) / 5604)


def test_a_failing_rule_fails_the_command(app_image: None, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", "app", "--ci", "--highest-wasted-bytes", "3KB", "--lowest-efficiency", "0",
                 "--highest-user-wasted-percent", "disabled"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL: highestWastedBytes: too many bytes wasted (wasted: 3548 > threshold: 3000)" in out
    assert out.splitlines()[-1] == "Result:FAIL [Total:3] [Passed:1] [Failed:1] [Warn:0] [Skipped:1]"
    assert main(["inspect", "app", "--ci", "--highest-wasted-bytes", "4KiB", "--lowest-efficiency", "0",
                 "--highest-user-wasted-percent", "disabled"]) == 0


def test_rules_file(app_image: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / ".dive-ci"
    rules.write_text("rules:\n  # dive's defaults, kebab-case\n  lowest-efficiency: 0.95\n"
                     "  highestWastedBytes: disabled\n  highestUserWastedPercent: \"0.20\"\n")
    code, data = ci_json(capsys, "--rules", str(rules))
    assert code == 1
    assert [r["status"] for r in data["rules"]] == ["FAIL", "SKIP", "FAIL"]  # type: ignore[index, union-attr]
    rules.write_text("rules:\n  lowestEfficency: 0.9\n")
    assert main(["inspect", "app", "--ci", "--rules", str(rules)]) == 1
    assert "unknown rule 'lowestEfficency'" in capsys.readouterr().err


def test_parse_bytes() -> None:
    assert ci.parse_bytes("20MB") == 20_000_000 and ci.parse_bytes("1.5GiB") == 1610612736
    assert ci.parse_bytes("1000") == 1000
    with pytest.raises(ci.RuleError):
        ci.parse_bytes("lots")
