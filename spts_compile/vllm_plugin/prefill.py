"""SPTS on vLLM's pure-prefill steps: what the decoder-layer variants (llama.py, qwen2.py) share.

What one skipping layer computes, per request of n tokens (spts_compile/SEMANTICS.md, sections 3-5, with
kv_cache "all"; the selection and scoring are `spts_compile.runtime`'s helpers on batch-1 views):
- x = the layer's input rows, every token of the request (vLLM carries the stream as hidden + residual; both are
  added here). A token that left the candidates (pruned, or outside a keep-set) passes every later layer
  unchanged, so its row of x is its frozen hidden state;
- xn = input_layernorm(x); q, k, v for every row, RoPE at the tokens' positions (vLLM's own modules);
- K and V of every row go into the paged cache at vLLM's slot mapping (`unified_kv_cache_update`): the
  candidates' own K/V, and the frozen states' projections for the others, which is the "all" policy;
- selector "probe": PAP (probe, top M, attention among the active rows), LTP (the proxy's norm times S_mha,
  top M, FFN on those rows) and MSDP (at a stage end, the prune of the lowest S_mha); selector "once"/"stage":
  the probe ranks the candidates at the first skipping layer (and at each stage start for "stage"), each layer
  keeps its top M for good and runs dense on them;
- the layer returns full-length (f, h) with f + h = the new stream; rows that skipped keep their value.
Layers before `start_layer`, requests shorter than `min_tokens` and steps that are not pure prefills are dense.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from spts_compile import runtime
from spts_compile.config import SPTSConfig

SELECTORS = ("probe", "once", "stage")
# Options the plugin cannot honour yet, with the only value it accepts.
FIXED = {"debug_dir": None, "record_selection": False}


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
def plugin_config(opts: dict) -> SPTSConfig:
    """The SPTSConfig of SPTS_VLLM_OPTIONS, kv_cache "all" unless given, after refusing what the plugin cannot
    honour (a ValueError naming the option). Unknown options and bad values raise in SPTSConfig itself. The
    options about compiling the rewrite (causal_cleanup, verify, share_layers, compiler) have nothing to act on in
    an eager vLLM layer and are accepted as they are."""
    opts = dict(opts)
    opts.setdefault("kv_cache", "all")
    cfg = SPTSConfig(**opts)
    if cfg.selector not in SELECTORS:
        raise ValueError(f"spts vllm plugin: selector={cfg.selector!r} is not supported; it implements "
                         f"{list(SELECTORS)}")
    every_token_stays = cfg.selector == "probe" and not cfg.msdp
    if cfg.kv_cache == "active" or (cfg.kv_cache == "candidates" and not every_token_stays):
        raise ValueError(f"spts vllm plugin: kv_cache={cfg.kv_cache!r} cannot be honoured: vLLM's paged cache "
                         f"holds K/V in every token's slot; use kv_cache='all'"
                         + ("" if cfg.kv_cache == "active" else " (with selector 'probe' and msdp=False, "
                            "'candidates' is the same)"))
    for key, value in FIXED.items():
        if getattr(cfg, key) != value:
            raise ValueError(f"spts vllm plugin: {key}={getattr(cfg, key)!r} is not supported; it implements "
                             f"{key}={value!r} (SPTS_VLLM_RECORD records the selection)")
    return cfg


def check_model(cfg: SPTSConfig, hf_config, layers) -> None:
    """Refuse, naming the option, what this model's layers cannot run under cfg."""
    if any(getattr(l.self_attn.attn, "sliding_window", None) is not None for l in layers):
        raise ValueError("spts vllm plugin: sliding-window attention is not supported (the skipping layers attend "
                         "with plain causal SDPA); serve without SPTS_VLLM_OPTIONS")
    if cfg.ltp and cfg.selector == "probe":
        from spts_compile.calibration import ACTIVATIONS
        if hf_config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"spts vllm plugin: ltp=True needs an FFN activation in {sorted(ACTIVATIONS)}, the "
                             f"model has {hf_config.hidden_act!r}; pass ltp=False")
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("spts vllm plugin: ltp=True does not support FFN biases (mlp_bias); pass ltp=False")


def build_proxies(cfg: SPTSConfig, schedule, layers) -> dict[int, tuple]:
    """The LTP proxy of each skipping layer, from its weights as loaded (before vLLM's CPU linears repack and
    drop them), as the backend builds them (`spts_compile.proxies.ProxyWatch`, `plan.ltp_dims`)."""
    from spts_compile.calibration import resolve_calibration
    from spts_compile.passes.plan import ltp_dims
    from spts_compile.proxies import ProxyWatch
    calibration = resolve_calibration(cfg.calibration)
    widths = [l.mlp.down_proj.weight.shape[1] for l in layers]
    hidden = layers[0].mlp.down_proj.weight.shape[0]
    if calibration is not None:
        calibration.check_fits(len(layers), hidden, widths)
    out = {}
    for layer in layers:
        i = layer.spts_index
        if i < schedule.start_layer:
            continue
        gate, up = layer.mlp.gate_up_proj.weight.detach().chunk(2, dim=0)
        down = layer.mlp.down_proj.weight.detach()
        channels, rank = ltp_dims(schedule, gate.shape[0], hidden)
        importance = calibration.importance_for(i) if calibration is not None else None
        watch = ProxyWatch(i, (gate, up, down), channels, rank, importance)
        out[i] = tuple(t.contiguous() for t in watch.build().tensors())
    return out


# ---------------------------------------------------------------------------------------------
# The step: which requests, and what each carries from layer to layer
# ---------------------------------------------------------------------------------------------
@dataclass
class Request:
    """One request's rows [start, end) of the flattened batch and its selection state."""
    start: int
    end: int
    cand: torch.Tensor                       # candidate positions in the request, ascending
    forced: torch.Tensor | None = None       # [n] sink/window tokens (None: none)
    keep_scores: torch.Tensor | None = None  # keep-set selectors: [1, C] scores of the candidates

    @property
    def n(self) -> int:
        return self.end - self.start


@dataclass
class Step:
    index: int
    requests: list[Request]
    records: list[dict] = field(default_factory=list)


current_step: Step | None = None          # published by SPTSCausalLM.forward for the model call it wraps
_steps_seen = 0


def pure_prefill_segments(num_tokens: int) -> list[tuple[int, int]] | None:
    """The requests of this step when every one is a whole fresh prompt (query length = sequence length:
    nothing cached before it, not a decode, not a continued chunk), else None."""
    from vllm.forward_context import get_forward_context, is_forward_context_available
    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if not isinstance(md, dict) or not md:    # a list: micro-batches (DBO); empty: profiling / warm-up
        return None
    meta = next(iter(md.values()))
    qsl, seq_lens = getattr(meta, "query_start_loc", None), getattr(meta, "seq_lens", None)
    if qsl is None or seq_lens is None:
        return None
    qsl, seq_lens = qsl.cpu().tolist(), [int(s) for s in seq_lens.cpu().tolist()]
    reqs = len(seq_lens)
    if reqs == 0 or [qsl[i + 1] - qsl[i] for i in range(reqs)] != seq_lens or qsl[reqs] > num_tokens:
        return None
    return [(qsl[i], qsl[i + 1]) for i in range(reqs)]


def new_step(segments, schedule, device) -> Step:
    global _steps_seen
    _steps_seen += 1
    requests = []
    for start, end in segments:
        n = end - start
        forced = None
        if schedule.forces:
            forced = runtime.forced_positions(torch.zeros(1, n, dtype=torch.long, device=device), None,
                                              schedule.sink, schedule.window)[0]
        requests.append(Request(start, end, torch.arange(n, device=device), forced))
    return Step(_steps_seen, requests)


def flush_records(step: Step) -> None:
    path = os.environ.get("SPTS_VLLM_RECORD")
    if path and step.records:
        with open(path, "a") as fh:
            for r in step.records:
                fh.write(json.dumps(r) + "\n")


# ---------------------------------------------------------------------------------------------
# One skipping layer
# ---------------------------------------------------------------------------------------------
def qkv_rows(attn, xn, positions):
    """q [T, Hq*hd], k and v [T, Hkv, hd] of every row, as vLLM's Llama/Qwen2 attention computes them."""
    qkv, _ = attn.qkv_proj(xn)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    if getattr(attn, "qk_norm", False):
        t = q.shape[0]
        q = attn.q_norm(q.view(t, attn.num_heads, attn.head_dim)).view(t, attn.q_size)
        k = attn.k_norm(k.view(t, attn.num_kv_heads, attn.head_dim)).view(t, attn.kv_size)
    q, k = attn.rotary_emb(positions, q, k)
    return q, k.reshape(-1, attn.num_kv_heads, attn.head_dim), v.reshape(-1, attn.num_kv_heads, attn.head_dim)


def probe_scores(q, k, cand, schedule, scale: float) -> torch.Tensor:
    """S_mha [1, C] of the candidates: the softmax weights the last probe_queries candidates' queries give them
    (causal in candidate order), averaged over those rows, aggregated over heads (`runtime.head_scores`), pooled
    (`runtime.smooth_scores`). q [Hq, n, hd] and k [Hkv, n, hd] are the request's rows, indexed by position."""
    c = cand.shape[0]
    pq = min(schedule.probe_queries, c)
    probe_idx = torch.arange(c - pq, c, device=cand.device)          # the last pq candidates; the last token is c - 1
    hq, hkv = q.shape[0], k.shape[0]
    qp = q[:, cand[probe_idx]].float().reshape(hkv, hq // hkv, pq, -1)
    logits = torch.einsum("grpd,gcd->grpc", qp, k[:, cand].float()) * scale
    visible = torch.arange(c, device=cand.device)[None, :] <= probe_idx[:, None]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).mean(dim=2)   # [Hkv, G, C]
    scores = runtime.head_scores(probs[None], schedule.heads)
    return runtime.smooth_scores(scores, schedule.pool, schedule.pool_kind)


def attend(q, k, v, rows, scale: float) -> torch.Tensor:
    """Causal attention among `rows` (positions, ascending) of the request: [M, Hq*hd]."""
    out = F.scaled_dot_product_attention(q[:, rows][None], k[:, rows][None], v[:, rows][None], is_causal=True,
                                         scale=scale, enable_gqa=q.shape[0] != k.shape[0])
    return out[0].transpose(0, 1).reshape(rows.numel(), -1)


@dataclass
class Setup:
    """What every skipping layer of one model reads: the resolved options, the selector, the LTP proxies
    (layer -> tensors; built after the weights load) and the proxy's activation name."""
    cfg: SPTSConfig
    schedule: object
    selector: object
    activation: str
    proxies: dict = field(default_factory=dict)


def spts_layer(layer, step: Step, setup: Setup, positions, hidden_states, residual):
    """One skipping layer on a pure-prefill step (module docstring). Returns vLLM's (hidden, residual)."""
    from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
    attn, index = layer.self_attn, layer.spts_index
    schedule, selector = setup.schedule, setup.selector
    x = hidden_states if residual is None else hidden_states + residual
    xn = layer.input_layernorm(x)
    q, k, v = qkv_rows(attn, xn, positions)
    unified_kv_cache_update(k, v, attn.attn.layer_name)        # every token's slot: the "all" policy
    h, f = x.clone(), torch.zeros_like(x)
    stage = schedule.stage_of(index) if schedule.msdp else 0
    for req in step.requests:
        s, e, n = req.start, req.end, req.n
        qr = q[s:e].reshape(n, attn.num_heads, attn.head_dim).transpose(0, 1)          # [Hq, n, hd]
        kr, vr = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)                          # [Hkv, n, hd]
        if n < schedule.min_tokens:       # short request: this layer (and every one) is dense for it
            rows = torch.arange(n, device=x.device)
            h[s + rows] = x[s + rows] + attn.o_proj(attend(qr, kr, vr, rows, attn.scaling))[0]
            f[s + rows] = layer.mlp(layer.post_attention_layernorm(h[s + rows]))
            continue
        n_ref = torch.empty(1, n, device="meta")           # only its length is read (budget fractions of N)
        last_c = torch.tensor([req.cand.shape[0] - 1], device=x.device)
        forced = None if req.forced is None else req.forced[req.cand][None]
        if selector.keeps_set:
            if selector.rescores(index, schedule, schedule.start_layer):
                scores = probe_scores(qr, kr, req.cand, schedule, attn.scaling)
                req.keep_scores = scores if forced is None else runtime.force_rows(scores, forced)
            keep = runtime.select_active(req.keep_scores, last_c, schedule.budgets[stage], n_ref)
            req.cand, req.keep_scores = req.cand[keep[0]], req.keep_scores.gather(1, keep)
            act = act_f = req.cand
        else:
            s_sel = probe_scores(qr, kr, req.cand, schedule, attn.scaling)
            s_chosen = s_sel if forced is None else runtime.force_rows(s_sel, forced)
            act = req.cand[runtime.select_active(s_chosen, last_c, schedule.budgets[stage], n_ref)[0]] \
                if schedule.pap else req.cand
        o, _ = attn.o_proj(attend(qr, kr, vr, act, attn.scaling))
        h[s + act] = x[s + act] + o
        if not selector.keeps_set:
            hn = layer.post_attention_layernorm(h[s + req.cand])
            if schedule.ltp:
                s_ffn = runtime.ltp_scores(hn[None], *setup.proxies[index], setup.activation,
                                           s_sel if schedule.pap else None, None)
                s_ffn = s_ffn if forced is None else runtime.force_rows(s_ffn, forced)
                pick = runtime.select_active(s_ffn, last_c, schedule.budgets[stage], n_ref)[0]
            else:
                pick = torch.arange(req.cand.shape[0], device=x.device)
            act_f = req.cand[pick]
            f[s + act_f] = layer.mlp(hn[pick])
        else:
            f[s + act_f] = layer.mlp(layer.post_attention_layernorm(h[s + act_f]))
        record = {"step": step.index, "layer": index, "n": n, "cand": req.cand.tolist(), "attn": act.tolist(),
                  "ffn": act_f.tolist(), "pruned": []}
        if not selector.keeps_set and schedule.is_stage_end(index):
            keep = runtime.prune_keep(s_chosen, last_c, schedule.prune[stage], n_ref, None)[0]
            gone = torch.ones(req.cand.shape[0], dtype=torch.bool, device=x.device)
            gone[keep] = False
            record["pruned"] = req.cand[gone].tolist()
            req.cand = req.cand[keep]
        step.records.append(record)
    return f, h                                          # vLLM's convention: the stream is f + h
