"""The protocol frontend's life: mount ``/dev/fuse``, answer INIT, serve until the mount ends.

Called by :func:`mountd.lifecycle.serve` with a built :class:`unionfs.fs.union.UnionFS`.  ``ready()`` is
called once the kernel has the mount and its INIT answer.  SIGTERM, SIGINT and SIGHUP detach the mount and
end the loop (as libfuse's handlers do); a plain ``umount`` ends it when the kernel closes the connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable, Iterator, Mapping

from mountd import logs
from mountd.lowlevel import abi
from mountd.lowlevel import mount as devmount
from mountd.lowlevel.dispatch import Dispatcher, Settings
from mountd.lowlevel.passthrough import Passthrough
from mountd.lowlevel.passthrough import stack_depth as stack_depth
from mountd.lowlevel.session import Session
from mountd.options import FuseValue
from mountd.service import MountService
from unionfs.fs.union import UnionFS

log = logs.log

MAX_WRITE = 1 << 20
_MOUNT_FLAG_OPTIONS = ("ro", "nodev", "nosuid", "noexec", "sync", "dirsync", "noatime")


class FrontendError(Exception):
    """The mount could not be made; ``str()`` is one line for the user."""


def settings_from(kwargs: Mapping[str, FuseValue], *, writeback_cache: bool, readdirplus: str,
                  posix_acl: bool, passthrough: str = "off", max_stack_depth: int = 1,
                  spin: str = "auto", dir_cache: bool = True) -> Settings:
    """The protocol settings for the FUSE options of a mount (``fuse_kwargs``)."""
    def seconds(name: str) -> float:
        value = kwargs.get(name, 0)
        return float(value) if not isinstance(value, str) else float(value or 0)

    return Settings(entry_timeout=seconds("entry_timeout"), attr_timeout=seconds("attr_timeout"),
                    negative_timeout=seconds("negative_timeout"), kernel_cache=bool(kwargs.get("kernel_cache")),
                    direct_io=bool(kwargs.get("direct_io")), writeback_cache=writeback_cache,
                    readdirplus=readdirplus, posix_acl=posix_acl, max_write=MAX_WRITE,
                    passthrough=passthrough, max_stack_depth=max_stack_depth, spin=spin,
                    dir_cache=dir_cache)


def mount_request(mountpoint: str, kwargs: Mapping[str, FuseValue]) -> devmount.MountRequest:
    flags = tuple(name for name in _MOUNT_FLAG_OPTIONS if kwargs.get(name))
    options = tuple(name for name in ("default_permissions", "allow_other") if kwargs.get(name))
    return devmount.MountRequest(mountpoint=mountpoint, source=str(kwargs.get("fsname", "unionfs")),
                                 subtype=str(kwargs.get("subtype", "unionfs")), flags=flags, options=options)


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None], wake_fd: int) -> Iterator[None]:
    """SIGTERM/SIGINT/SIGHUP call ``stop`` (main thread only; elsewhere nothing is installed).

    The kernel may deliver the signal to any thread, and only the main thread runs Python's handlers: the
    signal's number is also written to ``wake_fd`` (the session's wake-up pipe), so that a main thread
    asleep in ``poll`` wakes up to run ``stop``."""
    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    try:
        old = {sig: signal.signal(sig, lambda signum, frame: stop()) for sig in sigs}
    except ValueError:  # not the main thread
        yield
        return
    old_wake = signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_wake)
        for sig, handler in old.items():
            signal.signal(sig, handler)


def serve(fs: UnionFS, *, mountpoint: str, kwargs: Mapping[str, FuseValue], settings: Settings,
          ready: Callable[[], None]) -> None:
    """Mount ``fs`` at ``mountpoint`` and serve it until the mount ends.  Raises FrontendError before ready."""
    service = MountService(fs, mountpoint=mountpoint, frontend="lowlevel")
    request = mount_request(mountpoint, kwargs)
    try:
        fd = devmount.open_device() if os.geteuid() == 0 else devmount.fusermount(request)
    except OSError as exc:
        raise FrontendError(f"cannot mount '{mountpoint}': {exc.strerror or exc}") from None
    session = Session(fd, buffer_size=MAX_WRITE + 2 * 4096, spin=settings.spin)
    started: list[bool] = []

    def on_ready() -> None:
        if started:
            return
        started.append(True)
        service.start_invalidator(lambda nodeid: _invalidate(session, nodeid), resolve=dispatcher.nodes.find_path)
        try:
            service.start_control()
        except OSError:
            log.exception("control socket unavailable; the mount works without it")
        ready()

    if settings.passthrough == "off":
        passthrough = Passthrough(fd, enabled=False, reason="passthrough=off")
    elif os.geteuid() != 0:
        passthrough = Passthrough(fd, enabled=False, reason="needs root (CAP_SYS_ADMIN)")
    else:
        everything = settings.passthrough == "all"
        passthrough = Passthrough(fd, enabled=True, lower=fs.upper is None or everything, writes=everything)
    dispatcher = Dispatcher(fs, service, session, settings, passthrough=passthrough)
    service.extra_stats["passthrough"] = passthrough.snapshot
    session.dispatcher = dispatcher
    service.extra_stats["session"] = lambda: {**session.counters, "nodes": len(dispatcher.nodes),
                                              "spin": session.spin,
                                              "spin_window_us": session.spin_window_ns // 1000}
    stopping: list[bool] = []
    detached: list[bool] = []

    def stop() -> None:
        # as libfuse's handlers: detach the mount (users of a busy one keep it until they leave, and
        # get ENOTCONN once the daemon is gone) and leave the loop
        if not stopping:
            stopping.append(True)
            with contextlib.suppress(OSError):
                devmount.unmount(mountpoint, lazy=True)
                detached.append(True)
            session.stop()

    try:
        # the handlers come first: a signal right after the caller was told the mount is ready (or even
        # during the mount) must end it, not interrupt the set-up half-way
        with _stop_on_signals(stop, session.wake_fd):
            if os.geteuid() == 0:
                try:
                    synced = devmount.mount_device(fd, request, lambda: session.serve_init(dispatcher.handle))
                except OSError as exc:
                    raise FrontendError(f"cannot mount '{mountpoint}': {exc.strerror or exc}") from None
            else:
                synced = False
            if synced:
                on_ready()
            else:
                dispatcher.on_init = on_ready
            session.run()
            if stopping and not detached:
                # the signal came before the mount was there: it is there now
                with contextlib.suppress(OSError):
                    devmount.unmount(mountpoint, lazy=True)
    finally:
        service.close()
        session.close()
        dispatcher.nodes.clear()  # the objects kept for names that are gone (nothing of them is on disk)
        os.close(fd)


def _invalidate(session: Session, nodeid: int) -> None:
    """Drop what the kernel caches of node ``nodeid`` (attributes and data; a directory's cached listing)."""
    try:
        session.notify(abi.NOTIFY_INVAL_INODE, abi.NOTIFY_INVAL_INODE_OUT.pack(nodeid, 0, 0))
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENODEV):
            raise
