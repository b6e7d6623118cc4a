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

from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from spts_compile import runtime as rt
from spts_compile.config import KEEP_SET_SELECTORS

from .graph_utils import eliminate_dead_code
from .locate import GraphAnalysis, LayerSpec, NormSpec, materialize
from .plan import LayerPlan, Plan


@dataclass
class RewriteResult:
    rewritten_layers: list[int]
    record_names: list[tuple[int, str]]   # (layer, block) of each extra output appended for recording
    proxy_buffers: dict[int, list[int]]   # layer -> positions of its LTP proxy tensors in extra_inputs
    extra_inputs: list = None             # tensors appended to the graph's inputs (the LTP proxies)

    def __post_init__(self):
        self.extra_inputs = [] if self.extra_inputs is None else self.extra_inputs


class _Builder:
    def __init__(self, graph: Graph, layer: int):
        self.graph, self.layer = graph, layer

    def __call__(self, name: str, fn, *args) -> Node:
        return self.graph.create_node("call_function", fn, args, {}, name=f"l{self.layer}_{name}")

    def item(self, node: Node, i: int, name: str) -> Node:
        import operator
        return self.graph.create_node("call_function", operator.getitem, (node, i), {}, name=f"l{self.layer}_{name}")


def _norm(spec: NormSpec | None):
    return None if spec is None else spec.args()


def rewrite(gm: GraphModule, analysis: GraphAnalysis, plan: Plan, cfg, proxies: dict[int, tuple]) -> RewriteResult:
    """Rewrite gm in place. `proxies[layer]` holds the LTP proxy tensors of each skipping layer."""
    graph = gm.graph
    schedule = plan.schedule
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
    state = dict(x=first.attn.x_in, cand=n_ref, last=last_pos, base=None, once_scores=None, real=real)
    records: list[Node] = []
    for spec, lp in pairs:
        with graph.inserting_before(spec.ffn.out):
            b = _Builder(graph, spec.index)
            full, kv = _rewrite_layer(b, gm, spec, lp, schedule, cfg, state, n_ref, last_pos, proxies, result,
                                      records, first is spec)
        spec.ffn.out.replace_all_uses_with(full)
        if spec.attn.k_out is not None:
            output.replace_input_with(spec.attn.k_out, kv[0])
            output.replace_input_with(spec.attn.v_out, kv[1])
        result.rewritten_layers.append(spec.index)
    if records:
        outs = output.args[0]
        output.args = ((*outs, *records),) if isinstance(outs, (tuple, list)) else ((outs, *records),)
    eliminate_dead_code(graph)
    graph.lint()
    gm.recompile()
    return result


def _rewrite_layer(b, gm, spec: LayerSpec, lp: LayerPlan, schedule, cfg, state, n_ref, last_pos, proxies,
                   result, records, is_first):
    a, f = materialize(b.graph, _causal_view(spec.attn)), materialize(b.graph, spec.ffn)
    x, cand, last = state["x"], state["cand"], state["last"]
    selector = cfg.selector
    # ---- keep-set modes: probe at the first skipping layer ("once") or at each stage start ("stage") --
    if selector in KEEP_SET_SELECTORS:
        return _rewrite_layer_keep_set(b, spec, lp, schedule, state, n_ref, last_pos, records, result, is_first, cfg)
    # ---- attention (PAP) ------------------------------------------------------------------------------
    xn = b("attn_norm", rt.norm_apply, x, _norm(a.norm))
    # The probe's K rows feed the attention in every case; its scores feed PAP, LTP and the prune.
    probe = b("probe", rt.probe_attention, xn, cand, last, a.cos, a.sin, a.mask, a.wq, a.bq, a.wk, a.bk,
              _norm(a.q_norm), _norm(a.k_norm), a.head_dim, a.scale, schedule.probe_queries)
    k_all, scores = b.item(probe, 0, "probe_k"), b.item(probe, 1, "probe_score")
    if selector != "probe":
        scores = b("baseline_score", rt.baseline_scores, selector, x, cand, spec.index, cfg.seed)
    if schedule.pap:
        act = b("select", rt.select_active, scores, last, lp.budget, n_ref)
        xa = b("gather", rt.gather_rows, xn, act)
    else:
        act = b("all_rows", rt.initial_candidates, x)
        xa = xn
    attn = b("attend", rt.attend_active, xa, act, cand, k_all, a.cos, a.sin, a.mask, a.wq, a.bq, a.wv, a.bv,
             a.wo, a.bo, _norm(a.q_norm), _norm(a.post_norm), a.head_dim, a.scale)
    delta, k_act, v_act = (b.item(attn, i, n) for i, n in enumerate(("attn_out", "k_active", "v_active")))
    h = b("scatter", rt.scatter_add_rows, x, act, delta)
    if cfg.record_selection:
        records.append(b("kept_attn", torch.gather, cand, 1, act))
        result.record_names.append((spec.index, "attn"))
    # ---- FFN (LTP) ------------------------------------------------------------------------------------
    hn = b("ffn_norm", rt.norm_apply, h, _norm(f.norm))
    if schedule.ltp:
        if selector == "probe":
            consts = _proxy_nodes(gm, b, spec.index, proxies[spec.index], result)
            s_ffn = b("ltp_score", rt.ltp_scores, hn, *consts, f.act, scores if schedule.pap else None,
                      state["real"])
        else:
            s_ffn = scores
        act_f = b("ffn_select", rt.select_active, s_ffn, last, lp.budget, n_ref)
        ha = b("ffn_gather", rt.gather_rows, hn, act_f)
        fo = b("ffn", rt.ffn_rows, ha, f.w_gate, f.w_up, f.w_down, f.act, _norm(f.post_norm))
        y = b("ffn_scatter", rt.scatter_add_rows, h, act_f, fo)
        if cfg.record_selection:
            records.append(b("kept_ffn", torch.gather, cand, 1, act_f))
            result.record_names.append((spec.index, "ffn"))
    else:
        fo = b("ffn", rt.ffn_rows, hn, f.w_gate, f.w_up, f.w_down, f.act, _norm(f.post_norm))
        y = b("ffn_residual", torch.add, h, fo)
    # ---- full-length view, and MSDP prune at a stage end ---------------------------------------------
    full = y if state["base"] is None else b("restore", rt.scatter_rows, state["base"], cand, y)
    if lp.prune is not None:
        keep = b("prune", rt.prune_keep, scores, last, lp.prune, n_ref, state["real"])
        state["base"] = full
        state["cand"] = b("prune_cand", torch.gather, cand, 1, keep)
        if state["real"] is not None:
            state["real"] = b("prune_real", torch.gather, state["real"], 1, keep)
        state["x"] = b("prune_rows", rt.gather_rows, y, keep)
        state["last"] = b("prune_last", rt.locate_in_candidates, state["cand"], last_pos)
    else:
        state["x"] = y
    return full, (k_act, v_act)


def _rewrite_layer_keep_set(b, spec, lp, schedule, state, n_ref, last_pos, records, result, is_first, cfg):
    """Keep-set modes. "once" (GemFilter-like): score tokens with the first skipping layer's probe only,
    shrink the candidate set to each stage's budget by that score, and run every layer dense on it.
    "stage": the same, but the first layer of every stage probes its (remaining) candidates again."""
    a, f = materialize(b.graph, _causal_view(spec.attn)), materialize(b.graph, spec.ffn)
    x, cand, last = state["x"], state["cand"], state["last"]
    if is_first or (cfg.selector == "stage" and schedule.starts_stage(spec.index)):
        xn0 = b("attn_norm0", rt.norm_apply, x, _norm(a.norm))
        probe = b("probe", rt.probe_attention, xn0, cand, last, a.cos, a.sin, a.mask, a.wq, a.bq, a.wk, a.bk,
                  _norm(a.q_norm), _norm(a.k_norm), a.head_dim, a.scale, schedule.probe_queries)
        state["once_scores"] = b.item(probe, 1, "probe_score")
    keep = b("select_once", rt.select_active, state["once_scores"], last, lp.budget, n_ref)
    base = b("restore_before", rt.scatter_rows, state["base"], cand, x) if state["base"] is not None else x
    state["base"] = base
    cand = b("once_cand", torch.gather, cand, 1, keep)
    x = b("once_rows", rt.gather_rows, x, keep)
    state["once_scores"] = b("once_scores", torch.gather, state["once_scores"], 1, keep)
    if state["real"] is not None:
        state["real"] = b("once_real", torch.gather, state["real"], 1, keep)
    last = b("once_last", rt.locate_in_candidates, cand, last_pos)
    if cfg.record_selection:  # both blocks run on every kept row
        for block in ("attn", "ffn"):
            records.append(b(f"kept_{block}", torch.clone, cand))
            result.record_names.append((spec.index, block))
    xn = b("attn_norm", rt.norm_apply, x, _norm(a.norm))
    probe = b("keys", rt.probe_attention, xn, cand, last, a.cos, a.sin, a.mask, a.wq, a.bq, a.wk, a.bk,
              _norm(a.q_norm), _norm(a.k_norm), a.head_dim, a.scale, 1)
    act = b("all_rows", rt.initial_candidates, x)
    attn = b("attend", rt.attend_active, xn, act, cand, b.item(probe, 0, "probe_k"), a.cos, a.sin, a.mask, a.wq,
             a.bq, a.wv, a.bv, a.wo, a.bo, _norm(a.q_norm), _norm(a.post_norm), a.head_dim, a.scale)
    h = b("attn_residual", torch.add, x, b.item(attn, 0, "attn_out"))
    hn = b("ffn_norm", rt.norm_apply, h, _norm(f.norm))
    y = b("ffn_residual", torch.add, h, b("ffn", rt.ffn_rows, hn, f.w_gate, f.w_up, f.w_down, f.act,
                                          _norm(f.post_norm)))
    state.update(x=y, cand=cand, last=last)
    full = b("restore", rt.scatter_rows, base, cand, y)
    return full, (b.item(attn, 1, "k_active"), b.item(attn, 2, "v_active"))


def _causal_view(a):
    """A mask built in-graph from aranges alone is plain causal: read it from candidate order instead of
    gathering from a materialised [N, N] tensor."""
    from dataclasses import replace
    from .cleanup import is_builtin_causal
    return replace(a, mask=None) if is_builtin_causal(a.mask) else a


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
