"""One builder of the runtime helpers' arguments, from a block's spec.

The rewrite (graph nodes), the dense clean-up (graph nodes) and verification (captured tensors) all call
the helpers of `spts_compile.runtime` with arguments built here, so what verification runs is exactly what
the rewrite emits: the same fields, in the same order, and the same mask (None where the model's mask is
the plain causal one built in-graph, which the helpers then apply as `is_causal` / candidate order).

`value(field)` resolves one spec field: in the graph, a node (a RowSlice becomes a slicing node); in
verification, the captured tensor.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import Graph, Node

from .graph_utils import ancestors, example_value
from .locate import AttentionSpec, FFNSpec, NormSpec, RowSlice

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
            if isinstance(example_value(a), torch.Tensor):
                return False
            continue
        if a.op in ("call_function", "call_method") and _op_name(a) not in _CAUSAL_OPS:
            return False
        if _op_name(a) == "add" and any(isinstance(x, (int, float)) and x != 0 for x in a.args):
            return False  # an offset other than 0 means a cache offset or a window
    return True


def graph_value(graph: Graph) -> Callable:
    """A resolver for the rewrite: nodes and constants as they are, a RowSlice as a slice of its fused
    weight, inserted at the graph's current insertion point."""
    def value(x):
        if isinstance(x, RowSlice):
            return graph.create_node("call_function", operator.getitem, (x.node, slice(x.start, x.stop)), {})
        return x
    return value


def norm_args(norm: NormSpec | None, value) -> tuple | None:
    """(weight, eps, kind), as `runtime.norm_apply` takes a norm; None for no norm."""
    return None if norm is None else (value(norm.weight), value(norm.eps), norm.kind)


@dataclass
class AttentionArgs:
    """An attention block's operands, resolved, and the argument tuples of each helper."""

    norm: Any
    q_norm: Any
    k_norm: Any
    post_norm: Any
    cos: Any
    sin: Any
    mask: Any
    wq: Any
    bq: Any
    wk: Any
    bk: Any
    wv: Any
    bv: Any
    wo: Any
    bo: Any
    head_dim: int
    scale: Any

    def probe(self, xn, cand, last, probe_queries: int, heads: str = "mean", real=None) -> tuple:
        """`runtime.probe_attention`"""
        return (xn, cand, last, self.cos, self.sin, self.mask, self.wq, self.bq, self.wk, self.bk, self.q_norm,
                self.k_norm, self.head_dim, self.scale, probe_queries, heads, real)

    def values(self, xn) -> tuple:
        """`runtime.project_heads` for V (every candidate's, for a cache that keeps them all)"""
        return (xn, self.wv, self.bv, self.head_dim, None)

    def attend(self, xa, act, cand, k_all, v_all=None) -> tuple:
        """`runtime.attend_active`"""
        return (xa, act, cand, k_all, self.cos, self.sin, self.mask, self.wq, self.bq, self.wv, self.bv, self.wo,
                self.bo, self.q_norm, self.post_norm, self.head_dim, self.scale, v_all)

    def attend_all(self, x) -> tuple:
        """`runtime.attend_all` (the dense clean-up)"""
        return (x, self.cos, self.sin, self.mask, self.wq, self.bq, self.wk, self.bk, self.wv, self.bv, self.wo,
                self.bo, self.norm, self.q_norm, self.k_norm, self.post_norm, self.head_dim, self.scale)


def attention_args(spec: AttentionSpec, value) -> AttentionArgs:
    mask = None if spec.mask is None or is_builtin_causal(spec.mask) else value(spec.mask)
    v = value
    return AttentionArgs(
        norm=norm_args(spec.norm, v), q_norm=norm_args(spec.q_norm, v), k_norm=norm_args(spec.k_norm, v),
        post_norm=norm_args(spec.post_norm, v), cos=v(spec.cos), sin=v(spec.sin), mask=mask,
        wq=v(spec.wq), bq=v(spec.bq), wk=v(spec.wk), bk=v(spec.bk), wv=v(spec.wv), bv=v(spec.bv), wo=v(spec.wo),
        bo=v(spec.bo), head_dim=spec.head_dim, scale=v(spec.scale))


@dataclass
class FFNArgs:
    norm: Any
    w_gate: Any
    w_up: Any
    w_down: Any
    act: str
    post_norm: Any

    def ffn(self, ha) -> tuple:
        """`runtime.ffn_rows`"""
        return (ha, self.w_gate, self.w_up, self.w_down, self.act, self.post_norm)


def ffn_args(spec: FFNSpec, value) -> FFNArgs:
    return FFNArgs(norm=norm_args(spec.norm, value), w_gate=value(spec.w_gate), w_up=value(spec.w_up),
                   w_down=value(spec.w_down), act=spec.act, post_norm=norm_args(spec.post_norm, value))
