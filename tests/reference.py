"""An eager reference of SPTS prefill (spts_compile/SEMANTICS.md), written on the Hugging Face modules.

This file is the ground truth the compiled rewrite is tested against, so it is deliberately written
independently of `spts_compile/` and `passes/`: it reads the HF model's own submodules
(`model.model.embed_tokens`, `layers[i].input_layernorm`, `self_attn.q_proj`, `mlp.gate_proj`, ...,
`model.model.norm`, `lm_head`, `model.model.rotary_emb`) and builds the attention mask from first
principles. The only project code it uses is the schedule (`spts_compile.config`) and the LTP proxy
(`spts_compile.calibration.build_ltp_proxy` / `proxy_norm`), whose exact values the contract names.

Clarity beats speed: each batch row runs on its own through a Python loop over layers.

Choices where SEMANTICS.md is silent (keep the passes in step with these):
- top-k ties: among equal scores the later token (larger candidate index) wins. Masked keys score
  exactly 0, so ties are real (left padding, keys outside a sliding window), and torch.topk makes no
  promise about them. `select_top` implements the rule.
- M = max(1, min(budget_tokens(budget, N), C)): a fractional budget that rounds to 0 still keeps the
  last token.
- probe rows: pq = min(probe_queries, C) candidate indices last_c - pq + 1 .. last_c, each clamped at 0 (so a
  short prompt repeats row 0). Probe rows whose token is padding are left out of the mean.
- with pap=False the FFN score is Cn alone; S_mha is still computed (for pruning and for the record).
- N < schedule.min_tokens: the whole prefill is dense.
- padding never competes: its FFN score is -inf, and a stage end prunes the lowest *real* tokens
  (padding counts as +inf there), so a padded row prunes what it would prune alone. The keep-set selectors
  (once, stage) score padding -inf when they keep their top M (after pooling, which would lift a padding
  token next to a high-scoring one), so a padded row keeps what it would keep alone.
- kv_cache "all": a skipping layer's cache holds every position 0..N-1. The candidates' rows are the layer's own
  K (from the probe) and V = v_proj(xn) of all C candidates; a token outside the candidates (pruned at a stage
  end, or left out of a keep-set) gets K/V projected by this layer (attn_norm, k/v projections, k_norm, RoPE at
  its position) from its frozen value, the latest value it had (`latest`).
- a padding query row (which the model's mask leaves with no key at all) attends to itself only
  (besides any real key it may see), so it stays finite; its values are never compared.

Decoding on a compacted cache (`reference_cache`, `reference_step`, `reference_decode`): each row keeps, per
layer, the K/V rows its prefill cached with the original position of each (`kept[l]["kv_pos"]`) in plain
Python lists. New tokens take the next positions (also their RoPE positions) and run every layer dense: their
K/V are appended, and a token at position t attends to the entries at positions p <= t that are real tokens
and, on sliding layers, with t - p < window, tested pair by pair. The reference keeps every entry (it never
crops a sliding cache: the window test excludes what a crop would drop). Left-padded rows under `generate`
(whose RoPE positions skip the padding) are compared with the row run alone.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor

from spts_compile.config import Schedule, budget_tokens
from spts_compile.calibration import build_ltp_proxy, proxy_norm

# HF activation names -> the names `proxy_norm` takes.
_PROXY_ACT = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
              "gelu_new": "gelu_tanh", "gelu": "gelu"}


# ---------------------------------------------------------------------------------------------
# Reading the HF model
# ---------------------------------------------------------------------------------------------
def _hidden_act(config) -> str:
    return getattr(config, "hidden_activation", None) or config.hidden_act


def proxy_act(model) -> str:
    return _PROXY_ACT[_hidden_act(model.config)]


def mlp_weights(mlp) -> tuple[Tensor, Tensor, Tensor]:
    """(W_gate [I, D], W_up [I, D], W_down [D, I]); a fused gate_up_proj is gate first, then up."""
    if hasattr(mlp, "gate_up_proj"):
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        return gate, up, mlp.down_proj.weight
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def build_proxies(model, channels: int, rank: int, importance: list[Tensor] | None = None) -> dict[int, tuple]:
    """The LTP proxy tensors of every layer, keyed by layer index."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        g, u, d = mlp_weights(layer.mlp)
        imp = None if importance is None else importance[i]
        out[i] = build_ltp_proxy(g, u, d, channels=channels, rank=rank, importance=imp).tensors()
    return out


def sliding_window(config, layer: int) -> int | None:
    """The layer's window: per-layer `layer_types` when the config has them, else `sliding_window`
    for every layer (Mistral, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if types[layer] == "sliding_attention" else None
    return window


def _rope_tables(model, n: int, layer: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [n, rotary_dim] for positions 0..n-1 (HF's default position_ids = arange(N))."""
    rotary = model.model.rotary_emb
    if hasattr(model.model, "rotary_emb_local") and sliding_window(model.config, layer) is not None:
        rotary = model.model.rotary_emb_local   # transformers 4.x Gemma-3: a second RoPE for sliding layers
    pos = torch.arange(n, device=like.device)[None]
    if "layer_type" in inspect.signature(rotary.forward).parameters:   # Gemma-3: one RoPE per layer type
        cos, sin = rotary(like, pos, model.config.layer_types[layer])
    else:
        cos, sin = rotary(like, pos)
    return cos[0], sin[0]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [H, T, hd]; cos/sin [T, rd] with rd <= hd (partial rotary leaves the tail alone)."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


def _split_heads(t: Tensor, hd: int) -> Tensor:
    return t.view(t.shape[0], -1, hd)           # [T, H, hd]


def _project_q(attn, xn: Tensor) -> Tensor:
    """Query heads [Hq, T, hd] after q_proj and q_norm, before RoPE."""
    hd = attn.head_dim
    if hasattr(attn, "qkv_proj"):
        q = attn.qkv_proj(xn)[:, : attn.config.num_attention_heads * hd]
    else:
        q = attn.q_proj(xn)
    q = _split_heads(q, hd)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    return q.transpose(0, 1)


def _project_kv(attn, xn: Tensor) -> tuple[Tensor, Tensor]:
    """Key heads (after k_norm, before RoPE) and value heads, each [Hkv, T, hd]."""
    hd = attn.head_dim
    if hasattr(attn, "qkv_proj"):
        qkv = attn.qkv_proj(xn)
        nq, nkv = attn.config.num_attention_heads * hd, attn.config.num_key_value_heads * hd
        k, v = qkv[:, nq: nq + nkv], qkv[:, nq + nkv:]
    else:
        k, v = attn.k_proj(xn), attn.v_proj(xn)
    k, v = _split_heads(k, hd), _split_heads(v, hd)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    return k.transpose(0, 1), v.transpose(0, 1)


def _norms(layer):
    """(attention input norm, post-attention output norm or None, FFN input norm, post-FFN norm or None)."""
    if hasattr(layer, "pre_feedforward_layernorm"):      # Gemma: sandwich norms
        return (layer.input_layernorm, layer.post_attention_layernorm,
                layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm)
    return layer.input_layernorm, None, layer.post_attention_layernorm, None


def allowed(q_pos: Tensor, k_pos: Tensor, real: Tensor, window: int | None) -> Tensor:
    """The model's mask between query positions [Tq] and key positions [Tk], from first principles:
    causal, key is a real token, and inside the sliding window. A query always sees itself, which only
    changes padding queries (they would otherwise see nothing)."""
    q, k = q_pos[:, None], k_pos[None, :]
    ok = (k <= q) & real[k_pos][None, :]
    if window is not None:
        ok = ok & (q - k < window)
    return ok | (q == k)


def _attention_probs(q: Tensor, k: Tensor, ok: Tensor, scale: float) -> Tensor:
    """Softmax weights [Hq, Tq, Tk]; query head h uses KV head h // (Hq / Hkv)."""
    groups = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(groups, dim=0)
    logits = (q @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~ok, float("-inf"))
    return torch.softmax(logits.float(), dim=-1).to(q.dtype)


def _attend(q: Tensor, k: Tensor, v: Tensor, ok: Tensor, scale: float) -> Tensor:
    """Attention output [Tq, Hq * hd]."""
    probs = _attention_probs(q, k, ok, scale)
    out = probs @ v.repeat_interleave(q.shape[0] // v.shape[0], dim=0)      # [Hq, Tq, hd]
    return out.transpose(0, 1).reshape(q.shape[1], -1)


def select_top(scores: Tensor, m: int, always: int) -> Tensor:
    """Indices of the m highest scores, `always` forced in, ties to the larger index, sorted ascending."""
    s = scores.clone().float()
    s[always] = float("inf")
    c = s.shape[0]
    # A stable descending sort of the reversed scores puts, among equal scores, the larger index first.
    order = torch.sort(s.flip(0), descending=True, stable=True).indices
    return (c - 1 - order[:m]).sort().values


def aggregate_heads(probs: Tensor, kv_heads: int, heads: str) -> Tensor:
    """S [C] from softmax weights [Hq, P, C]. mean: over heads and probe rows. max: the largest query head's
    mean over probe rows. kv_union: each KV group ranks the candidates by its mean (ties: later first); the
    score is C minus the best rank in any group, plus the overall mean (< 1) to order equal ranks."""
    if heads == "mean":
        return probs.mean(dim=(0, 1))
    if heads == "max":
        return probs.mean(dim=1).max(dim=0).values
    c = probs.shape[-1]
    groups = probs.reshape(kv_heads, -1, *probs.shape[1:]).mean(dim=(1, 2))      # [Hkv, C]
    best = [c] * c
    for g in groups.tolist():
        for rank, j in enumerate(sorted(range(c), key=lambda j: (-g[j], -j))):
            best[j] = min(best[j], rank)
    return torch.tensor([float(c - r) for r in best]) + probs.mean(dim=(0, 1))


def smooth(scores: Tensor, kernel: int, kind: str) -> Tensor:
    """Each candidate's score becomes the mean (avg) or largest (max) score of the candidates within
    kernel // 2 of it in candidate order, the row's ends cutting the neighbourhood short."""
    if kernel <= 1:
        return scores
    h, c = kernel // 2, scores.shape[0]
    pick = torch.mean if kind == "avg" else torch.amax
    return torch.stack([pick(scores[max(0, j - h):min(c, j + h + 1)]) for j in range(c)])


def last_positions(attention_mask: Tensor | None, batch: int, n: int) -> list[int]:
    if attention_mask is None:
        return [n - 1] * batch
    out = []
    for b in range(batch):
        real = torch.nonzero(attention_mask[b]).flatten()
        out.append(int(real[-1]) if real.numel() else n - 1)
    return out


# ---------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_prefill(model, input_ids: Tensor, attention_mask: Tensor | None = None, *, schedule: Schedule,
                      proxies: dict[int, tuple] | None = None, output_hidden_states: bool = False,
                      record_blocks: bool = False, selector="probe", seed: int = 0) -> dict:
    """SPTS prefill of `input_ids` [B, N] exactly as SEMANTICS.md defines it.

    selector="once" is the prune-once mode instead: the first skipping layer's probe scores the
    candidates once; each skipping layer keeps the top M of its candidates by that score for good
    (no prune, no LTP) and runs densely on them. selector="stage" is the same, except that the first
    layer of each later stage scores its remaining candidates again with its own probe. A callable selector
    is a score function `score(x_c [1, C, D], cand [1, C], layer, seed) -> [1, C]` of the layer's input rows:
    its scores replace S_mha for the attention's top-M, the FFN's top-M (no proxy) and the stage-end prune.

    Returns a dict:
      logits [B, N, V];
      hidden_states (only if requested): a tuple shaped like HF's: the embeddings, then each layer's
        full-length output (latest value of every token), the last one after the final norm, as
        transformers 5 returns it;
      kv: per layer (K, V), each [B, Hkv, L_l, hd], K after RoPE at the tokens' original positions (with
        kv_cache "all", L_l = N at every layer: tokens outside the candidates are projected from their frozen
        value, SEMANTICS.md "Retrieval protection");
      kept: per layer a dict: 'cand' [B, C] candidate positions at the layer's input, 'attn' [B, M]
        positions that went through attention (= the layer's KV entries), 'ffn' [B, M'] positions that
        went through the FFN, 's_mha' [B, C] and 's_ffn' [B, C] scores (None where not computed),
        'pruned' [B, P] positions removed after the layer (empty when none);
      attention_mask: the mask used (ones when None was given).
    With `record_blocks`, each 'kept' entry also holds the candidate rows [B, C, D] at the layer's
    input ('x'), after its attention block ('h') and after its FFN block ('y').
    Proxies (layer -> proxy tensors) are needed when LTP is on; None builds them from the weights
    with the schedule's ltp_channels / ltp_rank (or 1/6 of the FFN width and 1/4 of that).
    """
    b_size, n = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    layers = model.model.layers
    depth = len(layers)
    if schedule.depth != depth:
        raise ValueError(f"schedule is for {schedule.depth} layers, the model has {depth}")
    if not callable(selector) and selector not in ("probe", "once", "stage"):
        raise ValueError(f"the reference implements selectors 'probe', 'once', 'stage' and score functions, "
                         f"not {selector!r}")
    if schedule.ltp and proxies is None and selector == "probe":
        width = mlp_weights(layers[0].mlp)[0].shape[0]
        channels = schedule.ltp_channels or max(1, width // 6)
        proxies = build_proxies(model, channels, schedule.ltp_rank or max(1, channels // 4))

    rows = [_prefill_row(model, input_ids[b], attention_mask[b], last, schedule, proxies, record_blocks, selector, seed)
            for b, last in enumerate(last_positions(attention_mask, b_size, n))]

    def stack(get):
        return torch.stack([get(r) for r in rows])

    model_ = model.model
    final = stack(lambda r: r["hidden"][-1])
    normed = model_.norm(final)
    logits = model.lm_head(normed)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    out = {"logits": logits, "attention_mask": attention_mask}
    out["kv"] = [(stack(lambda r: r["kv"][i][0]), stack(lambda r: r["kv"][i][1])) for i in range(depth)]
    out["kept"] = []
    for i in range(depth):
        rec = {}
        for key in rows[0]["kept"][i]:
            vals = [r["kept"][i][key] for r in rows]
            rec[key] = None if vals[0] is None else torch.stack(vals)
        out["kept"].append(rec)
    if output_hidden_states:
        hs = [stack(lambda r: r["hidden"][i]) for i in range(depth + 1)]
        hs[-1] = normed
        out["hidden_states"] = tuple(hs)
    return out


def _prefill_row(model, ids: Tensor, am: Tensor, last_pos: int, schedule: Schedule, proxies,
                 record_blocks: bool = False, selector="probe", seed: int = 0) -> dict:
    """One batch row through every layer. Returns per-layer full-length hidden states, KV and selections."""
    config = model.config
    n = ids.shape[0]
    real = am.bool()
    x = model.model.embed_tokens(ids[None])[0]                   # [N, D]
    latest = x.clone()                                           # every token's latest value
    hidden = [latest.clone()]
    cand = torch.arange(n)
    x_c = x
    all_dense = n < schedule.min_tokens
    act_name = proxy_act(model)
    kvs, kept = [], []
    once_scores = None

    def probe(attn, xn, k_all, cos_all, sin_all, last_c, window):
        """S_mha [C]: the last probe_queries queries' softmax weights over the candidates, head-averaged."""
        pq = min(schedule.probe_queries, cand.shape[0])
        rows = torch.tensor([max(last_c - pq + 1 + i, 0) for i in range(pq)])
        rows = rows[real[cand[rows]]] if real[cand[rows]].any() else rows
        qp = _rope(_project_q(attn, xn[rows]), cos_all[cand[rows]], sin_all[cand[rows]])
        probs = _attention_probs(qp, k_all, allowed(cand[rows], cand, real, window), attn.scaling).float()
        return aggregate_heads(probs, k_all.shape[0], schedule.heads)

    real_pos = torch.nonzero(real).flatten().tolist()
    forced_pos = set(real_pos[:schedule.sink]) | (set(real_pos[-schedule.window:]) if schedule.window else set())

    def retrieval(scores):
        """(smoothed scores, the same with the sink and window tokens at +inf)."""
        smoothed = smooth(scores, schedule.pool, schedule.pool_kind)
        return smoothed, force(smoothed)

    def force(scores):
        out = scores.clone()
        for j, p in enumerate(cand.tolist()):
            if p in forced_pos:
                out[j] = float("inf")
        return out

    for l, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        attn_norm, post_attn_norm, ffn_norm, post_ffn_norm = _norms(layer)
        window = sliding_window(config, l)
        cos_all, sin_all = _rope_tables(model, n, l, x)
        skipping = not all_dense and l >= schedule.start_layer
        stage = (schedule.stage_of(l) if schedule.msdp else 0) if skipping else None
        c = cand.shape[0]
        last_c = int((cand == last_pos).nonzero()[0, 0])
        m = max(1, min(budget_tokens(schedule.budgets[stage], n), c)) if skipping else c
        once = skipping and selector in ("once", "stage")
        if once:  # keep-set modes: score with a probe (once, or at each stage start), keep the top m for good
            new_stage = schedule.msdp and l > schedule.start_layer and schedule.is_stage_end(l - 1)
            if once_scores is None or (selector == "stage" and new_stage):
                xn0 = attn_norm(x_c)
                k0 = _rope(_project_kv(attn, xn0)[0], cos_all[cand], sin_all[cand])
                once_scores = retrieval(probe(attn, xn0, k0, cos_all, sin_all, last_c, window))[1]
                once_scores = once_scores.masked_fill(~real[cand], float("-inf"))   # padding never competes
            keep = select_top(once_scores, m, last_c)
            cand, x_c, once_scores = cand[keep], x_c[keep], once_scores[keep]
            c = m
            last_c = int((cand == last_pos).nonzero()[0, 0])

        # -- attention (PAP) --
        xn = attn_norm(x_c)
        k_pre, v_all = _project_kv(attn, xn)
        k_all = _rope(k_pre, cos_all[cand], sin_all[cand])        # [Hkv, C, hd]
        s_mha = probe(attn, xn, k_all, cos_all, sin_all, last_c, window) if skipping and not once else None
        if skipping and callable(selector):   # a score function replaces the probe's scores
            s_sel = selector(x_c[None], cand[None], l, seed)[0].float()
        else:
            s_sel = s_mha
        if skipping and not once:
            s_sel, s_chosen = retrieval(s_sel)
        act = select_top(s_chosen, m, last_c) if skipping and schedule.pap and not once else torch.arange(c)
        pos_a = cand[act]
        q = _rope(_project_q(attn, xn[act]), cos_all[pos_a], sin_all[pos_a])
        k_act, v_act = k_all[:, act], v_all[:, act]
        o = attn.o_proj(_attend(q, k_act, v_act, allowed(pos_a, pos_a, real, window), attn.scaling))
        if post_attn_norm is not None:
            o = post_attn_norm(o)
        h_c = x_c.clone()
        h_c[act] = x_c[act] + o
        keep_all = skipping and not once and schedule.pap and schedule.kv_cache == "candidates"
        every = skipping and schedule.kv_cache == "all"
        if every:   # every token: the candidates' own K/V, the others' from their frozen value (latest)
            k_pre_n, v_n = _project_kv(attn, attn_norm(latest))
            k_n = _rope(k_pre_n, cos_all, sin_all)
            k_n[:, cand], v_n[:, cand] = k_all, v_all
            kvs.append((k_n, v_n))
        else:
            kvs.append((k_all, v_all) if keep_all else (k_act, v_act))

        # -- FFN (LTP) --
        hn = ffn_norm(h_c)
        s_ffn = None
        if skipping and schedule.ltp and not once and callable(selector):
            s_ffn = force(s_sel)                                    # the same scores, padding included
            act_f = select_top(s_ffn, m, last_c)
        elif skipping and schedule.ltp and not once:
            cn = proxy_norm(hn, proxies[l], act_name)
            s_ffn = cn * s_sel if schedule.pap else cn
            s_ffn = s_ffn.masked_fill(~real[cand], float("-inf"))   # padding never competes for the FFN
            s_ffn = force(s_ffn)
            act_f = select_top(s_ffn, m, last_c)
        else:
            act_f = torch.arange(c)
        f = layer.mlp(hn[act_f])
        if post_ffn_norm is not None:
            f = post_ffn_norm(f)
        y_c = h_c.clone()
        y_c[act_f] = h_c[act_f] + f
        latest[cand] = y_c

        rec = {"cand": cand.clone(), "attn": pos_a.clone(), "ffn": cand[act_f].clone(),
               "kv_pos": torch.arange(n) if every else (cand if keep_all else pos_a).clone(),
               "s_mha": s_mha, "s_ffn": None if s_ffn is None else s_ffn.float()}
        if record_blocks:
            rec.update(x=x_c.clone(), h=h_c.clone(), y=y_c.clone())

        # -- stage end (MSDP): prune for good --
        if skipping and schedule.is_stage_end(l) and not once:
            p = min(budget_tokens(schedule.prune[stage], n), c - 1)
            keep = select_top(s_chosen.masked_fill(~real[cand], float("inf")), c - p, last_c)  # prune real tokens only
            gone = torch.ones(c, dtype=torch.bool)
            gone[keep] = False
            rec["pruned"] = cand[gone].clone()
            cand, x_c = cand[keep], y_c[keep]
        else:
            rec["pruned"] = cand[:0].clone()
            x_c = y_c
        kept.append(rec)
        hidden.append(latest.clone())
    return {"hidden": hidden, "kv": kvs, "kept": kept}


# ---------------------------------------------------------------------------------------------
# Decode on the compacted cache
# ---------------------------------------------------------------------------------------------
def reference_cache(ref_out: dict) -> dict:
    """The per-row, per-layer cache a reference prefill leaves: each layer's K/V rows with the original position
    of each row, the prompt's padding, and the sequence length so far. Rows are kept apart (a list per row)."""
    n = ref_out["logits"].shape[1]
    am = ref_out["attention_mask"]
    rows = []
    for b in range(am.shape[0]):
        layers = [{"k": k[b], "v": v[b], "pos": [int(p) for p in rec["kv_pos"][b]]}
                  for (k, v), rec in zip(ref_out["kv"], ref_out["kept"])]
        rows.append({"layers": layers, "real": [bool(r) for r in am[b]]})
    return {"rows": rows, "seen": n}


@torch.no_grad()
def reference_step(model, cache: dict, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Feed ids [B, q] through every layer on top of `cache` (updated in place) and return logits [B, q, V].

    The new tokens sit at sequence positions seen .. seen + q - 1, which are also their RoPE positions (what a
    forward without position_ids gives). Every layer runs dense on them: q/k/v of the new tokens, their K/V
    appended to the layer's entries, and each new token at position t attends to the entries at positions p with
    p <= t, p a real token (the prompt's padding, then `attention_mask` [B, q] for the new tokens; default
    real), and, on sliding layers, t - p < window; a token always sees itself."""
    config = model.config
    seen, q = cache["seen"], ids.shape[1]
    cap = getattr(config, "final_logit_softcapping", None)
    out = []
    for b, row in enumerate(cache["rows"]):
        new_real = [True] * q if attention_mask is None else [bool(r) for r in attention_mask[b]]
        row["real"] = row["real"] + new_real
        positions = list(range(seen, seen + q))
        x = model.model.embed_tokens(ids[b:b + 1])[0]                           # [q, D]
        for l, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            attn_norm, post_attn_norm, ffn_norm, post_ffn_norm = _norms(layer)
            window = sliding_window(config, l)
            cos_all, sin_all = _rope_tables(model, seen + q, l, x)
            cos, sin = cos_all[seen:seen + q], sin_all[seen:seen + q]
            xn = attn_norm(x)
            qh = _rope(_project_q(attn, xn), cos, sin)
            k_new, v_new = _project_kv(attn, xn)
            entry = row["layers"][l]
            entry["k"] = torch.cat([entry["k"], _rope(k_new, cos, sin)], dim=1)
            entry["v"] = torch.cat([entry["v"], v_new], dim=1)
            entry["pos"] = entry["pos"] + positions
            ok = torch.zeros(q, len(entry["pos"]), dtype=torch.bool)
            for i, t in enumerate(positions):
                for j, p in enumerate(entry["pos"]):
                    ok[i, j] = p == t or (p <= t and row["real"][p] and (window is None or t - p < window))
            o = attn.o_proj(_attend(qh, entry["k"], entry["v"], ok, attn.scaling))
            if post_attn_norm is not None:
                o = post_attn_norm(o)
            h = x + o
            f = layer.mlp(ffn_norm(h))
            if post_ffn_norm is not None:
                f = post_ffn_norm(f)
            x = h + f
        logits = model.lm_head(model.model.norm(x))
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        out.append(logits)
    cache["seen"] = seen + q
    return torch.stack(out)


def reference_crop(cache: dict, tokens: int) -> dict:
    """Forget the last `tokens` positions of the sequence (what `DynamicCache.crop(-tokens)` means): every layer of
    every row keeps the entries at positions < seen - tokens, however many entries that is. In place."""
    seen = cache["seen"] - tokens
    for row in cache["rows"]:
        row["real"] = row["real"][:seen]
        for entry in row["layers"]:
            keep = [j for j, p in enumerate(entry["pos"]) if p < seen]
            entry["k"], entry["v"] = entry["k"][:, keep], entry["v"][:, keep]
            entry["pos"] = [entry["pos"][j] for j in keep]
    cache["seen"] = seen
    return cache


@torch.no_grad()
def reference_decode(model, ref_out: dict, next_ids: Tensor | int | None = None, steps: int = 8,
                     cache: dict | None = None) -> Tensor:
    """Greedy decoding that continues from the reference's per-layer compacted KV cache (`reference_step`, one
    token at a time). The first token is `next_ids` [B] (default: the argmax of the prefill's last logits).
    Returns [B, steps] token ids: what `model.generate(..., max_new_tokens=steps, do_sample=False)` appends to
    the prompt when the cache is this one and the RoPE positions continue the cache's (batch 1, or rows
    without padding)."""
    cache = reference_cache(ref_out) if cache is None else cache
    if next_ids is None:
        tok = ref_out["logits"][:, -1].argmax(-1)
    else:
        tok = torch.as_tensor(next_ids).reshape(-1)
    out = [tok]
    for _ in range(steps - 1):
        tok = reference_step(model, cache, tok[:, None])[:, -1].argmax(-1)
        out.append(tok)
    return torch.stack(out, dim=1)
