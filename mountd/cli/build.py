"""``unionfs build``: an image from a Containerfile, one layer per RUN/COPY/ADD, each step cached.

Output like the classic builder: ``STEP N/M: INSTRUCTION``, the RUN output, ``--> Using cache ID`` for a
hit, ``--> ID (S s)`` after each step, ``COMMIT NAME`` and the image id last.  ``--quiet`` prints only the
id (and a failed RUN's output); ``--json`` one JSON object a line on stdout (``step`` events, then ``done``
or ``error``), RUN output on stderr.  Exit status 0, 1 on a failed build (one line on stderr, with the file
and line of the step), 130 on Ctrl-C (the running step stopped, its mount gone, the store's images as they
were); SIGTERM and SIGHUP stop it the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from mountd.build.executor import Builder, BuildError, BuildOptions, BuildResult, Reporter
from mountd.build.runtime import default_isolation, isolation_available
from unionfs.image.build.plan import Plan, Step
from unionfs.image.store import Store, StoreError, default_root, short
from unionfs.progress import Progress, for_stream

PROG = "unionfs"
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def error(message: object) -> None:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


class TextReporter(Reporter):
    """The classic builder's lines on stdout (nothing but warnings with ``quiet``)."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.run_output = -1 if quiet else None

    def _say(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)

    def step(self, step: Step | None, number: int, total: int, text: str) -> None:
        self._say(f"STEP {number}/{total}: {text}")

    def cached(self, state_id: str) -> None:
        self._say(f"--> Using cache {state_id}")

    def finished(self, state_id: str, seconds: float, *, layer: str | None, new_layer: bool) -> None:
        self._say(f"--> {short(state_id)} ({seconds:.2f} s)")

    def warn(self, message: str) -> None:
        print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)

    def failed_output(self, data: bytes) -> None:
        sys.stderr.buffer.write(data)
        sys.stderr.flush()

    def progress(self) -> Progress:
        return Progress() if self.quiet else for_stream(sys.stderr)


class JsonReporter(Reporter):
    """One JSON object a line: a ``step`` event when each step is over."""

    def __init__(self) -> None:
        self.run_output = 2  # RUN output to stderr: stdout carries only the events
        self.current: dict[str, Any] = {}

    def emit(self, event: dict[str, Any]) -> None:
        print(json.dumps(event, sort_keys=True), flush=True)

    def start(self, plan: Plan) -> None:
        self.emit({"event": "start", "base": plan.base, "steps": plan.total})

    def step(self, step: Step | None, number: int, total: int, text: str) -> None:
        self.current = {"event": "step", "step": number, "total": total, "instruction": text,
                        "line": step.instruction.line if step else None, "cached": False}

    def cached(self, state_id: str) -> None:
        self.current["cached"] = True

    def finished(self, state_id: str, seconds: float, *, layer: str | None, new_layer: bool) -> None:
        self.emit({**self.current, "id": state_id, "layer": layer, "new_layer": new_layer,
                   "seconds": round(seconds, 3)})

    def warn(self, message: str) -> None:
        self.emit({"event": "warning", "message": message})

    def failed_output(self, data: bytes) -> None:
        sys.stderr.buffer.write(data)


def _build_args(items: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise BuildError(f"--build-arg {item!r}: expected KEY=VALUE")
        if not sep:  # docker: KEY alone takes the value from the environment
            if key not in os.environ:
                continue
            value = os.environ[key]
        out.append((key, value))
    return tuple(out)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def cmd_build(args: argparse.Namespace) -> int:
    """``build [-f FILE] [-t NAME]... [--build-arg K=V]... [--no-cache] [--quiet] [--json] CONTEXT``"""
    # SIGTERM and SIGHUP stop a build as Ctrl-C does: the running step is cleaned up
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _build(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _build(args: argparse.Namespace) -> int:
    reporter: Reporter = JsonReporter() if args.json else TextReporter(quiet=args.quiet)
    isolation = args.isolation or default_isolation()
    try:
        if not isolation_available(isolation):
            raise BuildError(f"--isolation {isolation}: {'runc' if isolation == 'oci' else 'unshare'} is not "
                             "installed")
        if isolation == "chroot" and not args.isolation:
            reporter.warn("runc is not installed: RUN steps run with unshare + chroot (no seccomp filter, "
                          "no capability drop, the host's cgroup)")
        options = BuildOptions(context=args.context, file=args.file, tags=tuple(args.tag),
                               build_args=_build_args(args.build_arg), no_cache=args.no_cache, isolation=isolation)
        with Store(args.store or default_root(), writable=True) as store:
            result = Builder(store, options, reporter).run()
    except (BuildError, StoreError) as exc:
        if args.json:
            JsonReporter().emit({"event": "error", "message": str(exc)})
        error(exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        if args.json:
            JsonReporter().emit({"event": "error", "message": "interrupted"})
        error("interrupted: the running step was stopped; no image was written")
        return EXIT_INTERRUPTED
    _report(args, result)
    return 0


def _report(args: argparse.Namespace, result: BuildResult) -> None:
    if args.json:
        JsonReporter().emit({"event": "done", "id": result.id, "images": list(result.names),
                             "layers": list(result.state.layers), "steps": result.steps, "cached": result.cached,
                             "seconds": round(result.seconds, 3)})
        return
    if not args.quiet:
        print(f"COMMIT {' '.join(result.names)}")
        print(f"--> {short(result.id)}")
        for name in result.names:
            print(f"Successfully tagged {name}")
        print(f"built in {result.seconds:.2f} s: {result.steps} steps, {result.cached} from the cache, "
              f"{len(result.layers_written)} new layers", file=sys.stderr)
    print(result.id, flush=True)


def add_command(sub: Any) -> None:
    """Register ``build`` on the ``unionfs`` subcommands."""
    p: argparse.ArgumentParser = sub.add_parser(
        "build", help="build an image from a Containerfile",
        description="Build an image from a Containerfile: each RUN, COPY and ADD becomes a layer, each step is "
                    "cached by its parent and its inputs (a rebuild reuses what did not change).")
    p.add_argument("context", metavar="CONTEXT", help="the build context directory")
    p.add_argument("-f", "--file", metavar="FILE",
                   help="the Containerfile (default: CONTEXT/Containerfile, else CONTEXT/Dockerfile)")
    p.add_argument("-t", "--tag", action="append", default=[], metavar="NAME", help="name the image; repeatable")
    p.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE", help="set a build arg")
    p.add_argument("--no-cache", action="store_true", help="run every step, using no cached result")
    p.add_argument("--isolation", choices=("oci", "chroot"), default=None,
                   help="how RUN steps run: oci (runc; the default where installed) or chroot (unshare + chroot)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-q", "--quiet", action="store_true", help="print only the image id")
    out.add_argument("--json", action="store_true", help="one JSON event a line")
    p.add_argument("--store", metavar="DIR", help="the store (default: $UNIONFS_STORE, else /var/lib/unionfs "
                   "as root, ~/.local/share/unionfs otherwise)")
    p.set_defaults(func=cmd_build)

