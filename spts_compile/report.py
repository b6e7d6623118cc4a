"""Pass-inspection dumps and the plan summary users can read.

`options={"debug_dir": d}` (or SPTS_DEBUG_DIR) writes one folder per compiled graph:
  before.py / after.py   the graph as readable Python, before and after the passes
  layers.txt             the layers found: attention and FFN kind, verified, reason
  plan.txt               per layer: dense/skip, candidates, budget, prune, KV tokens, FLOPs dense vs planned
  summary.json           the same, machine-readable, with the totals at the example length
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import sympy
from tabulate import tabulate

from .passes.plan import N


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
    rows = []
    for l in record.analysis.layers if record.analysis else []:
        rows.append({
            "layer": l.index,
            "attention": (l.attn.kind + (" +bias" if l.attn.bq is not None else "") +
                          (" +qk_norm" if l.attn.q_norm else "")) if l.attn else "-",
            "ffn": l.ffn.act if l.ffn else "-",
            "cache": l.cache,
            "verified": "yes" if l.verified else "no",
            "reason": l.reason or l.verify_note or "",
        })
    return rows


def plan_rows(record) -> list[dict]:
    if record.plan is None:
        return []
    n = _n_value(record)
    rows = []
    for lp in record.plan.layers:
        fd, fd_v = _expr(lp.flops_dense, n)
        fp, fp_v = _expr(lp.flops_planned, n)
        rows.append({
            "layer": lp.index, "mode": lp.mode, "stage": lp.stage, "budget": lp.budget,
            "candidates": str(lp.candidates), "active": str(lp.active),
            "prune": lp.prune, "kv_tokens": str(lp.kv_tokens),
            "flops_dense": fd, "flops_planned": fp,
            "flops_dense_at_n": fd_v, "flops_planned_at_n": fp_v,
            "kv_tokens_at_n": float(sympy.sympify(lp.kv_tokens).subs(N, n)) if n else None,
        })
    return rows


def summary(record) -> dict:
    n = _n_value(record)
    out = {"graph": record.graph_id, "kind": record.kind, "reason": record.reason, "seq_len": n,
           "seq_len_symbolic": not isinstance(record.seq_len, int),
           "verify_seconds": round(record.verify_seconds, 3),
           "proxy_seconds": round(record.proxy_seconds, 3), "inductor_seconds": round(record.inductor_seconds, 3),
           "compile_seconds": round(record.compile_seconds, 3),
           "ltp_mode": record.ltp_mode, "selector": record.plan.selector.name if record.plan is not None else None,
           "causal_cleanup_layers": record.cleanup_layers,
           "rewritten_layers": record.rewritten_layers, "layers": layer_rows(record), "plan": plan_rows(record)}
    if record.schedule is not None:
        s = record.schedule
        out["schedule"] = {"preset": s.preset, "start_layer": s.start_layer, "stage_ends": s.stage_ends,
                           "budgets": s.budgets, "prune": s.prune, "pap": s.pap, "ltp": s.ltp, "msdp": s.msdp,
                           "probe_queries": s.probe_queries, "min_tokens": s.min_tokens}
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


def write_dump(debug_dir, record, before, after) -> Path:
    folder = Path(debug_dir) / f"graph_{os.getpid()}_{record.graph_id:03d}_{record.kind}"
    folder.mkdir(parents=True, exist_ok=True)
    if before is not None:
        (folder / "before.py").write_text(before)
    (folder / "after.py").write_text(after.code)
    s = summary(record)
    head = f"graph {record.graph_id}: {record.kind}" + (f" ({record.reason})" if record.reason else "")
    (folder / "layers.txt").write_text(head + "\n\n" + tabulate(s["layers"], headers="keys") + "\n")
    plan_cols = ["layer", "mode", "stage", "candidates", "active", "prune", "kv_tokens", "flops_dense",
                 "flops_planned"]
    text = tabulate([{k: r[k] for k in plan_cols} for r in s["plan"]], headers="keys")
    totals = {k: s.get(k) for k in ("flops_dense", "flops_planned", "flop_ratio", "kv_ratio", "kv_bytes_dense",
                                   "kv_bytes_planned", "ltp_mode",
                                   "ltp_channels", "ltp_rank", "causal_cleanup_layers", "verify_seconds")}
    (folder / "plan.txt").write_text(head + "\n\n" + text + "\n\n" +
                                     "\n".join(f"{k}: {v}" for k, v in totals.items()) + "\n")
    (folder / "summary.json").write_text(json.dumps(s, indent=2, default=str))
    return folder
