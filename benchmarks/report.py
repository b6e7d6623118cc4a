"""Turning raw measurements into the JSON summaries, the tables on screen, the targets and the plots."""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from tabulate import tabulate

PLAN_KEYS = ("graph", "kind", "reason", "seq_len", "seq_len_symbolic", "flop_ratio", "kv_ratio", "ltp_mode",
             "ltp_channels", "ltp_rank", "verify_seconds", "proxy_seconds", "inductor_seconds", "compile_seconds", "rewritten_layers", "schedule",
             "flops_dense", "flops_planned", "flops_dense_at_n", "flops_planned_at_n")

# Issue 5's targets on this CPU, fp32, SmolLM2 at 8K with the default preset.
TARGETS = {"prefill_speedup": 2.0, "e2e16_speedup": 1.8, "kv_fraction": 0.5, "accuracy_drop_points": 5.0,
           "kl": 0.1}


def plan_at(plan: dict | None, n: int) -> dict | None:
    """The plan summary of `spts_compile.last_plan()`, with FLOP ratio evaluated at length n when the
    graph was compiled for another (or a symbolic) length."""
    if not plan:
        return None
    out = {k: plan.get(k) for k in PLAN_KEYS if k in plan}
    if plan.get("seq_len") != n and plan.get("flops_dense") and plan.get("flops_planned"):
        try:
            import sympy

            fd, fp = sympy.sympify(plan["flops_dense"]), sympy.sympify(plan["flops_planned"])
            subs = {s: n for s in fd.free_symbols | fp.free_symbols if s.name == "N"}
            d, p = float(fd.subs(subs)), float(fp.subs(subs))
            out.update(flops_dense_at_n=d, flops_planned_at_n=p, flop_ratio=p / d if d else None, evaluated_at=n)
        except Exception as e:  # report, don't fail
            out["flop_ratio_error"] = repr(e)
    return out


def _med(row, key):
    s = row.get(key) or {}
    return s.get("median")


def add_speedups(rows: list[dict], length: int, new_tokens: tuple[int, int]) -> None:
    at = {r["variant"]: r for r in rows if r["length"] == length}
    ind, eag = at.get("inductor"), at.get("eager")
    keys = ["prefill_s"] + [f"e2e_{n}_s" for n in new_tokens]
    for r in at.values():
        for k in keys:
            name = k[:-2]
            for ref, tag in ((ind, "inductor"), (eag, "eager")):
                if ref and _med(ref, k) and _med(r, k):
                    r[f"{name}_speedup_vs_{tag}"] = _med(ref, k) / _med(r, k)
                    # ratio of the fastest runs: robust to other load on a shared machine
                    r[f"{name}_speedup_vs_{tag}_of_min"] = ref[k]["min"] / r[k]["min"]
        if ind and ind.get("kv_bytes") and r.get("kv_bytes") is not None:
            r["kv_fraction_of_dense"] = r["kv_bytes"] / ind["kv_bytes"]
        ratio = (r.get("plan") or {}).get("flop_ratio")
        if ratio:
            r["planned_speedup"] = 1.0 / ratio
            if r.get("prefill_speedup_vs_inductor"):
                r["speedup_fraction_of_planned"] = r["prefill_speedup_vs_inductor"] / r["planned_speedup"]


def accuracy_table(samples: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for s in samples:
        groups[(s["length"], s["task"], s["variant"])].append(s["score"])
    return [{"length": l, "task": t, "variant": v, "n": len(sc), "score": sum(sc) / len(sc),
             "exact_match": sum(x == 1.0 for x in sc) / len(sc)}
            for (l, t, v), sc in sorted(groups.items())]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def sweep_rows(results: dict, variants, length: int) -> list[dict]:
    """One row per configuration at `length`: prefill speed on the accuracy prompts (ratio of medians to
    Inductor's on the same prompts), accuracy over the suite, mean KL against dense."""
    acc = [s for s in results["accuracy_samples"] if s["length"] == length]
    fid = [f for f in results["fidelity"] if f["length"] == length]
    by_v = defaultdict(list)
    for s in acc:
        by_v[s["variant"]].append(s)
    ind_t = [s["prefill_s"] for s in by_v.get("inductor", [])]
    rows = []
    for v in variants:
        if v.name not in by_v:
            continue
        ss = by_v[v.name]
        t = statistics.median([s["prefill_s"] for s in ss])
        plan = plan_at(v.counter.prefill_plan if v.counter else None, length) or {}
        kls = [f[v.name].get("kl") for f in fid if v.name in f]
        rows.append({"variant": v.name, "group": v.group, "label": v.label, "length": length,
                     "options": (v.options or {}),
                     "prefill_s_median": t,
                     "speedup_vs_inductor": (statistics.median(ind_t) / t) if ind_t else None,
                     "accuracy": _mean([s["score"] for s in ss]),
                     "exact_match": _mean([float(s["score"] == 1.0) for s in ss]),
                     "n_samples": len(ss), "kl_mean": _mean(kls), "flop_ratio": plan.get("flop_ratio")})
    return rows


def targets(results: dict, length: int) -> dict:
    at = {r["variant"]: r for r in results["speed"] if r["length"] == length}
    sp = at.get("spts", {})
    acc = [s for s in results["accuracy_samples"] if s["length"] == length]
    dense_acc = _mean([s["score"] for s in acc if s["variant"] == "inductor"])
    spts_acc = _mean([s["score"] for s in acc if s["variant"] == "spts"])
    kls = [f["spts"].get("kl") for f in results["fidelity"] if f["length"] == length and "spts" in f]
    out = {"length": length}

    def put(name, measured, target, ok):
        out[name] = {"target": target, "measured": measured, "met": (None if measured is None else bool(ok(measured)))}

    put("prefill_speedup_vs_inductor", sp.get("prefill_speedup_vs_inductor"), f">= {TARGETS['prefill_speedup']}",
        lambda m: m >= TARGETS["prefill_speedup"])
    put("e2e16_speedup_vs_inductor", sp.get("e2e_16_speedup_vs_inductor"), f">= {TARGETS['e2e16_speedup']}",
        lambda m: m >= TARGETS["e2e16_speedup"])
    put("kv_fraction_of_dense", sp.get("kv_fraction_of_dense"), f"<= {TARGETS['kv_fraction']}",
        lambda m: m <= TARGETS["kv_fraction"])
    drop = None if dense_acc is None or spts_acc is None else 100 * (dense_acc - spts_acc)
    put("accuracy_drop_points", drop, f"<= {TARGETS['accuracy_drop_points']}",
        lambda m: m <= TARGETS["accuracy_drop_points"])
    out["accuracy_drop_points"].update(dense=dense_acc, spts=spts_acc, n=len([s for s in acc if s["variant"] == "spts"]))
    put("last_token_kl", _mean(kls), f"< {TARGETS['kl']}", lambda m: m < TARGETS["kl"])
    return out


# -- rendering -------------------------------------------------------------------------------------------

def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def render(results: dict) -> str:
    parts = []
    meta = results["meta"]
    parts.append(f"model {meta['model']} ({meta['model_class']}, {meta['layers']} layers, fp32), "
                 f"threads {meta['threads']}, torch {meta['torch']}, transformers {meta['transformers']}")
    rows = []
    for r in results["speed"]:
        p, c = r.get("prefill_s") or {}, r.get("compile") or {}
        rows.append([r["length"], r["variant"],
                     f"{_f(p.get('median'))} [{_f(p.get('min'))}-{_f(p.get('max'))}]",
                     _f(r.get("prefill_speedup_vs_inductor"), "{:.2f}x") + " / " +
                     _f(r.get("prefill_speedup_vs_inductor_of_min"), "{:.2f}x"),
                     _f(r.get("prefill_speedup_vs_eager"), "{:.2f}x"),
                     _f(_med(r, "e2e_16_s")), _f(r.get("e2e_16_speedup_vs_inductor"), "{:.2f}x"),
                     _f(_med(r, "e2e_64_s")), _f(r.get("e2e_64_speedup_vs_inductor"), "{:.2f}x"),
                     _f(c.get("first_call_seconds"), "{:.0f}"), _f(c.get("warm_first_call_seconds"), "{:.0f}"),
                     f"{c.get('graphs_compiled', 0)}/{r.get('graphs_total', 0)}",
                     _f((r.get("kv_bytes") or 0) / 2**20, "{:.1f}"), _f(r.get("kv_fraction_of_dense"), "{:.0%}"),
                     _f(r.get("peak_rss_delta_bytes", 0) / 2**20, "{:.0f}"),
                     _f((r.get("plan") or {}).get("flop_ratio")), _f(r.get("speedup_fraction_of_planned"), "{:.0%}")])
    if rows:   # (none with --only batch)
        parts.append(tabulate(rows, headers=["N", "config", "prefill s med [min-max]", "x ind med/min", "x eager",
                                             "+16 s", "x ind", "+64 s", "x ind", "1st call s", "warm 1st s", "graphs new/all",
                                             "KV MiB", "KV %", "peak +MiB", "FLOP ratio", "% of planned"]))
    if results.get("accuracy"):
        table = defaultdict(dict)
        names = []
        for a in results["accuracy"]:
            table[(a["length"], a["task"])][a["variant"]] = a["score"]
            if a["variant"] not in names:
                names.append(a["variant"])
        names = sorted(names, key=lambda n: (n != "inductor", n != "spts", n))
        arows = [[l, t] + [_f(table[(l, t)].get(n), "{:.2f}") for n in names] for (l, t) in sorted(table)]
        parts.append("accuracy (score: fraction of expected strings in the greedy answer; inductor = dense)\n" +
                     tabulate(arows, headers=["N", "task"] + names))
    if results.get("fidelity"):
        frows = []
        for f in results["fidelity"]:
            for n, m in f.items():
                if isinstance(m, dict):
                    frows.append([f["length"], f["text"], n, _f(m.get("kl"), "{:.4f}"), m.get("top1_agree"),
                                  _f(m.get("cont_match"), "{:.2f}"), m.get("cont_prefix")])
        parts.append("fidelity against dense Inductor (last-token KL, top-1 agreement, greedy 32-token match)\n" +
                     tabulate(frows, headers=["N", "text", "config", "KL", "top-1", "cont match", "cont prefix"]))
    if results.get("sweep"):
        srows = [[s["variant"], s["label"], _f(s["speedup_vs_inductor"], "{:.2f}x"), _f(s["flop_ratio"]),
                  _f(s["accuracy"]), _f(s["kl_mean"], "{:.4f}"), s["n_samples"]] for s in results["sweep"]]
        parts.append(f"speed-accuracy at N={results['meta']['sweep_length']} (speed on the accuracy prompts)\n" +
                     tabulate(srows, headers=["config", "what", "prefill x ind", "FLOP ratio", "accuracy", "KL", "n"]))
    if results.get("batch") and results["batch"].get("greedy_vs_inductor"):
        parts.append(render_batch(results["batch"]))
    if results.get("targets"):
        t = results["targets"]
        trows = [[k, v["target"], _f(v["measured"], "{:.3f}"), {True: "met", False: "MISSED", None: "-"}[v["met"]]]
                 for k, v in t.items() if isinstance(v, dict)]
        parts.append(f"targets at N={t['length']}\n" + tabulate(trows, headers=["target", "goal", "measured", ""]))
    return "\n\n".join(parts)


def render_batch(section: dict) -> str:
    """The batch section (benchmarks.batch) as a headline and a table."""
    rows = [[name, _f(c["prefill_s"]["median"]), _f(c["e2e_s"]["median"]), _f(c["tokens_per_s"], "{:.1f}"),
             _f(c.get("decode_tokens_per_s"), "{:.1f}"), _f((c.get("kv_bytes") or 0) / 2**20, "{:.1f}"),
             _f((c.get("plan") or {}).get("flop_ratio"))] for name, c in section["configs"].items()]
    g = section["greedy_vs_inductor"]
    head = (f"batch of {section['batch']}: {section['lengths']} tokens left-padded to {section['padded_to']}, "
            f"+{section['new_tokens']} greedy tokens, reps {section['reps']}. spts/Inductor: throughput "
            f"{_f(section['throughput_ratio_vs_inductor'], '{:.2f}x')}, prefill time ratio "
            f"{_f(section['prefill_time_ratio_vs_inductor'])}, greedy match {_f(g['greedy_match_fraction'])} "
            f"({g['rows_equal']}/{section['batch']} rows equal)")
    return head + "\n" + tabulate(rows, headers=["config", "prefill s", "e2e s", "tokens/s", "decode tokens/s",
                                                 "KV MiB", "FLOP ratio"])


# -- plots -----------------------------------------------------------------------------------------------

def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    written = []
    p = _plot_speed_accuracy(results, out)
    if p:
        written.append(p)
    p = _plot_tokens_kept(results, out)
    if p:
        written.append(p)
    return written


_GROUP_STYLE = {  # marker, colour, legend label
    "dense": ("*", "k", "dense (Inductor)"),
    "main": ("o", "tab:blue", "spts configuration"),
    "sweep": ("s", "tab:blue", "spts, budgets scaled"),
    "baseline": ("^", "tab:red", "other selector, same budgets"),
}


def _style(row):
    return _GROUP_STYLE["dense" if row["variant"] == "inductor" else row.get("group", "main")]


def _plot_speed_accuracy(results, out: Path) -> Path | None:
    """Speed against accuracy and against KL, one point per configuration. Points are numbered, with the key
    beside the panels (labels on the points pile up); a panel without data is not drawn."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in (results.get("sweep") or []) if r.get("speedup_vs_inductor") is not None]
    panels = [(key, label) for key, label in (("accuracy", "needle accuracy (suite mean score)"),
                                               ("kl_mean", "last-token KL vs dense (log scale)"))
              if any(r.get(key) is not None and (key != "kl_mean" or r["variant"] != "inductor") for r in rows)]
    if not rows or not panels:
        return None
    number = {r["variant"]: i + 1 for i, r in enumerate(rows)}
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5.2 * len(panels) + 3.6, 4.6),
                             gridspec_kw={"width_ratios": [1] * len(panels) + [0.7]})
    for ax, (key, ylabel) in zip(axes, panels):
        pts = [r for r in rows if r.get(key) is not None and not (key == "kl_mean" and r["variant"] == "inductor")]
        sweep = sorted((r for r in pts if r.get("group") == "sweep" or r["variant"] == "spts"),
                       key=lambda r: r["speedup_vs_inductor"])
        if len(sweep) > 1:
            ax.plot([r["speedup_vs_inductor"] for r in sweep], [r[key] for r in sweep], "-", color="tab:blue",
                    alpha=0.4, zorder=1)
        import math
        ys = [math.log10(r[key]) if key == "kl_mean" and r[key] > 0 else r[key] for r in pts]
        xspan = (max(r["speedup_vs_inductor"] for r in pts) - min(r["speedup_vs_inductor"] for r in pts)) or 1
        yspan = (max(ys) - min(ys)) or 1
        placed = []
        for r, y in zip(pts, ys):
            m, c, _ = _style(r)
            x = r["speedup_vs_inductor"]
            ax.scatter([x], [r[key]], marker=m, color=c, s=70, zorder=3)
            # neighbours within 4% of both spans get their numbers stacked, not printed on top of each other
            near = sum(abs(x - px) < 0.04 * xspan and abs(y - py) < 0.04 * yspan for px, py in placed)
            placed.append((x, y))
            ax.annotate(str(number[r["variant"]]), (x, r[key]), textcoords="offset points",
                        xytext=(5, 3 + 9 * near), fontsize=8)
        ax.set_xlabel("prefill speedup vs Inductor (x, same prompts)")
        ax.set_ylabel(ylabel)
        if key == "kl_mean":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.set_title(ylabel.split(" (")[0][0].upper() + ylabel.split(" (")[0][1:] + " against prefill speedup",
                     fontsize=10)
    key_ax = axes[-1]
    key_ax.axis("off")
    groups = [g for g in _GROUP_STYLE if any(_style(r) == _GROUP_STYLE[g] for r in rows)]
    key_ax.legend(handles=[Line2D([], [], marker=_GROUP_STYLE[g][0], color=_GROUP_STYLE[g][1], ls="",
                                  markersize=8, label=_GROUP_STYLE[g][2]) for g in groups],
                  loc="upper left", fontsize=8, frameon=False)
    key_ax.text(0, 0.62, "\n".join(f"{number[r['variant']]:>2}  {r.get('label') or r['variant']}" for r in rows),
                va="top", family="monospace", fontsize=7.5, transform=key_ax.transAxes)
    m = results["meta"]
    fig.suptitle(f"{m['model']}, N = {m['sweep_length']} tokens, {m['threads']} threads: every configuration "
                 f"on the same prompts", fontsize=11)
    fig.tight_layout()
    path = out / "speed_accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_tokens_kept(results, out: Path) -> Path | None:
    """Left: active tokens per skipping layer, for each block (the FFN's line dashed, with larger markers,
    so an equal count does not hide the attention's). Right: which positions each layer's attention kept."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    sel = results.get("selection")
    if not sel or not sel.get("layers"):
        return None
    n = sel["length"]
    layers = sel["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5), gridspec_kw={"width_ratios": [1, 2]})
    styles = {"attn": dict(color="tab:blue", marker="o", ls="-", ms=5, label="attention active"),
              "ffn": dict(color="tab:orange", marker="s", ls="--", ms=9, mfc="none", label="FFN active")}
    for block, st in styles.items():
        pts = sorted((d["layer"], len(d["active"])) for d in layers if d["block"] == block)
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], **st)
    axes[0].axhline(n, color="k", ls=":", lw=1, label=f"dense (N = {n})")
    axes[0].set_xlabel("layer")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("tokens")
    axes[0].set_ylim(0, n * 1.05)
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[0].set_title("Tokens each skipping layer runs", fontsize=10)
    attn = sorted((d for d in layers if d["block"] == "attn"), key=lambda d: d["layer"])
    if attn:
        bins = min(n, 256)
        edges = np.linspace(0, n, bins + 1)
        grid = np.stack([np.histogram(d["active"], bins=edges)[0] / np.diff(edges) for d in attn])
        lo, hi = attn[0]["layer"] - 0.5, attn[-1]["layer"] + 0.5
        im = axes[1].imshow(grid, aspect="auto", origin="lower", cmap="Blues", vmin=0, vmax=1,
                            extent=(0, n, lo, hi), interpolation="nearest")
        fig.colorbar(im, ax=axes[1], label="share of the positions in the bin kept by the attention")
        axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))
    for i, pos in enumerate(sel.get("needle_tokens") or []):
        axes[1].axvline(pos, color="tab:red", lw=1.2, ls="--", label="needle" if i == 0 else None)
    if sel.get("needle_tokens"):
        axes[1].legend(fontsize=8, loc="lower left")
    axes[1].set_xlim(0, n)
    axes[1].set_xlabel("token position in the prompt")
    axes[1].set_ylabel("layer")
    axes[1].set_title(f"Positions kept by each layer's attention ({sel['task']}, needle at depth {sel['depth']:.2f})",
                      fontsize=10)
    m = results.get("meta", {})
    fig.suptitle(f"{m.get('model', '')}: what the spts prefill kept, N = {n}", fontsize=11)
    fig.tight_layout()
    path = out / "tokens_kept.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
