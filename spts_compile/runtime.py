"""Plain PyTorch helpers that the rewritten graph calls.

Each skipping block becomes a short chain of calls to these functions (probe -> select -> gather ->
block on active rows -> scatter). They are ordinary tensor code: AOTAutograd traces through them and
Inductor fuses them, exactly as it would the model's own code. Sizes are computed with integer arithmetic,
so a symbolic sequence length never guards on its value; a min or max of two sizes (`size_min`, `size_max`)
guards on which side wins (a relation such as 3N//8 <= N - N//8, true for every length of a regime) and keeps
the winner's plain expression.

Shapes: x [B, C, D] rows of the residual stream (C candidates), `cand` [B, C] the candidates' original
positions, `idx` [B, M] indices into the candidate list, cos/sin [B|1, N, hd] indexed by original position,
`mask` the model's own 4D mask [B|1, 1|H, N, N] (bool, or additive float), or None for plain causal.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .calibration import ACTIVATIONS, proxy_norm
from .config import budget_tokens


# ---------------------------------------------------------------------------------------------
# Row bookkeeping
# ---------------------------------------------------------------------------------------------
def _expand_index(idx: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(like.shape)
    shape[0] = idx.shape[0]
    shape[dim] = idx.shape[1]
    view = [idx.shape[0]] + [1] * (like.dim() - 1)
    view[dim] = idx.shape[1]
    return idx.reshape(view).expand(shape)


def gather_rows(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x[b, idx[b, i], ...] along `dim`; a batch-1 x is broadcast over idx's rows."""
    if x.shape[0] != idx.shape[0]:
        x = x.expand(idx.shape[0], *x.shape[1:])
    return torch.gather(x, dim, _expand_index(idx, x, dim))


def scatter_add_rows(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A copy of x with delta added at rows idx. Rows outside idx are x, bit for bit."""
    return x.scatter_add(1, _expand_index(idx, x, 1), delta)


def scatter_rows(base: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of base with rows written at idx (restores pruned-stream rows to full length)."""
    return base.scatter(1, _expand_index(idx, base, 1), rows)


def initial_candidates(x: torch.Tensor) -> torch.Tensor:
    """Every position is a candidate: [B, N] = arange(N) per row."""
    b, n = x.shape[0], x.shape[1]
    return torch.arange(n, device=x.device).unsqueeze(0).expand(b, n)


def last_real_position(x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """[B] position of each row's last real token: from the 2D attention mask, else N - 1."""
    b, n = x.shape[0], x.shape[1]
    if padding_mask is None:
        return torch.full((b,), n - 1, dtype=torch.long, device=x.device)
    pos = torch.arange(n, device=x.device).unsqueeze(0)
    return torch.where(padding_mask.bool(), pos, torch.zeros_like(pos)).amax(dim=1)


def real_candidates(padding_mask, cand):
    """[B, C] True where the candidate is a real token (None without a padding mask)."""
    return None if padding_mask is None else padding_mask.bool().gather(1, cand)


def newest_rows(x: torch.Tensor, dim: int, keep: int) -> torch.Tensor:
    """The last `keep` entries of x along `dim` (all of them when there are fewer): a sliding-window cache."""
    return x[(slice(None),) * dim + (slice(-keep, None),)]


def locate_in_candidates(cand: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """[B] index of `position[b]` inside the sorted candidate list cand[b] (it is always present)."""
    return (cand <= position.unsqueeze(1)).sum(dim=1) - 1


# ---------------------------------------------------------------------------------------------
# The block's own math, on any subset of rows
# ---------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps, kind: str) -> torch.Tensor:
    """`kind` is the family table's norm kind (`spts_compile.families.NORM_KINDS`)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if kind == "rms_offset":  # Gemma: (1 + w), applied in float32
        return (xf * (1.0 + weight.to(torch.float32))).to(x.dtype)
    if kind == "rms":
        return weight * xf.to(x.dtype)
    raise ValueError(f"spts: unknown norm kind {kind!r}")


def norm_apply(x: torch.Tensor, norm) -> torch.Tensor:
    """`norm` is (weight, eps, kind) or None."""
    if norm is None:
        return x
    weight, eps, kind = norm
    return rms_norm(x, weight, eps, kind)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos/sin [B, T, hd] already gathered at the rows' original positions."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def project_heads(x: torch.Tensor, weight, bias, head_dim: int, norm) -> torch.Tensor:
    """[B, T, D] -> [B, H, T, hd], with the optional per-head q/k norm."""
    y = F.linear(x, weight, bias)
    y = y.view(x.shape[0], x.shape[1], -1, head_dim)
    y = norm_apply(y, norm)
    return y.transpose(1, 2)


def mask_block(mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """The model's mask entries between query positions q_pos [B, Q] and key positions k_pos [B, K]."""
    b = q_pos.shape[0]
    m = mask.expand(b, *mask.shape[1:])
    m = gather_rows(m, q_pos, dim=2)
    return gather_rows(m, k_pos, dim=3)


def _bias_from_mask(m: torch.Tensor, dtype) -> torch.Tensor:
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
    return m.to(dtype)


# ---------------------------------------------------------------------------------------------
# PAP: probe, select, attend on active rows
# ---------------------------------------------------------------------------------------------
def probe_attention(xn, cand, last_c, cos, sin, mask, wq, bq, wk, bk, q_norm, k_norm,
                    head_dim: int, scale, probe_queries: int, heads: str = "mean", real=None):
    """Post-RoPE K for every candidate and the PAP score S_mha [B, C] of each candidate: the softmax
    weight the last real token's query (or the last `probe_queries` ones) gives it, averaged over the probe
    rows and aggregated over heads as `head_scores` says. With `real` ([B, C], a padded batch) probe rows that
    are padding are left out of the average (all of them if a row has no real probe row)."""
    b, c = xn.shape[0], xn.shape[1]
    k = project_heads(xn, wk, bk, head_dim, k_norm)
    k = apply_rope(k, gather_rows(cos, cand), gather_rows(sin, cand))
    probe_queries = size_min(probe_queries, c)   # never more probe rows than candidates
    offsets = torch.arange(probe_queries - 1, -1, -1, device=xn.device)
    probe_idx = (last_c.unsqueeze(1) - offsets.unsqueeze(0)).clamp(min=0)          # [B, P]
    probe_pos = cand.gather(1, probe_idx)
    q = project_heads(gather_rows(xn, probe_idx), wq, bq, head_dim, q_norm)
    q = apply_rope(q, gather_rows(cos, probe_pos), gather_rows(sin, probe_pos))    # [B, Hq, P, hd]
    hq, hkv = q.shape[1], k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, probe_queries, head_dim).to(torch.float32)
    logits = torch.einsum("bgrpd,bgcd->bgrpc", qg, k.to(torch.float32)) * scale
    if mask is not None:
        bias = _bias_from_mask(mask_block(mask, probe_pos, cand), torch.float32)   # [B, 1|H, P, C]
        bias = bias.reshape(b, -1, 1, probe_queries, c) if bias.shape[1] == 1 else \
            bias.reshape(b, hkv, hq // hkv, probe_queries, c)
        logits = logits + bias
    else:  # plain causal: candidate j is visible to probe row i iff j <= i (candidates are sorted)
        visible = torch.arange(c, device=xn.device).view(1, 1, 1, 1, c) <= probe_idx.view(b, 1, 1, -1, 1)
        logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if real is None:
        rows = probs.mean(dim=3)
    else:
        use = real.gather(1, probe_idx)                                               # [B, P]
        use = use | ~use.any(dim=1, keepdim=True)
        use = use.view(b, 1, 1, probe_queries, 1)
        rows = torch.where(use, probs, 0.0).sum(dim=3) / use.sum(dim=3).to(probs.dtype)
    return k, head_scores(rows, heads)


def head_scores(probs: torch.Tensor, heads: str) -> torch.Tensor:
    """[B, C] from the probe's softmax weights averaged over probe rows, [B, Hkv, Hq/Hkv, C]. "mean": over
    heads (the paper). "max": the largest query head. "kv_union": each KV group (its query heads averaged)
    ranks the candidates; a candidate's score is C minus its best rank in any group, plus its mean score (< 1)
    to order equal ranks: top-M then takes each group's first choices in turn, the union of per-KV-head top
    lists."""
    if heads == "mean":
        return probs.mean(dim=(1, 2))
    if heads == "max":
        return probs.amax(dim=(1, 2))
    if heads == "kv_union":
        group = probs.mean(dim=2)                                                     # [B, G, C]
        c = group.shape[-1]
        # rank 0 = the group's highest score; among equal scores the later candidate ranks first
        order = torch.sort(group.flip(-1), dim=-1, descending=True, stable=True).indices
        order = c - 1 - order
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(c, device=probs.device).expand_as(order))
        best = ranks.amin(dim=1)                                                      # [B, C]
        return (c - best).to(torch.float32) + probs.mean(dim=(1, 2))
    raise ValueError(f"spts: unknown head aggregation {heads!r}")


def smooth_scores(scores: torch.Tensor, kernel: int, kind: str) -> torch.Tensor:
    """Pool [B, C] scores along the candidate order with an odd `kernel` ("avg": the mean of the neighbours
    inside the row, "max": their largest), so that a span of neighbouring tokens is kept together."""
    if kernel <= 1:
        return scores
    x = scores.unsqueeze(1)
    if kind == "avg":
        y = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    elif kind == "max":
        # a window max over -inf padding; F.max_pool1d would specialise a symbolic candidate count (its
        # shape check guards on the length), making a dynamic graph recompile for every prompt length
        r = kernel // 2
        y = F.pad(x, (r, r), value=float("-inf")).unfold(-1, kernel, 1).amax(dim=-1)
    else:
        raise ValueError(f"spts: unknown pooling {kind!r}")
    return y.squeeze(1)


def forced_positions(n_ref: torch.Tensor, padding_mask, sink: int, window: int) -> torch.Tensor:
    """[B, N] True at each row's first `sink` and last `window` real tokens (always active)."""
    if padding_mask is None:
        real = torch.ones_like(n_ref, dtype=torch.bool)
    else:
        real = padding_mask.bool()
    rank = real.long().cumsum(dim=1) - 1                               # index among the row's real tokens
    count = real.long().sum(dim=1, keepdim=True)
    return real & ((rank < sink) | (rank >= count - window))


def padding_loses(scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Padding candidates (`real` False) score -inf: they are kept only where a row has fewer real candidates
    than the budget, so a padded row keeps the real tokens it would keep alone."""
    return scores.masked_fill(~real, float("-inf"))


def force_rows(scores: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Forced candidates ([B, C] bool) score +inf: they win every top-M and no prune takes them."""
    return scores.masked_fill(forced, float("inf"))


def top_rows(scores, last_c, m):
    """Indices of the m highest scores per row, the last real token forced in, sorted ascending so that
    causal order holds among them. Ties go to the later token (masked keys score exactly 0, so ties are
    real): a stable descending sort of the reversed scores."""
    b, c = scores.shape
    if statically_known_true(m == c):   # every row: the sorted result is 0..C-1, without the sorts
        return torch.arange(c, device=scores.device).unsqueeze(0).expand(b, c).contiguous()
    forced = scores.scatter(1, last_c.unsqueeze(1), float("inf"))
    order = torch.sort(forced.flip(1), dim=1, descending=True, stable=True).indices
    # the first m columns, taken with a gather rather than a slice: a slice whose length may equal the
    # full width makes the tensor's layout depend on whether m == C, and that guards on N.
    order = order.gather(1, torch.arange(m, device=scores.device).unsqueeze(0).expand(b, m))
    return (c - 1 - order).sort(dim=1).values


def size_min(a, b):
    """min(a, b) of two sizes. On symbolic sizes it guards on which side wins and returns that side's own
    expression. torch.sym_min would nest a Min in every later stage's sizes, and Inductor's C++ index
    simplification (sympy) grows steeply with each nesting: a 4-layer tiny model with two stages spent 60% of
    its dynamic compile there. The guards hold for whole ranges of lengths (a fractional budget against the
    candidates, for every N >= 1), and the recompile-count tests keep their counts (tests/test_rewrite.py)."""
    return a if a <= b else b


def size_max(a, b):
    """max(a, b) of two sizes; see size_min."""
    return a if a >= b else b


def select_active(scores, last_c, budget, n_ref):
    """Top-M rows, M = max(1, min(budget tokens of N, C)), with N = n_ref.shape[-1]."""
    m = size_max(1, size_min(budget_tokens(budget, n_ref.shape[-1]), scores.shape[1]))
    return top_rows(scores, last_c, m)


def attend_active(xa, act, cand, k_all, cos, sin, mask, wq, bq, wv, bv, wo, bo, q_norm, post_norm,
                  head_dim: int, scale, v_all=None):
    """The attention block on the active rows only. Returns (delta [B, M, D], K_act, V_act). With `v_all`
    (every candidate's V, for a cache that keeps them all) the active rows' V are read from it."""
    pos = cand.gather(1, act)
    q = project_heads(xa, wq, bq, head_dim, q_norm)
    q = apply_rope(q, gather_rows(cos, pos), gather_rows(sin, pos))
    k = gather_rows(k_all, act, dim=2)
    v = project_heads(xa, wv, bv, head_dim, None) if v_all is None else gather_rows(v_all, act, dim=2)
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_block(mask, pos, pos), scale=scale,
                                             enable_gqa=gqa)
    out = out.transpose(1, 2).reshape(xa.shape[0], xa.shape[1], -1)
    delta = norm_apply(F.linear(out, wo, bo), post_norm)
    return delta, k, v


def attend_all(x, cos, sin, mask, wq, bq, wk, bk, wv, bv, wo, bo, norm, q_norm, k_norm, post_norm,
               head_dim: int, scale):
    """The whole attention block on every row, with SDPA (plain causal when mask is None).
    Returns (x + attention output, K, V): the dense form used by the clean-up."""
    xn = norm_apply(x, norm)
    q = apply_rope(project_heads(xn, wq, bq, head_dim, q_norm), cos, sin)
    k = apply_rope(project_heads(xn, wk, bk, head_dim, k_norm), cos, sin)
    v = project_heads(xn, wv, bv, head_dim, None)
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                         enable_gqa=gqa)
    out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return x + norm_apply(F.linear(out, wo, bo), post_norm), k, v


# ---------------------------------------------------------------------------------------------
# LTP: proxy score, FFN on active rows
# ---------------------------------------------------------------------------------------------
def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    try:
        return ACTIVATIONS[act](x)
    except KeyError:
        raise ValueError(f"spts: unknown FFN activation {act!r}") from None


def ltp_scores(hn, gate_in, gate_out, up_in, up_out, down, act: str, attn_scores, real):
    """S_ffn = ||proxy(hn)|| (`calibration.proxy_norm`, the one definition of the proxy), times the
    layer's PAP score when there is one. Padding candidates (`real` False) score -inf: they never
    compete for the FFN."""
    score = proxy_norm(hn, (gate_in, gate_out, up_in, up_out, down), act)
    score = score if attn_scores is None else score * attn_scores
    return score if real is None else padding_loses(score, real)


def ffn_rows(ha, w_gate, w_up, w_down, act: str, post_norm):
    """The gated FFN on the given rows."""
    y = F.linear(activation(F.linear(ha, w_gate), act) * F.linear(ha, w_up), w_down)
    return norm_apply(y, post_norm)


# ---------------------------------------------------------------------------------------------
# MSDP: prune at a stage end
# ---------------------------------------------------------------------------------------------
def prune_keep(scores, last_c, prune, n_ref, real):
    """Indices (into the candidate list) of the candidates that survive a stage end. Only real tokens are
    pruned (padding counts as +inf), so a padded row prunes what it would prune alone."""
    if real is not None:
        scores = scores.masked_fill(~real, float("inf"))
    c = scores.shape[1]
    p = size_min(budget_tokens(prune, n_ref.shape[-1]), c - 1)
    return top_rows(scores, last_c, c - p)


# ---------------------------------------------------------------------------------------------
# Shared layer code (passes/outline.py)
# ---------------------------------------------------------------------------------------------
def run_layer(subgraph, name: str, *operands):
    """One skipping layer's region, outlined into `subgraph`, called through the `invoke_subgraph`
    higher-order op. Under tracing, every call with the same identifier reuses the first call's traced graph,
    and Inductor compiles it once; so the identifier is the module's name (one per distinct region code) and
    the operands' shapes, strides and dtypes. On real tensors (compiler="eager", or a dispatch mode such as
    FlopCounterMode, which the op has no rule for) the module runs directly."""
    from torch._higher_order_ops.invoke_subgraph import invoke_subgraph
    from torch._subclasses.fake_tensor import is_fake
    if not any(is_fake(o) for o in operands):
        return subgraph(*operands)
    shapes = ";".join(f"{o.dtype}{tuple(o.shape)}{o.stride()}{o.device}" for o in operands)
    return invoke_subgraph(subgraph, f"{name}_{hashlib.sha256(shapes.encode()).hexdigest()[:16]}", *operands)
