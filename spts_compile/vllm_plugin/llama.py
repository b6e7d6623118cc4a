"""vLLM's Llama with an SPTS decoder-layer variant for pure-prefill steps (prototype; docs/vllm.md).

What one skipping layer computes on a pure-prefill step, per request of n tokens (spts_compile/SEMANTICS.md,
section 3, with selector "probe", ltp=False, msdp=False, kv_cache="candidates"):
- x = the layer's input rows (vLLM carries the residual stream as hidden + residual; both are added here);
- xn = input_layernorm(x); q, k, v for every row, RoPE at the tokens' positions;
- K and V of every token go into the paged cache at vLLM's own slot mapping, through the backend's cache
  write (`unified_kv_cache_update`), so decoding, the scheduler and the prefix cache see a whole sequence;
- probe: the last `probe_queries` queries' softmax weights over the request's keys (causal), aggregated over
  heads (mean, or the largest head) and probe rows; the last token is always active; the top M by score,
  ties to the later token, sorted ascending;
- attention among the active rows only (causal in position order), o_proj on them, added back at their rows;
  the other rows pass through unchanged;
- the FFN runs on every row (no LTP).
Layers before `start_layer`, requests shorter than `min_tokens` (attention over all rows), and every step
that is not a pure prefill run dense.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from . import options_from_env

logger = logging.getLogger("vllm.spts_compile")

# What the prototype implements of SPTSConfig; any other value is refused at model load.
_FIXED = {"selector": "probe", "ltp": False, "msdp": False, "kv_cache": "candidates",
          "pool": (None, 1), "sink": 0, "window": 0, "heads": (None, "mean", "max"), "calibration": None}


@dataclass
class _Step:
    """One pure-prefill step: each request's rows [start, end) in the flattened batch."""
    segments: list[tuple[int, int]]
    index: int


_current_step: _Step | None = None     # set by SPTSLlamaForCausalLM.forward for the model call it wraps
_steps_seen = 0


def _pure_prefill_segments(num_tokens: int) -> list[tuple[int, int]] | None:
    """The requests of this step when every one of them is a whole fresh prompt (its query length equals its
    sequence length: nothing cached before it, not a decode, not a continued chunk), else None."""
    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, list):            # micro-batches (DBO): not handled, dense
        return None
    if not isinstance(md, dict) or not md:
        return None                     # profiling / warm-up runs carry no metadata
    meta = next(iter(md.values()))
    qsl, seq_lens = getattr(meta, "query_start_loc", None), getattr(meta, "seq_lens", None)
    if qsl is None or seq_lens is None:
        return None
    qsl, seq_lens = qsl.cpu().tolist(), seq_lens.cpu().tolist()
    reqs = len(seq_lens)
    q_lens = [qsl[i + 1] - qsl[i] for i in range(reqs)]
    if reqs == 0 or q_lens != [int(s) for s in seq_lens] or qsl[reqs] > num_tokens:
        return None
    return [(qsl[i], qsl[i + 1]) for i in range(reqs)]


def _select_top(scores: torch.Tensor, m: int, always: int) -> torch.Tensor:
    """The m highest scores with `always` forced in; among equal scores the later index wins; ascending."""
    s = scores.float().clone()
    s[always] = float("inf")
    c = s.shape[0]
    flipped = torch.sort(s.flip(0), descending=True, stable=True).indices[:m]
    return (c - 1 - flipped).sort().values


class SPTSLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer; on a pure-prefill step at a skipping layer, PAP with every K/V cached."""

    def __init__(self, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.spts_index = int(prefix.rsplit(".", 1)[-1])
        self.spts_schedule = None            # set by SPTSLlamaForCausalLM when skipping is on

    def forward(self, positions, hidden_states, residual, **kwargs):
        step, sched = _current_step, self.spts_schedule
        if step is None or sched is None or self.spts_index < sched.start_layer:
            return super().forward(positions, hidden_states, residual, **kwargs)
        return self._spts_forward(step, sched, positions, hidden_states, residual)

    def _spts_forward(self, step: _Step, sched, positions, hidden_states, residual):
        from spts_compile.config import budget_tokens
        attn = self.self_attn
        x = hidden_states if residual is None else hidden_states + residual
        xn = self.input_layernorm(x)
        qkv, _ = attn.qkv_proj(xn)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        hq, hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
        k3, v3 = k.reshape(-1, hkv, hd), v.reshape(-1, hkv, hd)
        # Every token's K/V at vLLM's slot mapping: the "candidates" policy with every token a candidate.
        unified_kv_cache_update(k3, v3, attn.attn.layer_name)

        h = x.clone()
        records = []
        for start, end in step.segments:
            n = end - start
            qr = q[start:end].reshape(n, hq, hd).transpose(0, 1)          # [Hq, n, hd]
            kr = k3[start:end].transpose(0, 1)                             # [Hkv, n, hd]
            vr = v3[start:end].transpose(0, 1)
            if n >= sched.min_tokens:
                m = max(1, min(budget_tokens(sched.budgets[0], n), n))
                scores = self._probe(qr, kr, n, sched.probe_queries, sched.heads, attn.scaling)
                act = _select_top(scores, m, n - 1)
            else:
                act = torch.arange(n)
            out = F.scaled_dot_product_attention(qr[:, act][None], kr[:, act][None], vr[:, act][None],
                                                 is_causal=True, scale=attn.scaling, enable_gqa=hq != hkv)
            o, _ = attn.o_proj(out[0].transpose(0, 1).reshape(act.numel(), hq * hd))
            rows = start + act.to(h.device)
            h[rows] = x[rows] + o
            records.append({"step": step.index, "layer": self.spts_index, "n": n, "active": act.tolist()})
        _record(records)
        f = self.mlp(self.post_attention_layernorm(h))
        return f, h                                        # vLLM's convention: the stream is f + h

    @staticmethod
    def _probe(qr, kr, n: int, probe_queries: int, heads: str, scale: float) -> torch.Tensor:
        """S [n]: the softmax weights of the last probe_queries queries over the keys, causal."""
        pq = min(probe_queries, n)
        rows = torch.tensor([max(n - pq + i, 0) for i in range(pq)])
        groups = qr.shape[0] // kr.shape[0]
        logits = (qr[:, rows] @ kr.repeat_interleave(groups, dim=0).transpose(-1, -2)) * scale   # [Hq, pq, n]
        causal = torch.arange(n)[None, :] <= rows[:, None]
        probs = torch.softmax(logits.float().masked_fill(~causal, float("-inf")), dim=-1)
        if heads == "max":
            return probs.mean(dim=1).max(dim=0).values
        return probs.mean(dim=(0, 1))


def _record(records: list[dict]) -> None:
    path = os.environ.get("SPTS_VLLM_RECORD")
    if path and records:
        with open(path, "a") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")


def _schedule(opts: dict, depth: int):
    """The options resolved against the model's depth, after refusing what the prototype does not implement."""
    from spts_compile.config import SPTSConfig
    for key, value in opts.items():
        if key in _FIXED:
            allowed = _FIXED[key]
            if not (value in allowed if isinstance(allowed, tuple) else value == allowed):
                raise ValueError(f"spts vllm plugin (prototype): {key}={value!r} is not supported; "
                                 f"it implements {key}={allowed!r}")
    cfg = {"selector": "probe", "ltp": False, "msdp": False, "kv_cache": "candidates", "pool": 1,
           "probe_queries": 1, "heads": "mean"}
    cfg.update(opts)
    return SPTSConfig(**cfg).resolve(depth)


class SPTSLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM built with SPTSLlamaDecoderLayer. Dense steps take vLLM's path unchanged
    (the compiled graph when compilation is on); an SPTS step runs the model's forward eagerly
    (`ForwardContext.skip_compiled`), so the one-trace graph never holds a data-dependent branch."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=SPTSLlamaDecoderLayer)
        opts = options_from_env()
        self.spts_schedule = None
        if opts is None:
            logger.info("spts: SPTSLlamaForCausalLM loaded, skipping off (vLLM's dense model)")
            return
        depth = vllm_config.model_config.hf_config.num_hidden_layers
        sched = _schedule(opts, depth)
        chunked = vllm_config.scheduler_config.enable_chunked_prefill
        if chunked:
            logger.warning("spts: chunked prefill is on, so a step cannot tell a whole prompt from its first "
                           "chunk; SPTS stays off. Pass enable_chunked_prefill=False and "
                           "max_num_batched_tokens >= max_model_len to run it.")
            return
        if vllm_config.parallel_config.pipeline_parallel_size > 1 or \
                vllm_config.parallel_config.tensor_parallel_size > 1:
            logger.warning("spts: the prototype runs on one rank only; SPTS stays off")
            return
        if vllm_config.cache_config.enable_prefix_caching:
            logger.warning("spts: prefix caching is on: blocks written by an SPTS prefill (K/V of tokens whose "
                           "hidden states skipped layers) can be reused by a later request with the same prefix")
        self.spts_schedule = sched
        for layer in self.model.layers:
            if isinstance(layer, SPTSLlamaDecoderLayer):
                layer.spts_schedule = sched
        logger.info("spts: SPTSLlamaForCausalLM loaded, skipping on: start_layer %d of %d, budget %s, "
                    "probe_queries %d, heads %s, min_tokens %d, kv_cache candidates", sched.start_layer, depth,
                    sched.budgets[0], sched.probe_queries, sched.heads, sched.min_tokens)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        global _current_step, _steps_seen
        segments = None
        if self.spts_schedule is not None and intermediate_tensors is None:
            segments = _pure_prefill_segments(positions.shape[0])
        if segments is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        ctx = get_forward_context()
        was = ctx.skip_compiled
        _steps_seen += 1
        _current_step = _Step(segments=segments, index=_steps_seen)
        ctx.skip_compiled = True
        try:
            logger.info("spts: pure-prefill step %d: %d request(s), %s tokens; SPTS from layer %d",
                        _steps_seen, len(segments), [e - s for s, e in segments], self.spts_schedule.start_layer)
            return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        finally:
            ctx.skip_compiled = was
            _current_step = None
