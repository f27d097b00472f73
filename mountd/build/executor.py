"""The build loop: each step of a plan is a cache hit, a config change, or a union mounted on its parent
with a fresh upper, changed (RUN in a container, COPY/ADD from the context), unmounted and committed.

Nothing is decided here that :mod:`unionfs.image.build` decides: the plan (expansion, configs) and the keys
come from there.  Everything that can fail on the input fails before the first step runs: the
Containerfile's syntax, variables, flags, the base image, image names, and every COPY/ADD source (missing,
or reached through a symlink that leaves the context).

Scratch space of a step (upper, work, mountpoint, OCI bundle) is one directory under the store's ``tmp/``,
removed when the step ends however it ends; a failed or interrupted step is never committed, and the images
of the store are written only when the whole build succeeded.  The upper dir is committed directly after the
unmount (:func:`unionfs.image.commit.commit_layer`): it *is* the step's change, no tree is compared.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat as stat_mod
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from unionfs.fs.fsio import HostDir
from unionfs.image.build import rootfs
from unionfs.image.build.cache import BuildCache, State, base_key, step_key
from unionfs.image.build.containerfile import Containerfile, ParseError, parse
from unionfs.image.build.context import Context, ContextError
from unionfs.image.build.copy import Ownership, copy_sources
from unionfs.image.build.plan import SCRATCH, Plan, PlanError, Step, base_name, plan
from unionfs.image.commit import CommitError, base_from_image, commit_layer
from unionfs.image.records import HistoryEntry, ImageConfig, now
from unionfs.image.store import Store, StoreError, check_name, short
from unionfs.progress import Progress

DEFAULT_FILES = ("Containerfile", "Dockerfile")


class BuildError(Exception):
    """A build that failed; ``str()`` is one line for the user (with the file and line of the step)."""


@dataclass(frozen=True)
class BuildOptions:
    """What ``unionfs build`` was asked (see its help)."""

    context: str
    file: str | None = None
    tags: tuple[str, ...] = ()
    build_args: tuple[tuple[str, str], ...] = ()
    no_cache: bool = False
    isolation: str = "oci"


class Reporter:
    """Receives the build's events; this one ignores them (the command line prints them)."""

    run_output: int | None = None
    """Where RUN output goes: None (inherit stdout/stderr), a descriptor, or -1 (kept, shown on failure)."""

    def start(self, plan: Plan) -> None:
        """The plan is ready; the first step (FROM) begins."""

    def step(self, step: Step | None, number: int, total: int, text: str) -> None:
        """A step begins (``step`` None for FROM)."""

    def cached(self, state_id: str) -> None:
        """The step was a cache hit."""

    def finished(self, state_id: str, seconds: float, *, layer: str | None, new_layer: bool) -> None:
        """The step is over (after :meth:`cached` too)."""

    def warn(self, message: str) -> None:
        """Something the user should know that does not stop the build."""

    def failed_output(self, data: bytes) -> None:
        """The kept output of a failed RUN."""

    def progress(self) -> Progress:
        """Where a step's commit reports its progress (silent here)."""
        return Progress()


@dataclass
class BuildResult:
    """The image a build made, the names written, and the counts."""

    state: State
    names: tuple[str, ...]
    steps: int
    cached: int
    seconds: float
    layers_written: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.state.id


class Builder:
    """Builds ``options`` into ``store`` (writable), reporting to ``reporter``."""

    def __init__(self, store: Store, options: BuildOptions, reporter: Reporter | None = None) -> None:
        self.store = store
        self.options = options
        self.reporter = reporter or Reporter()
        self.ctx: Context | None = None
        self.cf: Containerfile | None = None

    # -- before any step ---------------------------------------------------------------------------------------
    def _read_containerfile(self, ctx: Context) -> Containerfile:
        name = self.options.file
        try:
            if name is None:
                for candidate in DEFAULT_FILES:
                    if ctx.host.try_lstat(candidate) is not None:
                        name = candidate
                        break
                else:
                    raise BuildError(f"no Containerfile or Dockerfile in {ctx.path} (use -f FILE)")
                text, shown = ctx.read_text(name), name
            else:
                with open(name, encoding="utf-8", errors="surrogateescape") as f:
                    text, shown = f.read(), name
        except OSError as exc:
            raise BuildError(f"cannot read {name}: {exc.strerror}") from None
        try:
            return parse(text, shown)
        except ParseError as exc:
            raise BuildError(str(exc)) from None

    def _base(self, cf: Containerfile, args: dict[str, str]) -> tuple[str, State, str]:
        """The base's name, state and cache key."""
        try:
            name = base_name(cf, args)
        except PlanError as exc:
            raise BuildError(str(exc)) from None
        if name == SCRATCH:
            return name, State(), base_key(None)
        try:
            base = base_from_image(self.store, name)
        except StoreError as exc:
            raise BuildError(f"{cf.path}:{cf.from_.line}: FROM {name}: {exc}") from None
        state = State(base.layers, base.history, base.config)
        return name, state, base_key(state.id)

    def _check_sources(self, cf: Containerfile, the_plan: Plan, ctx: Context) -> None:
        for step in the_plan.steps:
            if step.keyword in ("COPY", "ADD"):
                for source in step.sources:
                    try:
                        ctx.resolve(source)
                    except ContextError as exc:
                        raise BuildError(f"{cf.path}:{step.instruction.line}: {step.keyword}: {exc}") from None

    # -- the build ---------------------------------------------------------------------------------------------
    def run(self) -> BuildResult:
        """Build; BuildError for any failure (the store's images unchanged); KeyboardInterrupt passes through
        after the running step was stopped and cleaned up."""
        started = time.monotonic()
        for tag in self.options.tags:
            try:
                check_name(tag)
            except StoreError as exc:
                raise BuildError(str(exc)) from None
        try:
            ctx = Context(self.options.context)
        except (ContextError, OSError) as exc:
            raise BuildError(str(exc)) from None
        with ctx:
            cf = self._read_containerfile(ctx)
            args = dict(self.options.build_args)
            base, state, key = self._base(cf, args)
            try:
                the_plan = plan(cf, args, state.config)
            except PlanError as exc:
                raise BuildError(str(exc)) from None
            self._check_sources(cf, the_plan, ctx)
            for name in the_plan.unused_args:
                self.reporter.warn(f"build arg {name} was not used by any ARG")
            self.reporter.start(the_plan)
            cache = BuildCache(self.store)
            cache.begin()
            try:
                result = self._steps(cf, the_plan, ctx, cache, base, state, key)
                names = self.options.tags or (short(result.id),)
                for name in names:
                    self.store.put_image(result.state.image(name))
                cache.finish(names[0])
            finally:
                cache.close()
        result.names = tuple(names)
        result.seconds = time.monotonic() - started
        return result

    def _steps(self, cf: Containerfile, the_plan: Plan, ctx: Context, cache: BuildCache, base: str, state: State,
               key: str) -> BuildResult:
        total = the_plan.total
        self.reporter.step(None, 1, total, f"FROM {base}")
        self.reporter.finished(state.id, 0.0, layer=state.layers[-1] if state.layers else None, new_layer=False)
        result = BuildResult(state, (), total, 0, 0.0)
        for step in the_plan.steps:
            began = time.monotonic()
            self.reporter.step(step, step.number, total, step.text)
            content = ""
            if step.keyword in ("COPY", "ADD"):
                try:
                    content = ctx.digest(step.sources)
                except ContextError as exc:
                    raise BuildError(f"{cf.path}:{step.instruction.line}: {step.keyword}: {exc}") from None
            key = step_key(key, step, content)
            hit = None if self.options.no_cache else cache.lookup(key)
            if hit is not None:
                made = hit.layers[-1] if len(hit.layers) > len(state.layers) else None
                state = hit
                result.cached += 1
                self.reporter.cached(state.id)
                self.reporter.finished(state.id, time.monotonic() - began, layer=made, new_layer=False)
                continue
            top = state.layers[-1] if state.layers else ""
            layer: str | None = None
            new_layer = False
            if step.makes_layer or (step.keyword == "WORKDIR" and not self._is_dir(state, step.config.workdir)):
                layer, new_layer = self._layer_step(cf, step, ctx, state)
            if layer is None:
                entry = HistoryEntry(top, now(), step.text, "", empty_layer=True)
                state = State(state.layers, (*state.history, entry), step.config)
            else:
                entry = HistoryEntry(layer, now(), step.text, "")
                state = State((*state.layers, layer), (*state.history, entry), step.config)
                if new_layer:
                    result.layers_written.append(layer)
            cache.record(key, state)
            self.reporter.finished(state.id, time.monotonic() - began, layer=layer, new_layer=new_layer)
        result.state = state
        return result

    # -- a step that makes a layer -----------------------------------------------------------------------------
    def _where(self, cf: Containerfile, step: Step) -> str:
        return f"{cf.path}:{step.instruction.line}: {step.text}"

    def _is_dir(self, state: State, path: str) -> bool:
        """Is ``path`` a directory in the image ``state`` (read from the layers, no mount)?  False also where
        a symlink is on the way (the step then resolves it in a mounted union)."""
        from unionfs.image.changes import UnionView

        hosts = [HostDir(self.store.layer_path(d)) for d in state.image().mount_layers()]
        try:
            node = UnionView(hosts).lookup(path.strip("/")) if hosts else None
        finally:
            for host in hosts:
                host.close()
        return node is not None and node.kind == stat_mod.S_IFDIR

    def _layer_step(self, cf: Containerfile, step: Step, ctx: Context, state: State) -> tuple[str | None, bool]:
        """Run a step on a mounted union and commit its upper: (the layer, whether it is new to the store);
        no layer where a WORKDIR step changed nothing."""
        with _no_interrupts():
            staging = self.store.new_staging("build")
        scratch = os.path.join(self.store.root, staging)
        upper, work, mnt, bundle = (os.path.join(scratch, d) for d in ("upper", "work", "mnt", "bundle"))
        try:
            for d in (upper, work, mnt, bundle):
                os.mkdir(d, 0o755 if d != work else 0o700)
            lowers = [self.store.layer_path(d) for d in state.image().mount_layers()]
            if not lowers:
                lowers = [os.path.join(scratch, "empty")]
                os.mkdir(lowers[0], 0o755)
            with self._mounted(lowers, upper, work, mnt):
                if step.keyword == "RUN":
                    self._run(cf, step, mnt, bundle)
                elif step.keyword == "WORKDIR":
                    self._mkdir(cf, step, mnt)
                else:
                    self._copy(cf, step, ctx, mnt)
            if step.keyword == "WORKDIR" and not os.listdir(upper):
                return None, False
            with _no_interrupts():
                try:
                    done = commit_layer(self.store, upper, parent=state.layers[-1] if state.layers else None,
                                        created_by=step.text, progress=self.reporter.progress(), below=lowers)
                except (CommitError, StoreError) as exc:
                    raise BuildError(f"{self._where(cf, step)}: cannot commit: {exc}") from None
            return done.digest, done.new_layer
        finally:
            with _no_interrupts():
                self.store.discard(staging)

    @contextlib.contextmanager
    def _mounted(self, lowers: list[str], upper: str, work: str, mnt: str) -> Iterator[None]:
        # imported here: a build whose every step is cached mounts nothing (and starts faster)
        from mountd import lifecycle
        from mountd.options import MountConfig, OptionError, parse_argv
        from unionfs.control import daemon_pid
        from unionfs.mountopts import escape_path

        opts = ",".join(["lowerdir=" + ":".join(escape_path(d) for d in lowers), "upperdir=" + escape_path(upper),
                         "workdir=" + escape_path(work), "volatile"])
        try:
            config = parse_argv(["-o", opts, "--", mnt])
        except OptionError as exc:
            raise BuildError(f"cannot mount the step's union: {exc}") from None
        assert isinstance(config, MountConfig)
        mounted, pid = False, None
        try:
            with _no_interrupts():  # a Ctrl-C here is raised once the mount is recorded, so it is undone below
                try:
                    lifecycle.mount(config)
                except lifecycle.MountError as exc:
                    raise BuildError(f"cannot mount the step's union: {exc}") from None
                mounted = True
                pid = daemon_pid(mnt)
            yield
        finally:
            if mounted:
                with _no_interrupts():
                    try:
                        lifecycle.unmount(mnt)
                    finally:
                        if pid is not None:
                            with contextlib.suppress(ChildProcessError):
                                os.waitpid(pid, 0)

    def _run(self, cf: Containerfile, step: Step, mnt: str, bundle: str) -> None:
        from mountd.build.runtime import Container, Process, RuntimeFailure, describe_status

        config: ImageConfig = step.config
        with contextlib.closing(HostDir(mnt)) as host:
            try:
                uid, gid = rootfs.user_ids(host, config.user) if config.user else (0, 0)
                user = config.user.partition(":")[0]
                groups = tuple(rootfs.supplementary_groups(host, user)) if user and not user.isdigit() else ()
                cwd = config.workdir or "/"
                rootfs.makedirs(host, rootfs.resolve(host, cwd))
                home = rootfs.home_of(host, uid) or ("/root" if uid == 0 else "/")
            except (rootfs.RootfsError, OSError) as exc:
                raise BuildError(f"{self._where(cf, step)}: {exc}") from None
        env = list(step.run_env)
        if not any(e.startswith("HOME=") for e in env):
            env.append(f"HOME={home}")
        if not any(e.startswith("HOSTNAME=") for e in env):
            env.append("HOSTNAME=unionfs-build")
        name = "unionfs-" + os.path.basename(os.path.dirname(bundle))
        container = Container(root=mnt, bundle=bundle, name=name, isolation=self.options.isolation)
        container.prepare()
        kept: BinaryIO | None = None
        try:
            out: int | None = self.reporter.run_output
            if out == -1:
                kept = tempfile.TemporaryFile(dir=bundle)  # noqa: SIM115 - closed below
                out = kept.fileno()
            try:
                status = container.run(Process(step.argv, tuple(env), cwd, uid, gid, groups), stdout=out,
                                       stderr=out)
            except RuntimeFailure as exc:
                raise BuildError(f"{self._where(cf, step)}: {exc}") from None
            except BaseException:  # Ctrl-C, SIGTERM: the container goes before its root is unmounted
                with _no_interrupts():
                    container.stop()
                raise
            if status != 0:
                if kept is not None:
                    kept.seek(0)
                    self.reporter.failed_output(kept.read())
                raise BuildError(f"{self._where(cf, step)}: the command failed ({describe_status(status)})")
        finally:
            if kept is not None:
                kept.close()
            with _no_interrupts():
                container.cleanup()

    def _mkdir(self, cf: Containerfile, step: Step, mnt: str) -> None:
        """WORKDIR of a directory the image lacks: it is created (root, 0755), as docker does."""
        with contextlib.closing(HostDir(mnt)) as host:
            try:
                rootfs.makedirs(host, rootfs.resolve(host, step.config.workdir))
            except (rootfs.RootfsError, OSError) as exc:
                raise BuildError(f"{self._where(cf, step)}: {exc}") from None

    def _copy(self, cf: Containerfile, step: Step, ctx: Context, mnt: str) -> None:
        with contextlib.closing(HostDir(mnt)) as host:
            try:
                uid, gid = rootfs.user_ids(host, step.chown, what="--chown") if step.chown else (0, 0)
                copy_sources(ctx, host, keyword=step.keyword, sources=step.sources, dest=step.dest,
                             owner=Ownership(uid, gid, step.chmod))
            except (rootfs.RootfsError, ContextError) as exc:
                raise BuildError(f"{self._where(cf, step)}: {exc}") from None
            except OSError as exc:
                where = f": {exc.filename}" if exc.filename else ""
                raise BuildError(f"{self._where(cf, step)}: {exc.strerror}{where}") from None


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Hold Ctrl-C back while a mount, an unmount, a commit or a cleanup runs (it is acted on after), so an
    interrupt never leaves a step half cleaned up."""
    pending: list[int] = []

    def note(signum: int, _frame: object) -> None:
        pending.append(signum)

    try:
        previous = signal.signal(signal.SIGINT, note)
    except ValueError:  # not the main thread: nothing to hold back
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt
