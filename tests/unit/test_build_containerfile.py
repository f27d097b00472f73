"""The Containerfile parser and variable expansion (no mount, no store)."""

from __future__ import annotations

import pytest

from unionfs.image.build.containerfile import ParseError, parse
from unionfs.image.build.expand import Expander, ExpandError


def test_instructions_continuations_comments_and_forms() -> None:
    cf = parse("# syntax=docker/dockerfile:1\n"
               "ARG BASE=bb\n"
               "from $BASE AS build\n"
               "# a comment\n"
               "\n"
               "RUN echo one \\\n"
               "  # a comment inside the continuation\n"
               "  && echo two\n"
               'CMD ["/bin/app", "--flag"]\n'
               "COPY --chown=1:2 --chmod=0640 a b /dst/\n")
    assert cf.syntax == "docker/dockerfile:1"
    assert [i.keyword for i in cf.args_before_from] == ["ARG"]
    assert cf.from_.args == "$BASE AS build" and cf.from_.line == 3
    run, cmd, copy = cf.instructions
    assert (run.keyword, run.args, run.line) == ("RUN", "echo one && echo two", 6)
    assert cmd.exec_form == ("/bin/app", "--flag")
    assert copy.flags == (("chown", "1:2"), ("chmod", "0640")) and copy.args == "a b /dst/"


def test_escape_directive_changes_the_continuation_character() -> None:
    cf = parse("# escape=`\nFROM bb\nRUN echo a `\n  b\nCOPY c:\\dir\\x /x\n")
    assert cf.escape == "`"
    assert cf.instructions[0].args == "echo a b"
    assert cf.instructions[1].args == "c:\\dir\\x /x"


@pytest.mark.parametrize(("text", "message"), [
    ("FROM bb\nFOO bar\n", "Containerfile:2: unknown instruction 'FOO'"),
    ("RUN true\nFROM bb\n", "Containerfile:1: RUN before FROM"),
    ("FROM bb\nFROM bb\n", "Containerfile:2: a second FROM"),
    ("FROM bb\nCOPY onlyone\n", "Containerfile:2: COPY: needs at least one source and a destination"),
    ("FROM bb\nCOPY --from=x a b\n", "Containerfile:2: COPY --from: multi-stage builds are not supported"),
    ("FROM bb\nRUN --mount=type=cache true\n", "Containerfile:2: RUN: unsupported flag --mount"),
    ("FROM bb\nARG 1bad\n", "Containerfile:2: ARG: invalid name '1bad'"),
    ("FROM bb\nSHELL /bin/bash\n", "Containerfile:2: SHELL: needs a JSON array"),
    ("FROM bb\nLABEL novalue\n", "Containerfile:2: LABEL: needs KEY=VALUE"),
    ("# nothing\n", "Containerfile:1: no FROM instruction"),
    ("FROM bb\nRUN <<EOF\necho\nEOF\n", "Containerfile:2: RUN: here-documents"),
    ("FROM bb\nHEALTHCHECK NONE\n", "Containerfile:2: unknown instruction 'HEALTHCHECK'"),
    ("# escape=x\nFROM bb\n", "Containerfile:1: invalid escape character"),
])
def test_malformed_files_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ParseError) as info:
        parse(text)
    assert str(info.value).startswith(message)


def test_expansion_rules() -> None:
    ex = Expander({"A": "x y", "EMPTY": ""})
    assert ex.words('$A "$A" \'$A\' ${A:-d} ${NONE:-d} ${A:+alt} ${EMPTY:+alt}z \\$A') == \
        ["x", "y", "x y", "$A", "x", "y", "d", "alt", "z", "$A"]
    assert ex.used == {"A", "NONE", "EMPTY"}
    assert Expander({"P": "/opt"}).word("${P}/bin \\$P") == "/opt/bin $P"
    for bad in ("${A", "${1x}", "${A?err}", '"open'):
        with pytest.raises(ExpandError):
            Expander({"A": "1"}).words(bad)
