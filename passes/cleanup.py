"""Dense clean-up that is always safe: a causal mask built in-graph becomes `is_causal=True` SDPA.

When the user passed no mask, Hugging Face models under tracing may still materialise an [N, N] causal
mask (always, for eager attention). On CPU that mask makes attention about 2x slower at 4K. A layer whose
mask is built from nothing but aranges and comparisons of query and key indices (no sliding window, no
user tensor) gets its attention block replaced by the canonical block with `is_causal=True`. The layer must
have been verified by execution first. This is reported separately from skipping.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from spts_compile import runtime as rt

from .graph_utils import ancestors, eliminate_dead_code, example_value
from .locate import GraphAnalysis, LayerSpec, materialize

# Ops a pure causal mask is built from: index ranges, `kv <= q`, broadcasting, and the dtype conversion.
_CAUSAL_OPS = {"arange", "add", "getitem", "le", "ge", "new_ones", "and_", "to", "expand", "where", "zeros",
               "zeros_like", "full", "unsqueeze", "view", "reshape", "__and__", "logical_and", "_set_grad_enabled",
               "float", "bool", "contiguous", "__getitem__", "iand", "__iand__", "index_select", "size",
               "masked_fill", "tensor", "scalar_tensor"}


def _op_name(n: Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def is_builtin_causal(mask: Node | None) -> bool:
    """True when the mask reads no user tensor and is made only of causal-mask ops."""
    if mask is None:
        return False
    for a in ancestors(mask) | {mask}:
        if a.op == "placeholder":
            v = example_value(a)
            if isinstance(v, torch.Tensor):
                return False
            continue
        if a.op in ("call_function", "call_method") and _op_name(a) not in _CAUSAL_OPS:
            return False
        if _op_name(a) == "add" and any(isinstance(x, (int, float)) and x != 0 for x in a.args):
            return False  # an offset other than 0 means a cache offset or a window
    return True


def wants(layer: LayerSpec) -> bool:
    return layer.attn is not None and is_builtin_causal(layer.attn.mask)


def apply(gm: GraphModule, analysis: GraphAnalysis, plan, verified_from: GraphAnalysis | None = None) -> list[int]:
    """Rewrite every dense, verified layer that wants it. Returns the layers rewritten."""
    verdicts = {l.index: l.verified for l in (verified_from or analysis).layers}
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    done = []
    for i, spec in enumerate(analysis.layers):
        dense = plan is None or plan.layers[i].mode == "dense"
        if not (dense and spec.matched and verdicts.get(spec.index) and wants(spec)):
            continue
        with graph.inserting_before(spec.attn.out):
            a = materialize(graph, spec.attn)
            call = graph.create_node("call_function", rt.attend_all, (
                a.x_in, a.cos, a.sin, None, a.wq, a.bq, a.wk, a.bk, a.wv, a.bv, a.wo, a.bo, a.norm.args(),
                a.q_norm and a.q_norm.args(), a.k_norm and a.k_norm.args(), a.post_norm and a.post_norm.args(),
                a.head_dim, a.scale), {}, name=f"l{spec.index}_attend_causal")
            h, k, v = (graph.create_node("call_function", operator.getitem, (call, j), {},
                                         name=f"l{spec.index}_causal_{s}") for j, s in enumerate("hkv"))
        spec.attn.out.replace_all_uses_with(h)
        if a.k_out is not None:
            output.replace_input_with(a.k_out, k)
            output.replace_input_with(a.v_out, v)
        done.append(spec.index)
    if done:
        eliminate_dead_code(graph)
        graph.lint()
        gm.recompile()
    return done
