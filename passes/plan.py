"""MSDP planning: which layers skip, their budgets and prunes, and the FLOPs it saves.

Budgets are sympy expressions in the prompt length N, built with the same integer arithmetic the
runtime helpers use (`min(b, C)`, `N * p // q`), so the plan's numbers are the graph's numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import sympy

from spts_compile.config import KEEP_SET_SELECTORS, Budget, Schedule

from .locate import GraphAnalysis, LayerSpec

N = sympy.Symbol("N", positive=True, integer=True)


@dataclass
class LayerPlan:
    index: int
    mode: str                      # "dense" or "skip"
    stage: int | None = None
    budget: Budget | None = None
    prune: Budget | None = None    # tokens removed after this layer (stage end), or None
    candidates: sympy.Expr = N
    active: sympy.Expr = N         # attention and FFN active rows
    kv_tokens: sympy.Expr = N
    flops_dense: sympy.Expr = sympy.Integer(0)
    flops_planned: sympy.Expr = sympy.Integer(0)
    note: str = ""


@dataclass
class Plan:
    layers: list[LayerPlan] = field(default_factory=list)
    schedule: Schedule | None = None
    ltp_channels: int | None = None
    ltp_rank: int | None = None
    selector: str = "probe"

    @property
    def skipping(self) -> list[LayerPlan]:
        return [l for l in self.layers if l.mode == "skip"]

    def totals(self) -> tuple[sympy.Expr, sympy.Expr]:
        return (sympy.Add(*[l.flops_dense for l in self.layers]),
                sympy.Add(*[l.flops_planned for l in self.layers]))

    def kv_totals(self) -> tuple[sympy.Expr, sympy.Expr]:
        return sympy.Integer(len(self.layers)) * N, sympy.Add(*[l.kv_tokens for l in self.layers])

    def at(self, expr: sympy.Expr, n: int) -> float:
        return float(expr.subs(N, n))


def tokens(budget: Budget) -> sympy.Expr:
    if isinstance(budget, int):
        return sympy.Integer(budget)
    frac = Fraction(budget).limit_denominator(1 << 16)
    return sympy.floor(N * frac.numerator / frac.denominator)


def ltp_dims(schedule: Schedule, intermediate: int, hidden: int) -> tuple[int, int]:
    from spts_compile.config import GENERIC_LTP_CHANNEL_FRACTION, GENERIC_LTP_RANK_FRACTION
    channels = schedule.ltp_channels or max(1, int(intermediate * GENERIC_LTP_CHANNEL_FRACTION))
    channels = min(channels, intermediate)
    rank = schedule.ltp_rank or max(1, int(channels * GENERIC_LTP_RANK_FRACTION))
    return channels, min(rank, channels, hidden)


def make_plan(analysis: GraphAnalysis, schedule: Schedule, first_skip: int | None, selector: str = "probe") -> Plan:
    """first_skip: the first layer that will actually skip (start_layer, or later when a layer in the
    range could not be matched or verified); None when nothing skips. With selector "once" or "stage" the
    candidate set shrinks to each layer's budget for good and the layer runs dense on it (no prune, no LTP)."""
    plan = Plan(schedule=schedule, selector=selector)
    cand = N
    for spec in analysis.layers:
        lp = LayerPlan(index=spec.index, mode="dense")
        if first_skip is not None and spec.index >= first_skip:
            lp.mode = "skip"
            lp.stage = schedule.stage_of(spec.index) if schedule.msdp else 0
            lp.budget = schedule.budgets[lp.stage]
            lp.candidates = cand
            lp.active = sympy.Min(tokens(lp.budget), cand)
            if selector in KEEP_SET_SELECTORS:
                cand = lp.active
            elif schedule.is_stage_end(spec.index):
                lp.prune = schedule.prune[lp.stage]
                cand = cand - sympy.Min(tokens(lp.prune), cand - 1)
        elif spec.index >= schedule.start_layer and first_skip is None:
            lp.note = "dense: skipping is off for this graph"
        probes = first_skip is not None and (spec.index == first_skip or (
            selector == "stage" and spec.index > first_skip and schedule.starts_stage(spec.index)))
        _count_flops(lp, spec, schedule, plan, probes=probes)
        plan.layers.append(lp)
    return plan


def _count_flops(lp: LayerPlan, spec: LayerSpec, schedule: Schedule, plan: Plan, probes: bool = False) -> None:
    if spec.attn is None or spec.ffn is None:
        lp.flops_dense = lp.flops_planned = sympy.Integer(0)
        lp.note = lp.note or "not matched: FLOPs not counted"
        return
    a, f = spec.attn, spec.ffn
    d, hd, hq, hkv, inter = a.hidden, a.head_dim, a.n_heads, a.n_kv_heads, f.intermediate
    q_w, kv_w = hq * hd, hkv * hd

    def attention(rows):   # projections + causal core + output projection
        return 2 * rows * d * (q_w + 2 * kv_w) + 2 * q_w * rows ** 2 + 2 * rows * q_w * d

    def ffn(rows):
        return 6 * rows * d * inter

    lp.flops_dense = sympy.expand(attention(N) + ffn(N))
    if lp.mode == "dense":
        lp.flops_planned = lp.flops_dense
        lp.kv_tokens = N
        return
    c, m, p = lp.candidates, lp.active, schedule.probe_queries
    probe = 2 * c * d * kv_w + 2 * p * d * q_w + 2 * p * c * q_w
    lp.kv_tokens = m
    if plan.selector in KEEP_SET_SELECTORS:  # a probe over the candidates where it scores, then dense on m rows
        lp.flops_planned = (probe if probes else 0) + attention(m) + ffn(m) + 2 * d * q_w + 2 * m * q_w
        return
    if schedule.pap:
        attn = probe + 2 * m * d * (q_w + kv_w) + 2 * q_w * m ** 2 + 2 * m * q_w * d
    else:
        attn = attention(c) + (probe - 2 * c * d * kv_w if (schedule.ltp or schedule.msdp) else 0)
        lp.kv_tokens = c
    if schedule.ltp and plan.selector != "probe":  # baselines score the FFN with their attention scores
        ffn_cost = ffn(m)
    elif schedule.ltp:
        channels, rank = ltp_dims(schedule, inter, d)
        plan.ltp_channels, plan.ltp_rank = channels, rank
        ffn_cost = 2 * c * (2 * d * rank + 2 * rank * channels + channels * d) + ffn(m)
    else:
        ffn_cost = ffn(c)
    lp.flops_planned = attn + ffn_cost
