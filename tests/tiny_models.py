"""Tiny random-init Hugging Face causal LMs, one per supported family, for fast tests.

Every model is built from a seed, in fp32 and eval mode, so two calls with the same arguments give
bit-identical weights. The weights are re-initialised more boldly than HF's 0.02 default (and norm
weights and biases are made non-trivial) so that attention patterns are sharp enough for token
selection to be meaningful, and so that a reference that forgets a norm weight or a bias fails.

The family list is the backend's own table (`spts_compile.families`); this file gives each family a tiny
config: (config class, model class, config kwargs). Every test takes its families from `family_names()`.
"""
from __future__ import annotations

import torch
import transformers

from spts_compile import families

# Shared shape of every tiny model: hidden 64, 4 query heads, 2 KV heads (GQA), head_dim 16.
BASE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=128,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# family -> (config class name, model class name, family-specific config kwargs)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_act="silu")),
    # Qwen2: q/k/v projections carry biases (attention_bias is implied by the architecture).
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_act="silu")),
    # Mistral: a sliding window on every layer (config.sliding_window, no layer_types).
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_act="silu", sliding_window=8)),
    # Qwen3: RMSNorm on q and k over the head dim, before RoPE.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(hidden_act="silu")),
    # Gemma3 (text only): scaled embeddings, (1 + w) norms, post-attention and post-FFN norms, q/k norms,
    # GeGLU (gelu_tanh), query_pre_attn_scalar scaling, alternating sliding/full layers with their own RoPE.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_activation="gelu_pytorch_tanh", sliding_window=8, query_pre_attn_scalar=16,
        tie_word_embeddings=True)),
    # Phi3: fused qkv_proj and gate_up_proj.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(hidden_act="silu")),
}

assert list(FAMILIES) == families.names(), "tiny_models.FAMILIES must give a tiny config to each family of the table"

# Families whose tiny config attends in a sliding window (their KV caches cannot be compacted).
SLIDING = [f for f, (_, _, extra) in FAMILIES.items() if "sliding_window" in extra]

INIT_STD = 0.1  # weight std of every linear layer and the embedding


def _layer_types(family: str, layers: int) -> list[str] | None:
    if family == "gemma3":  # alternate, starting with a sliding layer, so that both kinds are skipping layers
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return None


def make_config(family: str, attn: str = "sdpa", layers: int = 4, **overrides):
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    cfg_name, _, extra = FAMILIES[family]
    kwargs = dict(BASE, **extra, num_hidden_layers=layers)
    layer_types = _layer_types(family, layers)
    if layer_types is not None:
        kwargs["layer_types"] = layer_types
    kwargs.update(overrides)
    config = getattr(transformers, cfg_name)(**kwargs)
    config._attn_implementation = attn
    return config


@torch.no_grad()
def _reinit(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight":
            # Llama-style norms multiply by w (init 1); Gemma-style by (1 + w) (init 0). Perturb either way.
            p.add_(0.1 * randn(p.shape))
        elif leaf == "bias":
            p.copy_(0.1 * randn(p.shape))  # non-zero biases (Qwen2 q/k/v)
        elif p.dim() == 2:
            p.copy_(INIT_STD * randn(p.shape))


def make_model(family: str, attn: str = "sdpa", layers: int = 4, seed: int = 0, **overrides):
    """A tiny random-init causal LM of `family` ("llama", "qwen2", "mistral", "qwen3", "gemma3", "phi3"),
    fp32, eval mode, deterministic in `seed`. `overrides` go to the config constructor."""
    config = make_config(family, attn=attn, layers=layers, **overrides)
    _, model_name, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    _reinit(model, seed)
    model.to(torch.float32)
    model.eval()
    if family == "qwen2":
        attn0 = model.model.layers[0].self_attn
        assert attn0.q_proj.bias is not None and attn0.q_proj.bias.abs().sum() > 0
    return model


def make_inputs(batch: int, length: int, vocab: int = 128, left_pad: list[int] | None = None, seed: int = 0):
    """Random prompt ids (avoiding the special ids 0..2) and a 2D attention mask.

    `left_pad[b]` padding positions (id 0, mask 0) are put at the start of row b. Returns
    (input_ids [B, N] long, attention_mask [B, N] long)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if left_pad is not None:
        if len(left_pad) != batch:
            raise ValueError(f"left_pad has {len(left_pad)} entries for batch {batch}")
        for b, p in enumerate(left_pad):
            if not 0 <= p < length:
                raise ValueError(f"left_pad[{b}]={p} must leave at least one real token of {length}")
            ids[b, :p] = 0
            mask[b, :p] = 0
    return ids, mask


def family_names() -> list[str]:
    return list(FAMILIES)


__all__ = ["FAMILIES", "SLIDING", "make_config", "make_model", "make_inputs", "family_names", "capture_graph"]


def capture_graph(fn, *args, **kwargs):
    """Dynamo's torch-level graph of fn(*args, **kwargs) and its example inputs (the real tensors), as a
    backend receives them; the last graph when Dynamo splits the call. No code is generated."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, dynamic=False)(*args, **kwargs)
    return graphs[-1]
