"""Turn one result file into a Markdown table and PNG plots.

``python -m benchmarks.report benchmarks/out/FILE.json [--update benchmarks/RESULTS.md] [--subject unionfs]``

Prints the table (every figure of every system, and the ratios subject / fuse-overlayfs and subject / kernel),
writes ``plots/ratios.png`` (how the subject compares with each baseline, per figure) and
``plots/layer_depth.png`` (cold lookup cost and mount time against the number of layers). With ``--update``
the "Latest run" section of RESULTS.md (between its markers) is replaced by the same text.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SYSTEM_ORDER = ("native", "kernel", "fuse-overlayfs", "unionfs")
COLORS = {"native": "#7f7f7f", "kernel": "#1f77b4", "fuse-overlayfs": "#ff7f0e", "unionfs": "#2ca02c"}
BEGIN, END = "<!-- latest-run:begin -->", "<!-- latest-run:end -->"
NOISY = 0.25  # (max - min) / median above which a median is flagged
TARGET_VS_FUSE = 1.5  # issue 4: every workload at least 1.5x faster than fuse-overlayfs
TARGET_VS_KERNEL = 0.9  # issue 4: warm workloads at least 0.9x the kernel's overlayfs
TARGET_DEPTH = 1.2  # issue 4: cold lookups at 500 layers at most 1.2x the cost at 1 layer


def fmt(v: float) -> str:
    """Three significant figures, without exponents."""
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.001:
        return f"{v:.3f}"
    return f"{v:.2g}"


def median_of(entry: dict[str, Any], system: str) -> float | None:
    res = entry["systems"].get(system)
    if not res or "median" not in res:
        return None
    return float(res["median"])


def speedup(entry: dict[str, Any], subject: str, baseline: str) -> float | None:
    """How many times better the subject is than the baseline (> 1: subject better), whatever the unit."""
    s, b = median_of(entry, subject), median_of(entry, baseline)
    if s is None or b is None or s <= 0 or b <= 0:
        return None
    return b / s if entry["better"] == "lower" else s / b


def _cell(entry: dict[str, Any], system: str) -> str:
    res = entry["systems"].get(system)
    if res is None:
        return "—"
    if "error" in res and "median" not in res:
        return "error"
    runs = [float(x) for x in res["runs"]]
    text = fmt(float(res["median"]))
    med = float(res["median"])
    if len(runs) > 1 and med and (max(runs) - min(runs)) / med > NOISY:
        text += " †"
    if len(runs) < int(entry.get("runs_planned", len(runs))):
        text += f" ‡{len(runs)}"
    return text


def _target(name: str, entry: dict[str, Any], baseline: str, ratio: float) -> str:
    """✓/✗ against issue 4's targets, where one applies to this figure."""
    if name.startswith(("daemon_", "mount_time")):
        return ""
    if baseline == "fuse-overlayfs":
        return " ✓" if ratio >= TARGET_VS_FUSE else " ✗"
    if baseline == "kernel" and entry["temperature"] == "warm":
        return " ✓" if ratio >= TARGET_VS_KERNEL else " ✗"
    return ""


def _ratio_cell(name: str, entry: dict[str, Any], subject: str, baseline: str) -> str:
    s, b = median_of(entry, subject), median_of(entry, baseline)
    if s is None or b is None or b == 0:
        return "—"
    gain = speedup(entry, subject, baseline)
    mark = _target(name, entry, baseline, gain) if gain is not None else ""
    return f"{s / b:.2f}{mark}"


def _systems(doc: dict[str, Any]) -> list[str]:
    names = list(doc["systems"])
    return sorted(names, key=lambda n: SYSTEM_ORDER.index(n) if n in SYSTEM_ORDER else len(SYSTEM_ORDER))


def header(doc: dict[str, Any]) -> str:
    """Command, date, machine, commit and the systems (with versions, or why one did not run)."""
    h, c, o = doc["host"], doc["commit"], doc["options"]
    argv = o.get("argv") or []
    lines = [
        f"- **Command:** `python -m benchmarks.run {shlex.join(argv)}`"
        + (f" (unionfs command overridden: `{o['unionfs_override']}`)" if o.get("unionfs_override") else "")
        + (f" (unionfs extra options: `{o['unionfs_opts']}`)" if o.get("unionfs_opts") else ""),
        f"- **Date:** {doc['date']}" + (f", {doc['duration_s']:.0f} s" if "duration_s" in doc else "")
        + (" — **interrupted**" if doc.get("interrupted") else ""),
        f"- **Machine:** {h['os']}, kernel {h['kernel']}, {h['cpus']}× {h['cpu']}, {h['mem_gib']} GiB RAM; "
        f"scratch {h['scratch']}; load average {h['loadavg_start'][0]:.2f} at start"
        + (f", {h['loadavg_end'][0]:.2f} at end" if "loadavg_end" in h else "")
        + ("; the VM's balloon reports free pages to the host (fresh page cache is slow: see README)"
           if h.get("free_page_reporting") else ""),
        f"- **Commit:** `{c['hash'][:12]}` on {c['branch']}" + (" (with local changes)" if c["dirty"] else ""),
        f"- **Mode:** {o['mode']}, median of {o['sizes']['runs']} runs (memory figures: one run)"
        + (", memory recycled before timed writes and cold reads" if o.get("recycle_memory") else ""),
    ]
    sysparts = []
    for name in _systems(doc):
        info = doc["systems"][name]
        if info["available"]:
            sysparts.append(f"{name} ({info['version']})" if info.get("version") else name)
        else:
            last = [ln for ln in info["reason"].splitlines() if ln.strip()][-1:] or ["?"]
            sysparts.append(f"{name} (**not run**: {last[0].strip()[:200]})")
    lines.append("- **Systems:** " + "; ".join(sysparts))
    return "\n".join(lines)


def table(doc: dict[str, Any], subject: str = "unionfs",
          baselines: Sequence[str] = ("fuse-overlayfs", "kernel")) -> str:
    """The main table: one row per figure, one column per system, then subject/baseline ratios."""
    systems = _systems(doc)
    baselines = [b for b in baselines if b != subject]
    cols = ["figure", "unit", "better", "temp", *systems, *(f"{subject} / {b}" for b in baselines)]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(cols) - 4)) + "|"]
    for name, entry in doc["results"].items():
        arrow = "lower ↓" if entry["better"] == "lower" else "higher ↑"
        row = [f"`{name}`", entry["unit"], arrow, entry["temperature"]]
        row += [_cell(entry, s) for s in systems]
        row += [_ratio_cell(name, entry, subject, b) for b in baselines]
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def legend(subject: str) -> str:
    return " ".join([
        f"Ratios are {subject}'s figure divided by the baseline's, in the figure's unit: for a time",
        "(better = lower ↓) a ratio **below 1** means faster, for a throughput (better = higher ↑) a ratio",
        f"**above 1** does. ✓/✗: issue 4's targets ({TARGET_VS_FUSE}× better than fuse-overlayfs on every",
        f"workload; at least {TARGET_VS_KERNEL}× the kernel on warm workloads). † marks a median whose runs",
        f"spread by more than {NOISY:.0%}; ‡N: only N runs (the time budget per figure ran out).",
        "temp: cold = caches dropped after a fresh mount; fresh = fresh mount, layers warm in the host",
        "cache; warm = repeated in the same mount. Native: the bottom layer read directly, or a plain copy",
        "of it for workloads that write (copy_up: a plain file copy).",
    ])


def depth_table(doc: dict[str, Any], subject: str = "unionfs") -> str:
    """Cold lookup cost per stack size, per system, and the deepest/shallowest ratio (issue 4: ≤ 1.2)."""
    series: dict[float, dict[str, Any]] = {}
    mounts: dict[float, dict[str, Any]] = {}
    for entry in doc["results"].values():
        if entry.get("series") == "depth_stat_cold":
            series[float(entry["x"])] = entry
        elif entry.get("series") == "mount_time":
            mounts[float(entry["x"])] = entry
    if not series:
        return ""
    xs = sorted(series)
    systems = _systems(doc)
    cols = ["system", *(f"stat @{x:g}" for x in xs), f"@{xs[-1]:g} / @{xs[0]:g}",
            *(f"mount @{x:g}" for x in xs if x in mounts)]
    out = ["| " + " | ".join(cols) + " |", "|---|" + "|".join(["---:"] * (len(cols) - 1)) + "|"]
    for s in systems:
        vals = [median_of(series[x], s) for x in xs]
        if all(v is None for v in vals):
            continue
        first, last = vals[0], vals[-1]
        growth = "—"
        if first and last:
            growth = f"{last / first:.2f}"
            if s == subject:
                growth += " ✓" if last / first <= TARGET_DEPTH else " ✗"
        mts = [median_of(mounts[x], s) for x in xs if x in mounts]
        out.append("| " + " | ".join([s, *(fmt(v) if v is not None else "—" for v in vals), growth,
                                      *(fmt(v) if v is not None else "—" for v in mts)]) + " |")
    return "\n".join(out)


def render(doc: dict[str, Any], subject: str = "unionfs", plots: Sequence[Path] = (),
           relative_to: Path | None = None) -> str:
    """The whole Markdown section: header, main table, legend, layer-depth table, plot links."""
    parts = [header(doc), "", table(doc, subject), "", legend(subject)]
    depth = depth_table(doc, subject)
    if depth:
        parts += ["", f"Layer depth (seconds; the last columns are mount times; target for {subject}: "
                      f"@500 / @1 ≤ {TARGET_DEPTH}):", "", depth]
    if doc.get("errors"):
        parts += ["", "Workloads that could not run: "
                  + "; ".join(f"`{k}`: {v}" for k, v in doc["errors"].items())]
    errors = [f"`{n}` on {s}: {r['error'][:160]}" for n, e in doc["results"].items()
              for s, r in e["systems"].items() if "error" in r]
    if errors:
        parts += ["", "Errors: " + "; ".join(errors)]
    for p in plots:
        rel = os.path.relpath(p, relative_to) if relative_to else str(p)
        parts += ["", f"![{p.stem}]({rel})"]
    return "\n".join(parts)


def plot(doc: dict[str, Any], out_dir: Path, subject: str = "unionfs",
         baselines: Sequence[str] = ("fuse-overlayfs", "kernel")) -> list[Path]:
    """Write the ratio bar chart and the layer-depth curves; returns the files written (none without data)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    baselines = [b for b in baselines if b != subject]

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    date = doc["date"][:10]

    names = [n for n, e in doc["results"].items() if any(speedup(e, subject, b) for b in baselines)]
    if names:
        fig, ax = plt.subplots(figsize=(9, 0.42 * len(names) + 1.6))
        height = 0.8 / len(baselines)
        for i, b in enumerate(baselines):
            vals = [speedup(doc["results"][n], subject, b) or 0.0 for n in names]
            ys = [k + i * height for k in range(len(names))]
            ax.barh(ys, vals, height=height, label=f"vs {b}", color=COLORS.get(b))
        ax.set_yticks([k + height * (len(baselines) - 1) / 2 for k in range(len(names))], names)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.axvline(TARGET_VS_FUSE, color="grey", linestyle="--", linewidth=0.8, label=f"{TARGET_VS_FUSE}× target")
        ax.set_xlabel(f"how many times better {subject} is (> 1: {subject} faster / higher throughput; log)")
        ax.set_title(f"{subject} relative to each baseline ({doc['options']['mode']} run, {date})")
        ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        path = out_dir / "ratios.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    curves = {s: [e for e in doc["results"].values() if e.get("series") == s]
              for s in ("depth_stat_cold", "mount_time")}
    if curves["depth_stat_cold"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        titles = {"depth_stat_cold": "cold stat of the bottom layer's paths", "mount_time": "mount time"}
        for ax, (series, entries) in zip(axes, curves.items(), strict=True):
            entries = sorted(entries, key=lambda e: e["x"])
            for s in _systems(doc):
                pts = [(e["x"], median_of(e, s)) for e in entries]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=s, color=COLORS.get(s))
            ax.set_xscale("log")
            if series == "depth_stat_cold":
                ax.set_yscale("log")
            else:
                ax.set_ylim(bottom=0)
            ax.set_xticks(sorted({e["x"] for e in entries}))
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(plain)
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("layers")
            ax.set_ylabel("seconds (lower is better)")
            ax.set_title(titles[series])
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
        fig.suptitle(f"Layer depth ({doc['options']['mode']} run, {date})")
        fig.tight_layout()
        path = out_dir / "layer_depth.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def update_results(path: Path, section: str) -> None:
    """Replace the text between the latest-run markers of ``path`` with ``section``."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} … {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{section}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path, help="a JSON file written by benchmarks.run")
    p.add_argument("--subject", default="unionfs", help="the system the ratios are about (default unionfs)")
    p.add_argument("--plots", type=Path, default=HERE / "plots", help="where the PNGs go")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--update", type=Path, help="RESULTS.md whose 'Latest run' section to replace")
    args = p.parse_args(argv)
    doc = json.loads(args.result.read_text())
    plots = [] if args.no_plots else plot(doc, args.plots, args.subject)
    relative_to = args.update.resolve().parent if args.update else None
    section = render(doc, args.subject, plots, relative_to)
    print(section)
    if args.update:
        update_results(args.update, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
