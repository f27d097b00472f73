"""A registry on loopback (Debian's docker-registry, started by the test, always stopped): push, pull back
with equal digests, and skopeo reads what unionfs pushed."""

from __future__ import annotations

import json
from pathlib import Path

from images_support import mounted_image, ok, registry, run, tree, tree_diff, unionfs
from support.layers import WHITEOUT, File, Hardlink, build_layer


def test_push_pull_round_trip_through_a_registry(tools: None, store: Path, tmp_path: Path) -> None:
    base = build_layer({"etc": {"os-release": "ID=test\n", "hosts": File("h", mode=0o600, uid=7, gid=8)},
                        "bin": {"tool": File(b"\x7fELF" + bytes(100_000), mode=0o755), "alias": Hardlink("bin/tool")}},
                       tmp_path / "base")
    upper = build_layer({"etc": {"hosts": WHITEOUT, "new": "n"}}, tmp_path / "upper")
    ok(store, "import-dir", str(base), "--image", "base")
    ok(store, "commit", str(upper), "--image", "app", "--from", "base", "--cmd", "/bin/tool")
    with registry(tmp_path / "registry") as host:
        pushed = json.loads(ok(store, "push", "app", f"docker://{host}/team/app:v1", "--json"))
        pulled = json.loads(ok(store, "pull", f"docker://{host}/team/app:v1", "--image", "back", "--json"))
        assert pulled["manifest"] == pushed["manifest"] and pulled["config"] == pushed["config"]
        by_digest = json.loads(ok(store, "pull", f"docker://{host}/team/app@{pushed['manifest']}",
                                  "--image", "pinned", "--json"))
        assert by_digest["manifest"] == pushed["manifest"] and by_digest["new_layers"] == 0
        repushed = json.loads(ok(store, "push", "back", f"docker://{host}/team/app:v2", "--json"))
        assert repushed["manifest"] == pushed["manifest"] and repushed["reused"] == 2

        inspect = json.loads(run(["skopeo", "inspect", "--tls-verify=false", f"docker://{host}/team/app:v2"]).stdout)
        assert inspect["Digest"] == pushed["manifest"]
        run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{host}/team/app:v1",
             f"oci:{tmp_path / 'copy'}:c"])
        index = json.loads((tmp_path / "copy" / "index.json").read_text())
        assert index["manifests"][0]["digest"] == pushed["manifest"]

        missing = unionfs(store, "pull", f"docker://{host}/team/nothere:v1", "--image", "x")
        assert missing.code == 1 and missing.err.count("\n") == 1 and "HTTP 404" in missing.err
    with mounted_image(store, "app", tmp_path / "m1") as m1:
        original = tree(m1)
    with mounted_image(store, "back", tmp_path / "m2") as m2:
        copy = tree(m2)
    assert tree_diff(original, copy) == []
    assert "etc/hosts" not in copy and copy["bin/alias"][8] == "bin/alias"
