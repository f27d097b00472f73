"""``unionfs inspect IMAGE --ci``: dive's CI rules on an image (see :mod:`unionfs.image.ci`).

Prints one line per rule (``PASS``/``FAIL``/``SKIP``) and dive's ``Result:`` line; exit status 1 when a rule
fails (or the rules cannot be read), else 0.  ``--json`` gives the metrics and the outcomes.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from unionfs.image import changes as changes_mod
from unionfs.image import ci
from unionfs.image.records import Image
from unionfs.image.store import Store, StoreError

_FLAGS = (("lowest_efficiency", "lowestEfficiency"), ("highest_wasted_bytes", "highestWastedBytes"),
          ("highest_user_wasted_percent", "highestUserWastedPercent"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--ci`` options of ``inspect``."""
    p.add_argument("--ci", action="store_true", help="check the image against CI rules (dive's) and exit 1 when "
                   "one fails")
    p.add_argument("--rules", metavar="FILE", help="a .dive-ci rules file (default: .dive-ci in the current "
                   "directory, if there is one)")
    p.add_argument("--metric", choices=("reclaimable", "dive"), default="reclaimable",
                   help="how waste is measured: bytes a squash would save (default), or dive's arithmetic")
    for dest, rule in _FLAGS:
        p.add_argument("--" + dest.replace("_", "-"), dest=dest, metavar="VALUE", help=f"the {rule} rule")


def _rules(args: argparse.Namespace) -> dict[str, str]:
    rules: dict[str, str] = {}
    path = args.rules or (".dive-ci" if os.path.isfile(".dive-ci") else None)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                rules = ci.read_rules(f.read(), path)
        except OSError as exc:
            raise ci.RuleError(f"cannot read {path}: {exc.strerror}") from None
    for dest, rule in _FLAGS:
        value = getattr(args, dest)
        if value is not None:
            rules[rule] = value
    return rules


def run(args: argparse.Namespace, store: Store, image: Image) -> int:
    """Evaluate and print; the exit status."""
    try:
        rules = _rules(args)
        if args.metric == "dive":
            metrics = ci.dive_metrics(store, image)
        else:
            report = changes_mod.inspect_image(store, image)
            metrics = ci.reclaimable_metrics(store, image, efficiency=report.efficiency,
                                             wasted=report.wasted_bytes)
        outcomes = ci.evaluate(metrics, rules)
    except ci.RuleError as exc:
        raise StoreError(str(exc)) from None
    failed = any(o.status == "FAIL" for o in outcomes)
    if args.json:
        data: dict[str, Any] = {"image": image.name, "metric": metrics.metric, "efficiency": metrics.efficiency,
                                "wasted_bytes": metrics.wasted_bytes,
                                "user_wasted_percent": metrics.user_wasted_percent,
                                "rules": [{"rule": o.rule, "status": o.status, "detail": o.detail}
                                          for o in outcomes], "passed": not failed}
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(f"  efficiency: {metrics.efficiency * 100:.4f} %")
        print(f"  wastedBytes: {metrics.wasted_bytes} bytes")
        print(f"  userWastedPercent: {metrics.user_wasted_percent * 100:.4f} %  (metric: {metrics.metric})")
        for o in outcomes:
            print(f"  {o.status}: {o.rule}" + (f": {o.detail}" if o.detail else ""))
        print(ci.summary(outcomes))
    return 1 if failed else 0
