"""The life of a mount: validate, open the layers, daemonize, serve, report ready, end on umount or signal.

:func:`mount` is the one entry point (``unionfs-mount`` and ``unionfs mount`` both end here):

1. Everything that can be checked without writing is checked first, in the calling process: the options the
   core cannot honour yet, the mountpoint (exists, is a directory, is not already a mount point), and the
   layers (:meth:`unionfs.fs.layers.LayerStack.open`: missing or non-directory dirs, overlaps, workdir on
   another filesystem or in use).  A failure here raises :class:`MountError`; nothing is mounted or written.
2. Without ``-f`` the process forks *before* anything starts a thread.  The child becomes the daemon:
   ``setsid``, umask 0, cwd ``/``, stdin/stdout on ``/dev/null``, stderr captured until ready.  It inherits
   the open layers (and the workdir lock), so the caller may remove its lowerdir mounts as soon as we return.
3. The daemon builds :class:`unionfs.fs.union.UnionFS` and runs libfuse in the foreground.  libfuse's ``init``
   (the kernel has the mount) calls :meth:`_Readiness.ready`, which points stderr at ``/dev/null`` (no caller
   waiting for EOF on a pipe is kept waiting) and tells the parent, which exits 0.  A failure before that is
   sent to the parent as one line, which it raises as :class:`MountError`; a daemon that dies or is not ready
   within :data:`READY_TIMEOUT` is killed, and a FUSE mount it left behind is detached.
4. ``umount MOUNTPOINT`` ends the FUSE loop; SIGTERM/SIGINT/SIGHUP make libfuse leave the loop and unmount
   (its own handlers).  Either way the daemon closes the union and exits 0.

Mode bits from the kernel already carry the caller's umask, so the daemon runs with umask 0 (also with -f).
:func:`unmount` is ``unionfs umount``: unmount, then wait until the daemon has exited.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import select
import signal
import stat
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mountd import logs
from mountd.options import FRONTENDS, MountConfig, fuse_kwargs, unsupported_fuse_options
from unionfs.fs.layers import LayerError, LayerStack
from unionfs.mountinfo import find_mount

if TYPE_CHECKING:
    from unionfs.fs.union import UnionFS

log = logs.log

READY_TIMEOUT = 60.0
"""How long the parent waits for the daemon to report the mount ready before giving up on it."""

EXIT_TIMEOUT = 30.0
"""How long :func:`unmount` waits for the daemon to exit after the unmount."""

_MNT_DETACH = 2

FSTYPE_PREFIX = "fuse.unionfs"
"""mountinfo's type of our mounts (``fuse.`` + subtype: ``unionfs`` by default, ``unionfs-mount`` under
``mount -t fuse.unionfs-mount``)."""


class MountError(Exception):
    """A mount or unmount that cannot be done; ``str()`` is one line meant for the user."""


def check_mountpoint(mountpoint: str) -> str:
    """Check that ``mountpoint`` is an existing directory that is not a mount point; return its real path.

    Raises :class:`MountError` ("no such directory", "not a directory", "already a mount point").
    """
    real = os.path.realpath(mountpoint)
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise MountError(f"mountpoint '{mountpoint}': no such directory") from None
        raise MountError(f"mountpoint '{mountpoint}': {exc.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise MountError(f"mountpoint '{mountpoint}': not a directory")
    entry = find_mount(real)
    if entry is not None:
        raise MountError(f"mountpoint '{mountpoint}' is already a mount point ({entry.fstype})")
    return real


# -- checks before anything is started ----------------------------------------------------------------------

def open_stack(config: MountConfig) -> LayerStack:
    """Validate and open the layers (MountError with LayerStack's one-line message).

    A read-only mount that names an upper dir (``-o ro``) reads it as the top lower layer: the view is the
    same and nothing is written, not even to the workdir.
    """
    lowers = list(config.lowers)
    upper, work = config.upper, config.work
    if config.read_only and upper is not None:
        lowers.insert(0, upper)
        upper = work = None
    try:
        return LayerStack.open(lowers=lowers, upper=upper, work=work, mountpoint=config.mountpoint)
    except LayerError as exc:
        raise MountError(str(exc)) from None


# -- mount --------------------------------------------------------------------------------------------------

def mount(config: MountConfig) -> int:
    """Mount ``config``; return the exit status (0) once the mount is ready (daemon) or over (``-f``).

    Raises :class:`MountError` when the mount cannot be made; nothing is then mounted, and nothing has been
    written to the layers unless the failure came from the core or libfuse after the checks.
    """
    check_mountpoint(config.mountpoint)
    _raise_file_limit()
    stack = open_stack(config)
    if config.foreground:
        return serve(config, stack, _Readiness(config.mountpoint, None))
    return _daemonize(config, stack)


def _raise_file_limit() -> None:
    """Let the daemon hold as many descriptors as the system allows it (one per open file of the union)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _daemonize(config: MountConfig, stack: LayerStack) -> int:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        _run_daemon(config, stack, write_fd)
    os.close(write_fd)
    stack.close()  # our copies only: the daemon's descriptors, and the workdir lock, stay
    return _wait_ready(read_fd, pid, config.mountpoint)


def _run_daemon(config: MountConfig, stack: LayerStack, status_fd: int) -> None:
    """The daemon's whole life; never returns (it must not run its parent's code, e.g. under a test)."""
    code = 1
    readiness = _Readiness(config.mountpoint, status_fd)
    try:
        _detach(readiness)
        code = serve(config, stack, readiness)
    except MountError as exc:
        readiness.fail(str(exc))
    except BaseException as exc:  # a bug: still report one line to the parent, and log it
        log.exception("the daemon failed")
        readiness.fail(f"internal error: {type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            logs.shutdown()
        os._exit(code)


def _detach(readiness: _Readiness) -> None:
    """Become a daemon: own session, umask 0, cwd /, stdin/stdout on /dev/null, stderr captured, and no
    descriptor the caller let us inherit (a pipe it waits on) kept open."""
    os.setsid()
    os.umask(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    _close_inherited_fds()
    readiness.capture_stderr()


def _close_inherited_fds() -> None:
    """Close every descriptor above 2 without close-on-exec: those came from our caller (all of ours, the
    layers, the workdir lock and the status pipe, are close-on-exec)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with contextlib.suppress(OSError):
            if fd > 2 and os.get_inheritable(fd):
                os.close(fd)


def _wait_ready(read_fd: int, pid: int, mountpoint: str) -> int:
    """Wait for the daemon's one status line: 0 when ready, else :class:`MountError` with its message.

    On any failure nothing may stay mounted: a daemon that never got ready is killed, and a FUSE mount it
    left at ``mountpoint`` (there was none before: :func:`check_mountpoint`) is detached.
    """
    try:
        line = _read_status(read_fd)
    except TimeoutError:
        _abandon(pid, mountpoint, signal.SIGKILL)
        raise MountError(f"the mount was not ready after {READY_TIMEOUT:.0f} s; stopped the daemon") from None
    if line == "ready":
        return 0
    status = _abandon(pid, mountpoint, None)
    if line.startswith("error "):
        raise MountError(line.removeprefix("error "))
    raise MountError(f"the daemon exited before the mount was ready ({_describe_status(status)})")


def _read_status(read_fd: int) -> str:
    """The status line from the daemon ('' if it closed the pipe without one); TimeoutError after
    :data:`READY_TIMEOUT`."""
    data = b""
    deadline = time.monotonic() + READY_TIMEOUT
    with os.fdopen(read_fd, "rb", buffering=0) as status:
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([status], [], [], left)[0]:
                raise TimeoutError
            chunk = status.read(4096)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").strip()


def _abandon(pid: int, mountpoint: str, sig: signal.Signals | None) -> int:
    """Reap the failed daemon (after ``sig``, if given) and detach a FUSE mount it left; its wait status."""
    if sig is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    _, status = os.waitpid(pid, 0)
    real = os.path.realpath(mountpoint)
    entry = find_mount(real)
    if entry is not None and entry.fstype.startswith("fuse"):
        with contextlib.suppress(MountError):
            _umount(real, mountpoint, lazy=True)
    return status


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


class _Readiness:
    """Tells whoever waits that the mount is ready, or why it failed.  ``status_fd`` is the pipe to the
    parent (None with ``-f``).  :meth:`ready` runs once, on libfuse's ``init`` (a FUSE thread)."""

    def __init__(self, mountpoint: str, status_fd: int | None) -> None:
        self.mountpoint = mountpoint
        self.status_fd = status_fd
        self.is_ready = False
        self._stderr_log: int | None = None
        self._lock = threading.Lock()

    def capture_stderr(self) -> None:
        """Send fd 2 to a memory file until ready, so that a failure can quote what libfuse said there."""
        self._stderr_log = os.memfd_create("unionfs-mount-stderr", os.MFD_CLOEXEC)
        os.dup2(self._stderr_log, 2)

    def ready(self) -> None:
        with self._lock:
            if self.is_ready:
                return
            self.is_ready = True
        log.info("mounted %s (pid %d)", self.mountpoint, os.getpid())
        if self.status_fd is None:
            return
        self._send("ready")  # first: the caller goes on while the daemon quiets its stderr
        if self._stderr_log is not None:
            os.close(self._stderr_log)
            self._stderr_log = None
        _quiet_after_ready()

    def fail(self, message: str) -> None:
        """Report a failure before ready (after ready there is nobody to tell: it is logged)."""
        if self.is_ready or self.status_fd is None:
            log.error("%s", message)
            return
        said = self.stderr_tail()
        if said and said not in message:
            message = f"{message} ({said})"
        self._send("error " + " ".join(message.split()))

    def stderr_tail(self) -> str:
        """The last line written to the captured stderr (libfuse's own complaint), or ''."""
        if self._stderr_log is None:
            return ""
        text = os.pread(self._stderr_log, 65536, 0).decode(errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def _send(self, line: str) -> None:
        if self.status_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.status_fd, line.encode() + b"\n")
            os.close(self.status_fd)
        self.status_fd = None


def _quiet_after_ready() -> None:
    """After ready nobody reads the daemon's stderr: point it at /dev/null, log to syslog if there is one."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    logs.to_syslog()


DEFAULT_FRONTEND = "lowlevel"
FRONTEND_ENV = "UNIONFS_FRONTEND"


def frontend_of(config: MountConfig) -> str:
    """The ONE place that picks the frontend: ``-o frontend=``, else ``$UNIONFS_FRONTEND``, else
    :data:`DEFAULT_FRONTEND`.  Raises MountError for an unknown name in the environment."""
    name = config.frontend or os.environ.get(FRONTEND_ENV) or DEFAULT_FRONTEND
    if name not in FRONTENDS:
        raise MountError(f"{FRONTEND_ENV}={name}: expected one of {', '.join(FRONTENDS)}")
    return name


def serve(config: MountConfig, stack: LayerStack, readiness: _Readiness) -> int:
    """Build the union on ``stack`` and serve it through the chosen frontend until the mount ends; return 0.

    Raises :class:`MountError` when the union or the mount cannot be set up (before ready).  The union is
    closed on the way out in every case.
    """
    from unionfs.fs.union import UnionFS

    os.umask(0)
    try:
        frontend = frontend_of(config)
    except MountError:
        stack.close()
        raise
    try:
        fs = UnionFS(stack, whiteout=config.whiteout, volatile=config.volatile, idmap=config.id_map(),
                     redirect_dir=config.redirect_dir, index=config.inode_index == "on",
                     cache_entries=config.cache_entries)
    except (OSError, ValueError) as exc:
        stack.close()
        raise MountError(_describe(exc)) from None
    try:
        if frontend == "lowlevel":
            _serve_lowlevel(config, fs, readiness)
        else:
            _serve_fusepy(config, fs, readiness)
    finally:
        fs.close()
    log.info("unmounted %s", config.mountpoint)
    return 0


def _serve_lowlevel(config: MountConfig, fs: UnionFS, readiness: _Readiness) -> None:
    from mountd.lowlevel import frontend

    kwargs = fuse_kwargs(config, libfuse_major=3)
    posix_acl = config.acl and bool(kwargs.get("default_permissions")) and fs.idmap is None
    settings = frontend.settings_from(kwargs, writeback_cache=config.writeback_cache,
                                      readdirplus=config.readdirplus, posix_acl=posix_acl,
                                      passthrough=config.passthrough, spin=config.spin,
                                      dir_cache=config.dir_cache,
                                      max_stack_depth=frontend.stack_depth([layer.host.fd
                                                                            for layer in fs.stack.layers]))
    log.debug("FUSE options: %s", kwargs)
    try:
        frontend.serve(fs, mountpoint=config.mountpoint, kwargs=kwargs, settings=settings,
                       ready=readiness.ready)
    except frontend.FrontendError as exc:
        raise MountError(str(exc)) from None
    if not readiness.is_ready:
        raise MountError(f"the kernel ended the mount of '{config.mountpoint}' before it was ready")


def _serve_fusepy(config: MountConfig, fs: UnionFS, readiness: _Readiness) -> None:
    from mountd.highlevel.binding import LIBFUSE_MAJOR, UnionFUSE  # FUSE only in the process that serves
    from mountd.highlevel.operations import UnionOperations

    for name in unsupported_fuse_options(config, libfuse_major=LIBFUSE_MAJOR):
        log.warning("option %s is not available with libfuse %d: ignored", name, LIBFUSE_MAJOR)
    kwargs = fuse_kwargs(config, libfuse_major=LIBFUSE_MAJOR)
    # ACLs are enforced where the kernel checks permissions anyway, and not through an owner mapping
    # (the ids inside an ACL would need mapping too)
    posix_acl = config.acl and bool(kwargs.get("default_permissions")) and fs.idmap is None
    ops = UnionOperations(fs, on_ready=readiness.ready, mountpoint=config.mountpoint,
                          writeback_cache=config.writeback_cache, readdirplus=config.readdirplus,
                          posix_acl=posix_acl)
    log.debug("FUSE options: %s", kwargs)
    try:
        UnionFUSE(ops, config.mountpoint, **kwargs)
    except RuntimeError as exc:
        if not readiness.is_ready:
            raise MountError(f"libfuse could not mount '{config.mountpoint}' (error {exc})") from None
        # libfuse leaves its loop with an error code when a signal ended it: that is a normal end
        log.debug("the FUSE loop ended: %s", exc)
    if not readiness.is_ready:
        raise MountError(f"libfuse returned without mounting '{config.mountpoint}'")


def _describe(exc: OSError | ValueError) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"cannot set up the union: {exc.strerror}{where}"
    return f"cannot set up the union: {exc}"


def configure_logging(*, debug: bool) -> None:
    """Log to stderr: warnings and errors, everything with ``-d`` (:mod:`mountd.logs`: ``logging`` itself is
    imported once something is logged)."""
    logs.configure(debug=debug)


# -- finding the daemon of a mount --------------------------------------------------------------------------

# -- unmount ------------------------------------------------------------------------------------------------

def unmount(mountpoint: str, *, timeout: float = EXIT_TIMEOUT) -> None:
    """Unmount a unionfs mount and wait until its daemon has exited.

    Raises :class:`MountError`: not mounted, not a unionfs mount, busy, or the daemon did not exit in time.
    """
    from unionfs.control import daemon_pid

    real = os.path.realpath(mountpoint)
    entry = find_mount(real)
    if entry is None:
        raise MountError(f"'{mountpoint}' is not mounted")
    pid = daemon_pid(real)
    if pid is None and not entry.fstype.startswith(FSTYPE_PREFIX):
        raise MountError(f"'{mountpoint}' is not a unionfs mount ({entry.fstype})")
    with _pidfd(pid) as pidfd:
        _umount(real, mountpoint)
        if pidfd is not None and not select.select([pidfd], [], [], timeout)[0]:
            raise MountError(f"the daemon of '{mountpoint}' (pid {pid}) did not exit within {timeout:.0f} s")


@contextlib.contextmanager
def _pidfd(pid: int | None) -> Iterator[int | None]:
    """A pidfd of ``pid`` (readable once the process has exited), or None if there is none to watch."""
    fd = None
    if pid is not None:
        with contextlib.suppress(OSError):
            fd = os.pidfd_open(pid)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _umount(real: str, shown: str, *, lazy: bool = False) -> None:
    """Unmount ``real`` (``umount2`` as root, else fusermount); ``lazy`` detaches it even when busy."""
    import ctypes  # unmounts only: not on a mount's way
    import subprocess

    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(real), _MNT_DETACH if lazy else 0) != 0:
            err = ctypes.get_errno()
            raise MountError(f"cannot unmount '{shown}': {os.strerror(err)}")
        return
    for tool in ("fusermount3", "fusermount"):
        try:
            proc = subprocess.run([tool, "-u", *(["-z"] if lazy else []), real], capture_output=True, text=True,
                                  check=False)
        except FileNotFoundError:
            continue
        if proc.returncode != 0:
            said = proc.stderr.strip().splitlines()
            raise MountError(f"cannot unmount '{shown}': {said[-1] if said else tool + ' failed'}")
        return
    raise MountError(f"cannot unmount '{shown}': neither fusermount3 nor fusermount is installed")
