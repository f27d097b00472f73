"""The one grammar of ``-o`` option lists and ``lowerdir=`` values (the fuse-overlayfs command line).

Inside an ``-o`` list a backslash escapes the next character: ``\\,`` is a comma inside a value, and in
``lowerdir=`` ``\\:`` is a colon inside one directory name; commas inside double quotes do not split (an
SELinux ``context="…:c1,c2"``, as the kernel reads it).  :func:`split_options` splits a list and keeps every
other escape for the value's own reader: :func:`split_lowerdir` for ``lowerdir``, :func:`unescape` for a
single path.  :func:`escape_path` writes a path so that those read it back unchanged.

Callers: the option parser of the mount program (:mod:`mountd.options`), the in-use checks that read other
daemons' command lines (:mod:`unionfs.image.inuse`), the command lines that build an option list.
"""

from __future__ import annotations


def split_options(text: str) -> list[str]:
    """Split one ``-o`` argument at commas, except escaped ones (``\\,``, which become plain commas) and those
    inside double quotes; other escapes stay for later; empty items are dropped."""
    return [part for part in _split_unescaped(text, ",") if part]


def option_values(text: str) -> dict[str, str]:
    """``a=1,b,c=x\\,y`` -> ``{"a": "1", "b": "", "c": "x,y"}`` (a later value of a name wins); values keep
    their other escapes, as :func:`split_options` leaves them."""
    out: dict[str, str] = {}
    for item in split_options(text):
        name, _, value = item.partition("=")
        out[name] = value
    return out


def split_lowerdir(value: str) -> list[str]:
    """``A:B\\:C`` -> ``["A", "B:C"]``: the directories of a ``lowerdir=`` value, top-down, unescaped.  An
    empty name (``A::B``) is kept as ``""`` for the caller to refuse."""
    return [unescape(part) for part in _split_unescaped(value, ":")]


def unescape(text: str) -> str:
    """Drop each escaping backslash: ``a\\:b`` -> ``a:b``, ``a\\\\b`` -> ``a\\b``."""
    out: list[str] = []
    chars = iter(text)
    for char in chars:
        out.append(next(chars, "") if char == "\\" else char)
    return "".join(out)


def escape_path(path: str) -> str:
    """The inverse of the grammar for one directory name: escape backslashes, colons, commas and quotes."""
    return "".join("\\" + char if char in '\\:,"' else char for char in path)


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    chars = iter(text)
    for char in chars:
        if char == "\\":
            following = next(chars, "")
            current.append(following if following == sep == "," else char + following)
        elif char == '"' and sep == ",":
            quoted = not quoted
            current.append(char)
        elif char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts
