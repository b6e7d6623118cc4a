"""Dense clean-up that is always safe: a causal mask built in-graph becomes `is_causal=True` SDPA.

When the user passed no mask, Hugging Face models under tracing may still materialise an [N, N] causal
mask (always, for eager attention). On CPU that mask makes attention about 2x slower at 4K. A layer whose
mask is built from nothing but aranges and comparisons of query and key indices (no sliding window, no
user tensor) gets its attention block replaced by the canonical block with `is_causal=True`. The layer must
have been verified by execution first. This is reported separately from skipping.
"""
from __future__ import annotations

import operator

from torch.fx import GraphModule

from spts_compile import runtime as rt

from .blocks import attention_args, graph_value, is_builtin_causal
from .graph_utils import eliminate_dead_code, take_place
from .locate import GraphAnalysis, LayerSpec


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
            args = attention_args(spec.attn, graph_value(graph))
            assert args.mask is None  # wants(): the mask is the built-in causal one, applied as is_causal
            call = graph.create_node("call_function", rt.attend_all, args.attend_all(spec.attn.x_in), {},
                                     name=f"l{spec.index}_attend_causal")
            h, k, v = (graph.create_node("call_function", operator.getitem, (call, j), {},
                                         name=f"l{spec.index}_causal_{s}") for j, s in enumerate("hkv"))
        take_place(spec.attn.out, h)
        if spec.attn.k_out is not None:
            output.replace_input_with(spec.attn.k_out, k)
            output.replace_input_with(spec.attn.v_out, v)
        done.append(spec.index)
    if done:
        eliminate_dead_code(graph)
        graph.lint()
        gm.recompile()
    return done
