"""CI rules on an image: ``unionfs inspect IMAGE --ci [--rules FILE]``, with dive's rule names.

Rules (dive's names; the kebab-case spellings of its newer config are accepted too):

* ``lowestEfficiency`` (default 0.9): fail when the efficiency is below it;
* ``highestWastedBytes`` (default disabled): fail when more bytes are wasted (``20MB``, ``1.5GiB``, ``1000``);
* ``highestUserWastedPercent`` (default 0.1): fail when wasted bytes are more than this share of the bytes of
  every layer after the first (the "user" layers: the base image's own waste is not the Containerfile's
  fault, but it counts in the numerator, as in dive).

A value ``disabled`` (or ``off``) skips a rule.  The rules file is dive's ``.dive-ci``: ``key: value`` lines
under ``rules:`` (only that flat shape is read, ``#`` comments allowed).

**Two measures of waste.**  ``reclaimable`` (the default, what ``unionfs inspect`` reports): the data bytes
of lower layers that the image never shows because a higher layer overwrote or deleted them (each hard-link
group once) — exactly what squashing the image would save; a file of *a* bytes overwritten by one of *b*
bytes wastes *a*.  ``dive`` (``--metric dive``): dive's own arithmetic — for every path found in two or more
layers, the sizes of *all* its copies (the kept copy too) plus the size a whiteout removes; efficiency is
Σ smallest copy / Σ all copies over all paths.  The same overwrite wastes *a + b* there (reported as double
counting in wagoodman/dive#684), and a file added and deleted wastes twice its size.  dive's numbers are
therefore larger, and a ``.dive-ci`` threshold applied to ``reclaimable`` figures lets more waste pass: pick
the metric the thresholds were written for.  We default to ``reclaimable`` because it is a number a user can
act on (bytes a squash or a better Containerfile would save), not a count that grows with the copy kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from unionfs.fs.fsio import HostDir
from unionfs.image.digest import scan
from unionfs.image.records import Image
from unionfs.image.store import Store, StoreError, short

RULES = ("lowestEfficiency", "highestWastedBytes", "highestUserWastedPercent")
DEFAULTS: dict[str, str] = {"lowestEfficiency": "0.9", "highestWastedBytes": "disabled",
                            "highestUserWastedPercent": "0.1"}
_KEBAB = {"lowest-efficiency": "lowestEfficiency", "highest-wasted-bytes": "highestWastedBytes",
          "highest-user-wasted-percent": "highestUserWastedPercent"}
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4, "k": 1000, "m": 1000**2, "g": 1000**3}
_BYTES_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*")


class RuleError(ValueError):
    """A rules file or a rule value that cannot be read; ``str()`` is one line for the user."""


def parse_bytes(text: str) -> int:
    """``20MB`` → 20000000, ``1.5GiB`` → 1610612736 (dive's units: decimal MB, binary MiB)."""
    m = _BYTES_RE.fullmatch(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise RuleError(f"{text!r} is not a byte count (like 20MB or 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def read_rules(text: str, source: str) -> dict[str, str]:
    """The ``rules:`` of a ``.dive-ci`` file (RuleError for an unknown rule or a line it cannot read)."""
    out: dict[str, str] = {}
    in_rules = False
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        key, sep, value = line.strip().partition(":")
        if not sep:
            raise RuleError(f"{source}:{no}: expected 'key: value'")
        if not raw.startswith((" ", "\t")):
            in_rules = key == "rules"
            continue
        if not in_rules:
            continue
        name = _KEBAB.get(key, key)
        if name not in RULES:
            raise RuleError(f"{source}:{no}: unknown rule {key!r} (known: {', '.join(RULES)})")
        out[name] = value.strip().strip("'\"")
    return out


@dataclass(frozen=True)
class Metrics:
    """An image's efficiency (0..1), wasted bytes, and wasted share of the user layers (0..1)."""

    metric: str
    efficiency: float
    wasted_bytes: int
    user_wasted_percent: float


@dataclass(frozen=True)
class Outcome:
    rule: str
    status: str  # PASS, FAIL, SKIP
    detail: str = ""


def _user_bytes(store: Store, image: Image) -> int:
    return sum(store.layer(d).size for d in image.layers[1:])


def reclaimable_metrics(store: Store, image: Image, *, efficiency: float, wasted: int) -> Metrics:
    """Our measure (from ``inspect``'s report)."""
    user = _user_bytes(store, image)
    return Metrics("reclaimable", efficiency, wasted, wasted / user if user else 0.0)


def dive_metrics(store: Store, image: Image) -> Metrics:
    """dive's measure (see the module doc), from the layers' trees."""
    view: dict[str, int] = {}  # what the layers so far show: path -> size (files and links)
    cumulative: dict[str, int] = {}
    smallest: dict[str, int] = {}
    count: dict[str, int] = {}
    for digest in image.layers:
        if not store.has_layer(digest):
            raise StoreError(f"image {image.name!r}: layer {short(digest)} is missing")
        host = HostDir(store.layer_path(digest))
        try:
            entries = scan(host, content=False).entries
        finally:
            host.close()
        for e in entries:
            if e.kind == "dir":  # a node of size 0, as in dive's trees (a whiteout of it then counts twice)
                if not e.path:
                    continue
                if e.opaque:
                    prefix = e.path + "/"
                    for path in [p for p in view if p.startswith(prefix)]:
                        del view[path]
                size = 0
            elif e.kind == "whiteout":
                prefix = e.path + "/"
                size = view.pop(e.path, 0)
                for path in [p for p in view if p.startswith(prefix)]:
                    size += view.pop(path)
            else:
                size = e.size if e.kind in ("file", "link") else 0
                view[e.path] = size
            cumulative[e.path] = cumulative.get(e.path, 0) + size
            smallest[e.path] = min(smallest.get(e.path, size), size)
            count[e.path] = count.get(e.path, 0) + 1
    total = sum(cumulative.values())
    efficiency = sum(smallest.values()) / total if total else 1.0
    wasted = sum(size for path, size in cumulative.items() if count[path] > 1)
    user = _user_bytes(store, image)
    return Metrics("dive", efficiency, wasted, wasted / user if user else 0.0)


def evaluate(metrics: Metrics, rules: dict[str, str]) -> list[Outcome]:
    """Each rule (defaults where ``rules`` does not say) against ``metrics``."""
    out = []
    for rule in RULES:
        value = rules.get(rule, DEFAULTS[rule])
        if value.lower() in ("disabled", "off", ""):
            out.append(Outcome(rule, "SKIP", "rule disabled"))
            continue
        try:
            if rule == "highestWastedBytes":
                limit = parse_bytes(value)
                bad = metrics.wasted_bytes > limit
                detail = f"too many bytes wasted (wasted: {metrics.wasted_bytes} > threshold: {limit})"
            else:
                threshold = float(value)
                if rule == "lowestEfficiency":
                    bad = metrics.efficiency < threshold
                    detail = f"image efficiency is too low (efficiency: {metrics.efficiency:.4f} < " \
                             f"threshold: {threshold})"
                else:
                    bad = metrics.user_wasted_percent > threshold
                    detail = f"too many bytes wasted, relative to the user bytes added (%-user-wasted-bytes: " \
                             f"{metrics.user_wasted_percent:.4f} > threshold: {threshold})"
        except ValueError as exc:
            raise RuleError(f"{rule}: {exc}") from None
        out.append(Outcome(rule, "FAIL" if bad else "PASS", detail if bad else ""))
    return out


def summary(outcomes: Sequence[Outcome]) -> str:
    """dive's last line: ``Result:PASS [Total:3] [Passed:2] [Failed:0] [Warn:0] [Skipped:1]``."""
    passed = sum(o.status == "PASS" for o in outcomes)
    failed = sum(o.status == "FAIL" for o in outcomes)
    skipped = sum(o.status == "SKIP" for o in outcomes)
    return f"Result:{'FAIL' if failed else 'PASS'} [Total:{len(outcomes)}] [Passed:{passed}] [Failed:{failed}] " \
           f"[Warn:0] [Skipped:{skipped}]"
