"""The speed-accuracy frontier (issue 12): every configuration of one or more accuracy-suite runs on one figure.

    python -m benchmarks.frontier benchmarks/measured/accuracy-smollm2-4096-frontier.json \\
        benchmarks/measured/accuracy-qwen05-4096-frontier.json --out benchmarks/measured/frontier.png

Each input is a `benchmarks.accuracy` result JSON. Per file (one row of panels: its model and length):
- left: the plan's FLOP ratio (x) against needle accuracy with its Wilson 95% interval (y); dense is the
  horizontal band at FLOP 1.0's accuracy;
- right: the FLOP ratio against the median last-token KL over the suite's natural texts (log y).
Points are numbered; the key under the figure names each number's configuration, with the measured prefill
speedup against Inductor where `--speedups NAME=X` gives one (measured elsewhere: `benchmarks.run`).
A table of the same numbers is printed (and written next to the PNG as .md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_points(path: Path) -> tuple[dict, list[dict]]:
    res = json.loads(path.read_text())
    meta = res["meta"]
    points = []
    for name, c in res.get("configs", {}).items():
        if "overall" not in c:
            continue
        o, f = c["overall"], c.get("fidelity") or {}
        points.append({"name": name, "options": c.get("options"), "flop": c.get("flop_ratio"),
                       "kv": c.get("kv_ratio"), "correct": o["correct"], "n": o["n"], "ci": o["wilson95"],
                       "lost": (c.get("vs_dense") or {}).get("lost"), "kl_median": f.get("kl_median"),
                       "kl_mean": f.get("kl_mean"), "top1": f.get("top1_agree"), "texts": f.get("n_texts"),
                       "match32": f.get("greedy_match_mean")})
    dense = res["dense"]["overall"]
    return {"model": meta["model"], "length": meta["length"], "dense": dense, "threads": meta.get("threads"),
            "suite": meta.get("suite"), "tasks": meta.get("tasks")}, points


def merge_runs(runs: list[tuple[dict, list[dict]]]) -> list[tuple[dict, list[dict]]]:
    """Runs of one model, length and task list (the same dense answers) share one table and one figure row."""
    merged: dict[tuple, tuple[dict, list[dict]]] = {}
    for meta, points in runs:
        d = meta["dense"]
        key = (meta["model"], meta["length"], tuple(meta["tasks"] or ()), d["correct"], d["n"])
        merged.setdefault(key, (meta, []))[1].extend(points)
    return list(merged.values())


def _texts(points: list[dict]) -> str:
    counts = sorted({p["texts"] for p in points if p["texts"]})
    return "/".join(map(str, counts)) or "0"


def table(meta: dict, points: list[dict], speedups: dict) -> str:
    d = meta["dense"]
    lines = [f"{meta['model']} at {meta['length']} tokens, tasks {meta['tasks']}: dense {d['correct']}/{d['n']} "
             f"[{d['wilson95'][0]:.2f}-{d['wilson95'][1]:.2f}]", "",
             "| # | config | FLOP ratio | KV ratio | right (Wilson 95%) | lost vs dense | KL median | KL mean | "
             "top-1 | 32-token match | prefill vs Inductor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(points, 1):
        sp = speedups.get(p["name"])
        lines.append(f"| {i} | {p['name']} | {p['flop']:.3f} | {p['kv']:.3f} | {p['correct']}/{p['n']} "
                     f"({p['ci'][0]:.2f}-{p['ci'][1]:.2f}) | {p['lost']} | {_f(p['kl_median'])} | {_f(p['kl_mean'])} | "
                     f"{p['top1']}/{p['texts']} | {_f(p['match32'], 2)} | {f'{sp:.2f}x' if sp else 'not measured'} |")
    return "\n".join(lines)


def _f(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def plot(runs: list[tuple[dict, list[dict]]], out: Path, speedups: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 4.2 * len(runs)), squeeze=False)
    keys = []
    for row, (meta, points) in enumerate(runs):
        d = meta["dense"]
        ax_acc, ax_kl = axes[row]
        lo, hi = d["wilson95"]
        ax_acc.axhspan(lo, hi, color="0.85", label=f"dense {d['correct']}/{d['n']} (95% interval)")
        ax_acc.axhline(d["accuracy"], color="0.4", lw=1)
        for i, p in enumerate(points, 1):
            acc = p["correct"] / p["n"]
            ax_acc.errorbar([p["flop"]], [acc], yerr=[[acc - p["ci"][0]], [p["ci"][1] - acc]], fmt="o", capsize=3)
            ax_acc.annotate(str(i), (p["flop"], acc), textcoords="offset points", xytext=(5, 4), fontsize=9)
            if p["kl_median"]:
                ax_kl.plot([p["flop"]], [p["kl_median"]], "o")
                ax_kl.annotate(str(i), (p["flop"], p["kl_median"]), textcoords="offset points", xytext=(5, 4),
                               fontsize=9)
        title = f"{meta['model']}, {meta['length']} tokens"
        tasks = meta["tasks"] or []
        ax_acc.set(title=f"{title}: accuracy, " + (", ".join(tasks) if len(tasks) < 3 else f"{len(tasks)} tasks"),
                   xlabel="planned FLOP ratio (spts / dense)", ylabel="fraction right", ylim=(-0.05, 1.05))
        ax_acc.legend(loc="lower right", fontsize=8)
        ax_kl.set(title=f"{title}: median KL vs dense, {_texts(points)} texts",
                  xlabel="planned FLOP ratio (spts / dense)", ylabel="KL (log scale)", yscale="log")
        flops = [p["flop"] for p in points] or [0.5]
        mid, half = (min(flops) + max(flops)) / 2, max(0.1, (max(flops) - min(flops)) / 2 + 0.04)
        for ax in (ax_acc, ax_kl):   # never zoom into a sliver of FLOP ratios: a 0.2-wide axis at least
            ax.set_xlim(mid - half, mid + half)
        ax_kl.axhline(0.05, color="0.5", ls="--", lw=1)
        ax_kl.annotate("target 0.05", (ax_kl.get_xlim()[0], 0.05), fontsize=8, color="0.4",
                       textcoords="offset points", xytext=(2, 3))
        keys.append(f"{title}: " + "; ".join(
            f"{i} {p['name']}" + (f" ({speedups[p['name']]:.2f}x)" if p["name"] in speedups else "")
            for i, p in enumerate(points, 1)))
    fig.text(0.01, 0.005, "\n".join(keys), fontsize=8, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04 * len(runs) + 0.02, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.frontier", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="benchmarks.accuracy result JSON files")
    p.add_argument("--speedups", nargs="*", default=[], metavar="NAME=X",
                   help="measured prefill speedups against Inductor, by config name")
    p.add_argument("--out", type=Path, default=Path("results/frontier.png"))
    args = p.parse_args(argv)
    speedups = {}
    for s in args.speedups:
        name, _, x = s.partition("=")
        try:
            speedups[name] = float(x)
        except ValueError:
            p.error(f"--speedups: {s!r} is not NAME=X with a number X")
    runs = merge_runs([load_points(f) for f in args.results])
    text = "\n\n".join(table(m, pts, speedups) for m, pts in runs)
    print(text)
    plot(runs, args.out, speedups)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
