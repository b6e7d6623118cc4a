"""The PAP, LTP and MSDP rewrites.

Every skipping layer's region is replaced by a chain of calls to `spts_compile.runtime`:

    norm -> probe -> select -> gather -> attend (active rows) -> scatter          (PAP)
    norm -> ltp_score -> select -> gather -> ffn (active rows) -> scatter         (LTP)
    prune -> gather (stage ends)                                                  (MSDP)

The residual stream of the skipping layers is carried as (x_c, cand): the rows of the current
candidates and their original positions. Per-token side inputs (RoPE cos/sin, the model's own masks) are
read at `cand`'s positions, so after a prune every later layer sees only the surviving tokens. Each layer's
original output node is replaced by its full-length view, so the final norm, `output_hidden_states` and
`logits` keep their dense shapes; the layer's KV-cache outputs become its active-only K/V.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from spts_compile import runtime as rt

from .blocks import attention_args, ffn_args, graph_value
from .graph_utils import eliminate_dead_code, take_place
from .locate import GraphAnalysis, LayerSpec
from .outline import dense_regions, outline
from .plan import LayerPlan, Plan


@dataclass
class RewriteResult:
    rewritten_layers: list[int]
    record_names: list[tuple[int, str]]   # (layer, block) of each extra output appended for recording
    proxy_buffers: dict[int, list[int]]   # layer -> positions of its LTP proxy tensors in extra_inputs
    extra_inputs: list = None             # tensors appended to the graph's inputs (the LTP proxies)
    kv_layers: list = None                # layers whose cache positions are appended as outputs, in order
    shared_modules: dict = None           # layer (dense or skipping) -> the outlined module it calls (share_layers)

    def __post_init__(self):
        self.extra_inputs = [] if self.extra_inputs is None else self.extra_inputs
        self.kv_layers = [] if self.kv_layers is None else self.kv_layers
        self.shared_modules = {} if self.shared_modules is None else self.shared_modules


class _Builder:
    def __init__(self, graph: Graph, layer: int):
        self.graph, self.layer = graph, layer
        self.value = graph_value(graph)
        self.created: list[Node] = []   # the layer's region, for passes/outline.py

    def __call__(self, name: str, fn, *args) -> Node:
        return self._add(fn, args, name)

    def item(self, node: Node, i: int, name: str) -> Node:
        return self._add(operator.getitem, (node, i), name)

    def _add(self, fn, args, name: str) -> Node:
        node = self.graph.create_node("call_function", fn, args, {}, name=f"l{self.layer}_{name}")
        self.created.append(node)
        return node


@dataclass
class Stream:
    """The skipping layers' residual stream: candidate rows, their positions and bookkeeping nodes."""

    x: Node                       # [B, C, D] the candidates' rows
    cand: Node                    # [B, C] their original positions
    last: Node                    # [B] index of each row's last real token in cand
    n_ref: Node                   # [B, N] a tensor whose last dim is N (for fractional budgets)
    last_pos: Node                # [B] the last real token's position
    real: Node | None             # [B, C] which candidates are real tokens (None without padding)
    forced: Node | None = None    # [B, C] which candidates are always active (sink / window; None: none)
    base: Node | None = None      # full-length hidden states the pruned tokens froze in
    kept_scores: Node | None = None  # keep-set selectors: the latest probe scores of the kept candidates


@dataclass
class LayerContext:
    """What a selector sees when it emits a skipping layer's scores (`spts_compile.selectors`)."""

    layer: int
    x: Node
    cand: Node
    seed: int
    probe_scores: Node | None
    hn: Node | None = None        # the FFN's normed input, once the attention is done
    proxy: list | None = None     # the layer's LTP proxy inputs
    ffn_act: str | None = None
    real: Node | None = None
    pap: bool = True

    def ltp_scores(self, b, attn_scores):
        return b("ltp_score", rt.ltp_scores, self.hn, *self.proxy, self.ffn_act, attn_scores if self.pap else None,
                 self.real)


def rewrite(gm: GraphModule, analysis: GraphAnalysis, plan: Plan, cfg, proxies: dict[int, tuple],
            inline: Iterable[int] = ()) -> RewriteResult:
    """Rewrite gm in place. `proxies[layer]` holds the LTP proxy tensors of each skipping layer. With
    share_layers, the dense layers are outlined too (passes/outline.py), except those in `inline` (the ones
    causal cleanup rewrote: their new nodes carry no layer of their own)."""
    inline = set(inline)
    graph = gm.graph
    pairs = [(s, p) for s, p in zip(analysis.layers, plan.layers) if p.mode == "skip"]
    result = RewriteResult([], [], {})
    if not pairs:
        return result
    output = next(n for n in graph.nodes if n.op == "output")
    first = pairs[0][0]
    with graph.inserting_before(first.ffn.out):
        b = _Builder(graph, first.index)
        n_ref = b("positions", rt.initial_candidates, first.attn.x_in)
        last_pos = b("last_real", rt.last_real_position, first.attn.x_in, analysis.padding_mask)
        real = None if analysis.padding_mask is None else b("real", rt.real_candidates, analysis.padding_mask, n_ref)
        forced = b("forced", rt.forced_positions, n_ref, analysis.padding_mask, plan.schedule.sink,
                   plan.schedule.window) if plan.schedule.forces else None
    state = Stream(x=first.attn.x_in, cand=n_ref, last=last_pos, n_ref=n_ref, last_pos=last_pos, real=real,
                   forced=forced)
    records: list[Node] = []
    kv_positions: list[Node] = []
    emit = _rewrite_layer_keep_set if plan.selector.keeps_set else _rewrite_layer
    regions, carried = {}, {}
    for spec, lp in pairs:
        with graph.inserting_before(spec.ffn.out):
            b = _Builder(graph, spec.index)
            full, kv = emit(b, gm, spec, lp, plan, cfg, state, proxies, result, records, first.index)
            if spec.attn.k_out is not None:
                kv = _cache_rows(b, spec, *kv)
        regions[spec.index] = b.created
        carried[spec.index] = [state.x, state.cand, state.last, state.base, state.real, state.forced,
                               state.kept_scores]
        take_place(spec.ffn.out, full)
        if spec.attn.k_out is not None:
            output.replace_input_with(spec.attn.k_out, kv[0])
            output.replace_input_with(spec.attn.v_out, kv[1])
            spec.attn.k_out, spec.attn.v_out = kv[0], kv[1]
            kv_positions.append(kv[2])
            result.kv_layers.append(spec.index)
        result.rewritten_layers.append(spec.index)
    extra = records + kv_positions
    if extra:
        outs = output.args[0]
        output.args = ((*outs, *extra),) if isinstance(outs, (tuple, list)) else ((outs, *extra),)
    if cfg.share_layers:   # before the dead code goes, so that a stage's last layer keeps its stage's code
        dense = dense_regions(graph, [s.index for s, p in zip(analysis.layers, plan.layers)
                                      if p.mode == "dense" and s.index not in inline])
        replaced, result.shared_modules = outline(gm, {**dense, **regions}, carried)
        for spec in analysis.layers:   # the dense layers' caches moved into their modules too
            if spec.attn is not None and spec.attn.k_out is not None:
                spec.attn.k_out = replaced.get(spec.attn.k_out, spec.attn.k_out)
                spec.attn.v_out = replaced.get(spec.attn.v_out, spec.attn.v_out)
    eliminate_dead_code(graph)
    graph.lint()
    gm.recompile()
    return result


def _cache_rows(b, spec: LayerSpec, k, v, pos):
    """What the layer's cache keeps: its K/V rows and their original positions [B, M], cut to the newest
    `keep` rows on a sliding-window cache (the rows a later query can still see are among them: the kept
    positions are sorted)."""
    keep = spec.attn.cache.keep if spec.attn.cache is not None else None
    if keep is None:
        return k, v, pos
    return (b("cache_k", rt.newest_rows, k, 2, keep), b("cache_v", rt.newest_rows, v, 2, keep),
            b("cache_pos", rt.newest_rows, pos, 1, keep))


def _record(b, cfg, records, result, layer: int, block: str, fn, *args) -> None:
    """With record_selection: one more graph output, the original positions `fn(*args)` a block ran on."""
    if cfg.record_selection:
        records.append(b(f"kept_{block}", fn, *args))
        result.record_names.append((layer, block))


def _smoothed(b, schedule, scores: Node) -> Node:
    """The retrieval options' smoothing of a selection score (SEMANTICS.md, "Retrieval protection")."""
    return b("smooth", rt.smooth_scores, scores, schedule.pool, schedule.pool_kind) if schedule.pool > 1 else scores


def _forced(b, state: Stream, scores: Node, name: str) -> Node:
    """Sink and window tokens score +inf: active in every top-M, never pruned."""
    return scores if state.forced is None else b(f"force_{name}", rt.force_rows, scores, state.forced)


def _keep(b, state: Stream, keep: Node, prefix: str) -> None:
    """The per-candidate side inputs follow a selection of the candidates that stays for good."""
    if state.real is not None:
        state.real = b(f"{prefix}_real", torch.gather, state.real, 1, keep)
    if state.forced is not None:
        state.forced = b(f"{prefix}_forced", torch.gather, state.forced, 1, keep)


def _rewrite_layer(b, gm, spec: LayerSpec, lp: LayerPlan, plan: Plan, cfg, state: Stream, proxies, result,
                   records, first: int):
    """Per-layer selection: probe -> select -> gather -> attend -> scatter, then the same for the FFN."""
    schedule, selector = plan.schedule, plan.selector
    a, f = attention_args(spec.attn, b.value), ffn_args(spec.ffn, b.value)
    x, cand, last = state.x, state.cand, state.last
    # ---- attention (PAP) ------------------------------------------------------------------------------
    xn = b("attn_norm", rt.norm_apply, x, a.norm)
    # The probe's K rows feed the attention in every case; its scores feed PAP, LTP and the prune.
    probe = b("probe", rt.probe_attention, *a.probe(xn, cand, last, schedule.probe_queries, schedule.heads, state.real))
    k_all = b.item(probe, 0, "probe_k")
    ctx = LayerContext(layer=spec.index, x=x, cand=cand, seed=cfg.seed, probe_scores=b.item(probe, 1, "probe_score"),
                       ffn_act=f.act, real=state.real, pap=schedule.pap)
    scores = _smoothed(b, schedule, selector.attn_scores(b, ctx))
    chosen = _forced(b, state, scores, "attn")       # what the attention's top-M and the prune rank
    v_all = None
    if schedule.pap:
        act = b("select", rt.select_active, chosen, last, lp.budget, state.n_ref)
        xa = b("gather", rt.gather_rows, xn, act)
        if schedule.kv_cache == "candidates":
            v_all = b("values", rt.project_heads, *a.values(xn))
    else:
        act = b("all_rows", rt.initial_candidates, x)
        xa = xn
    attn = b("attend", rt.attend_active, *a.attend(xa, act, cand, k_all, v_all))
    delta, k_act, v_act = (b.item(attn, i, n) for i, n in enumerate(("attn_out", "k_active", "v_active")))
    kv_pos = None
    if v_all is not None:   # the cache keeps every candidate's K/V, at their original positions
        k_act, v_act = k_all, v_all
        kv_pos = cand
    h = b("scatter", rt.scatter_add_rows, x, act, delta)
    _record(b, cfg, records, result, spec.index, "attn", torch.gather, cand, 1, act)
    # ---- FFN (LTP) ------------------------------------------------------------------------------------
    hn = b("ffn_norm", rt.norm_apply, h, f.norm)
    if schedule.ltp:
        ctx.hn = hn
        if selector.uses_proxy:
            ctx.proxy = _proxy_nodes(gm, b, spec.index, proxies[spec.index], result)
        s_ffn = _forced(b, state, selector.ffn_scores(b, ctx, scores), "ffn")
        act_f = b("ffn_select", rt.select_active, s_ffn, last, lp.budget, state.n_ref)
        ha = b("ffn_gather", rt.gather_rows, hn, act_f)
        fo = b("ffn", rt.ffn_rows, *f.ffn(ha))
        y = b("ffn_scatter", rt.scatter_add_rows, h, act_f, fo)
        _record(b, cfg, records, result, spec.index, "ffn", torch.gather, cand, 1, act_f)
    else:
        y = b("ffn_residual", torch.add, h, b("ffn", rt.ffn_rows, *f.ffn(hn)))
    # ---- full-length view, and MSDP prune at a stage end ---------------------------------------------
    full = y if state.base is None else b("restore", rt.scatter_rows, state.base, cand, y)
    if lp.prune is not None:
        keep = b("prune", rt.prune_keep, chosen, last, lp.prune, state.n_ref, state.real)
        state.base = full
        state.cand = b("prune_cand", torch.gather, cand, 1, keep)
        _keep(b, state, keep, "prune")
        state.x = b("prune_rows", rt.gather_rows, y, keep)
        state.last = b("prune_last", rt.locate_in_candidates, state.cand, state.last_pos)
    else:
        state.x = y
    if kv_pos is None and spec.attn.k_out is not None:
        kv_pos = b("kv_positions", torch.gather, cand, 1, act)
    return full, (k_act, v_act, kv_pos)


def _rewrite_layer_keep_set(b, gm, spec, lp, plan: Plan, cfg, state: Stream, proxies, result, records, first: int):
    """Keep-set selectors: where the selector rescores, the probe ranks the remaining candidates; every
    skipping layer keeps its budget of them for good and runs dense on them."""
    schedule = plan.schedule
    a, f = attention_args(spec.attn, b.value), ffn_args(spec.ffn, b.value)
    x, cand, last = state.x, state.cand, state.last
    if plan.selector.rescores(spec.index, schedule, first):
        xn0 = b("attn_norm0", rt.norm_apply, x, a.norm)
        probe = b("probe", rt.probe_attention, *a.probe(xn0, cand, last, schedule.probe_queries, schedule.heads,
                                                         state.real))
        scores = _smoothed(b, schedule, b.item(probe, 1, "probe_score"))
        if state.real is not None:   # padding never competes for the kept set (a pooled score would lift it)
            scores = b("once_padding", rt.padding_loses, scores, state.real)
        state.kept_scores = _forced(b, state, scores, "once")
    keep = b("select_once", rt.select_active, state.kept_scores, last, lp.budget, state.n_ref)
    base = b("once_before", rt.scatter_rows, state.base, cand, x) if state.base is not None else x
    state.base = base
    cand = b("once_cand", torch.gather, cand, 1, keep)
    x = b("once_rows", rt.gather_rows, x, keep)
    state.kept_scores = b("once_scores", torch.gather, state.kept_scores, 1, keep)
    _keep(b, state, keep, "once")
    last = b("once_last", rt.locate_in_candidates, cand, state.last_pos)
    for block in ("attn", "ffn"):  # both blocks run on every kept row
        _record(b, cfg, records, result, spec.index, block, torch.clone, cand)
    xn = b("attn_norm", rt.norm_apply, x, a.norm)
    probe = b("keys", rt.probe_attention, *a.probe(xn, cand, last, 1))
    act = b("all_rows", rt.initial_candidates, x)
    attn = b("attend", rt.attend_active, *a.attend(xn, act, cand, b.item(probe, 0, "probe_k")))
    h = b("attn_residual", torch.add, x, b.item(attn, 0, "attn_out"))
    hn = b("ffn_norm", rt.norm_apply, h, f.norm)
    y = b("ffn_residual", torch.add, h, b("ffn", rt.ffn_rows, *f.ffn(hn)))
    state.x, state.cand, state.last = y, cand, last
    full = b("restore", rt.scatter_rows, base, cand, y)
    return full, (b.item(attn, 1, "k_active"), b.item(attn, 2, "v_active"), cand)


def _proxy_nodes(gm: GraphModule, b, layer: int, tensors, result) -> list[Node]:
    """The LTP proxy tensors become extra graph inputs, appended after Dynamo's own: the runner passes
    them on every call, so rebuilding them in place after a weight change takes effect at once."""
    graph = gm.graph
    nodes = []
    for i, t in enumerate(tensors):
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last):
            node = graph.placeholder(f"spts_ltp_l{layer}_{i}")
        node._dynamo_source = None  # not a user input: AOTAutograd must not look for a Dynamo source
        node.meta["example_value"] = t
        nodes.append(node)
        result.extra_inputs.append(t)
    result.proxy_buffers[layer] = list(range(len(result.extra_inputs) - len(tensors), len(result.extra_inputs)))
    return nodes
