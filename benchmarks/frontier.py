"""The speed-accuracy frontier (issue 12): every configuration of one or more accuracy-suite runs on one figure.

    python -m benchmarks.frontier benchmarks/measured/accuracy-smollm2-4096-frontier.json \\
        benchmarks/measured/accuracy-qwen05-4096-frontier.json --out benchmarks/measured/frontier.png

Each input is a `benchmarks.accuracy` result JSON. Per file (one row of panels: its model and length):
- left: the plan's FLOP ratio (x) against needle accuracy with its Wilson 95% interval (y); dense is the
  horizontal band at FLOP 1.0's accuracy;
- right: the FLOP ratio against the median last-token KL over the suite's natural texts (log y).
Points are numbered; the key under the figure names each number's configuration.

The measured prefill speedup against Inductor comes from `benchmarks.prefill` result JSONs (`--speed FILE`,
measured on the speed model, SmolLM2, whatever model the accuracy run used). A point takes the speedup of the
prefill configuration with its recipe: the selector and the schedule's fields that do not depend on the
model's depth (budgets, prune, probe and pooling, forced tokens, KV policy), budgets written as what they
compute (a keep-set stage keeps min(budget, the previous stage's M), so a later budget above an earlier one is
the earlier one). With any speedups, a second row of panels per run plots accuracy and KL against the measured
speedup. `--speedups NAME=X` sets one by configuration name instead.
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
                       "match32": f.get("greedy_match_mean"), "recipe": recipe(c.get("options"), c.get("schedule"))})
    dense = res["dense"]["overall"]
    return {"model": meta["model"], "length": meta["length"], "dense": dense, "threads": meta.get("threads"),
            "suite": meta.get("suite"), "tasks": meta.get("tasks")}, points


# The schedule fields that choose tokens and cost FLOPs, without the layer indices (they scale with the depth).
RECIPE_FIELDS = ("budgets", "prune", "pap", "ltp", "msdp", "probe_queries", "heads", "pool", "pool_kind", "sink",
                 "window", "kv_cache")


def recipe(options: dict | None, schedule: dict | None):
    """What a configuration computes, comparable across models (module docstring); None without a schedule."""
    if not schedule:
        return None
    from spts_compile.config import SPTSConfig
    from spts_compile.selectors import get as get_selector
    selector = (options or {}).get("selector") or SPTSConfig.selector
    fields = {k: schedule.get(k) for k in RECIPE_FIELDS}
    if get_selector(selector).keeps_set and fields["budgets"]:
        capped = []
        for b in fields["budgets"]:   # fractions with fractions, counts with counts
            same_kind = capped and isinstance(b, float) == isinstance(capped[-1], float)
            capped.append(min(b, capped[-1]) if same_kind else b)
        fields["budgets"] = capped
    return json.dumps([selector, fields], sort_keys=True)


def load_speeds(path: Path) -> dict[str, tuple[float, str]]:
    """recipe -> (measured prefill speedup against Inductor, where: model and length), from one
    `benchmarks.prefill` result JSON (its main spts run and every `--set` configuration)."""
    res = json.loads(path.read_text())
    where = f"{res['meta']['model']} {res['meta']['length'] // 1024}K"
    runs = [({}, res.get("plan"), res.get("speedup_vs_inductor"))]
    runs += [(c.get("options"), c.get("plan"), c.get("speedup_vs_inductor")) for c in res.get("configs", {}).values()]
    out = {}
    for options, plan, speedup in runs:
        key = recipe(options, (plan or {}).get("schedule"))
        if key is not None and speedup:
            out[key] = (speedup, where)
    return out


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


def table(meta: dict, points: list[dict]) -> str:
    d = meta["dense"]
    lines = [f"{meta['model']} at {meta['length']} tokens, tasks {meta['tasks']}: dense {d['correct']}/{d['n']} "
             f"[{d['wilson95'][0]:.2f}-{d['wilson95'][1]:.2f}]", "",
             "| # | config | FLOP ratio | KV ratio | right (Wilson 95%) | lost vs dense | KL median | KL mean | "
             "top-1 | 32-token match | prefill vs Inductor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(points, 1):
        sp, where = p.get("speed"), p.get("speed_at")
        lines.append(f"| {i} | {p['name']} | {p['flop']:.3f} | {p['kv']:.3f} | {p['correct']}/{p['n']} "
                     f"({p['ci'][0]:.2f}-{p['ci'][1]:.2f}) | {p['lost']} | {_f(p['kl_median'])} | {_f(p['kl_mean'])} | "
                     f"{p['top1']}/{p['texts']} | {_f(p['match32'], 2)} | {f'{sp:.2f}x ({where})' if sp else 'not measured'} |")
    return "\n".join(lines)


def _f(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def _panels(ax_acc, ax_kl, meta, points, x_of, xlabel: str) -> None:
    """Accuracy (with its interval, over dense's band) and median KL against one x per point."""
    d = meta["dense"]
    lo, hi = d["wilson95"]
    ax_acc.axhspan(lo, hi, color="0.85", label=f"dense {d['correct']}/{d['n']} (95% interval)")
    ax_acc.axhline(d["accuracy"], color="0.4", lw=1)
    xs = []
    for i, p in enumerate(points, 1):
        x = x_of(p)
        if x is None:
            continue
        xs.append(x)
        acc = p["correct"] / p["n"]
        ax_acc.errorbar([x], [acc], yerr=[[acc - p["ci"][0]], [p["ci"][1] - acc]], fmt="o", capsize=3)
        ax_acc.annotate(str(i), (x, acc), textcoords="offset points", xytext=(5, 4), fontsize=9)
        if p["kl_median"]:
            ax_kl.plot([x], [p["kl_median"]], "o")
            ax_kl.annotate(str(i), (x, p["kl_median"]), textcoords="offset points", xytext=(5, 4), fontsize=9)
    title = f"{meta['model']}, {meta['length']} tokens"
    tasks = meta["tasks"] or []
    ax_acc.set(title=f"{title}: accuracy, " + (", ".join(tasks) if len(tasks) < 3 else f"{len(tasks)} tasks"),
               xlabel=xlabel, ylabel="fraction right", ylim=(-0.05, 1.05))
    ax_acc.legend(loc="lower right", fontsize=8)
    ax_kl.set(title=f"{title}: median KL vs dense, {_texts(points)} texts", xlabel=xlabel,
              ylabel="KL (log scale)", yscale="log")
    xs = xs or [0.5]
    mid, half = (min(xs) + max(xs)) / 2, max(0.1, (max(xs) - min(xs)) / 2 + 0.04)
    for ax in (ax_acc, ax_kl):   # never zoom into a sliver of x: a 0.2-wide axis at least
        ax.set_xlim(mid - half, mid + half)
    ax_kl.axhline(0.05, color="0.5", ls="--", lw=1)
    ax_kl.annotate("target 0.05", (ax_kl.get_xlim()[0], 0.05), fontsize=8, color="0.4",
                   textcoords="offset points", xytext=(2, 3))


def plot(runs: list[tuple[dict, list[dict]]], out: Path) -> None:
    """Per run, a row of panels against the planned FLOP ratio, and one against the measured speedup where
    any point has one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(meta, points, "flop") for meta, points in runs]
    rows += [(meta, points, "speed") for meta, points in runs if any(p.get("speed") for p in points)]
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4.2 * len(rows)), squeeze=False)
    for (meta, points, axis), (ax_acc, ax_kl) in zip(rows, axes):
        if axis == "flop":
            _panels(ax_acc, ax_kl, meta, points, lambda p: p["flop"], "planned FLOP ratio (spts / dense)")
        else:
            _panels(ax_acc, ax_kl, meta, points, lambda p: p.get("speed"),
                    "measured prefill speedup against Inductor (" +
                    "/".join(sorted({p["speed_at"] for p in points if p.get("speed")})) + ", benchmarks.prefill)")
    keys = [f"{meta['model']}, {meta['length']} tokens: " + "; ".join(
        f"{i} {p['name']}" + (f" ({p['speed']:.2f}x)" if p.get("speed") else "") for i, p in enumerate(points, 1))
        for meta, points in runs]
    fig.text(0.01, 0.005, "\n".join(keys), fontsize=8, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04 * len(runs) + 0.02, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.frontier", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="benchmarks.accuracy result JSON files")
    p.add_argument("--speed", action="append", type=Path, default=[], metavar="FILE",
                   help="a benchmarks.prefill result JSON: measured speedups, matched to points by recipe")
    p.add_argument("--speedups", nargs="*", default=[], metavar="NAME=X",
                   help="a measured prefill speedup against Inductor by config name (overrides --speed)")
    p.add_argument("--out", type=Path, default=Path("results/frontier.png"))
    args = p.parse_args(argv)
    by_name = {}
    for s in args.speedups:
        name, _, x = s.partition("=")
        try:
            by_name[name] = float(x)
        except ValueError:
            p.error(f"--speedups: {s!r} is not NAME=X with a number X")
    speeds = {}
    for f in args.speed:
        speeds.update(load_speeds(f))
    runs = merge_runs([load_points(f) for f in args.results])
    for _, points in runs:
        for pt in points:
            pt["speed"], pt["speed_at"] = ((by_name[pt["name"]], "given") if pt["name"] in by_name
                                           else speeds.get(pt["recipe"], (None, None)))
    text = "\n\n".join(table(m, pts) for m, pts in runs)
    print(text)
    plot(runs, args.out)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
