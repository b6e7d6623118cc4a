"""Layers that repeat compile once: each layer's region becomes one call of a shared subgraph.

Inductor lowers and generates code for every layer of one graph anew, even where the code repeats (it reuses
a C++ kernel only once its source has been generated again and matches). Here the nodes the rewrite built for
one layer move into a small graph module of their own, called through `runtime.run_layer`, which hands it to
the `invoke_subgraph` higher-order op. Layers whose regions have the same code share one module; the op's
identifier adds the operands' shapes, strides and dtypes, so Inductor lowers and generates code once per
(code, shapes) and calls the same compiled function for every such layer. A layer is no longer fused with its
neighbours: what that costs at run time is measured in the README (compile-time paragraph).

What a region is: for a skipping layer, the nodes the rewrite created for it (`_Builder` records them); for a
dense layer, its op nodes as Dynamo traced them (`dense_regions`: every node whose module stack is that
layer), so that a model's alike dense layers (the ones before `start_layer`) lower once too. Its inputs are the
outside nodes those read (weights, RoPE tables, masks, the stream of the layer before); its outputs are the
members read outside (the stream, the full-length view, the KV cache rows and positions, the recorded
selections). Constants (budgets, head sizes, activation names) stay in the code, so layers of different
stages, or a stage end and the layers before it, get different modules. A region that reads a non-tensor
value from outside, or whose outputs are read before its last node, is left inline (it still compiles, only
without sharing).
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule, Node

from spts_compile import runtime as rt

from .graph_utils import layer_ops, take_place


def outline(gm: GraphModule, regions: dict[int, list[Node]], carried: dict[int, list] | None = None
            ) -> tuple[dict[Node, Node], dict[int, str]]:
    """Replace each layer's region by a `run_layer` call. `carried[layer]` are the values the next skipping
    layer would read (the stream): outputs even where no layer follows, so that the last layer keeps the
    code of the layers before it. Returns (old node -> the getitem that replaces it, layer -> the submodule
    it calls); a layer left inline is absent from the second."""
    carried = carried or {}
    replaced: dict[Node, Node] = {}
    modules: dict[int, str] = {}
    by_code: dict[str, str] = {}
    # graph order, taken once: the calls this inserts stand after regions already done, and no region or
    # reader of one is a node this makes
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for layer, nodes in regions.items():
        live = set(nodes)
        order = sorted(live, key=position.__getitem__)
        found = _region(order, live, {n for n in carried.get(layer, ()) if n in live}, position)
        if found is None:
            continue
        inputs, outputs = found
        sub = _subgraph(order, inputs, outputs, f"l{layer}_")
        name = by_code.get(sub.code)
        if name is None:
            name = by_code[sub.code] = f"spts_layer_{len(by_code)}"
            gm.add_submodule(name, sub)
        modules[layer] = name
        replaced.update(_call(gm, order, inputs, outputs, name))
    return replaced, modules


def dense_regions(graph: Graph, layers) -> dict[int, list[Node]]:
    """layer -> its op nodes, for the dense layers `layers` (as Dynamo traced them): outlined like the skipping
    ones, the layers of a model that are alike lower and generate code once instead of once per layer."""
    wanted = set(layers)
    regions: dict[int, list[Node]] = {}
    for n, where in layer_ops(graph):
        if where[0] in wanted:
            regions.setdefault(where[0], []).append(n)
    return regions


def _region(order: list[Node], live: set[Node], carried: set[Node], position: dict[Node, int]):
    """(inputs, outputs) of a region that can move, else None."""
    if any(n.op not in ("call_function", "call_method") for n in order):
        return None
    inputs: list[Node] = []
    for n in order:
        for a in n.all_input_nodes:
            if a not in live and a not in inputs:
                value = a.meta.get("example_value", a.meta.get("val"))
                if value is not None and not isinstance(value, torch.Tensor):
                    return None   # a size or scalar from outside: invoke_subgraph takes tensors
                if a.op == "get_attr":
                    return None
                inputs.append(a)
    # read outside, carried, or read by nothing: a value the next layer reads in one stage but not at its end
    # (the kept scores before a rescoring layer) is an output either way, so that the two layers' code is the same
    outputs = [n for n in order if n in carried or not n.users or any(u not in live for u in n.users)]
    if not outputs:
        return None
    last = position[order[-1]]
    if any(position[u] < last for o in outputs for u in o.users if u not in live):
        return None   # read outside before the region ends: the call could not stand in one place
    return inputs, outputs


def _subgraph(order: list[Node], inputs: list[Node], outputs: list[Node], prefix: str) -> GraphModule:
    """The region as a graph module whose names do not say which layer it came from (inputs by position, the
    rewrite's steps without their `l<layer>_` prefix), so that two layers' regions with the same operations
    and constants print the same code."""
    graph = Graph()
    env = {a: graph.placeholder(f"arg{i}") for i, a in enumerate(inputs)}
    for i, n in enumerate(order):
        args = torch.fx.map_arg(n.args, env.__getitem__)
        kwargs = torch.fx.map_arg(n.kwargs, env.__getitem__)
        name = n.name[len(prefix):] if n.name.startswith(prefix) else f"n{i}"
        env[n] = graph.create_node(n.op, n.target, args, kwargs, name=name)
    graph.output(tuple(env[o] for o in outputs))
    return GraphModule(torch.nn.Module(), graph)


def _call(gm: GraphModule, order, inputs, outputs, name: str) -> dict[Node, Node]:
    graph = gm.graph
    with graph.inserting_after(order[-1]):
        attr = graph.get_attr(name)
    with graph.inserting_after(attr):
        call = graph.call_function(rt.run_layer, (attr, name, *inputs))
    replaced = {}
    at = call
    for i, o in enumerate(outputs):
        with graph.inserting_after(at):
            at = graph.call_function(operator.getitem, (call, i))
        take_place(o, at)   # the region's own readers go with it below
        replaced[o] = at
    for n in reversed(order):
        graph.erase_node(n)
    return replaced
