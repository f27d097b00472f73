"""The fuse-overlayfs command line, parsed once into a frozen :class:`MountConfig`.

``PROG [SOURCE] MOUNTPOINT -o OPTS [-o MORE] [-f] [-d] [-s] [-V|--version] [-h|--help]``

Options may come before or after the positional arguments; several ``-o`` merge, and a later value of the
same option wins (as with libfuse).  Inside an ``-o`` list a backslash escapes the next character, so ``\\,``
is a comma inside a value and, in ``lowerdir=``, ``\\:`` is a colon inside one directory name.

Every option is in exactly one table below: union options, FUSE options passed through to libfuse, mount
flags applied to the mount, options accepted and ignored, and options refused as unsupported.  Anything else
is an :class:`OptionError`.  The FUSE defaults the daemon adds live in :data:`FUSE_DEFAULTS` and
:data:`ROOT_FUSE_DEFAULTS` only; :func:`fuse_kwargs` turns a config into the keyword arguments of
``FUSE(ops, mountpoint, **kwargs)``.

This module never touches the filesystem and never imports FUSE: it is pure parsing, testable as such.
"""

from __future__ import annotations

import enum
import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Final, Literal, NamedTuple, TypeAlias, TypeVar

from unionfs.fs.idmap import IdMap, IdRange
from unionfs.mountopts import split_lowerdir, split_options, unescape

FuseValue: TypeAlias = bool | int | float | str
"""A FUSE option value: ``True`` for a flag, else the value of ``name=value``."""

Whiteout: TypeAlias = Literal["auto", "kernel", "oci"]
ReaddirPlus: TypeAlias = Literal["0", "1", "auto"]
Frontend: TypeAlias = Literal["lowlevel", "fusepy"]
FRONTENDS: Final[tuple[Frontend, ...]] = ("lowlevel", "fusepy")
Spin: TypeAlias = Literal["auto", "on", "off"]
SPINS: Final[tuple[Spin, ...]] = ("auto", "on", "off")
WHITEOUT_FORMATS: Final[tuple[Whiteout, ...]] = ("auto", "kernel", "oci")
PassthroughMode: TypeAlias = Literal["on", "off", "all"]
PASSTHROUGH_MODES: Final[tuple[PassthroughMode, ...]] = ("on", "off", "all")
RedirectDir: TypeAlias = Literal["on", "follow", "nofollow", "off"]
REDIRECT_DIR_MODES: Final[tuple[RedirectDir, ...]] = ("on", "follow", "nofollow", "off")
Index: TypeAlias = Literal["on", "off"]
INDEX_MODES: Final[tuple[Index, ...]] = ("on", "off")

MAX_ID: Final = 2**32 - 2
"""The largest uid/gid (``(uid_t) -1`` is reserved)."""


class OptionError(ValueError):
    """A command line that cannot be accepted; ``str()`` is one line meant for the user."""


class Action(enum.Enum):
    """What the command line asks for when it is not a mount."""

    HELP = "help"
    VERSION = "version"


# -- the option tables (the ONE place that knows every option) ----------------------------------------------

FUSE_DEFAULTS: Final[Mapping[str, FuseValue]] = MappingProxyType({
    "subtype": "unionfs",
    "use_ino": True,
    # Lower layers never change and upper changes go through the daemon, whose replies keep the kernel
    # informed: long kernel-side caching makes repeat lookups and stats never reach Python
    # (docs/architecture.md, "The hot path").
    "attr_timeout": 3600,
    "entry_timeout": 3600,
    "negative_timeout": 3600,
    "kernel_cache": True,
    # An unlinked file that is still open is removed at once, not renamed to a .fuse_hidden* name that
    # would show up in the upper dir; its handle keeps working without a path.
    "hard_remove": True,
    # libfuse 2 only (left out on 3, which always writes in large requests): 128 KiB writes instead of 4 KiB
    # — measured 20 MB/s without it (benchmarks/RESULTS.md, "Binding choice").
    "big_writes": True,
    # libfuse 3 only: at most 4 worker threads instead of libfuse's 10.  A walk's requests go to the idle
    # workers in turn, so every extra worker is one more cold thread per request; with 4 the daemon spent
    # a quarter less CPU on a container commit's walk (benchmarks/RESULTS.md, "Container build"), and slow
    # requests (a copy-up's fsync, a cold read) still run beside quick ones.
    "max_threads": 4,
})
"""FUSE options the daemon sets unless the user gives the same option (``-o NAME=0`` switches a flag off).
``fsname`` defaults to the SOURCE argument, else ``unionfs``."""

ROOT_FUSE_DEFAULTS: Final[Mapping[str, FuseValue]] = MappingProxyType({
    "allow_other": True,
    "default_permissions": True,
    "dev": True,
    "suid": True,
})
"""Added when the daemon runs as root: every user sees the mount and the kernel checks permissions for each
caller (as with the kernel's overlayfs); device files and set-id bits work as they do on the layers."""

DEFAULT_FSNAME: Final = "unionfs"
DEFAULT_CACHE_ENTRIES: Final = 1_000_000
"""The lookup cache's bound (entries) unless ``cache_entries=`` says otherwise."""

_FUSE_FLAGS: Final[Mapping[str, frozenset[int]]] = MappingProxyType({
    # flag -> libfuse major versions that accept it
    **dict.fromkeys(("allow_other", "allow_root", "default_permissions", "kernel_cache", "auto_cache",
                     "noauto_cache", "use_ino", "readdir_ino", "direct_io", "hard_remove", "noforget",
                     "auto_unmount"), frozenset({2, 3})),
    **dict.fromkeys(("big_writes", "async_read", "sync_read", "atomic_o_trunc"), frozenset({2})),
    "clone_fd": frozenset({3}),
})
"""FUSE flags passed through to libfuse (dropped, with a log line, where the loaded libfuse lacks them)."""

_FUSE_VALUES: Final[Mapping[str, tuple[Callable[[str], FuseValue], frozenset[int]]]] = MappingProxyType({
    # name -> (value parser, libfuse major versions that accept it)
    "fsname": (lambda v: _text("fsname", v), frozenset({2, 3})),
    "subtype": (lambda v: _text("subtype", v), frozenset({2, 3})),
    "attr_timeout": (lambda v: _seconds("attr_timeout", v), frozenset({2, 3})),
    "entry_timeout": (lambda v: _seconds("entry_timeout", v), frozenset({2, 3})),
    "negative_timeout": (lambda v: _seconds("negative_timeout", v), frozenset({2, 3})),
    "ac_attr_timeout": (lambda v: _seconds("ac_attr_timeout", v), frozenset({2, 3})),
    "remember": (lambda v: _count("remember", v, minimum=-1), frozenset({2, 3})),
    # libfuse 3's high-level API refuses max_read unless init() agrees; libfuse 3 sizes requests itself.
    "max_read": (lambda v: _count("max_read", v), frozenset({2})),
    "max_write": (lambda v: _count("max_write", v), frozenset({2})),
    "max_readahead": (lambda v: _count("max_readahead", v), frozenset({2})),
    "max_threads": (lambda v: _count("max_threads", v), frozenset({3})),
    "max_idle_threads": (lambda v: _count("max_idle_threads", v, minimum=-1), frozenset({3})),
})
"""FUSE ``name=value`` options passed through to libfuse."""

_MOUNT_FLAGS: Final[Mapping[str, str]] = MappingProxyType({
    "dev": "nodev", "nodev": "dev", "suid": "nosuid", "nosuid": "suid", "exec": "noexec", "noexec": "exec",
    "sync": "async", "async": "sync", "dirsync": "", "noatime": "",
})
"""Mount flags libfuse applies to the mount -> the flag each one cancels."""

_ROOT_ONLY_FLAGS: Final = ("dev", "suid")

_OPPOSITES: Final[Mapping[str, str]] = MappingProxyType({
    **{k: v for k, v in _MOUNT_FLAGS.items() if v},
    "allow_other": "allow_root", "allow_root": "allow_other",
    "auto_cache": "noauto_cache", "noauto_cache": "auto_cache",
})

IGNORED_FLAGS: Final = frozenset({
    # kernel-overlayfs and fuse-overlayfs options with nothing to do here
    "userxattr", "static_nlink",
    # atime variants libfuse does not take (the daemon does not update atime through the union)
    "relatime", "norelatime", "strictatime", "nostrictatime", "nodiratime", "diratime", "lazytime",
    "nolazytime",
    # fstab/mount(8) bookkeeping
    "defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users",
})
"""Flags accepted and ignored."""

IGNORED_KEYS: Final = frozenset({
    "context", "fscontext", "defcontext", "rootcontext",     # SELinux labels
    "metacopy", "xino", "nfs_export", "uuid", "verity",     # kernel overlayfs
    "fast_ino",                                              # fuse-overlayfs tuning
    "comment",
})
"""``name=value`` options accepted and ignored (any value)."""

IGNORED_PREFIXES: Final = ("x-",)

UNSUPPORTED_KEYS: Final[Mapping[str, str]] = MappingProxyType({
    "plugins": "fuse-overlayfs plugins are not supported",
    "xattr_permissions": "xattr_permissions is not supported",
    "noxattrs": "noxattrs is not supported",
    "umask": "umask= would change the modes of files: not supported",
    "uid": "uid= would change the owners of files: use uidmapping= or squash_to_uid=",
    "gid": "gid= would change the owners of files: use gidmapping= or squash_to_gid=",
    "blksize": "blksize= is only for block-device FUSE mounts",
})


# -- the config ---------------------------------------------------------------------------------------------

class MountConfig(NamedTuple):
    """Everything a mount needs, validated.  Paths are absolute (made so against the caller's cwd) but not
    resolved: symlinks are followed by :meth:`unionfs.fs.layers.LayerStack.open`, which also checks them.

    ``lowers`` is top-down (``lowerdir=A:B`` gives ``("A", "B")``).  ``upper`` and ``work`` are both set or both
    ``None``.  ``read_only`` is true without an upper dir or with ``-o ro``.  ``fuse_options`` holds the FUSE
    options and mount flags the user gave, in order, each name once (``False`` switches off a default flag);
    :func:`fuse_kwargs` merges them with the defaults.  ``ignored`` lists the options accepted and ignored.
    """

    mountpoint: str
    lowers: tuple[str, ...]
    upper: str | None = None
    work: str | None = None
    source: str | None = None
    foreground: bool = False
    debug: bool = False
    single_threaded: bool = False
    read_only: bool = False
    volatile: bool = False
    writeback_cache: bool = False
    readdirplus: ReaddirPlus = "1"
    acl: bool = True
    cache_entries: int = DEFAULT_CACHE_ENTRIES
    whiteout: Whiteout = "auto"
    redirect_dir: RedirectDir = "on"
    inode_index: Index = "off"
    """``-o index=``: hard links kept together across copy-up (a NamedTuple cannot name a field ``index``)."""
    frontend: Frontend | None = None
    passthrough: PassthroughMode = "on"
    dir_cache: bool = True
    spin: Spin = "auto"
    uid_mappings: tuple[IdRange, ...] = ()
    gid_mappings: tuple[IdRange, ...] = ()
    squash_to_root: bool = False
    squash_to_uid: int | None = None
    squash_to_gid: int | None = None
    fuse_options: tuple[tuple[str, FuseValue], ...] = ()
    ignored: tuple[str, ...] = ()

    @property
    def maps_ids(self) -> bool:
        """True when owners are mapped or squashed (the core has to translate uids and gids)."""
        return bool(self.uid_mappings or self.gid_mappings or self.squash_to_root
                    or self.squash_to_uid is not None or self.squash_to_gid is not None)

    def id_map(self) -> IdMap | None:
        """The core's owner mapping (None when owners pass unchanged)."""
        if not self.maps_ids:
            return None
        squash_uid = 0 if self.squash_to_root else self.squash_to_uid
        squash_gid = 0 if self.squash_to_root else self.squash_to_gid
        return IdMap(uids=self.uid_mappings, gids=self.gid_mappings, squash_uid=squash_uid, squash_gid=squash_gid)


def fuse_kwargs(config: MountConfig, *, libfuse_major: int, euid: int | None = None,
                defaults: Mapping[str, FuseValue] = FUSE_DEFAULTS) -> dict[str, FuseValue]:
    """The keyword arguments for ``FUSE(ops, config.mountpoint, **kwargs)``.

    The daemon always runs libfuse in the foreground (it daemonizes itself first), so ``foreground`` is
    always true.  Order: ``defaults`` (benchmarks may pass their own), the root defaults when ``euid`` (default:
    the current one) is 0, then the user's options, which win; a user option cancels its opposite
    (``nodev`` cancels the default ``dev``, ``allow_root`` the default ``allow_other``) and ``NAME=0`` removes
    a flag.  ``dev`` and ``suid`` are dropped for an unprivileged daemon.  Options the loaded libfuse
    (``libfuse_major``) does not know are left out (see :func:`unsupported_fuse_options`).
    """
    opts: dict[str, FuseValue] = {"foreground": True, "fsname": config.source or DEFAULT_FSNAME}
    opts.update(defaults)
    root = (os.geteuid() if euid is None else euid) == 0
    if root:
        opts.update(ROOT_FUSE_DEFAULTS)
    for name, value in config.fuse_options:
        _set_fuse_option(opts, name, value)
    if not root:
        for name in _ROOT_ONLY_FLAGS:  # fusermount refuses them for unprivileged users; mount.fuse passes them
            opts.pop(name, None)
    if config.read_only:
        _set_fuse_option(opts, "ro", True)
    if config.single_threaded:
        opts["nothreads"] = True
    if config.debug:
        opts["debug"] = True
    return {name: _escape(value) for name, value in opts.items()
            if value is not False and libfuse_major in _versions(name)}


def unsupported_fuse_options(config: MountConfig, *, libfuse_major: int) -> list[str]:
    """The user's FUSE options the loaded libfuse does not know (they are left out of :func:`fuse_kwargs`)."""
    return [name for name, value in config.fuse_options
            if value is not False and libfuse_major not in _versions(name)]


def _versions(name: str) -> frozenset[int]:
    if name in _FUSE_FLAGS:
        return _FUSE_FLAGS[name]
    if name in _FUSE_VALUES:
        return _FUSE_VALUES[name][1]
    return frozenset({2, 3})  # mount flags, ro, foreground, nothreads, debug


def _set_fuse_option(opts: dict[str, FuseValue], name: str, value: FuseValue) -> None:
    opposite = _OPPOSITES.get(name)
    if opposite and value is not False:
        opts.pop(opposite, None)
    opts[name] = value


def _escape(value: FuseValue) -> FuseValue:
    """libfuse splits ``-o`` at commas and drops backslashes: escape both in text values."""
    if isinstance(value, str):
        return value.replace("\\", "\\\\").replace(",", "\\,")
    return value


# -- the command line ---------------------------------------------------------------------------------------

class _Parsed:
    """The mutable state of one parse; frozen into a :class:`MountConfig` at the end."""

    __slots__ = ("acl", "cache_entries", "debug", "dir_cache", "foreground", "frontend", "fuse", "gid_mappings",
                 "ignored", "index", "lowers", "passthrough", "positionals", "readdirplus", "redirect_dir", "ro",
                 "single_threaded", "spin", "squash_to_gid", "squash_to_root", "squash_to_uid", "uid_mappings", "upper",
                 "volatile", "whiteout", "work", "writeback_cache")

    def __init__(self) -> None:
        self.positionals: list[str] = []
        self.foreground: bool = False
        self.debug: bool = False
        self.single_threaded: bool = False
        self.lowers: tuple[str, ...] = ()
        self.upper: str | None = None
        self.work: str | None = None
        self.ro: bool = False
        self.volatile: bool = False
        self.writeback_cache: bool = False
        self.readdirplus: ReaddirPlus = "1"
        self.acl: bool = True
        self.cache_entries: int = DEFAULT_CACHE_ENTRIES
        self.whiteout: Whiteout = "auto"
        self.redirect_dir: RedirectDir = "on"
        self.index: Index = "off"
        self.frontend: Frontend | None = None
        self.passthrough: PassthroughMode = "on"
        self.dir_cache: bool = True
        self.spin: Spin = "auto"
        self.uid_mappings: tuple[IdRange, ...] = ()
        self.gid_mappings: tuple[IdRange, ...] = ()
        self.squash_to_root: bool = False
        self.squash_to_uid: int | None = None
        self.squash_to_gid: int | None = None
        self.fuse: dict[str, FuseValue] = {}
        self.ignored: list[str] = []


def parse_argv(argv: Sequence[str], *, cwd: str | None = None) -> MountConfig | Action:
    """Parse the arguments after the program name.  Raises :class:`OptionError` on bad input.

    Returns :attr:`Action.HELP` or :attr:`Action.VERSION` when ``-h``/``-V`` appear anywhere (help wins,
    and either wins over errors elsewhere on the line), else the config.  Relative paths are made absolute
    against ``cwd`` (default: the current directory).
    """
    action = _action(argv)
    if action is not None:
        return action
    state = _Parsed()
    for kind, value in _tokens(argv):
        if kind == "flag":
            _apply_flag(state, value)
        elif kind == "opts":
            for option in split_options(value):
                _apply_option(state, option)
        else:
            state.positionals.append(value)
    return _freeze(state, cwd if cwd is not None else os.getcwd())


def _action(argv: Sequence[str]) -> Action | None:
    found: set[Action] = set()
    args = iter(argv)
    for arg in args:
        if arg == "--":
            break
        if arg == "-o":
            next(args, None)
        elif arg in ("-h", "--help"):
            found.add(Action.HELP)
        elif arg in ("-V", "--version"):
            found.add(Action.VERSION)
    return Action.HELP if Action.HELP in found else (Action.VERSION if found else None)


def _tokens(argv: Sequence[str]) -> Iterator[tuple[str, str]]:
    """Classify argv: ("flag", -f|-d|-s), ("opts", OPTS), ("positional", ARG); -h/-V were handled before."""
    args = iter(argv)
    for arg in args:
        if arg == "--":
            yield from (("positional", rest) for rest in args)
        elif arg in ("-f", "-d", "-s"):
            yield "flag", arg
        elif arg == "-o":
            value = next(args, None)
            if value is None:
                raise OptionError("option -o needs a value")
            yield "opts", value
        elif arg.startswith("-o"):
            yield "opts", arg[2:]
        elif arg.startswith("--options="):
            yield "opts", arg.split("=", 1)[1]
        elif arg.startswith("-") and arg != "-":
            raise OptionError(f"unknown option '{arg}'")
        else:
            yield "positional", arg


def _apply_flag(state: _Parsed, flag: str) -> None:
    if flag == "-f":
        state.foreground = True
    elif flag == "-d":
        state.debug = True  # libfuse's -d implies -f; so does ours
        state.foreground = True
    else:
        state.single_threaded = True


def _apply_option(state: _Parsed, option: str) -> None:
    name, has_value, raw = option.partition("=")
    handler = _UNION_OPTIONS.get(name)
    if handler is not None:
        handler(state, raw if has_value else None)
    elif name in UNSUPPORTED_KEYS:
        raise OptionError(f"option '{name}': {UNSUPPORTED_KEYS[name]}")
    elif name in IGNORED_FLAGS or name in IGNORED_KEYS or name.startswith(IGNORED_PREFIXES):
        state.ignored.append(option)
    elif name in _FUSE_FLAGS or name in _MOUNT_FLAGS:
        _set_fuse_option(state.fuse, name, _flag_value(name, raw) if has_value else True)
    elif name in _FUSE_VALUES:
        if not has_value:
            raise OptionError(f"option '{name}' needs a value ({name}=…)")
        state.fuse[name] = _FUSE_VALUES[name][0](unescape(raw))
    else:
        raise OptionError(f"unknown option '{option}'")


def _flag_value(name: str, raw: str) -> bool:
    """``NAME=1`` sets a flag, ``NAME=0`` removes it (also a default one)."""
    if raw in ("0", "1"):
        return raw == "1"
    raise OptionError(f"option '{name}' is a flag: give it alone, or {name}=0 to switch it off")


# -- union options ------------------------------------------------------------------------------------------

def _need(name: str, raw: str | None) -> str:
    if raw is None:
        raise OptionError(f"option '{name}' needs a value ({name}=…)")
    return raw


def _no_value(name: str, raw: str | None) -> None:
    if raw is not None:
        raise OptionError(f"option '{name}' takes no value")


def _opt_lowerdir(state: _Parsed, raw: str | None) -> None:
    parts = split_lowerdir(_need("lowerdir", raw))
    if any(part == "" for part in parts):
        raise OptionError("lowerdir: empty directory name (data-only '::' layers are not supported)")
    state.lowers = tuple(parts)


def _opt_upperdir(state: _Parsed, raw: str | None) -> None:
    state.upper = _nonempty_path("upperdir", raw)


def _opt_workdir(state: _Parsed, raw: str | None) -> None:
    state.work = _nonempty_path("workdir", raw)


def _nonempty_path(name: str, raw: str | None) -> str:
    path = unescape(_need(name, raw))
    if not path:
        raise OptionError(f"{name}: empty directory name")
    return path


def _opt_ro(state: _Parsed, raw: str | None) -> None:
    _no_value("ro", raw)
    state.ro = True


def _opt_rw(state: _Parsed, raw: str | None) -> None:
    _no_value("rw", raw)
    state.ro = False


def _opt_writeback_cache(state: _Parsed, raw: str | None) -> None:
    """The kernel's writeback cache (libfuse 3): writes are gathered in the page cache and sent in large
    requests; ``writeback_cache=0`` switches it off."""
    state.writeback_cache = True if raw is None else _zero_one("writeback_cache", raw) == 1


def _opt_readdirplus(state: _Parsed, raw: str | None) -> None:
    """Attributes sent with directory listings (libfuse 3): ``1`` (the default) with every reply of a listing,
    ``auto`` as the kernel decides (with a directory's first reply, later ones only after lookups in it:
    libfuse's own default), ``0`` never (the kernel looks up each entry on its own)."""
    modes: dict[str, ReaddirPlus] = {"0": "0", "1": "1", "auto": "auto"}
    mode = modes.get("1" if raw is None else raw)
    if mode is None:
        raise OptionError(f"readdirplus={raw}: expected 0, 1 or auto")
    state.readdirplus = mode


def _opt_cache_entries(state: _Parsed, raw: str | None) -> None:
    """The lookup cache's bound, in entries (merged directories, attributes, xattrs, inode numbers): what
    bounds the daemon's memory on a big tree; least recently used entries go first."""
    state.cache_entries = _count("cache_entries", _need("cache_entries", raw), minimum=1000)


def _opt_writeback(state: _Parsed, raw: str | None) -> None:
    """fuse-overlayfs' spelling: ``writeback=0|1``."""
    state.writeback_cache = _zero_one("writeback", _need("writeback", raw)) == 1


def _opt_volatile(state: _Parsed, raw: str | None) -> None:
    _no_value("volatile", raw)
    state.volatile = True


def _opt_noacl(state: _Parsed, raw: str | None) -> None:
    """POSIX ACLs of the layers not enforced by the kernel on the mount (as fuse-overlayfs's ``noacl``):
    permissions then follow the mode bits alone."""
    _no_value("noacl", raw)
    state.acl = False


def _opt_fsync(state: _Parsed, raw: str | None) -> None:
    state.volatile = _zero_one("fsync", raw) == 0


def _opt_threaded(state: _Parsed, raw: str | None) -> None:
    state.single_threaded = _zero_one("threaded", raw) == 0


def _opt_debug(state: _Parsed, raw: str | None) -> None:
    _no_value("debug", raw)
    _apply_flag(state, "-d")


_Choice = TypeVar("_Choice", bound=str)


def _choice(name: str, raw: str | None, choices: tuple[_Choice, ...]) -> _Choice:
    """The value of option ``name`` (``raw``, escaped), which must be one of ``choices``."""
    value = unescape(_need(name, raw))
    for choice in choices:
        if value == choice:
            return choice
    raise OptionError(f"{name}={value}: expected one of {', '.join(choices)}")


def _opt_whiteout(state: _Parsed, raw: str | None) -> None:
    state.whiteout = _choice("whiteout", raw, WHITEOUT_FORMATS)


def _opt_redirect_dir(state: _Parsed, raw: str | None) -> None:
    """The kernel's ``redirect_dir=``: ``on`` renames directories with lower copies (a redirect xattr
    records the move), ``follow`` and ``off`` read redirects only, ``nofollow`` reads none."""
    state.redirect_dir = _choice("redirect_dir", raw, REDIRECT_DIR_MODES)


def _opt_index(state: _Parsed, raw: str | None) -> None:
    """The kernel's ``index=``: ``on`` keeps the names of a lower hard link together across copy-up (an
    inode index in the work dir); ``off`` (default) breaks the link at copy-up (docs/semantics.md)."""
    state.index = _choice("index", raw, INDEX_MODES)


def _opt_frontend(state: _Parsed, raw: str | None) -> None:
    """Which frontend serves the mount: ``lowlevel`` (the daemon speaks /dev/fuse itself) or ``fusepy``
    (libfuse's high-level API through mfusepy).  Unset: ``$UNIONFS_FRONTEND``, else the default."""
    state.frontend = _choice("frontend", raw, FRONTENDS)


def _opt_passthrough(state: _Parsed, raw: str | None) -> None:
    """Reads and writes of regular files passed straight to the backing file by the kernel (protocol
    frontend, root, kernel 6.9+).  ``on``: upper files, and lower files of a read-only mount; ``all``: lower
    files of a writable mount too (a descriptor opened before a copy-up then keeps reading the lower file);
    ``off`` (or 0): none."""
    value = unescape(_need("passthrough", raw))
    if value in ("1", "0"):
        state.passthrough = "on" if value == "1" else "off"
        return
    state.passthrough = _choice("passthrough", raw, PASSTHROUGH_MODES)


def _opt_dir_cache(state: _Parsed, raw: str | None) -> None:
    """Directory listings kept in the kernel's page cache (protocol frontend): no OPENDIR/RELEASEDIR
    requests, and a listing read again costs nothing until something changes it; ``dir_cache=off`` (or 0)
    switches it off."""
    value = unescape(_need("dir_cache", raw))
    if value not in ("on", "off", "1", "0"):
        raise OptionError(f"dir_cache={value}: expected on or off")
    state.dir_cache = value in ("on", "1")


def _opt_spin(state: _Parsed, raw: str | None) -> None:
    """Whether the protocol frontend's reader keeps reading the device for a short while after a request
    before it sleeps: ``auto`` (while a CPU is free for it), ``on`` or ``off``."""
    state.spin = _choice("spin", raw, SPINS)


def _opt_timeout(state: _Parsed, raw: str | None) -> None:
    """fuse-overlayfs' ``timeout=`` sets how long the kernel caches entries and attributes."""
    seconds = _seconds("timeout", unescape(_need("timeout", raw)))
    for name in ("attr_timeout", "entry_timeout", "negative_timeout"):
        state.fuse[name] = seconds


def _opt_uidmapping(state: _Parsed, raw: str | None) -> None:
    state.uid_mappings = parse_mappings("uidmapping", _need("uidmapping", raw))


def _opt_gidmapping(state: _Parsed, raw: str | None) -> None:
    state.gid_mappings = parse_mappings("gidmapping", _need("gidmapping", raw))


def _opt_squash_to_root(state: _Parsed, raw: str | None) -> None:
    _no_value("squash_to_root", raw)
    state.squash_to_root = True


def _opt_squash_to_uid(state: _Parsed, raw: str | None) -> None:
    state.squash_to_uid = _id("squash_to_uid", _need("squash_to_uid", raw))


def _opt_squash_to_gid(state: _Parsed, raw: str | None) -> None:
    state.squash_to_gid = _id("squash_to_gid", _need("squash_to_gid", raw))


_UNION_OPTIONS: Final[Mapping[str, Callable[[_Parsed, str | None], None]]] = MappingProxyType({
    "lowerdir": _opt_lowerdir,
    "upperdir": _opt_upperdir,
    "workdir": _opt_workdir,
    "ro": _opt_ro,
    "rw": _opt_rw,
    "volatile": _opt_volatile,
    "writeback_cache": _opt_writeback_cache,
    "writeback": _opt_writeback,
    "readdirplus": _opt_readdirplus,
    "noacl": _opt_noacl,
    "cache_entries": _opt_cache_entries,
    "fsync": _opt_fsync,
    "threaded": _opt_threaded,
    "debug": _opt_debug,
    "whiteout": _opt_whiteout,
    "redirect_dir": _opt_redirect_dir,
    "index": _opt_index,
    "timeout": _opt_timeout,
    "frontend": _opt_frontend,
    "passthrough": _opt_passthrough,
    "dir_cache": _opt_dir_cache,
    "spin": _opt_spin,
    "uidmapping": _opt_uidmapping,
    "gidmapping": _opt_gidmapping,
    "squash_to_root": _opt_squash_to_root,
    "squash_to_uid": _opt_squash_to_uid,
    "squash_to_gid": _opt_squash_to_gid,
})
"""Options the union itself interprets."""


def parse_mappings(name: str, text: str) -> tuple[IdRange, ...]:
    """Parse ``CONTAINERID:HOSTID:SIZE[:CONTAINERID:HOSTID:SIZE…]`` (fuse-overlayfs' syntax).

    Raises :class:`OptionError` for a malformed list, a zero size, ids beyond 32 bits, or two ranges that
    overlap on either side (the mapping would not be one-to-one).
    """
    # empty fields are skipped as fuse-overlayfs does: containers/storage writes ``uidmapping=:0:100000:65536``
    fields = [field for field in text.split(":") if field]
    if not fields or len(fields) % 3 or not all(field.isdigit() for field in fields):
        raise OptionError(f"{name}={text}: expected CONTAINERID:HOSTID:SIZE[:CONTAINERID:HOSTID:SIZE…]")
    numbers = [int(field) for field in fields]
    mappings = tuple(IdRange(*numbers[i:i + 3]) for i in range(0, len(numbers), 3))
    for mapping in mappings:
        if mapping.size == 0:
            raise OptionError(f"{name}={text}: a range of size 0")
        if max(mapping.container_id, mapping.host_id) + mapping.size - 1 > MAX_ID:
            raise OptionError(f"{name}={text}: ids beyond {MAX_ID}")
    for starts in ([m.container_id for m in mappings], [m.host_id for m in mappings]):
        ranges = sorted((start, start + m.size) for start, m in zip(starts, mappings, strict=True))
        if any(end > start for (_, end), (start, _) in itertools.pairwise(ranges)):
            raise OptionError(f"{name}={text}: ranges overlap")
    return mappings


# -- values -------------------------------------------------------------------------------------------------

def _text(name: str, value: str) -> str:
    if not value:
        raise OptionError(f"option '{name}' needs a value ({name}=…)")
    return value


def _seconds(name: str, value: str) -> int | float:
    try:
        seconds = float(value)
    except ValueError:
        raise OptionError(f"{name}={value}: expected a number of seconds") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise OptionError(f"{name}={value}: expected a number of seconds")
    return int(seconds) if seconds.is_integer() else seconds


def _count(name: str, value: str, *, minimum: int = 1) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise OptionError(f"{name}={value}: expected an integer") from None
    if number < minimum:
        raise OptionError(f"{name}={value}: expected an integer >= {minimum}")
    return number


def _id(name: str, value: str) -> int:
    if not value.isdigit() or int(value) > MAX_ID:
        raise OptionError(f"{name}={value}: expected an id from 0 to {MAX_ID}")
    return int(value)


def _zero_one(name: str, raw: str | None) -> int:
    value = _need(name, raw)
    if value not in ("0", "1"):
        raise OptionError(f"{name}={value}: expected 0 or 1")
    return int(value)


# -- freezing -----------------------------------------------------------------------------------------------

def _freeze(state: _Parsed, cwd: str) -> MountConfig:
    if not state.positionals:
        raise OptionError("missing MOUNTPOINT")
    if len(state.positionals) > 2:
        raise OptionError(f"too many arguments: {' '.join(state.positionals)}")
    source = state.positionals[0] if len(state.positionals) == 2 else None
    mountpoint = state.positionals[-1]
    if not mountpoint:
        raise OptionError("MOUNTPOINT is empty")
    if not state.lowers:
        raise OptionError("missing -o lowerdir=DIR[:DIR…]")
    if (state.upper is None) != (state.work is None):
        raise OptionError("upperdir and workdir must be given together")

    def absolute(path: str) -> str:
        return os.path.normpath(os.path.join(cwd, path))

    return MountConfig(
        mountpoint=absolute(mountpoint),
        lowers=tuple(absolute(p) for p in state.lowers),
        upper=absolute(state.upper) if state.upper is not None else None,
        work=absolute(state.work) if state.work is not None else None,
        source=source,
        foreground=state.foreground,
        debug=state.debug,
        single_threaded=state.single_threaded,
        read_only=state.ro or state.upper is None,
        volatile=state.volatile,
        writeback_cache=state.writeback_cache,
        readdirplus=state.readdirplus,
        acl=state.acl,
        cache_entries=state.cache_entries,
        whiteout=state.whiteout,
        redirect_dir=state.redirect_dir,
        inode_index=state.index,
        frontend=state.frontend,
        passthrough=state.passthrough,
        dir_cache=state.dir_cache,
        spin=state.spin,
        uid_mappings=state.uid_mappings,
        gid_mappings=state.gid_mappings,
        squash_to_root=state.squash_to_root,
        squash_to_uid=state.squash_to_uid,
        squash_to_gid=state.squash_to_gid,
        fuse_options=tuple(state.fuse.items()),
        ignored=tuple(state.ignored),
    )


# -- help ---------------------------------------------------------------------------------------------------

def help_text(prog: str) -> str:
    """The ``-h`` text, generated from the tables above so it cannot drift from the parser."""
    def names(items: Sequence[str] | frozenset[str] | Mapping[str, object], suffix: str = "") -> str:
        return ", ".join(f"{name}{suffix}" for name in sorted(items))

    defaults = ",".join(_show(k, v) for k, v in FUSE_DEFAULTS.items())
    root_defaults = ",".join(_show(k, v) for k, v in ROOT_FUSE_DEFAULTS.items())
    return f"""\
usage: {prog} [SOURCE] MOUNTPOINT -o lowerdir=DIR[:DIR…][,upperdir=DIR,workdir=DIR][,OPTION…]
       [-o OPTIONS]… [-f] [-d] [-s] [-V|--version] [-h|--help]

Mount a union of directories on MOUNTPOINT (fuse-overlayfs command line).  Returns once the mount is
ready; the daemon then runs detached until `umount MOUNTPOINT` or SIGTERM.

  -f            stay in the foreground
  -d            debug log on stderr (implies -f)
  -s            single-threaded
  -V, --version print the version and exit
  -h, --help    print this help and exit

Union options (-o, comma-separated; '\\,' is a comma in a value, '\\:' a colon in a lowerdir name):
  lowerdir=A:B:C     read-only layers, A on top (required)
  upperdir=U         writable layer; needs workdir=W on the same filesystem (no upperdir: read-only)
  workdir=W          scratch dir for atomic copy-up, emptied at mount
  ro | rw            read-only (upperdir then acts as the top lower) | read-write
  volatile, fsync=0  skip fsync (fsync=1 undoes it)
  writeback_cache[=0|1], writeback=0|1   the kernel's writeback cache (libfuse 3 only)
  readdirplus=0|1|auto   attributes with directory listings: never, with every reply (default), as the
                     kernel decides (libfuse 3 only)
  noacl              POSIX ACLs not enforced (else enforced by the kernel wherever it checks permissions:
                     default_permissions, no uid/gid mapping, libfuse 3)
  cache_entries=N    bound of the daemon's lookup cache, in entries (default 1000000, at least 1000)
  whiteout=auto|kernel|oci   whiteout format written (auto: kernel's when the daemon may mknod)
  redirect_dir=on|follow|nofollow|off   as the kernel's: on (default) renames directories that have lower
                     copies (a redirect xattr records the move); follow and off read redirects but answer
                     such a rename with EXDEV; nofollow reads none (a lookup that needs one is EPERM)
  index=on|off       as the kernel's: on keeps the names of a lower hard link one file across copy-up (an
                     inode index in workdir/index); off (default) breaks the link at copy-up
  uidmapping=CONTAINERID:HOSTID:SIZE[:…], gidmapping=…   map owners between the layers and the mount
  squash_to_root, squash_to_uid=N, squash_to_gid=N       show every file as owned by root / N
  frontend=lowlevel|fusepy   who speaks to the kernel: the daemon itself on /dev/fuse, or libfuse's
                     high-level API (default: $UNIONFS_FRONTEND, else lowlevel)
  passthrough=on|all|off file data straight to the backing file (lowlevel frontend, root, kernel 6.9+);
                     all: lower files of a writable mount too
  dir_cache=on|off   directory listings cached by the kernel until they change (lowlevel frontend; default on)
  spin=auto|on|off   the lowlevel reader polls the device briefly after each request (auto: while a CPU is free)
  timeout=SECONDS    kernel cache time for entries and attributes (sets the three *_timeout options)
  threaded=0|1, debug

FUSE options passed to libfuse: {names(_FUSE_FLAGS)}, {names(_FUSE_VALUES, "=")}
  A flag can be switched off with NAME=0 (e.g. kernel_cache=0).
Mount flags: {names(_MOUNT_FLAGS)}
Defaults: {defaults},fsname=SOURCE (else {DEFAULT_FSNAME}); as root also {root_defaults}
Accepted and ignored: {names(IGNORED_FLAGS)}, {names(IGNORED_KEYS, "=…")}, x-…
Not supported: {names(UNSUPPORTED_KEYS, "=")}

Exit status: 0 mounted (or help/version), 1 the mount failed (bad directories, mountpoint, libfuse),
2 bad command line (unknown option, bad value, missing argument).
"""


def _show(name: str, value: FuseValue) -> str:
    return name if value is True else f"{name}={value}"
