"""Pass-inspection dumps and the plan summary users can read.

`options={"debug_dir": d}` (or SPTS_DEBUG_DIR) writes one folder per compiled graph:
  before.py / after.py   the graph as readable Python, before and after the passes
  layers.txt             the layers found: attention and FFN kind, verified (or why it did not need to be)
  plan.txt               per layer at the compiled N: dense/skip (and why dense), candidates, active, pruned,
                         KV tokens, GFLOPs dense vs planned
  plan_symbolic.txt      the same rules as expressions in N, compactly (candidates C, active M per layer)
  summary.json           all of it, machine-readable (the full sympy expressions too)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import sympy
from tabulate import tabulate

from .passes.plan import N, tokens


def _n_value(record) -> int | None:
    n = record.seq_len
    if isinstance(n, int):
        return n
    try:
        return int(n.node.hint)
    except Exception:
        return None


def _expr(e, n):
    e = sympy.sympify(e)
    value = float(e.subs(N, n)) if n is not None else None
    return str(e), value


def layer_rows(record) -> list[dict]:
    """What the analysis found per layer. `verified` is "yes", "no" (with why), or "not needed": a layer the
    passes leave exactly as compiled (dense) is not verified."""
    rows = []
    for l in record.analysis.layers if record.analysis else []:
        if l.verified:
            verified, reason = "yes", l.verify_note
        elif l.verify_note:
            verified, reason = "no", l.verify_note
        elif l.reason:
            verified, reason = "no", f"not matched: {l.reason}"
        else:
            verified, reason = "not needed", "left as compiled (dense)"
        rows.append({
            "layer": l.index,
            "family": l.family.name,
            "attention": (l.attn.kind + (" +bias" if l.attn.bq is not None else "") +
                          (" +qk_norm" if l.attn.q_norm else "")) if l.attn else "-",
            "ffn": l.ffn.act if l.ffn else "-",
            "cache": l.cache,
            "module": record.layer_modules.get(l.index, "-"),   # the outlined region it calls (share_layers)
            "verified": verified,
            "reason": reason,
        })
    return rows


def _at(expr, n):
    return None if n is None else float(sympy.sympify(expr).subs(N, n))


def _compact_rules(plan) -> list[dict]:
    """Per layer, candidates C and active M as short rules in N and the previous layer's C."""
    rows, prev = [], None
    for lp in plan.layers:
        if lp.mode == "dense":
            rule_c, rule_m = "N", "N"
        else:
            rule_c = "N" if prev is None else prev
            rule_m = f"min({tokens(lp.budget)}, C{lp.index})"
        row = {"layer": lp.index, "mode": lp.mode, "C (candidates)": rule_c, "M (active)": rule_m,
               "pruned after": f"min({tokens_str(lp.prune)}, C{lp.index} - 1)" if lp.prune is not None else "",
               "KV tokens": "N" if lp.mode == "dense" else ("M" if sympy.sympify(lp.kv_tokens) == sympy.sympify(lp.active)
                                                           else "C"),
               "FLOPs dense": str(sympy.factor(lp.flops_dense))}
        rows.append(row)
        if lp.mode == "skip":
            if plan.selector is not None and plan.selector.keeps_set:
                prev = f"M{lp.index}"
            elif lp.prune is not None:
                prev = f"C{lp.index} - min({tokens_str(lp.prune)}, C{lp.index} - 1)"
            else:
                prev = f"C{lp.index}"
    return rows


def tokens_str(budget) -> str:
    return str(tokens(budget))


def plan_rows(record) -> list[dict]:
    if record.plan is None:
        return []
    n = _n_value(record)
    rows = []
    for lp in record.plan.layers:
        fd, fd_v = _expr(lp.flops_dense, n)
        fp, fp_v = _expr(lp.flops_planned, n)
        cand_n = _at(lp.candidates, n)
        pruned_n = None
        if lp.prune is not None and n is not None:
            pruned_n = min(_at(tokens(lp.prune), n), cand_n - 1)
        rows.append({
            "layer": lp.index, "mode": lp.mode, "stage": lp.stage, "budget": lp.budget,
            "candidates": str(lp.candidates), "active": str(lp.active),
            "prune": lp.prune, "kv_tokens": str(lp.kv_tokens),
            "flops_dense": fd, "flops_planned": fp,
            "candidates_at_n": cand_n, "active_at_n": _at(lp.active, n), "pruned_at_n": pruned_n,
            "flops_dense_at_n": fd_v, "flops_planned_at_n": fp_v,
            "kv_tokens_at_n": _at(lp.kv_tokens, n),
            "why": lp.note,
        })
    return rows


def summary(record) -> dict:
    n = _n_value(record)
    out = {"graph": record.graph_id, "kind": record.kind, "reason": record.reason, "seq_len": n,
           "seq_len_symbolic": not isinstance(record.seq_len, int),
           "verify_seconds": round(record.verify_seconds, 3),
           "proxy_seconds": round(record.proxy_seconds, 3), "inductor_seconds": round(record.inductor_seconds, 3),
           "dense_seconds": round(record.dense_seconds, 3),
           "compile_seconds": round(record.compile_seconds, 3),
           "kernels": record.kernels, "subgraphs": record.subgraphs, "layer_modules": record.layer_modules,
           "inductor_cache": record.cache,
           "ltp_mode": record.ltp_mode, "selector": record.plan.selector.name if record.plan is not None else None,
           "causal_cleanup_layers": record.cleanup_layers,
           "rewritten_layers": record.rewritten_layers, "layers": layer_rows(record), "plan": plan_rows(record)}
    if record.schedule is not None:
        s = record.schedule
        out["schedule"] = {"preset": s.preset, "start_layer": s.start_layer, "stage_ends": s.stage_ends,
                           "budgets": s.budgets, "prune": s.prune, "pap": s.pap, "ltp": s.ltp, "msdp": s.msdp,
                           "probe_queries": s.probe_queries, "heads": s.heads, "pool": s.pool,
                           "pool_kind": s.pool_kind, "sink": s.sink, "window": s.window, "kv_cache": s.kv_cache,
                           "min_tokens": s.min_tokens}
    if record.plan is not None:
        dense, planned = record.plan.totals()
        kv_dense, kv_planned = record.plan.kv_totals()
        out.update({
            "flops_dense": str(sympy.simplify(dense)), "flops_planned": str(planned),
            "kv_tokens_dense": str(kv_dense), "kv_tokens_planned": str(kv_planned),
            "ltp_channels": record.plan.ltp_channels, "ltp_rank": record.plan.ltp_rank,
        })
        if n:
            out.update(_kv_bytes(record, n))
            fd, fp = float(dense.subs(N, n)), float(planned.subs(N, n))
            kd, kp = float(kv_dense.subs(N, n)), float(kv_planned.subs(N, n))
            out.update({"flops_dense_at_n": fd, "flops_planned_at_n": fp, "flop_ratio": fp / fd if fd else None,
                        "kv_ratio": kp / kd if kd else None})
    return out


def _kv_bytes(record, n: int) -> dict:
    """KV-cache bytes of one prefill at length n, dense against planned, per layer and in total."""
    analysis = record.analysis
    itemsize = analysis.dtype.itemsize if analysis.dtype is not None else 4
    batch = analysis.batch if isinstance(analysis.batch, int) else 1
    per_layer = []
    for spec, lp in zip(analysis.layers, record.plan.layers):
        if spec.attn is None:
            continue
        per_token = 2 * spec.attn.n_kv_heads * spec.attn.head_dim * itemsize * batch
        per_layer.append({"layer": lp.index, "dense": per_token * n,
                          "planned": int(per_token * float(sympy.sympify(lp.kv_tokens).subs(N, n)))})
    return {"kv_bytes_dense": sum(r["dense"] for r in per_layer),
            "kv_bytes_planned": sum(r["planned"] for r in per_layer), "kv_bytes_per_layer": per_layer}


def plan_table(s: dict) -> str:
    """The plan at the compiled N as a table of plain numbers (GFLOPs), with why a layer is dense."""
    n = s.get("seq_len")
    if not s.get("plan"):
        return "(no plan)"
    if n is None:
        cols = ["layer", "mode", "stage", "candidates", "active", "prune", "kv_tokens", "why"]
        return tabulate([{k: r[k] for k in cols} for r in s["plan"]], headers="keys")
    rows = [{"layer": r["layer"], "mode": r["mode"], "stage": r["stage"],
             "candidates": _int(r["candidates_at_n"]), "active": _int(r["active_at_n"]),
             "pruned after": _int(r["pruned_at_n"]) if r["pruned_at_n"] is not None else "",
             "KV tokens": _int(r["kv_tokens_at_n"]),
             "GFLOPs dense": f"{r['flops_dense_at_n'] / 1e9:.4g}", "GFLOPs planned": f"{r['flops_planned_at_n'] / 1e9:.4g}",
             "why dense": r["why"] if r["mode"] == "dense" else ""} for r in s["plan"]]
    return f"at N = {n}\n" + tabulate(rows, headers="keys")


def _int(x):
    return None if x is None else int(x)


def _outlined_code(gm, record) -> str:
    """The outlined layer modules' code (share_layers), each headed by the layers that call it and their
    mode (a module is dense or skipping: layers of different modes never share one)."""
    modes = {lp.index: lp.mode for lp in record.plan.layers} if record.plan is not None else {}
    parts = []
    for name in dict.fromkeys(record.layer_modules.values()):
        layers = [l for l, m in record.layer_modules.items() if m == name]
        mode = "dense" if modes.get(layers[0]) == "dense" else "skipping"
        parts.append(f"\n\n# {name}: {mode} layers {', '.join(map(str, layers))}\n{getattr(gm, name).code}")
    return "".join(parts)


def write_dump(debug_dir, record, before, after) -> Path:
    folder = Path(debug_dir) / f"graph_{os.getpid()}_{record.graph_id:03d}_{record.kind}"
    folder.mkdir(parents=True, exist_ok=True)
    if before is not None:
        (folder / "before.py").write_text(before)
    (folder / "after.py").write_text(after.code + _outlined_code(after, record))
    s = summary(record)
    head = f"graph {record.graph_id}: {record.kind}" + (f" ({record.reason})" if record.reason else "")
    (folder / "layers.txt").write_text(head + "\n\n" + tabulate(s["layers"], headers="keys") + "\n")
    text = plan_table(s)
    if record.plan is not None:
        (folder / "plan_symbolic.txt").write_text(
            head + "\n\nRules per layer (N: prompt length; C<l>, M<l>: layer l's candidates and active tokens)\n\n"
            + tabulate(_compact_rules(record.plan), headers="keys") + "\n\nTotal FLOPs, dense: "
            + str(s.get("flops_dense")) + "\n")
    totals = {k: s.get(k) for k in ("flops_dense_at_n", "flops_planned_at_n", "flop_ratio", "kv_ratio",
                                   "kv_bytes_dense", "kv_bytes_planned", "ltp_mode", "ltp_channels", "ltp_rank",
                                   "causal_cleanup_layers", "selector", "compile_seconds", "verify_seconds",
                                   "inductor_seconds", "kernels", "subgraphs", "layer_modules", "inductor_cache")}
    (folder / "plan.txt").write_text(head + "\n\n" + text + "\n\n" +
                                     "\n".join(f"{k}: {v}" for k, v in totals.items()) + "\n")
    (folder / "summary.json").write_text(json.dumps(s, indent=2, default=str))
    return folder
