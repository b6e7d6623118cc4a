"""How a skipping layer chooses its tokens: one registered unit per strategy.

A selector declares everything the other parts ask of it, so that no code outside this file compares
selector names:
- how it scores (`attn_scores`, `ffn_scores`: the graph nodes it emits into a skipping layer);
- whether it keeps a set for good (`keeps_set`: the layer then runs dense on the kept tokens, with no LTP
  and no stage-end prune) and, if so, at which layers it scores again (`rescores`);
- whether it needs the LTP proxy (`uses_proxy`, built at compile time when LTP is on);
- what the plan counts for it (`layer_flops`, `kv_tokens`).

A new selector is a few lines: subclass `Selector` (or give `ScoreSelector` a score function of the
candidates' rows) and `register` it. The names are what `options={"selector": ...}` accepts.
"""
from __future__ import annotations

from typing import Callable

import torch


class Selector:
    """The paper's way, for per-layer selection: PAP's probe scores choose the attention rows and feed the
    stage-end prune. Subclasses change the scores, or keep a set (`KeepSetSelector`)."""

    name = ""
    keeps_set = False
    uses_proxy = False
    # How the probe scores when the options leave it unset: the paper's single last-token query, the mean over
    # heads, no smoothing. Every key of SPTSConfig's scoring fields (probe_queries, heads, pool, pool_kind).
    defaults = dict(probe_queries=1, heads="mean", pool=1, pool_kind="avg")

    # -- the rewrite: which nodes a skipping layer's selection emits (`ctx`: rewrite.LayerContext) ---------
    def attn_scores(self, b, ctx):
        """[B, C] scores for the attention's top-M and the stage-end prune. Default: the probe's S_mha."""
        return ctx.probe_scores

    def ffn_scores(self, b, ctx, attn_scores):
        """[B, C] scores for the FFN's top-M. Default: the attention's."""
        return attn_scores

    def rescores(self, layer: int, schedule, first_skip: int) -> bool:
        """Keep-set selectors: whether `layer` probes its candidates again before keeping its top M."""
        return layer == first_skip

    # -- the plan ---------------------------------------------------------------------------------------
    def layer_flops(self, cost, lp, schedule, rescores: bool):
        """Planned FLOPs of a skipping layer (`cost`: plan.LayerCost; `lp`: its LayerPlan)."""
        c, m = lp.candidates, lp.active
        if schedule.pap:
            attn = cost.probe(c) + cost.attention_on(m)
            if schedule.kv_cache == "candidates":   # V for every candidate, not only the active rows
                attn += cost.values(c) - cost.values(m)
        else:
            attn = cost.attention(c) + (cost.probe_scores(c) if (schedule.ltp or schedule.msdp) else 0)
        ffn = cost.ffn(m) + self.ffn_score_flops(cost, c) if schedule.ltp else cost.ffn(c)
        return attn + ffn

    def ffn_score_flops(self, cost, c):
        return 0

    def kv_tokens(self, lp, schedule):
        return lp.active if schedule.pap and schedule.kv_cache == "active" else lp.candidates


class ProbeSelector(Selector):
    """SPTS: PAP's probe for attention and the prune, LTP's proxy times S_mha for the FFN."""

    name = "probe"
    uses_proxy = True

    def ffn_scores(self, b, ctx, attn_scores):
        return ctx.ltp_scores(b, attn_scores)

    def ffn_score_flops(self, cost, c):
        return cost.ltp_proxy(c)


class ScoreSelector(Selector):
    """A per-layer selector given by a score function `score(x_c, cand, layer, seed) -> [B, C]` of the
    candidates' rows [B, C, D] and original positions [B, C]: higher is kept. It replaces the probe's
    scores for attention, FFN and prune; the probe still runs, for the K rows attention needs."""

    def __init__(self, name: str, score: Callable):
        self.name, self.score = name, score

    def attn_scores(self, b, ctx):
        return b("select_score", self.score, ctx.x, ctx.cand, ctx.layer, ctx.seed)


class KeepSetSelector(Selector):
    """Keep-set modes: at the layers where it scores, the probe ranks the remaining candidates; each skipping
    layer keeps its stage's budget of them for good and runs dense on them (no LTP proxy, no prune).
    `every_stage=False`: score at the first skipping layer only ("once", GemFilter-like); True: again at the
    first layer of each later stage ("stage")."""

    keeps_set = True
    # Retrieval-safe scoring (README "The default and the paper"): the last 64 tokens' queries (the question),
    # the largest weight any head gives, max-pooled over 25 neighbours so that a needle is kept whole.
    defaults = dict(probe_queries=64, heads="max", pool=25, pool_kind="max")

    def __init__(self, name: str, every_stage: bool):
        self.name, self.every_stage = name, every_stage

    def rescores(self, layer, schedule, first_skip):
        return layer == first_skip or (self.every_stage and layer > first_skip and schedule.starts_stage(layer))

    def layer_flops(self, cost, lp, schedule, rescores):
        m = lp.active
        return (cost.probe(lp.candidates) if rescores else 0) + cost.attention(m) + cost.ffn(m) + cost.last_query(m)

    def kv_tokens(self, lp, schedule):
        return lp.active


# ---------------------------------------------------------------------------------------------
# Baseline score functions: the same budgets, simpler rules
# ---------------------------------------------------------------------------------------------
def recent_scores(x_c, cand, layer: int, seed: int):
    """Keep the latest tokens."""
    return cand.to(torch.float32)


def norm_scores(x_c, cand, layer: int, seed: int):
    """Keep the tokens with the largest hidden-state norms."""
    return x_c.to(torch.float32).norm(dim=-1)


def random_scores(x_c, cand, layer: int, seed: int):
    """A fixed hash of (position, layer, seed): deterministic and graph-friendly."""
    h = torch.sin(cand.to(torch.float64) * 12.9898 + (layer * 78.233 + seed * 3.7)) * 43758.5453
    return (h - torch.floor(h)).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Selector] = {}


def register(selector: Selector) -> Selector:
    """Make `selector` available as `options={"selector": selector.name}`. Re-registering a name replaces it."""
    if not isinstance(selector, Selector):
        raise ValueError(f"spts: a selector must be a spts_compile.selectors.Selector, got {type(selector).__name__}")
    if not isinstance(selector.name, str) or not selector.name:
        raise ValueError(f"spts: a selector needs a non-empty str name, got {selector.name!r}")
    _REGISTRY[selector.name] = selector
    return selector


def get(name: str) -> Selector:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"spts: selector must be one of {names()}, got {name!r}") from None


def names() -> list[str]:
    return list(_REGISTRY)


def baselines() -> list[str]:
    """The selectors the benchmarks compare the default with: every registered one but the default."""
    from .config import SPTSConfig
    return [n for n in _REGISTRY if n != SPTSConfig.selector]


register(ProbeSelector())
register(ScoreSelector("recent", recent_scores))
register(ScoreSelector("norm", norm_scores))
register(ScoreSelector("random", random_scores))
register(KeepSetSelector("once", every_stage=False))
register(KeepSetSelector("stage", every_stage=True))
