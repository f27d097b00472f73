"""Variable expansion and word splitting as Containerfiles use them (docker's ``shell/lex.go`` rules).

``$NAME``, ``${NAME}``, ``${NAME:-default}``, ``${NAME:+alternative}``; the escape character (``\\`` or the
one a ``# escape=`` line sets) before ``$`` keeps it literal; inside single quotes nothing is expanded.  An
unset variable expands to ``""``.  :class:`Expander` records which variables an expansion read, so a step's
cache key can name exactly the build args it depends on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


class ExpandError(ValueError):
    """A malformed ``${…}`` (unterminated, bad name, unsupported modifier); ``str()`` is the reason."""


def _is_name_char(ch: str, first: bool) -> bool:
    return ch == "_" or ch.isalpha() or (not first and ch.isdigit())


@dataclass
class Expander:
    """Expands words against ``variables``; ``used`` collects every name looked up (set or not)."""

    variables: Mapping[str, str]
    escape: str = "\\"
    used: set[str] = field(default_factory=set)

    def _lookup(self, name: str) -> str | None:
        self.used.add(name)
        return self.variables.get(name)

    def words(self, text: str) -> list[str]:
        """Split ``text`` into words at unquoted whitespace, removing quotes and escapes and expanding
        variables (outside single quotes; an unquoted value is split at its whitespace, an empty one gives no
        word).  ``ExpandError`` for an unterminated quote."""
        words: list[str] = []
        cur: list[str] = []
        have = False
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if ch in " \t\n":
                if have:
                    words.append("".join(cur))
                    cur, have = [], False
                i += 1
                continue
            if ch == "$":  # unquoted: the value is split at whitespace, as a shell would
                value: list[str] = []
                i = self._dollar(text, i, value)
                joined = "".join(value)
                pieces = joined.split()
                if have and joined[:1].isspace():
                    words.append("".join(cur))
                    cur, have = [], False
                for k, piece in enumerate(pieces):
                    if k:
                        words.append("".join(cur))
                        cur = []
                    cur.append(piece)
                    have = True
                if have and pieces and joined[-1:].isspace():
                    words.append("".join(cur))
                    cur, have = [], False
                continue
            have = True
            if ch == "'":
                end = text.find("'", i + 1)
                if end < 0:
                    raise ExpandError("unterminated single quote")
                cur.append(text[i + 1:end])
                i = end + 1
            elif ch == '"':
                i = self._double(text, i + 1, cur)
            elif ch == self.escape and i + 1 < n:
                cur.append(text[i + 1])
                i += 2
            else:
                cur.append(ch)
                i += 1
        if have:
            words.append("".join(cur))
        return words

    def word(self, text: str) -> str:
        """Expand ``text`` as one word: variables replaced, escapes before ``$`` removed, quotes and
        whitespace kept (what docker does for COPY/ADD/WORKDIR/USER/… arguments of a JSON array)."""
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if ch == self.escape and i + 1 < n and text[i + 1] == "$":
                out.append("$")
                i += 2
            elif ch == "$":
                i = self._dollar(text, i, out)
            else:
                out.append(ch)
                i += 1
        return "".join(out)

    def _double(self, text: str, i: int, cur: list[str]) -> int:
        n = len(text)
        while i < n:
            ch = text[i]
            if ch == '"':
                return i + 1
            if ch == self.escape and i + 1 < n and text[i + 1] in ('"', "$", self.escape):
                cur.append(text[i + 1])
                i += 2
            elif ch == "$":
                i = self._dollar(text, i, cur)
            else:
                cur.append(ch)
                i += 1
        raise ExpandError("unterminated double quote")

    def _dollar(self, text: str, i: int, out: list[str]) -> int:
        """Expand the variable reference at ``text[i] == '$'``; returns the index after it."""
        n = len(text)
        if i + 1 < n and text[i + 1] == "{":
            end = text.find("}", i + 2)
            if end < 0:
                raise ExpandError(f"missing '}}' in {text[i:]!r}")
            body = text[i + 2:end]
            name_end = 0
            while name_end < len(body) and _is_name_char(body[name_end], name_end == 0):
                name_end += 1
            name, rest = body[:name_end], body[name_end:]
            if not name:
                raise ExpandError(f"bad substitution {text[i:end + 1]!r}")
            value = self._lookup(name)
            if rest == "":
                out.append(value or "")
            elif rest.startswith(":-"):
                out.append(value if value else self.word(rest[2:]))
            elif rest.startswith(":+"):
                out.append(self.word(rest[2:]) if value else "")
            else:
                raise ExpandError(f"unsupported modifier in {text[i:end + 1]!r}")
            return end + 1
        j = i + 1
        while j < n and _is_name_char(text[j], j == i + 1):
            j += 1
        if j == i + 1:
            out.append("$")
            return j
        out.append(self._lookup(text[i + 1:j]) or "")
        return j
