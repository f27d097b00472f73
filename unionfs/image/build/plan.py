"""From a parsed Containerfile to the steps to run: variables expanded, the image config after each step.

Everything here is decided before any step runs, so a bad variable reference or a bad flag value fails the
build with its line number and nothing done.  The rules are the classic builder's:

* ARG before FROM is seen by FROM only; inside the build an ``ARG NAME`` brings it back (its value, a
  ``--build-arg`` or the default).  ENV wins over ARG of the same name.
* ADD, COPY, ENV, EXPOSE, FROM, LABEL, STOPSIGNAL, USER and WORKDIR expand variables; RUN, CMD and
  ENTRYPOINT do not (their shell does, at run time).
* RUN sees the build args in scope as environment variables (not kept in the image), so a RUN depends on all
  of them: a changed build arg misses at its first use, not at its declaration.
* ENV, ARG, WORKDIR, USER, CMD, ENTRYPOINT, LABEL, EXPOSE, STOPSIGNAL and SHELL change the config only: no
  layer.  RUN, COPY and ADD make one; so does a WORKDIR whose directory the image lacks (the executor
  creates it, as docker does).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, replace

from unionfs.image.build.containerfile import Containerfile, Instruction
from unionfs.image.build.expand import Expander, ExpandError
from unionfs.image.records import ImageConfig

DEFAULT_SHELL = ("/bin/sh", "-c")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""PATH of a RUN whose image sets none (docker's default)."""
LAYER_KINDS = ("RUN", "COPY", "ADD")
SCRATCH = "scratch"
_URL_PREFIXES = ("http://", "https://", "git@", "git://", "ftp://")


class PlanError(ValueError):
    """A step that cannot be planned; ``str()`` is ``FILE:LINE: reason``."""


@dataclass(frozen=True)
class Step:
    """One step after FROM.  ``number`` counts FROM as 1; ``text`` is the instruction as recorded in the
    history and shown (arguments expanded where the builder expands them); ``config`` the image config after
    the step; ``args_used`` the build args (name, value) the step depends on."""

    number: int
    instruction: Instruction
    text: str
    config: ImageConfig
    args_used: tuple[tuple[str, str], ...] = ()
    argv: tuple[str, ...] = ()
    """RUN: the command."""
    run_env: tuple[str, ...] = ()
    """RUN: its environment (the image's, the build args in scope, PATH if unset)."""
    sources: tuple[str, ...] = ()
    """COPY/ADD: the sources as written (expanded), relative to the context."""
    dest: str = ""
    """COPY/ADD: the absolute destination in the image; a trailing ``/`` means "into this directory"."""
    chown: str = ""
    chmod: int | None = None

    @property
    def keyword(self) -> str:
        return self.instruction.keyword

    @property
    def makes_layer(self) -> bool:
        return self.keyword in LAYER_KINDS


@dataclass(frozen=True)
class Plan:
    """The base (an image name or ``scratch``), the steps, and the ``--build-arg`` names no ARG declared."""

    base: str
    steps: tuple[Step, ...]
    unused_args: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        """How many steps the output counts (FROM included)."""
        return len(self.steps) + 1


def _fail(cf: Containerfile, ins: Instruction, message: str) -> PlanError:
    return PlanError(f"{cf.path}:{ins.line}: {ins.keyword}: {message}")


def _global_args(cf: Containerfile, build_args: Mapping[str, str]) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for ins in cf.args_before_from:
        for word in Expander({k: v for k, v in values.items() if v is not None}, cf.escape).words(ins.args):
            name, sep, default = word.partition("=")
            values[name] = build_args.get(name, default if sep else None)
    return values


def base_name(cf: Containerfile, build_args: Mapping[str, str]) -> str:
    """The image FROM names, with the ARGs before FROM expanded (PlanError for a bad reference)."""
    scope = {k: v for k, v in _global_args(cf, build_args).items() if v is not None}
    try:
        words = Expander(scope, cf.escape).words(cf.from_.args)
    except ExpandError as exc:
        raise _fail(cf, cf.from_, str(exc)) from None
    if not words or not words[0]:
        raise _fail(cf, cf.from_, "the image name is empty after expansion")
    return words[0]


class _Planner:
    def __init__(self, cf: Containerfile, build_args: Mapping[str, str], config: ImageConfig) -> None:
        self.cf = cf
        self.build_args = build_args
        self.global_args = _global_args(cf, build_args)
        self.config = config
        self.args: dict[str, str | None] = {}
        self.declared: set[str] = set(self.global_args)
        self.cmd_set = False

    def expander(self) -> Expander:
        scope = {k: v for k, v in self.args.items() if v is not None}
        scope.update(self.config.env_dict())
        return Expander(scope, self.cf.escape)

    def used_args(self, ex: Expander) -> tuple[tuple[str, str], ...]:
        env = self.config.env_dict()
        return tuple(sorted((k, v) for k in ex.used if k not in env and (v := self.args.get(k)) is not None))

    def step(self, number: int, ins: Instruction) -> Step:
        try:
            return self._step(number, ins)
        except ExpandError as exc:
            raise _fail(self.cf, ins, str(exc)) from None

    def _pairs(self, ins: Instruction, ex: Expander) -> list[tuple[str, str]]:
        """KEY=VALUE words of ENV and LABEL (and ENV's old ``ENV KEY VALUE`` form)."""
        first = ins.args.split(None, 1)
        if ins.keyword == "ENV" and "=" not in first[0]:
            if len(first) < 2:
                raise _fail(self.cf, ins, f"{first[0]} needs a value")
            return [(first[0], " ".join(ex.words(first[1])))]
        pairs = []
        for word in ex.words(ins.args):
            key, sep, value = word.partition("=")
            if not sep or not key:
                raise _fail(self.cf, ins, f"expected KEY=VALUE, got {word!r}")
            pairs.append((key, value))
        return pairs

    def _step(self, number: int, ins: Instruction) -> Step:
        k = ins.keyword
        ex = self.expander()
        cfg = self.config
        text = f"{k} {ins.args}"
        if k == "ENV":
            pairs = self._pairs(ins, ex)
            cfg = cfg.merged(env=[f"{key}={value}" for key, value in pairs])
            text = "ENV " + " ".join(f"{key}={value}" for key, value in pairs)
        elif k == "LABEL":
            pairs = self._pairs(ins, ex)
            cfg = cfg.merged(labels=pairs)
            text = "LABEL " + " ".join(f"{key}={value}" for key, value in pairs)
        elif k == "ARG":
            for word in ex.words(ins.args):
                name, sep, default = word.partition("=")
                value = self.build_args.get(name)
                if value is None:
                    value = default if sep else self.global_args.get(name)
                self.args[name] = value
                self.declared.add(name)
        elif k == "WORKDIR":
            path = ex.word(ins.args.strip())
            if not path:
                raise _fail(self.cf, ins, "the path is empty after expansion")
            cfg = replace(cfg, workdir=posixpath.normpath(posixpath.join(cfg.workdir or "/", path)))
            text = f"WORKDIR {cfg.workdir}"
        elif k == "USER":
            cfg = replace(cfg, user=ex.word(ins.args.strip()))
            text = f"USER {cfg.user}"
        elif k in ("CMD", "ENTRYPOINT"):
            argv = ins.exec_form if ins.exec_form is not None else (*(cfg.shell or DEFAULT_SHELL), ins.args)
            if k == "CMD":
                cfg = replace(cfg, cmd=argv)
                self.cmd_set = True
            else:
                cfg = replace(cfg, entrypoint=argv, cmd=cfg.cmd if self.cmd_set else ())
            text = f"{k} {_show_argv(argv) if ins.exec_form is not None else ins.args}"
        elif k == "EXPOSE":
            ports = [p if "/" in p else f"{p}/tcp" for p in ex.words(ins.args)]
            for port in ports:
                num, _, proto = port.partition("/")
                if not num.replace("-", "").isdigit() or proto not in ("tcp", "udp", "sctp"):
                    raise _fail(self.cf, ins, f"invalid port {port!r}")
            cfg = replace(cfg, exposed_ports=tuple(sorted(set(cfg.exposed_ports) | set(ports))))
            text = "EXPOSE " + " ".join(ports)
        elif k == "STOPSIGNAL":
            cfg = replace(cfg, stop_signal=ex.word(ins.args.strip()))
            text = f"STOPSIGNAL {cfg.stop_signal}"
        elif k == "SHELL":
            cfg = replace(cfg, shell=ins.exec_form or ())
            text = f"SHELL {_show_argv(cfg.shell)}"
        elif k == "RUN":
            argv = ins.exec_form if ins.exec_form is not None else (*(cfg.shell or DEFAULT_SHELL), ins.args)
            scoped = {n: v for n, v in self.args.items() if v is not None}
            env = cfg.env_dict()
            run_env = [*cfg.env, *(f"{n}={v}" for n, v in sorted(scoped.items()) if n not in env)]
            if "PATH" not in env:
                run_env.append(f"PATH={DEFAULT_PATH}")
            used = tuple(sorted((n, v) for n, v in scoped.items() if n not in env))
            text = f"RUN {_show_argv(argv) if ins.exec_form is not None else ins.args}"
            return Step(number, ins, text, cfg, used, argv=argv, run_env=tuple(run_env))
        elif k in ("COPY", "ADD"):
            return self._copy(number, ins, ex, cfg)
        self.config = cfg
        return Step(number, ins, text.rstrip(), cfg, self.used_args(ex))

    def _copy(self, number: int, ins: Instruction, ex: Expander, cfg: ImageConfig) -> Step:
        words = [ex.word(w) for w in ins.exec_form] if ins.exec_form is not None else ex.words(ins.args)
        sources, dest = words[:-1], words[-1]
        if not dest:
            raise _fail(self.cf, ins, "the destination is empty after expansion")
        for src in sources:
            if src.startswith(_URL_PREFIXES):
                raise _fail(self.cf, ins, f"{src}: sources from URLs are not supported (builds have no network)")
        keep_slash = dest.endswith("/") or dest in (".", "..")
        full = posixpath.normpath(posixpath.join(cfg.workdir or "/", dest))
        if keep_slash and not full.endswith("/"):
            full += "/"
        chown = ex.word(ins.flag("chown") or "")
        chmod_text = ins.flag("chmod")
        chmod = None
        if chmod_text is not None:
            try:
                chmod = int(chmod_text, 8)
            except ValueError:
                raise _fail(self.cf, ins, f"--chmod={chmod_text}: expected octal bits like 0755") from None
            if not 0 <= chmod <= 0o7777:
                raise _fail(self.cf, ins, f"--chmod={chmod_text}: expected octal bits like 0755")
        flags = (f"--chown={chown} " if chown else "") + (f"--chmod={chmod_text} " if chmod is not None else "")
        text = f"{ins.keyword} {flags}{' '.join([*sources, full])}"
        return Step(number, ins, text, cfg, self.used_args(ex), sources=tuple(sources), dest=full, chown=chown,
                    chmod=chmod)


def _show_argv(argv: tuple[str, ...]) -> str:
    return json.dumps(list(argv))


def plan(cf: Containerfile, build_args: Mapping[str, str], base_config: ImageConfig) -> Plan:
    """The steps of ``cf`` on a base whose config is ``base_config`` (PlanError, with file and line)."""
    base = base_name(cf, build_args)
    planner = _Planner(cf, build_args, base_config)
    steps = tuple(planner.step(i + 2, ins) for i, ins in enumerate(cf.instructions))
    unused = tuple(sorted(set(build_args) - planner.declared))
    return Plan(base, steps, unused)
