"""Planning: variables in scope per step, the config after each step, what a step depends on, cache keys."""

from __future__ import annotations

import pytest

from unionfs.image.build.cache import base_key, step_key
from unionfs.image.build.containerfile import parse
from unionfs.image.build.plan import DEFAULT_PATH, PlanError, base_name, plan
from unionfs.image.records import ImageConfig

TEXT = """\
ARG TAG=1
FROM base:$TAG
ENV HOME_DIR=/srv
ARG TAG
ARG LATE=no
WORKDIR $HOME_DIR
WORKDIR app
COPY --chmod=755 tool ${HOME_DIR}/bin/
RUN make $LATE
ENV LATE=env-wins
USER nobody:nogroup
EXPOSE 80 53/udp
ENTRYPOINT ["/srv/bin/tool"]
"""


def test_config_after_each_step_and_expansion() -> None:
    cf = parse(TEXT)
    assert base_name(cf, {}) == "base:1"
    assert base_name(cf, {"TAG": "2"}) == "base:2"
    p = plan(cf, {"LATE": "yes", "UNUSED": "x"}, ImageConfig(cmd=("sh",), env=("PATH=/bin",)))
    assert p.unused_args == ("UNUSED",)
    texts = [s.text for s in p.steps]
    assert texts[3:6] == ["WORKDIR /srv", "WORKDIR /srv/app", "COPY --chmod=755 tool /srv/bin/"]
    copy, run = p.steps[5], p.steps[6]
    assert (copy.sources, copy.dest, copy.chmod) == (("tool",), "/srv/bin/", 0o755)
    assert run.argv == ("/bin/sh", "-c", "make $LATE")  # RUN leaves expansion to its shell
    assert run.run_env == ("PATH=/bin", "HOME_DIR=/srv", "LATE=yes", "TAG=1")
    assert run.args_used == (("LATE", "yes"), ("TAG", "1"))
    last = p.steps[-1].config
    assert last.env == ("PATH=/bin", "HOME_DIR=/srv", "LATE=env-wins")
    assert (last.workdir, last.user, last.exposed_ports) == ("/srv/app", "nobody:nogroup", ("53/udp", "80/tcp"))
    assert last.entrypoint == ("/srv/bin/tool",) and last.cmd == ()  # ENTRYPOINT drops the base's CMD
    assert [s.makes_layer for s in p.steps].count(True) == 2


def test_run_gets_a_default_path() -> None:
    p = plan(parse("FROM scratch\nRUN true\n"), {}, ImageConfig())
    assert p.steps[0].run_env == (f"PATH={DEFAULT_PATH}",)


@pytest.mark.parametrize(("text", "message"), [
    ("FROM bb\nCOPY --chmod=9z a /b\n", "Containerfile:2: COPY: --chmod=9z: expected octal bits"),
    ("FROM bb\nADD https://example.com/x /x\n", "Containerfile:2: ADD: https://example.com/x: sources from URLs"),
    ("FROM bb\nWORKDIR ${UNSET}\n", "Containerfile:2: WORKDIR: the path is empty"),
    ("FROM bb\nEXPOSE http\n", "Containerfile:2: EXPOSE: invalid port 'http/tcp'"),
])
def test_plan_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(PlanError) as info:
        plan(parse(text), {}, ImageConfig())
    assert str(info.value).startswith(message)


def test_cache_keys_follow_the_inputs() -> None:
    text = "FROM bb\nARG V=1\nRUN echo $V\nCOPY a /a\n"
    one = plan(parse(text), {}, ImageConfig())
    two = plan(parse(text), {"V": "2"}, ImageConfig())
    root = base_key("image-id")
    assert root != base_key(None)

    def keys(p: object, content: str = "c1") -> list[str]:
        out, key = [], root
        for step in p.steps:  # type: ignore[attr-defined]
            key = step_key(key, step, content if step.keyword == "COPY" else "")
            out.append(key)
        return out

    k1, k2 = keys(one), keys(two)
    assert k1[0] == k2[0]  # the ARG itself: a changed value misses at its first use
    assert k1[1] != k2[1] and k1[2] != k2[2]
    assert keys(one) == k1  # stable
    assert keys(one, "c2")[:2] == k1[:2] and keys(one, "c2")[2] != k1[2]
    env_changed = plan(parse("FROM bb\nENV V=1\nARG V=1\nRUN echo $V\n"), {}, ImageConfig())
    assert env_changed.steps[2].args_used == ()  # ENV wins: the build arg is not what RUN sees
