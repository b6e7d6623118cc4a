"""Decode and continuation graphs on a possibly compacted KV cache: where each layer's cache enters and
leaves the graph, and whether its attention takes its own mask.

The model builds one mask for all layers of a kind, sized by one layer's cache. After an SPTS prefill a
skipping layer's cache holds fewer rows, at scattered original positions. `spts_compile.kv_positions` wraps
transformers' attention functions so that an attention that reads a cache takes its mask through
`spts::layer_mask`, which the runner feeds with the positions each layer holds. This module finds, per layer,
the graph inputs and outputs of its cache and checks that its mask goes through that op; the graph itself is
left as it is (decoding is dense).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from .graph_utils import ancestors, example_value, module_path
from .locate import GraphAnalysis, is_layer_mask


@dataclass
class LayerCache:
    """Where one layer's cache enters and leaves a graph: the index of its past-K placeholder among the graph's
    inputs (None on a fresh cache), of its K among the outputs, its sliding window (0: none), and whether its
    attention takes the layer's own mask (or none at all), so that a compacted cache decodes correctly. The window
    is the one the cache shows (it keeps its newest window - 1 rows) or else the one the attention's mask op was
    given (a sliding cache that records its past, for assisted decoding, keeps every row until a crop)."""

    layer: int
    k_in: int | None
    k_out: int | None
    window: int
    own_mask: bool = True


def cache_layout(gm: GraphModule, analysis: GraphAnalysis) -> list[LayerCache]:
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    outputs = _output_list(gm)
    own = _layers_with_own_mask(gm)
    layout = []
    for spec in analysis.layers:
        io = spec.attn.cache if spec.attn is not None else None
        if io is None:
            continue
        k_in = placeholders.index(io.k_past) if io.k_past is not None else None
        k_out = outputs.index(spec.attn.k_out) if spec.attn.k_out in outputs else None
        own_mask = spec.attn.mask is None or spec.index in own
        # a sliding cache that records its past (assisted decoding) keeps every row: its window is the attention's
        layout.append(LayerCache(spec.index, k_in, k_out, io.window or own.get(spec.index, 0), own_mask))
    return layout


def _layers_with_own_mask(gm: GraphModule) -> dict[int, int]:
    """layer -> the sliding window its `spts::layer_mask` op was given (0: none), for each layer that has one."""
    found = {}
    for n in gm.graph.nodes:
        if is_layer_mask(n):
            where = module_path(n)
            if where is not None:
                found[where[0]] = n.args[3] if len(n.args) > 3 and isinstance(n.args[3], int) else 0
    return found


def _output_list(gm: GraphModule) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    args = out.args[0]
    return list(args) if isinstance(args, (tuple, list)) else [args]


def rope_from_input(gm: GraphModule, analysis: GraphAnalysis) -> bool:
    """Whether the RoPE positions come from a graph input (position_ids) rather than from the cache's length."""
    first = next((l for l in analysis.layers if l.attn is not None), None)
    if first is None:
        return False
    anc = ancestors(first.attn.cos)
    for p in gm.graph.find_nodes(op="placeholder"):
        v = example_value(p)
        if p in anc and isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dim() == 2:
            return True
    return False
