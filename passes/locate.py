"""Analysis: find the decoder layers of a Dynamo graph and describe each block as a typed spec.

`nn_module_stack` delimits the regions (layer -> attention / FFN / norms); op patterns inside each region
then fill in the spec. Anything unexpected raises `Unmatched`, and the layer stays dense with that reason.
Nothing here trusts placeholder names: weights are found as the arguments of the region's own ops.
"""
from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from spts_compile import families
from spts_compile.families import Family

from .graph_utils import (ADD, LINEAR, MATMUL, SDPA, SOFTMAX, ancestors, example_value, external_inputs,
                          is_add, is_call, is_method, is_mul, layer_ops, output_nodes, region_output,
                          shape_of, value_ancestors)


class Unmatched(Exception):
    """The region does not have a shape this backend knows; the message says what differed."""


@dataclass
class NormSpec:
    weight: Node
    eps: Any                 # a float, or the graph node that holds it (dynamic floats)
    kind: str                # a `families.NORM_KINDS` entry: "rms", or Gemma's "rms_offset" ((1 + w))
    x: Node                  # the norm's input
    out: Node                # the norm's output


@dataclass(frozen=True)
class RowSlice:
    """Rows [start, stop) of a fused weight (Phi-3's qkv_proj and gate_up_proj)."""

    node: Node
    start: int
    stop: int


def slice_value(value, lookup):
    """The tensor a spec field stands for, given `lookup(node)`; RowSlice fields are sliced."""
    if isinstance(value, RowSlice):
        return lookup(value.node)[value.start:value.stop]
    return lookup(value) if isinstance(value, Node) else value


@dataclass
class AttentionSpec:
    kind: str                # "sdpa" or "eager"
    norm: NormSpec
    wq: Node
    bq: Node | None
    wk: Node
    bk: Node | None
    wv: Node
    bv: Node | None
    wo: Node
    bo: Node | None
    q_norm: NormSpec | None
    k_norm: NormSpec | None
    post_norm: NormSpec | None
    head_dim: int
    n_heads: int
    n_kv_heads: int
    hidden: int
    scale: Any
    cos: Node
    sin: Node
    mask: Node | None
    x_in: Node
    out: Node                # residual add: x_in + attention output
    k_out: Node | None       # the KV-cache outputs this layer writes
    v_out: Node | None
    core: Node | None = None  # the sdpa node (for the dense clean-up)
    cache: "CacheIO | None" = None  # how the layer reads and writes its KV cache (None: no cache)


@dataclass
class CacheIO:
    """A layer's KV-cache traffic: the past K/V it reads (graph inputs, on a filled cache), the new K rows it
    appends, and, for a sliding-window cache, how many of the newest rows the cache keeps (`keep`)."""

    k_past: Node | None = None   # placeholder [B, Hkv, L, hd]
    v_past: Node | None = None
    k_new: Node | None = None    # [B, Hkv, q, hd], after RoPE
    keep: int | None = None      # the cache keeps its last `keep` rows (sliding window - 1); None: all

    @property
    def window(self) -> int:
        """The layer's sliding window as its cache shows it (0: none)."""
        return 0 if self.keep is None else self.keep + 1


@dataclass
class FFNSpec:
    kind: str                # a `families.FFN_MATMULS` key ("gated")
    norm: NormSpec
    w_gate: Node
    w_up: Node
    w_down: Node
    act: str
    post_norm: NormSpec | None
    intermediate: int
    h_in: Node
    out: Node                # residual add: h_in + FFN output


@dataclass
class LayerSpec:
    index: int
    family: Family = families.GENERIC
    attn: AttentionSpec | None = None
    ffn: FFNSpec | None = None
    reason: str | None = None          # why the layer cannot be rewritten
    verified: bool = False
    verify_note: str = ""
    cache: str = "none"                # "none" (use_cache=False), "fresh" (prefill writes it), "filled", "static"

    @property
    def matched(self) -> bool:
        return self.attn is not None and self.ffn is not None and self.reason is None


@dataclass
class GraphAnalysis:
    layers: list[LayerSpec] = field(default_factory=list)
    kind: str = "prefill"              # "prefill", "decode", "cached", "none"
    reason: str | None = None          # why the whole graph stays dense
    seq_len: Any = None                # N (an int or a SymInt)
    batch: Any = None
    seq_source: int | None = None      # index of the placeholder whose dim 1 is N (for run-time dispatch)
    padding_mask: Node | None = None   # the user's 2D attention mask, if any
    dtype: torch.dtype | None = None
    computes_loss: bool = False        # the graph computes a loss (labels= was passed)


# ------------------------------------------------------------------------------------------------
def analyse(gm: GraphModule) -> GraphAnalysis:
    regions = _layer_regions(gm)
    result = GraphAnalysis()
    if not regions:
        result.kind = "none"
        result.reason = "no decoder layers found in the graph (no nn_module_stack entry named layers.<i>)"
        return result
    for idx in sorted(regions):
        family = families.for_layer_class(regions[idx].pop("class"))
        spec = LayerSpec(index=idx, family=family)
        try:
            spec.attn, spec.cache = _match_attention(gm, regions[idx], family)
            spec.ffn = _match_ffn(regions[idx], spec.attn.out, family)
        except Unmatched as e:
            spec.reason = str(e)
        result.layers.append(spec)
    _check_chain(result.layers)
    _classify(gm, result)
    return result


def _layer_regions(gm: GraphModule) -> dict[int, dict[str | None, list[Node]]]:
    """layer index -> child module name (None: the layer's own ops) -> nodes in graph order; the key
    "class" holds the layer's class."""
    regions: dict[int, dict[str | None, list[Node]]] = defaultdict(lambda: defaultdict(list))
    for n, (idx, child, grandchild, layer_class) in layer_ops(gm.graph):
        regions[idx]["class"] = layer_class
        regions[idx][child].append(n)
        regions[idx][(child, grandchild)].append(n)
    return regions


# ------------------------------------------------------------------------------------------------
# Norms
# ------------------------------------------------------------------------------------------------
def _match_norm(region: list[Node], name: str, family: Family) -> NormSpec:
    if not region:
        raise Unmatched(f"{name}: empty region")
    mean = [n for n in region if is_method(n, "mean") or is_call(n, {torch.mean})]
    rsqrt = [n for n in region if is_call(n, {torch.rsqrt}) or is_method(n, "rsqrt")]
    if len(mean) != 1 or len(rsqrt) != 1:
        raise Unmatched(f"{name}: not an RMSNorm (expected one mean and one rsqrt)")
    eps_add = next((u for u in mean[0].users if is_add(u)), None)
    if eps_add is None:
        raise Unmatched(f"{name}: RMSNorm without an epsilon add")
    eps = eps_add.args[1] if eps_add.args[0] is mean[0] else eps_add.args[0]
    ext = external_inputs(region)
    weights = [a for a in ext if a.op in ("placeholder", "get_attr") and (shape_of(a) or (0, 0))[:1] and len(shape_of(a) or ()) == 1]
    if len(weights) != 1:
        raise Unmatched(f"{name}: expected one weight vector, found {len(weights)}")
    weight = weights[0]
    pow_in = [n for n in region if is_method(n, "pow") or is_call(n, {torch.pow})]
    if len(pow_in) != 1:
        raise Unmatched(f"{name}: expected one pow")
    x = pow_in[0].args[0]
    while isinstance(x, Node) and x in set(region) and (is_method(x, "to", "float", "type_as")):
        x = x.args[0]
    if not isinstance(x, Node) or x in set(region):
        raise Unmatched(f"{name}: could not find the norm's input")
    offset = any(is_add(u) and any(a == 1 or a == 1.0 for a in u.args if not isinstance(a, Node))
                 for w in [weight] + [u for u in weight.users if is_method(u, "float", "to")]
                 for u in w.users)
    kind = "rms_offset" if offset else "rms"
    if family.norm is not None and kind != family.norm:
        raise Unmatched(f"{name}: a {kind} norm, but the {family.name} family has {family.norm} norms")
    out = region_output(region)
    if out is None:
        raise Unmatched(f"{name}: no output")
    return NormSpec(weight=weight, eps=eps, kind=kind, x=x, out=out)


def _norm_feeding(regions, layer_children, node: Node, what: str, family: Family) -> NormSpec:
    """The norm module whose output is `node`."""
    for child in layer_children:
        if child and "norm" in child.lower():
            region = regions[child]
            if region and region_output(region) is node:
                return _match_norm(region, child, family)
    raise Unmatched(f"{what}: its input does not come from an RMSNorm module")


def _norm_fed_by(regions, layer_children, node: Node, family: Family) -> NormSpec | None:
    """A norm module applied directly to `node` (a post-norm), if any."""
    for child in layer_children:
        if child and "norm" in child.lower():
            region = regions[child]
            if region:
                try:
                    spec = _match_norm(region, child, family)
                except Unmatched:
                    continue
                if spec.x is node:
                    return spec
    return None


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------
def _linears(region: list[Node], regions, child: str) -> dict[str, Node]:
    out = {}
    for n in region:
        if is_call(n, LINEAR):
            for key, nodes in regions.items():
                if isinstance(key, tuple) and key[0] == child and n in nodes and key[1]:
                    out[key[1]] = n
    return out


def _weight_bias(lin) -> tuple:
    if isinstance(lin, _SliceOf):
        return lin.weight, lin.bias
    w = lin.args[1] if len(lin.args) > 1 else lin.kwargs.get("weight")
    b = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    return w, b


def _match_attention(gm, regions, family: Family) -> tuple[AttentionSpec, str]:
    children = [c for c in regions if isinstance(c, str) or c is None]
    attn_child = next((c for c in children if c and "attn" in c.lower()), None)
    if attn_child is None:
        raise Unmatched("no attention module in the layer")
    region = regions[attn_child]
    if any(n.op == "call_method" and str(n.target).endswith("_") and n.target != "__getitem__" for n in region) \
            or any(n.op == "call_function" and getattr(n.target, "__name__", "").endswith("_") for n in region):
        # an in-place write into a preallocated cache (StaticCache and friends)
        raise Unmatched("the attention writes a preallocated KV cache in place (StaticCache); "
                        "SPTS cannot compact it")
    lins = _linears(region, regions, attn_child)
    fused = families.fused_names("fused_qkv") & set(lins)
    if fused and family.fused_qkv not in fused:
        raise Unmatched(f"attention: fused {sorted(fused)} found, but the {family.name} family has separate q/k/v")
    if family.fused_qkv in lins:
        lins.update(_split_fused_qkv(lins.pop(family.fused_qkv)))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if name not in lins:
            raise Unmatched(f"attention: no {name} linear (found {sorted(lins)})")
    wq, bq = _weight_bias(lins["q_proj"])
    wk, bk = _weight_bias(lins["k_proj"])
    wv, bv = _weight_bias(lins["v_proj"])
    wo, bo = _weight_bias(lins["o_proj"])
    xn = _linear_input(lins["q_proj"])
    if _linear_input(lins["k_proj"]) is not xn or _linear_input(lins["v_proj"]) is not xn:
        raise Unmatched("attention: q/k/v projections do not share one input")
    norm = _norm_feeding(regions, children, xn, "attention", family)
    view = next((u for u in lins["q_proj"].users if is_method(u, "view", "reshape")), None)
    if view is None:
        raise Unmatched("attention: q projection is not reshaped into heads")
    shape = view.args[1] if len(view.args) == 2 and isinstance(view.args[1], (tuple, list)) else view.args[1:]
    head_dim = shape[-1]
    if not isinstance(head_dim, int):
        raise Unmatched("attention: head_dim is not a constant")
    wq_rows, wk_rows, hidden = _rows(wq), _rows(wk), shape_of(_base(wq))[1]
    n_heads, n_kv = wq_rows // head_dim, wk_rows // head_dim
    q_norm = _sub_norm(regions, attn_child, "q_norm", family)
    k_norm = _sub_norm(regions, attn_child, "k_norm", family)
    if family.qk_norm is not None and (q_norm is not None, k_norm is not None) != (family.qk_norm,) * 2:
        raise Unmatched(f"attention: q/k norms {'missing' if family.qk_norm else 'found'}, but the "
                        f"{family.name} family has {'them' if family.qk_norm else 'none'}")
    kind, core, scale, mask = _attention_core(region)
    cos, sin = _rope_inputs(region, set(_param_like(region)) | {xn, mask})
    cache, k_out, v_out = _cache_outputs(gm, region, _node_of(lins["k_proj"]), _node_of(lins["v_proj"]), core)
    cache_io = _cache_io(region, _node_of(lins["k_proj"]), _node_of(lins["v_proj"]), k_out, v_out)
    o_node = lins["o_proj"]
    post_norm = _norm_fed_by(regions, children, o_node, family)
    attn_out = _through_identity(post_norm.out if post_norm else o_node)
    residual = next((u for u in attn_out.users if is_add(u) and norm.x in u.args), None)
    if residual is None:
        raise Unmatched("attention: no residual add of the block input and the attention output")
    spec = AttentionSpec(kind=kind, norm=norm, wq=wq, bq=bq, wk=wk, bk=bk, wv=wv, bv=bv, wo=wo, bo=bo,
                         q_norm=q_norm, k_norm=k_norm, post_norm=post_norm, head_dim=head_dim,
                         n_heads=n_heads, n_kv_heads=n_kv, hidden=hidden, scale=scale, cos=cos,
                         sin=sin, mask=mask, x_in=norm.x, out=residual, k_out=k_out, v_out=v_out, core=core,
                         cache=cache_io)
    return spec, cache


class _SliceOf:
    """A slice of a fused projection's output, standing in for a separate linear node."""

    def __init__(self, lin: Node, piece: Node, start: int, stop: int, rows: int):
        self.lin, self.piece, self.start, self.stop = lin, piece, start, stop
        self.users = piece.users
        w, b = _weight_bias(lin)
        self.weight = RowSlice(w, start, stop)
        self.bias = RowSlice(b, start, stop) if b is not None else None


def _split_fused_qkv(lin: Node) -> dict:
    """Phi-3: one qkv_proj whose output is sliced on its last dim into q, k and v."""
    rows = shape_of(_weight_bias(lin)[0])[0]
    pieces = []
    for u in lin.users:
        if not (is_call(u, {operator.getitem}) and isinstance(u.args[1], tuple)
                and isinstance(u.args[1][-1], slice)):
            raise Unmatched("attention: fused qkv_proj output is used other than by slicing")
        sl = u.args[1][-1]
        pieces.append((sl.start or 0, sl.stop if sl.stop is not None else rows, u))
    if len(pieces) != 3:
        raise Unmatched("attention: fused qkv_proj is not split into three slices")
    pieces.sort(key=lambda p: p[0])
    return {name: _SliceOf(lin, piece, start, stop, rows)
            for name, (start, stop, piece) in zip(("q_proj", "k_proj", "v_proj"), pieces)}


def _node_of(lin) -> Node:
    return lin.piece if isinstance(lin, _SliceOf) else lin


def _linear_input(lin) -> Node:
    return (lin.lin if isinstance(lin, _SliceOf) else lin).args[0]


def _base(w):
    return w.node if isinstance(w, RowSlice) else w


def _rows(w) -> int:
    return w.stop - w.start if isinstance(w, RowSlice) else shape_of(w)[0]


def _through_identity(node: Node) -> Node:
    """Follow an eval-mode dropout (Phi-3's resid_*_dropout), which returns its input unchanged."""
    while len(node.users) == 1:
        u = next(iter(node.users))
        if not (u.op == "call_function" and u.target is F.dropout):
            break
        p = u.kwargs.get("p", u.args[1] if len(u.args) > 1 else 0.5)
        training = u.kwargs.get("training", u.args[2] if len(u.args) > 2 else True)
        if training and p != 0:
            raise Unmatched("dropout is active (is the model in train mode?)")
        node = u
    return node


def _param_like(region):
    return [a for a in external_inputs(region) if a.op in ("placeholder", "get_attr")]


def _sub_norm(regions, child, name, family: Family) -> NormSpec | None:
    region = regions.get((child, name))
    return _match_norm(region, f"{child}.{name}", family) if region else None


def _attention_core(region: list[Node]):
    """(kind, core node, scale, mask) from an SDPA call or from the eager matmul-softmax-matmul."""
    inside = set(region)
    sdpa = [n for n in region if is_call(n, SDPA)]
    if len(sdpa) == 1:
        n = sdpa[0]
        mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
        scale = n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None)
        dropout = n.kwargs.get("dropout_p", n.args[4] if len(n.args) > 4 else 0.0)
        if dropout not in (0, 0.0):
            raise Unmatched("attention: dropout is active (is the model in train mode?)")
        if scale is None:
            scale = 1.0 / (shape_of(n.args[0])[-1] ** 0.5)
        return "sdpa", n, scale, _outside(mask, inside)
    softmax = [n for n in region if is_call(n, SOFTMAX) or is_method(n, "softmax")]
    if len(softmax) != 1:
        raise Unmatched("attention: neither one SDPA call nor one softmax")
    x = softmax[0].args[0]
    mask = None
    if is_add(x):
        a, b = x.args[0], x.args[1]
        # the scores are the scaled matmul; the other operand is the mask (maybe a slice of it)
        mask, x = (b, a) if isinstance(a, Node) and is_mul(a) else (a, b)
        mask = _outside(mask, inside)
        if mask is None:
            raise Unmatched("attention: eager mask add with no external mask")
    if not is_mul(x):
        raise Unmatched("attention: eager scores are not scaled by a constant")
    scale = next(a for a in x.args if not (isinstance(a, Node) and is_call(a, MATMUL)))
    return "eager", softmax[0], scale, mask


def _outside(node, inside: set):
    """Follow slicing inside the region back to the external mask it reads."""
    while isinstance(node, Node) and node in inside:
        if is_call(node, {operator.getitem}) or is_method(node, "__getitem__", "to", "contiguous"):
            node = node.args[0]
        elif is_layer_mask(node):   # the layer's own mask on a cache (spts_compile.kv_positions)
            node = node.args[1]
        else:
            raise Unmatched("attention: the mask is built inside the attention module")
    return node


def is_layer_mask(node) -> bool:
    import spts_compile.kv_positions  # noqa: F401  (registers the op)
    return isinstance(node, Node) and node.op == "call_function" and \
        node.target in (torch.ops.spts.layer_mask.default, torch.ops.spts.layer_mask)


def _rope_inputs(region: list[Node], exclude: set) -> tuple[Node, Node]:
    """The rotary cos and sin: external tensors multiplied into q and k; sin multiplies rotate_half(x)."""
    cos = sin = None
    for e in external_inputs(region):
        if e in exclude or e.op in ("placeholder", "get_attr"):
            continue
        uses = [u for u in e.users if u in set(region)]
        uses = [w for u in uses for w in ([u] if not is_method(u, "unsqueeze") else list(u.users))]
        muls = [u for u in uses if is_mul(u)]
        if not muls:
            continue
        rotated = any(any(isinstance(a, Node) and is_call(a, {torch.cat}) and
                          any(isinstance(c, Node) and (c.op == "call_function" and c.target.__name__ == "neg")
                              for c in a.args[0]) for a in m.args) for m in muls)
        if rotated:
            sin = e
        else:
            cos = e
    if cos is None or sin is None:
        raise Unmatched("attention: could not find rotary cos/sin inputs (rotate-half RoPE expected)")
    return cos, sin


def _cache_outputs(gm, region, k_lin: Node, v_lin: Node, core: Node):
    inside = set(region)
    outs = [n for n in output_nodes(gm) if n in inside]
    if any(n is core or core in ancestors(n) for n in outs):
        raise Unmatched("the graph returns this layer's attention weights (output_attentions=True), over every "
                        "token: a skipping layer does not compute them")
    cats = [n for n in region if is_call(n, {torch.cat})]
    filled = any(a.op == "placeholder" for c in cats for a in c.all_input_nodes)
    k_out = v_out = None
    for n in outs:
        anc = ancestors(n)
        if k_lin in anc and v_lin not in anc:
            k_out = n
        elif v_lin in anc and k_lin not in anc:
            v_out = n
    if filled:
        return "filled", k_out, v_out
    if outs and (k_out is None or v_out is None):
        raise Unmatched("attention: graph outputs from the attention that are not its K/V cache")
    if k_out is not None and (is_call(k_out, {operator.getitem}) or is_method(k_out, "__getitem__")):
        # A sliding-window cache keeps a crop of what attention used: its layout is tied to positions.
        return "window", k_out, v_out
    return ("fresh" if k_out is not None else "none"), k_out, v_out


def _cache_io(region, k_lin: Node, v_lin: Node, k_out, v_out) -> CacheIO | None:
    """The past K/V inputs (the placeholders a filled cache concatenates the new rows to) and the tail a
    sliding-window cache keeps (`k_out = cat(...)[:, :, -keep:]`)."""
    if k_out is None:
        return None
    io = CacheIO()
    for n in region:
        if not is_call(n, {torch.cat}) or not isinstance(n.args[0], (list, tuple)) or len(n.args[0]) != 2:
            continue
        past, new = n.args[0]
        if isinstance(past, Node) and past.op == "placeholder" and isinstance(new, Node):
            anc = ancestors(n)
            if k_lin in anc and v_lin not in anc:
                io.k_past, io.k_new = past, new
            elif v_lin in anc and k_lin not in anc:
                io.v_past = past
    io.keep = _kept_tail(k_out)
    if io.keep != _kept_tail(v_out):
        raise Unmatched("attention: the K and V caches keep different rows")
    return io


def _kept_tail(out: Node | None) -> int | None:
    """`keep` when `out` is `x[:, :, -keep:, ...]` (a sliding-window cache); None when it is not a slice."""
    if out is None or not (is_call(out, {operator.getitem}) or is_method(out, "__getitem__")):
        return None
    idx = out.args[1]
    if not isinstance(idx, tuple) or len(idx) < 3 or not isinstance(idx[2], slice):
        raise Unmatched("attention: the KV cache output is a slice this backend does not know")
    sl = idx[2]
    rest_full = all(isinstance(i, slice) and i == slice(None) for i in idx[:2] + idx[3:])
    if not rest_full or sl.stop is not None or sl.step is not None or not isinstance(sl.start, int) or sl.start >= 0:
        raise Unmatched("attention: the KV cache output is a slice other than its newest rows")
    return -sl.start


# ------------------------------------------------------------------------------------------------
# FFN
# ------------------------------------------------------------------------------------------------
def _match_ffn(regions, h_in: Node, family: Family) -> FFNSpec:
    children = [c for c in regions if isinstance(c, str) or c is None]
    ffn_child = next((c for c in children if c and c.lower() in ("mlp", "feed_forward", "ffn")), None)
    if ffn_child is None:
        raise Unmatched("no MLP module in the layer")
    region = regions[ffn_child]
    lins = _linears(region, regions, ffn_child)
    fused_names = families.fused_names("fused_gate_up") & set(lins)
    if fused_names and family.fused_gate_up not in fused_names:
        raise Unmatched(f"FFN: fused {sorted(fused_names)} found, but the {family.name} family has separate "
                        "gate/up projections")
    if family.fused_gate_up in lins:
        fused = lins.pop(family.fused_gate_up)
        w, bias = _weight_bias(fused)
        if bias is not None:
            raise Unmatched("FFN: biased projections are not supported")
        rows = shape_of(w)[0]
        act = _activation(region, None)
        post_norm = _norm_fed_by(regions, children, lins["down_proj"], family) if "down_proj" in lins else None
        if "down_proj" not in lins:
            raise Unmatched("FFN: no down_proj linear")
        xn = fused.args[0]
        norm = _norm_feeding(regions, children, xn, "FFN", family)
        if norm.x is not h_in:
            raise Unmatched("FFN: its norm does not read the attention's residual output")
        w_down, _ = _weight_bias(lins["down_proj"])
        ffn_out = _through_identity(post_norm.out if post_norm else lins["down_proj"])
        residual = next((u for u in ffn_out.users if is_add(u) and h_in in u.args), None)
        if residual is None:
            raise Unmatched("FFN: no residual add of the block input and the FFN output")
        return FFNSpec(kind=family.mlp, norm=norm, w_gate=RowSlice(w, 0, rows // 2), w_up=RowSlice(w, rows // 2, rows), w_down=w_down,
                       act=act, post_norm=post_norm, intermediate=rows // 2, h_in=h_in, out=residual)
    for name in ("gate_proj", "up_proj", "down_proj"):
        if name not in lins:
            raise Unmatched(f"FFN: no {name} linear (found {sorted(lins)}); only gated FFNs are supported")
    w_gate, b_gate = _weight_bias(lins["gate_proj"])
    w_up, b_up = _weight_bias(lins["up_proj"])
    w_down, b_down = _weight_bias(lins["down_proj"])
    if b_gate is not None or b_up is not None or b_down is not None:
        raise Unmatched("FFN: biased projections are not supported")
    xn = lins["gate_proj"].args[0]
    if lins["up_proj"].args[0] is not xn:
        raise Unmatched("FFN: gate and up projections do not share one input")
    norm = _norm_feeding(regions, children, xn, "FFN", family)
    if norm.x is not h_in:
        raise Unmatched("FFN: its norm does not read the attention's residual output")
    act = _activation(region, lins["gate_proj"])
    post_norm = _norm_fed_by(regions, children, lins["down_proj"], family)
    ffn_out = _through_identity(post_norm.out if post_norm else lins["down_proj"])
    residual = next((u for u in ffn_out.users if is_add(u) and h_in in u.args), None)
    if residual is None:
        raise Unmatched("FFN: no residual add of the block input and the FFN output")
    return FFNSpec(kind=family.mlp, norm=norm, w_gate=w_gate, w_up=w_up, w_down=w_down, act=act, post_norm=post_norm,
                   intermediate=shape_of(w_gate)[0], h_in=h_in, out=residual)


def _activation(region, gate: Node | None) -> str:
    """The gate's activation: among the gate's users, or anywhere in the FFN region for a fused gate_up."""
    for u in (gate.users if gate is not None else region):
        if u.op == "call_function" and u.target in (F.silu,):
            return "silu"
        if u.op == "call_function" and u.target is F.gelu:
            return "gelu_tanh" if u.kwargs.get("approximate", "none") == "tanh" else "gelu"
    raise Unmatched("FFN: the gate activation is not silu or gelu")


# ------------------------------------------------------------------------------------------------
def _check_chain(layers: list[LayerSpec]) -> None:
    """Each layer must read the previous layer's output, so a pruned stream can flow through them."""
    for prev, cur in zip(layers, layers[1:]):
        if prev.matched and cur.matched and cur.attn.x_in is not prev.ffn.out:
            cur.reason = "its input is not the previous layer's output"


_LOSSES = {F.cross_entropy, F.nll_loss, torch._C._nn.cross_entropy_loss, torch._C._nn.nll_loss}


def _classify(gm: GraphModule, result: GraphAnalysis) -> None:
    result.computes_loss = any(n.op == "call_function" and n.target in _LOSSES for n in gm.graph.nodes)
    caches = {l.cache for l in result.layers if l.reason is None}
    if "filled" in caches:
        result.kind = "cached"
        result.reason = "the KV cache already holds tokens (decode or chunked prefill): left dense"
    first = next((l for l in result.layers if l.attn is not None), None)
    if first is None:
        return
    x = example_value(first.attn.x_in)
    result.batch, result.seq_len = x.shape[0], x.shape[1]
    result.dtype = x.dtype
    if isinstance(result.seq_len, int) and result.seq_len == 1 and result.kind == "prefill":
        result.kind = "decode"
        result.reason = "query length 1 (decode step): left dense"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, p in enumerate(placeholders):
        v = example_value(p)
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == result.seq_len \
                and not isinstance(v, torch.nn.Parameter) and v.dim() <= 3:
            if v.dim() == 2 and v.dtype in (torch.long, torch.int32, torch.bool) and result.seq_source is None:
                result.seq_source = i
            elif v.dim() == 3 and result.seq_source is None:
                result.seq_source = i
    result.padding_mask = _find_padding_mask(gm, first.attn.mask, placeholders)


def _find_padding_mask(gm, mask: Node | None, placeholders) -> Node | None:
    """The user's 2D attention mask among the 4D mask's value sources, if the mask reads one. Only values count: in
    a dynamic graph the mask is sized from input_ids (a 2D placeholder too) through a SymInt node."""
    if mask is None:
        return None
    anc = value_ancestors(mask)
    for p in placeholders:
        v = example_value(p)
        if p in anc and isinstance(v, torch.Tensor) and v.dim() == 2 and not isinstance(v, torch.nn.Parameter):
            return p
    return None
