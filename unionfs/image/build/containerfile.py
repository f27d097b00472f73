"""The Containerfile parser and its instruction model.

:func:`parse` turns the text into :class:`Instruction` objects, or raises :class:`ParseError` with the file
and line number of the first problem, before anything runs.  What it reads (the classic builder's rules):

* parser directives ``# escape=C`` (``\\`` or a backtick) and ``# syntax=…`` (recorded, not acted on), only
  before the first instruction, comment or blank line;
* comments (lines whose first non-blank character is ``#``), blank lines, and line continuations (the escape
  character at the end of a line; comment lines inside a continued instruction are dropped);
* the instructions FROM, RUN, COPY, ADD, ENV, ARG, WORKDIR, USER, CMD, ENTRYPOINT, LABEL, EXPOSE, STOPSIGNAL
  and SHELL, in any letter case; RUN, CMD, ENTRYPOINT, COPY, ADD and SHELL in exec (JSON array) form too;
* flags ``--chown=`` and ``--chmod=`` of COPY and ADD.

Single-stage builds only: a second FROM, ``COPY --from``, ``RUN --mount`` and every other instruction are
refused with a clear error.  Variables are *not* expanded here (:mod:`.plan` does that, with the values
each step sees).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from unionfs.image.build.expand import Expander, ExpandError

KNOWN = ("FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "CMD", "ENTRYPOINT", "LABEL",
         "EXPOSE", "STOPSIGNAL", "SHELL")
EXEC_FORM = ("RUN", "CMD", "ENTRYPOINT", "COPY", "ADD", "SHELL")
_FLAGS = {"COPY": ("chown", "chmod"), "ADD": ("chown", "chmod")}
_DIRECTIVE_RE = re.compile(r"#\s*([A-Za-z]+)\s*=\s*(.*?)\s*$")
_FLAG_RE = re.compile(r"--([A-Za-z][A-Za-z0-9-]*)(?:=(\S*))?")
_ARG_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ParseError(ValueError):
    """A Containerfile that cannot be built; ``str()`` is ``FILE:LINE: reason``."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line
        self.reason = message


@dataclass(frozen=True)
class Instruction:
    """One instruction.  ``args`` is the text after the keyword and the flags (continuations joined with a
    space, not expanded); ``exec_form`` the JSON array where the exec form was used; ``flags`` the
    ``--name=value`` flags in order; ``line`` the 1-based line it starts on."""

    keyword: str
    args: str
    line: int
    flags: tuple[tuple[str, str], ...] = ()
    exec_form: tuple[str, ...] | None = None

    def flag(self, name: str) -> str | None:
        """The value of flag ``name`` (the last one given), or None."""
        found = [v for k, v in self.flags if k == name]
        return found[-1] if found else None

    def text(self) -> str:
        """The instruction as written (flags and arguments normalised to one line)."""
        flags = "".join(f"--{k}={v} " for k, v in self.flags)
        body = json.dumps(list(self.exec_form)) if self.exec_form is not None else self.args
        return f"{self.keyword} {flags}{body}".rstrip()


@dataclass(frozen=True)
class Containerfile:
    """A parsed Containerfile: ``args_before_from`` (ARGs before FROM), ``from_`` and the instructions after
    it, in order; the directives it had."""

    path: str
    from_: Instruction
    args_before_from: tuple[Instruction, ...]
    instructions: tuple[Instruction, ...]
    escape: str = "\\"
    syntax: str = ""


def _logical_lines(text: str, path: str) -> tuple[list[tuple[int, str]], str, str]:
    """The instructions' lines (start line, joined text), the escape character and the syntax directive."""
    lines = text.splitlines()
    escape, syntax = "\\", ""
    i = 0
    seen: set[str] = set()
    while i < len(lines):
        m = _DIRECTIVE_RE.fullmatch(lines[i].strip())
        if not m or not lines[i].lstrip().startswith("#"):
            break
        name, value = m.group(1).lower(), m.group(2)
        if name not in ("escape", "syntax"):
            break  # an ordinary comment ends the directives
        if name in seen:
            raise ParseError(path, i + 1, f"directive {name!r} given twice")
        seen.add(name)
        if name == "escape":
            if value not in ("\\", "`"):
                raise ParseError(path, i + 1, f"invalid escape character {value!r}: use '\\' or '`'")
            escape = value
        else:
            syntax = value
        i += 1
    out: list[tuple[int, str]] = []
    start = 0
    parts: list[str] = []
    for no in range(i, len(lines)):
        raw = lines[no]
        stripped = raw.strip()
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if parts and (stripped.startswith("#") or not stripped):
            continue  # comments and blank lines inside a continued instruction
        if not parts:
            start = no + 1
        body = raw.rstrip()
        if body.endswith(escape):
            parts.append(body[:-1].lstrip() if parts else body[:-1])
            continue
        parts.append(body.lstrip() if parts else body)
        out.append((start, " ".join(p.strip() for p in parts if p.strip())))
        parts = []
    if parts:
        out.append((start, " ".join(p.strip() for p in parts if p.strip())))
    return out, escape, syntax


def _split_flags(keyword: str, rest: str, path: str, line: int) -> tuple[tuple[tuple[str, str], ...], str]:
    flags = []
    allowed = _FLAGS.get(keyword, ())
    while rest.startswith("--"):
        word, _, after = rest.partition(" ")
        m = _FLAG_RE.fullmatch(word)
        if not m:
            raise ParseError(path, line, f"{keyword}: malformed flag {word!r}")
        name, value = m.group(1), m.group(2)
        if name not in allowed:
            if keyword in ("COPY", "ADD") and name == "from":
                raise ParseError(path, line, f"{keyword} --from: multi-stage builds are not supported")
            raise ParseError(path, line, f"{keyword}: unsupported flag --{name}")
        if not value:
            raise ParseError(path, line, f"{keyword}: flag --{name} needs a value (--{name}=VALUE)")
        flags.append((name, value))
        rest = after.lstrip()
    return tuple(flags), rest


def _exec_form(rest: str) -> tuple[str, ...] | None:
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def _check(ins: Instruction, path: str) -> None:
    """The shape checks of one instruction (arguments present, names valid)."""
    k, args, line = ins.keyword, ins.args, ins.line

    def fail(message: str) -> None:
        raise ParseError(path, line, f"{k}: {message}")

    if k in ("RUN", "CMD", "ENTRYPOINT"):
        if ins.exec_form is None and not args:
            fail("needs a command")
        if ins.exec_form is None and args.startswith("<<"):
            fail("here-documents (RUN <<EOF) are not supported")
        if k == "RUN" and ins.exec_form == ():
            fail("needs a command")
    elif k == "SHELL":
        if not ins.exec_form:
            fail('needs a JSON array, e.g. SHELL ["/bin/sh", "-c"]')
    elif k in ("COPY", "ADD"):
        words = list(ins.exec_form) if ins.exec_form is not None else args.split()
        if len(words) < 2:
            fail("needs at least one source and a destination")
    elif k == "ARG":
        if not args:
            fail("needs a name")
        try:
            words = Expander({}).words(args)
        except ExpandError as exc:
            fail(str(exc))
        for word in words:
            name = word.partition("=")[0]
            if not _ARG_NAME_RE.fullmatch(name):
                fail(f"invalid name {name!r}")
    elif k in ("ENV", "LABEL"):
        if not args:
            fail("needs KEY=VALUE")
        if k == "LABEL" and "=" not in args:
            fail("needs KEY=VALUE")
    elif k in ("WORKDIR", "USER", "STOPSIGNAL", "EXPOSE", "FROM"):
        if not args:
            fail("needs an argument")
        if k == "FROM":
            words = args.split()
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
                fail("expected FROM IMAGE [AS NAME]")
        elif k in ("WORKDIR", "USER", "STOPSIGNAL") and len(args.split()) != 1 and k != "WORKDIR":
            fail("takes exactly one argument")


def parse(text: str, path: str = "Containerfile") -> Containerfile:
    """Parse a Containerfile; ``path`` names it in errors.  Raises :class:`ParseError`."""
    lines, escape, syntax = _logical_lines(text, path)
    before: list[Instruction] = []
    from_: Instruction | None = None
    body: list[Instruction] = []
    for line, content in lines:
        word, _, rest = content.strip().partition(" ")
        keyword = word.upper()
        if keyword not in KNOWN:
            raise ParseError(path, line, f"unknown instruction {word!r}")
        rest = rest.strip()
        flags, rest = _split_flags(keyword, rest, path, line) if rest.startswith("--") else ((), rest)
        exec_form = _exec_form(rest) if keyword in EXEC_FORM else None
        ins = Instruction(keyword, rest, line, flags, exec_form)
        _check(ins, path)
        if keyword == "FROM":
            if from_ is not None:
                raise ParseError(path, line, "a second FROM: multi-stage builds are not supported")
            from_ = ins
        elif from_ is None:
            if keyword != "ARG":
                raise ParseError(path, line, f"{keyword} before FROM (only ARG may come first)")
            before.append(ins)
        else:
            body.append(ins)
    if from_ is None:
        raise ParseError(path, lines[-1][0] if lines else 1, "no FROM instruction")
    return Containerfile(path, from_, tuple(before), tuple(body), escape, syntax)
