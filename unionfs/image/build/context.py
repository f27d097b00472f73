"""The build context: the directory COPY and ADD read from.

* ``.containerignore`` (else ``.dockerignore``) at its root excludes paths: one pattern a line, ``#``
  comments, ``*``/``?``/``[…]`` within one path component, ``**`` for any number of components, a leading
  ``!`` re-includes; the last matching pattern wins; a pattern that matches a directory matches everything
  under it (docker's rules).  The ignore file itself and the Containerfile are still read.
* A source is resolved inside the context: ``/`` and ``..`` may not leave it, globs are matched per
  component, and a symlink on the way (or the source itself) is followed only while it stays inside the
  context — one that points outside (an absolute target, or ``..`` past the root) is refused: a context must
  not let a build read the host.  Inside a copied directory symlinks are copied as symlinks, never followed.
* :meth:`Context.digest` is what a COPY/ADD depends on: for each file under its sources, the path, type,
  permission bits, size, content (xxh3-128) and symlink target — not mtimes or the context's owners (COPY
  gives files to root or ``--chown``), so a touched file or a fresh checkout still hits the cache.

All access goes through :class:`unionfs.fs.fsio.HostDir`: nothing under the context is followed by accident.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import posixpath
import re
import stat as stat_mod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import xxhash

from unionfs.fs.fsio import HostDir, join
from unionfs.image.digest import hash_file

IGNORE_FILES = (".containerignore", ".dockerignore")
_GLOB_CHARS = re.compile(r"[*?\[]")
_MAX_LINKS = 40


class ContextError(ValueError):
    """A source that cannot be used; ``str()`` is one line for the user."""


# -- ignore patterns -------------------------------------------------------------------------------------------

def _pattern_re(pattern: str) -> re.Pattern[str]:
    """A regex for one ignore pattern (already cleaned, no leading ``!``)."""
    out = []
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:.*/)?")
            continue
        out.append(fnmatch.translate(part).removeprefix("(?s:").removesuffix(")\\Z").replace(".*", "[^/]*"))
        if not last:
            out.append("/")
    return re.compile("".join(out) + "(?:/.*)?", re.DOTALL)


@dataclass(frozen=True)
class Ignore:
    """Compiled ignore patterns: (regex, excluded) in file order."""

    rules: tuple[tuple[re.Pattern[str], bool], ...] = ()
    source: str = ""

    @classmethod
    def parse(cls, text: str, source: str = "") -> Ignore:
        rules = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            line = line[1:].strip() if include else line
            line = posixpath.normpath(line.lstrip("/")) if line.lstrip("/") else "."
            if line == ".":
                continue
            rules.append((_pattern_re(line), not include))
        return cls(tuple(rules), source)

    @property
    def has_exceptions(self) -> bool:
        return any(not excluded for _r, excluded in self.rules)

    def ignored(self, rel: str) -> bool:
        """Is ``rel`` (relative to the context root) excluded?"""
        if rel in IGNORE_FILES:
            return False
        result = False
        for regex, excluded in self.rules:
            if regex.fullmatch(rel):
                result = excluded
        return result


# -- the context -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A resolved source: ``rel`` its path in the context (``""`` for the root), ``name`` the name it is
    copied under (the last component as written, for a followed symlink too), ``is_dir``."""

    rel: str
    name: str
    is_dir: bool


class Context:
    """The context directory ``path`` (resolved once; it may itself be reached through a symlink)."""

    def __init__(self, path: str) -> None:
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            raise ContextError(f"build context {path}: not a directory")
        self.path = real
        self.host = HostDir(real)
        self.ignore = self._load_ignore()

    def close(self) -> None:
        self.host.close()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load_ignore(self) -> Ignore:
        for name in IGNORE_FILES:
            st = self.host.try_lstat(name)
            if st is not None and stat_mod.S_ISREG(st.st_mode):
                return Ignore.parse(self.read_text(name), name)
        return Ignore()

    def read_text(self, rel: str) -> str:
        """A regular file of the context as text (never through a symlink)."""
        return self.host.read_bytes(rel).decode(errors="surrogateescape")

    # -- sources ---------------------------------------------------------------------------------------------
    def resolve(self, source: str) -> list[Source]:
        """The context paths ``source`` names (a glob may name several, sorted); ContextError when it names
        nothing, leaves the context, or goes through a symlink that points outside it."""
        clean = posixpath.normpath("/" + source).lstrip("/")
        lexical = posixpath.normpath(source)
        if lexical == ".." or lexical.startswith("../"):
            raise ContextError(f"{source}: outside the build context")
        found = [self._follow(rel, source) for rel in self._glob(clean)] if clean else [""]
        out = []
        for rel in found:
            if rel and self.ignore.ignored(rel):
                continue
            st = self.host.lstat(rel)
            name = posixpath.basename(clean) if not _GLOB_CHARS.search(clean) else posixpath.basename(rel)
            out.append(Source(rel, name, stat_mod.S_ISDIR(st.st_mode)))
        if not out:
            excluded = f" (or excluded by {self.ignore.source})" if self.ignore.source else ""
            raise ContextError(f"{source}: no such file or directory in the build context {self.path}{excluded}")
        return out

    def _glob(self, clean: str) -> list[str]:
        """Paths matching ``clean`` component by component (symlinked dirs on the way are followed inside the
        context); missing plain names give nothing."""
        current = [""]
        for part in clean.split("/"):
            following = []
            for base in current:
                base = self._follow(base, clean) if base else base
                if _GLOB_CHARS.search(part):
                    st = self.host.try_lstat(base)
                    if st is None or not stat_mod.S_ISDIR(st.st_mode):
                        continue
                    names = sorted(n for n, _k, _i in self.host.scandir(base))
                    following += [join(base, n) for n in names if fnmatch.fnmatchcase(n, part)]
                elif self.host.try_lstat(join(base, part)) is not None:
                    following.append(join(base, part))
            current = following
        return [p for p in current if self._exists(p, clean)]

    def _exists(self, rel: str, shown: str) -> bool:
        try:
            self._follow(rel, shown)
        except FileNotFoundError:
            return False
        return True

    def _follow(self, rel: str, shown: str) -> str:
        """``rel`` with every symlink in it resolved inside the context (FileNotFoundError when a part is
        missing; ContextError when a link points outside the context or links loop)."""
        parts = rel.split("/") if rel else []
        done: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            path = join("/".join(done), part)
            st = self.host.try_lstat(path)
            if st is None:
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            if not stat_mod.S_ISLNK(st.st_mode):
                done.append(part)
                continue
            hops += 1
            target = self.host.readlink(path)
            if hops > _MAX_LINKS:
                raise ContextError(f"{shown}: too many levels of symbolic links in the build context")
            joined = posixpath.normpath(posixpath.join("/".join(done), target)) if not target.startswith("/") \
                else None
            if joined is None or joined == ".." or joined.startswith("../"):
                raise ContextError(f"{shown}: {path} is a symlink pointing outside the build context "
                                   f"({target}); refusing to read it")
            parts = ([] if joined == "." else joined.split("/")) + parts
            done = []
        return "/".join(done)

    # -- walking -----------------------------------------------------------------------------------------------
    def walk(self, src: Source) -> Iterator[tuple[str, os.stat_result]]:
        """``(path relative to the source, lstat)`` of the source and, for a directory, everything under it
        that is not ignored, parents before children, names sorted bytewise; never follows a symlink."""
        yield "", self.host.lstat(src.rel)
        if not src.is_dir:
            return
        stack = [""]
        while stack:
            sub = stack.pop()
            entries = []
            for name, _k, _i in self.host.scandir(join(src.rel, sub) if sub else src.rel):
                rel = join(sub, name)
                full = join(src.rel, rel) if src.rel else rel
                st = self.host.lstat(full)
                if self.ignore.ignored(full) and not (stat_mod.S_ISDIR(st.st_mode) and self.ignore.has_exceptions):
                    continue
                entries.append((os.fsencode(name), rel, st))
            entries.sort()
            for _n, rel, st in entries:
                yield rel, st
            stack += [rel for _n, rel, st in reversed(entries) if stat_mod.S_ISDIR(st.st_mode)]

    def digest(self, sources: Sequence[str]) -> str:
        """The content digest of what ``sources`` name (see the module doc); ContextError as :meth:`resolve`."""
        h = xxhash.xxh3_128()
        buf = bytearray(1 << 20)
        for source in sources:
            for src in self.resolve(source):
                h.update(f"S\0{src.rel}\0{src.name}\0".encode(errors="surrogateescape"))
                for rel, st in self.walk(src):
                    full = join(src.rel, rel) if rel else src.rel
                    mode = st.st_mode
                    h.update(f"E\0{rel}\0{stat_mod.S_IFMT(mode)}\0{stat_mod.S_IMODE(mode)}\0".encode(
                        errors="surrogateescape"))
                    if stat_mod.S_ISREG(mode):
                        fd = self.host.open(full, os.O_RDONLY)
                        try:
                            content, _seen = hash_file(fd, st.st_size, buf=buf)
                        finally:
                            os.close(fd)
                        h.update(f"{st.st_size}\0{content}\0".encode())
                    elif stat_mod.S_ISLNK(mode):
                        h.update(os.fsencode(self.host.readlink(full)) + b"\0")
                    elif stat_mod.S_ISCHR(mode) or stat_mod.S_ISBLK(mode):
                        h.update(f"{st.st_rdev}\0".encode())
        return h.hexdigest()
