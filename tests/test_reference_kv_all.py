"""The reference's kv_cache="all" policy (SEMANTICS.md "Retrieval protection"), checked another way.

Under "all" every skipping layer caches K/V of every position: the candidates' own rows, and for a token that
left the candidates (pruned at a stage end, or left out of a keep-set) K/V projected from its frozen hidden state.
The checks: with every token kept the cache is the dense model's (HF's own cache); with tokens dropped, each
layer's cache is the k/v projection + RoPE of the layer's full-length input (the reference's hidden states,
where a dropped token's row stays frozen) computed here with HF's modules; the candidates' rows are the other
policies' rows; nothing but the cache changes; and the torch.compile backend refuses the policy.
"""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from spts_compile.config import SPTSConfig
from tests.reference import build_proxies, reference_decode, reference_prefill
from tests.tiny_models import make_inputs, make_model

FAMILIES = ["llama", "qwen2", "qwen3"]     # separate q/k/v projections, no sliding window
N = 24
SELECTORS = ["probe", "stage", "once"]


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = make_model(family)
        return cache[family]
    return get


def schedule(kv_cache="all", **kw):
    args = dict(start_layer=1, stage_ends=[1, 2], budgets=[12, 8], prune=2, min_tokens=1, kv_cache=kv_cache)
    args.update(kw)
    return SPTSConfig(**args).resolve(4)


def prefill(model, ids, sched, selector, **kw):
    return reference_prefill(model, ids, schedule=sched, proxies=build_proxies(model, channels=32, rank=8),
                             selector=selector, **kw)


def projected_kv(model, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K (after k_norm and RoPE at positions 0..N-1) and V of every row of x [N, D], with HF's own modules."""
    block = model.model.layers[layer]
    attn, n = block.self_attn, x.shape[0]
    xn = block.input_layernorm(x[None])
    k = attn.k_proj(xn).view(1, n, -1, attn.head_dim)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    v = attn.v_proj(xn).view(1, n, -1, attn.head_dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(xn, torch.arange(n)[None])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k[0], v[0]


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("family", FAMILIES)
def test_all_kept_equals_dense_cache(models, family, selector):
    """Budgets >= N and no prune: every token stays a candidate, and "all" is HF's dense cache."""
    model = models(family)
    ids, am = make_inputs(1, N, seed=3)
    sched = schedule(budgets=[1000, 1.0], prune=0)
    ref = prefill(model, ids, sched, selector)
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=am, use_cache=True)
    torch.testing.assert_close(ref["logits"], hf.logits, atol=1e-5, rtol=1e-5)
    for l, (k, v) in enumerate(ref["kv"]):
        assert ref["kept"][l]["kv_pos"][0].tolist() == list(range(N))
        torch.testing.assert_close(k, hf.cache.layers[l].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, hf.cache.layers[l].values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("family", FAMILIES)
def test_all_is_projection_of_frozen_states(models, family, selector):
    """Tokens leave the candidates (a prune, or a keep-set): at every layer the cache holds every position, and
    each row is the layer's k/v projection of that token's layer input, which for a dropped token is frozen at
    the value it had when it left."""
    model = models(family)
    ids, _ = make_inputs(1, N, seed=4)
    ref = prefill(model, ids, schedule(), selector, output_hidden_states=True)
    hs = ref["hidden_states"]                  # hs[l]: the full-length input of layer l (hs[-1] is normed)
    dropped_somewhere = False
    for l, (k, v) in enumerate(ref["kv"]):
        rec = ref["kept"][l]
        assert k.shape[2] == v.shape[2] == N and rec["kv_pos"][0].tolist() == list(range(N))
        want_k, want_v = projected_kv(model, l, hs[l][0])
        torch.testing.assert_close(k[0], want_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[0], want_v, atol=1e-5, rtol=1e-5)
        out = sorted(set(range(N)) - set(rec["cand"][0].tolist()))   # not a candidate of this layer
        dropped_somewhere |= bool(out)
        if out and l + 1 < len(ref["kv"]):      # its state is frozen: the layer passes it through unchanged
            assert torch.equal(hs[l + 1][0, out], hs[l][0, out])
    assert dropped_somewhere, "the schedule must drop tokens for this test to mean anything"


@pytest.mark.parametrize("selector", SELECTORS)
def test_all_changes_only_the_cache(models, selector):
    """Selection, logits and the candidates' cache rows are those of the policy that caches the candidates
    ("candidates" for the probe selector, "active" for the keep-set selectors, whose candidates are active)."""
    model = models("qwen2")
    ids, _ = make_inputs(1, N, seed=5)
    other = "candidates" if selector == "probe" else "active"
    ours = prefill(model, ids, schedule(), selector)
    theirs = prefill(model, ids, schedule(kv_cache=other), selector)
    assert torch.equal(ours["logits"], theirs["logits"])
    for l in range(4):
        a, b = ours["kept"][l], theirs["kept"][l]
        for key in ("cand", "attn", "ffn", "pruned"):
            assert torch.equal(a[key], b[key]), (l, key)
        pos = b["kv_pos"][0]
        for mine, base in zip(ours["kv"][l], theirs["kv"][l]):
            assert torch.equal(mine[:, :, pos], base)


def test_all_cache_decodes_like_dense_when_everything_kept(models):
    """The decode of the reference on an "all" cache with nothing dropped is HF's greedy generate."""
    model = models("llama")
    ids, am = make_inputs(1, N, seed=6)
    ref = prefill(model, ids, schedule(budgets=[1000, 1.0], prune=0), "stage")
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=am, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert reference_decode(model, ref, steps=5)[0].tolist() == hf[0, N:].tolist()


def test_backend_refuses_all():
    from spts_compile.backend import spts_backend
    SPTSConfig(kv_cache="all").resolve(4)            # a valid option (the vLLM plugin's)
    for call in (lambda: SPTSConfig.from_options({"kv_cache": "all"}),
                 lambda: spts_backend(None, [], options={"kv_cache": "all"})):
        with pytest.raises(ValueError, match="kv_cache='all' is for the vLLM plugin only"):
            call()
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        SPTSConfig(kv_cache="every")
