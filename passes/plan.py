"""MSDP planning: which layers skip, their budgets and prunes, and the FLOPs it saves.

Budgets are sympy expressions in the prompt length N, built with the same integer arithmetic the
runtime helpers use (`min(b, C)`, `N * p // q`), so the plan's numbers are the graph's numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import sympy

from spts_compile import families
from spts_compile.config import GENERIC_LTP_CHANNEL_FRACTION, GENERIC_LTP_RANK_FRACTION, Budget, Schedule
from spts_compile.selectors import Selector

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
    selector: Selector | None = None

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
    channels = schedule.ltp_channels or max(1, int(intermediate * GENERIC_LTP_CHANNEL_FRACTION))
    channels = min(channels, intermediate)
    rank = schedule.ltp_rank or max(1, int(channels * GENERIC_LTP_RANK_FRACTION))
    return channels, min(rank, channels, hidden)


@dataclass
class Gate:
    """Whether this graph skips at all, and why not."""

    skipping: bool
    reason: str | None = None
    warn: bool = False   # the reason deserves a warning (not just a line in the dumps)


def gate(analysis: GraphAnalysis, schedule: Schedule, cfg) -> Gate:
    """Only a prefill skips, of at least min_tokens (when the length is static), with options that skip. A
    sliding-window cache keeps the newest rows of the layer's kept tokens (rewrite._cache_rows)."""
    static_n = analysis.seq_len if isinstance(analysis.seq_len, int) else None
    if analysis.kind != "prefill":
        return Gate(False, analysis.reason)
    if not cfg.skipping:
        return Gate(False)
    if static_n is not None and static_n < schedule.min_tokens:
        return Gate(False, f"prompt of {static_n} tokens is shorter than min_tokens={schedule.min_tokens}: dense")
    return Gate(True)


def layers_to_verify(analysis: GraphAnalysis, schedule: Schedule, skipping: bool, cleans_up) -> list[LayerSpec]:
    """The layers the passes will touch: the skipping range, and dense layers the clean-up may rewrite
    (`cleans_up(layer)`)."""
    return [l for l in analysis.layers if l.matched and (
        (skipping and l.index >= schedule.start_layer) or cleans_up(l))]


def first_skipping_layer(analysis: GraphAnalysis, start: int) -> int | None:
    """Skipping needs every layer from the first skipping one to the last to be matched and verified."""
    first = None
    for l in reversed(analysis.layers):
        if l.index < start or not (l.matched and l.verified):
            break
        first = l.index
    return first


def make_plan(analysis: GraphAnalysis, schedule: Schedule, first_skip: int | None, selector: Selector) -> Plan:
    """first_skip: the first layer that will actually skip (start_layer, or later when a layer in the
    range could not be matched or verified); None when nothing skips. A keep-set selector shrinks the
    candidate set to each layer's budget for good (no prune); the others prune at stage ends."""
    plan = Plan(schedule=schedule, selector=selector)
    if first_skip is not None and schedule.ltp and selector.uses_proxy:
        spec = analysis.layers[first_skip]
        plan.ltp_channels, plan.ltp_rank = ltp_dims(schedule, spec.ffn.intermediate, spec.attn.hidden)
    cand = N
    for spec in analysis.layers:
        lp = LayerPlan(index=spec.index, mode="dense")
        if first_skip is not None and spec.index >= first_skip:
            lp.mode = "skip"
            lp.stage = schedule.stage_of(spec.index) if schedule.msdp else 0
            lp.budget = schedule.budgets[lp.stage]
            lp.candidates = cand
            lp.active = sympy.Min(tokens(lp.budget), cand)
            if selector.keeps_set:
                cand = lp.active
            elif schedule.is_stage_end(spec.index):
                lp.prune = schedule.prune[lp.stage]
                cand = cand - sympy.Min(tokens(lp.prune), cand - 1)
        elif spec.index < schedule.start_layer:
            lp.note = f"dense by the schedule (before start_layer={schedule.start_layer})"
        elif first_skip is None:
            lp.note = "dense: nothing skips in this graph (see its reason)"
        else:
            lp.note = (f"dense: skipping starts at layer {first_skip}, after the last layer that could not be "
                       "matched or verified (every skipping layer's successors must be)")
        _count_flops(lp, spec, schedule, selector, first_skip)
        plan.layers.append(lp)
    return plan


class LayerCost:
    """Matmul FLOPs of one layer's pieces, as functions of their row counts (2 FLOPs per multiply-add)."""

    def __init__(self, spec: LayerSpec, schedule: Schedule):
        a, f = spec.attn, spec.ffn
        self.d, self.inter = a.hidden, f.intermediate
        self.q_w, self.kv_w = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        self.ffn_matmuls = families.FFN_MATMULS[f.kind]
        self.schedule = schedule

    def attention(self, rows):
        """Projections, causal core and output projection on `rows` tokens."""
        return 2 * rows * self.d * (self.q_w + 2 * self.kv_w) + 2 * self.q_w * rows ** 2 + 2 * rows * self.q_w * self.d

    def attention_on(self, m):
        """The attention on m active rows whose K the probe already computed: Q and V, core, output."""
        d, q_w = self.d, self.q_w
        return 2 * m * d * (q_w + self.kv_w) + 2 * q_w * m ** 2 + 2 * m * q_w * d

    def values(self, rows):
        """The V projection of `rows` tokens."""
        return 2 * rows * self.d * self.kv_w

    def ffn(self, rows):
        return 2 * self.ffn_matmuls * rows * self.d * self.inter

    def probe(self, c):
        """PAP's probe over c candidates: K for all of them, the probe rows' queries and their logits."""
        return 2 * c * self.d * self.kv_w + self.probe_scores(c)

    def probe_scores(self, c):
        """The probe without the K projection (when the attention computes K anyway)."""
        p = sympy.Min(self.schedule.probe_queries, c)   # the runtime never probes with more rows than candidates
        return 2 * p * self.d * self.q_w + 2 * p * c * self.q_w

    def last_query(self, m):
        """One query's projection and logits over m keys (the keep-set layer's one-row probe)."""
        return 2 * self.d * self.q_w + 2 * m * self.q_w

    def ltp_proxy(self, c):
        channels, rank = ltp_dims(self.schedule, self.inter, self.d)
        return 2 * c * (2 * self.d * rank + 2 * rank * channels + channels * self.d)


def _count_flops(lp: LayerPlan, spec: LayerSpec, schedule: Schedule, selector: Selector, first_skip) -> None:
    if spec.attn is None or spec.ffn is None:
        lp.flops_dense = lp.flops_planned = sympy.Integer(0)
        lp.note = lp.note or "not matched: FLOPs not counted"
        return
    cost = LayerCost(spec, schedule)
    lp.flops_dense = sympy.expand(cost.attention(N) + cost.ffn(N))
    if lp.mode == "dense":
        lp.flops_planned, lp.kv_tokens = lp.flops_dense, N
        return
    rescores = selector.keeps_set and selector.rescores(spec.index, schedule, first_skip)
    lp.flops_planned = selector.layer_flops(cost, lp, schedule, rescores)
    lp.kv_tokens = selector.kv_tokens(lp, schedule)
