"""Decoding on a compacted cache, per family and attention: generate with and without an attention mask,
padded batches, and a second call that continues the cache, each against the eager reference
(`reference_prefill`, then `reference_step` per token), which keeps each layer's entries with their
original positions and masks them from first principles.

One compiled forward per (family, attention, selector) serves every test of the module (compiler="eager": these
tests are about what is computed, not about code generation; tests/test_generate.py runs Inductor)."""
from __future__ import annotations

import pytest
import torch

import spts_compile
from reference import (build_proxies, reference_cache, reference_crop, reference_decode, reference_prefill,
                       reference_step)
from spts_compile.config import SPTSConfig
from spts_compile.passes.plan import ltp_dims
from tiny_models import make_inputs, make_model

OPTS = dict(start_layer=1, stage_ends=[1, 2], budgets=[16, 12], prune=4, min_tokens=1, selector="probe",
            compiler="eager")
N = 32
STEPS = 6
PAD = [0, 5]          # the padded batch: row 1 has 5 padding tokens on the left
# (family, attention, selector): every family with both attentions: llama, gemma3 (sliding and full layers, q/k
# norms), mistral (sliding only), phi3 (fused projections), qwen2 (q/k/v biases) and qwen3 (q/k norms), with the
# paper's per-layer selector "probe". The default selector "stage" (keep-set, re-probed at each stage start, with
# its own probe defaults: the last 64 queries, max over heads, a 25-token max-pool) on llama sdpa.
CASES = [(f, a, "probe") for f in ("llama", "gemma3", "mistral", "phi3", "qwen2", "qwen3") for a in ("sdpa", "eager")]
CASES.append(("llama", "sdpa", "stage"))
# Batch 1 without a mask, sdpa, on these families: tests/test_family_generate.py runs it (8 steps).
FAMILY_GENERATE_SDPA = ("mistral", "phi3", "qwen3")


class Compiled:
    """A tiny model whose forward is compiled with the spts backend, and the reference's view of it."""

    def __init__(self, family, attn, selector):
        self.family, self.attn, self.selector = family, attn, selector
        opts = dict(OPTS, selector=selector)
        torch._dynamo.reset()
        self.model = make_model(family, attn=attn, layers=4)
        self.eager_forward = self.model.forward
        self.model.forward = torch.compile(self.eager_forward, backend="spts", options=opts)
        self.schedule = SPTSConfig(**opts).resolve(4)   # the selector's own probe defaults filled in
        cfg = self.model.config
        self.proxies = build_proxies(self.model, *ltp_dims(self.schedule, cfg.intermediate_size, cfg.hidden_size))

    def generate(self, ids, am, steps=STEPS):
        """The compiled model's greedy tokens [B, steps] and the raw logits of each step [B, steps, V]."""
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=am, max_new_tokens=steps, min_new_tokens=steps,
                                      do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                                      output_logits=True)
        return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)

    def reference(self, ids, am=None):
        return reference_prefill(self.model, ids, am, schedule=self.schedule, proxies=self.proxies,
                                 selector=self.selector)

    def alone(self, ids, am, steps=STEPS):
        """Each row run alone, without its padding, by the reference: its greedy tokens [B, steps] and the logits
        each token was chosen from [B, steps, V] (the prefill's last, then each decode step's)."""
        tokens, logits = [], []
        for b in range(ids.shape[0]):
            row = ids[b:b + 1, int((am[b] == 0).sum()):]
            ref = self.reference(row)
            cache, step = reference_cache(ref), ref["logits"][:, -1]
            for i in range(steps):
                logits.append(step[0])
                tokens.append(step.argmax(-1))
                if i < steps - 1:
                    step = reference_step(self.model, cache, tokens[-1][:, None])[:, -1]
        return torch.cat(tokens).view(ids.shape[0], steps), torch.stack(logits).view(ids.shape[0], steps, -1)

    def assert_generates_each_row_alone(self, ids, am):
        """generate on (ids, am) gives each row the tokens, and the logits, of that row run alone."""
        got, got_logits = self.generate(ids, am)
        want, want_logits = self.alone(ids, am)
        torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
        assert got.tolist() == want.tolist()


def _case_id(family, attn, selector):
    return f"{family}-{attn}" + ("" if selector == "probe" else f"-{selector}")


# One xdist group per case (`--dist loadgroup`): every test of a case runs on one worker, so its dynamo traces
# (a tiny model's prefill, decode and continuation graphs, about 2 s each, most of each test's time) are made
# once, not on both workers.
@pytest.fixture(scope="module", params=[pytest.param(c, id=_case_id(*c),
                                                     marks=pytest.mark.xdist_group(f"decode_masks-{_case_id(*c)}"))
                                        for c in CASES])
def compiled(request):
    c = Compiled(*request.param)
    yield c
    c.model.forward = c.eager_forward
    torch._dynamo.reset()


def test_generate_batch_one_without_padding(compiled):
    """No attention_mask reaches the decode steps (generate drops an all-ones mask): sdpa decodes unmasked,
    eager with the model's causal mask, sliding layers with their window. (tests/test_family_generate.py runs
    this case on every family but llama, Gemma 3 through Inductor; tests/test_generate.py on llama.)"""
    if compiled.attn == "sdpa" and compiled.family in FAMILY_GENERATE_SDPA:
        pytest.skip("covered by test_family_generate")
    ids, am = make_inputs(1, N, seed=3)
    compiled.assert_generates_each_row_alone(ids, am)
    assert spts_compile.last_plan()["rewritten_layers"] == [1, 2, 3]


def test_generate_batch_one_with_left_padding(compiled):
    """The decode steps carry an attention_mask with padding: each layer's mask is built from its positions."""
    ids, am = make_inputs(1, N, left_pad=[4], seed=4)
    compiled.assert_generates_each_row_alone(ids, am)


def test_generate_padded_batch_equals_each_row_alone(compiled):
    """Batch 2, row 1 left-padded: each row's greedy tokens and logits equal the reference's for that row alone
    (int budgets): the padding changes nothing that is kept, in the prefill or in any decode step."""
    ids, am = make_inputs(2, N, left_pad=PAD, seed=5)
    compiled.assert_generates_each_row_alone(ids, am)
    assert spts_compile.last_plan()["rewritten_layers"] == [1, 2, 3]


@pytest.mark.parametrize("batch", ["padded-2", "one-no-mask"])
def test_second_call_continues_the_compacted_cache(compiled, batch):
    """A prefill that keeps its cache, then a call with 5 new tokens on it (a next turn): every layer runs
    dense on the new tokens over its own compacted entries. Logits of the real rows equal the reference's.
    Padded batch 2 with its attention_mask on every call, or batch 1 with no attention_mask at all."""
    padded = batch == "padded-2"
    b = 2 if padded else 1
    ids, am = make_inputs(b, N, left_pad=PAD if padded else None, seed=6)
    more, _ = make_inputs(b, 5, seed=7)
    am2 = torch.cat([am, torch.ones_like(more)], dim=1)

    def mask(m):
        return {"attention_mask": m} if padded else {}
    ref = compiled.reference(ids, am if padded else None)
    real = am.bool()
    with torch.no_grad():
        first = compiled.model(ids, use_cache=True, **mask(am))
        torch.testing.assert_close(first.logits[real], ref["logits"][real], atol=1e-4, rtol=1e-4)
        second = compiled.model(more, cache=first.past_key_values, use_cache=True, **mask(am2))
    cache = reference_cache(ref)
    want = reference_step(compiled.model, cache, more)
    torch.testing.assert_close(second.logits, want, atol=1e-4, rtol=1e-4)
    # and one more decode step on top of the continued cache
    nxt = second.logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        third = compiled.model(nxt, cache=second.past_key_values, use_cache=True,
                               **mask(torch.cat([am2, torch.ones_like(nxt)], 1)))
    torch.testing.assert_close(third.logits, reference_step(compiled.model, cache, nxt), atol=1e-4, rtol=1e-4)


def test_a_dynamic_continuation_graph_reads_the_attention_mask():
    """dynamic=True: the continuation graph's input_ids has a symbolic length, from which transformers sizes the
    4D mask, so input_ids is an ancestor of the mask. The per-layer masks must still read the 2D attention_mask
    (once they took input_ids for it and refused the call: "the attention_mask has 5 columns"). Padded batch 2,
    5 new tokens on the compacted cache, against the reference."""
    torch._dynamo.reset()
    model = make_model("llama", layers=4)
    forward = model.forward
    model.forward = torch.compile(forward, backend="spts", options=OPTS, dynamic=True)
    try:
        ids, am = make_inputs(2, N, left_pad=PAD, seed=20)
        more, _ = make_inputs(2, 5, seed=21)
        with torch.no_grad():
            first = model(ids, attention_mask=am, use_cache=True)
            got = model(more, attention_mask=torch.cat([am, _ones(2, 5)], 1), cache=first.past_key_values,
                        use_cache=True).logits
    finally:
        model.forward = forward
        torch._dynamo.reset()
    schedule = SPTSConfig(**OPTS).resolve(4)
    cfg = model.config
    ref = reference_prefill(model, ids, am, schedule=schedule,
                            proxies=build_proxies(model, *ltp_dims(schedule, cfg.intermediate_size, cfg.hidden_size)),
                            selector="probe")
    torch.testing.assert_close(got, reference_step(model, reference_cache(ref), more), atol=1e-4, rtol=1e-4)


def _path_log_prob(model, ref, cache, tokens):
    """The reference's log-probability of generating `tokens` [T] after the prefill `ref` (batch 1)."""
    total = torch.log_softmax(ref["logits"][0, -1].float(), -1)[tokens[0]]
    for prev, tok in zip(tokens[:-1], tokens[1:]):
        logits = reference_step(model, cache, prev.view(1, 1))[0, -1]
        total = total + torch.log_softmax(logits.float(), -1)[tok]
    return float(total)


def test_a_dense_model_decodes_the_same_prompt_after_an_spts_one(compiled):
    """A dense model beside the compiled one (the benchmarks run both in one process) decodes the same padded
    batch after the spts prefill compacted its own cache. At the first skipping layer the last token's K is the
    same in both caches (the same dense input), which alone must not mark the dense cache as compacted."""
    _only(compiled, ("llama", "sdpa", "probe"))
    dense = make_model(compiled.family, attn=compiled.attn, layers=4)
    ids, am = make_inputs(2, N, left_pad=PAD, seed=19)

    def greedy():
        with torch.no_grad():
            return dense.generate(ids, attention_mask=am, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                  pad_token_id=0)
    before = greedy()
    compiled.generate(ids, am, steps=3)
    assert greedy().tolist() == before.tolist()


def test_beam_search_reorders_the_compacted_cache(compiled):
    """Beam search reorders the cache between steps (index_select on the batch dim): the reordered tensors are
    recognised row by row. Each returned beam's score equals the reference's log-probability of its tokens
    (length_penalty=0: the score is the sum), which a wrong position table after a reorder would change."""
    if (compiled.family, compiled.attn, compiled.selector) not in (("llama", "sdpa", "probe"), ("gemma3", "eager", "probe")):
        pytest.skip("beam search runs on two cases")
    ids, am = make_inputs(1, N, seed=8)
    with torch.no_grad():
        out = compiled.model.generate(ids, attention_mask=am, max_new_tokens=5, min_new_tokens=5, num_beams=3,
                                      num_return_sequences=2, do_sample=False, length_penalty=0.0,
                                      early_stopping=True, pad_token_id=0, return_dict_in_generate=True,
                                      output_scores=True)
    ref = compiled.reference(ids, am)
    for seq, score in zip(out.sequences, out.sequences_scores):
        want = _path_log_prob(compiled.model, ref, reference_cache(ref), seq[N:])
        assert abs(float(score) - want) < 1e-3, (seq[N:].tolist(), float(score), want)


def test_a_compacted_cache_outside_the_compiled_model_is_refused(compiled):
    """The uncompiled model cannot know which positions a compacted cache holds: it raises, never decodes on
    the model's one mask."""
    if (compiled.family, compiled.attn, compiled.selector) not in (("llama", "sdpa", "probe"), ("gemma3", "eager", "probe")):
        pytest.skip("runs on two cases")   # (a sliding layer whose kept rows are its newest is not compacted)
    ids, am = make_inputs(1, N, left_pad=[3], seed=9)
    with torch.no_grad():
        first = compiled.model(ids, attention_mask=am, use_cache=True)
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        with pytest.raises(spts_compile.CompactedCacheError):
            compiled.eager_forward(nxt, attention_mask=torch.cat([am, torch.ones_like(nxt)], 1),
                                   cache=first.past_key_values, use_cache=True)


# ---------------------------------------------------------------------------------------------
# DynamicCache.crop(-r) (assisted decoding drops rejected draft tokens with it): HF removes each layer's last r
# rows, which on a compacted layer are r positions only when they come after the prompt
# ---------------------------------------------------------------------------------------------
def _only(compiled, *cases):
    if (compiled.family, compiled.attn, compiled.selector) not in cases:
        pytest.skip("crop runs on " + ", ".join("-".join(c) for c in cases))


def _ones(b, q):
    return torch.ones(b, q, dtype=torch.long)


def test_crop_of_tokens_after_the_prompt_continues_the_cache(compiled):
    """Padded batch 2: prefill, a call with 5 new tokens, crop(-3), then a call with 2 more: logits equal the
    reference's, whose crop forgets positions (not rows)."""
    _only(compiled, ("llama", "sdpa", "probe"), ("llama", "sdpa", "stage"))
    ids, am = make_inputs(2, N, left_pad=PAD, seed=10)
    more, _ = make_inputs(2, 5, seed=11)
    nxt, _ = make_inputs(2, 2, seed=12)
    with torch.no_grad():
        first = compiled.model(ids, attention_mask=am, use_cache=True)
        cache = compiled.model(more, attention_mask=torch.cat([am, _ones(2, 5)], 1), cache=first.past_key_values,
                               use_cache=True).past_key_values
        cache.crop(-3)
        got = compiled.model(nxt, attention_mask=torch.cat([am, _ones(2, 4)], 1), cache=cache, use_cache=True).logits
    ref = reference_cache(compiled.reference(ids, am))
    reference_step(compiled.model, ref, more)
    want = reference_step(compiled.model, reference_crop(ref, 3), nxt)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_crop_into_the_prompt_keeps_the_positions_before_it(compiled):
    """Batch 1: crop(-10) right after the prefill forgets positions 22..31. A compacted layer holds fewer than 10
    of them, so removing its last 10 rows (HF's crop) would forget kept prompt tokens; the next call must see
    exactly the entries at positions < 22."""
    _only(compiled, ("llama", "sdpa", "probe"))
    r = 10
    ids, am = make_inputs(1, N, left_pad=[3], seed=13)
    nxt, _ = make_inputs(1, 4, seed=14)
    ref = compiled.reference(ids, am)
    held = [sum(p >= N - r for p in rec["kv_pos"][0].tolist()) for rec in ref["kept"]]
    assert held[0] == r and min(held[1:]) < r, held          # the test tells positions from rows
    with torch.no_grad():
        cache = compiled.model(ids, attention_mask=am, use_cache=True).past_key_values
        rows = [layer.keys.shape[2] for layer in cache.layers]
        cache.crop(-r)
        assert [layer.keys.shape[2] for layer in cache.layers] == [n - h for n, h in zip(rows, held)]
        got = compiled.model(nxt, attention_mask=torch.cat([am[:, :N - r], _ones(1, 4)], 1), cache=cache,
                             use_cache=True).logits
    want = reference_step(compiled.model, reference_crop(reference_cache(ref), r), nxt)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_crop_into_the_prompt_of_a_padded_batch_is_refused(compiled):
    """Padded batch 2, crop(-10) after the prefill: the two rows of a compacted layer hold different numbers of
    positions >= 22, so no [B, H, L, hd] tensor holds what each row keeps. Refused, naming crop, the cache as it
    was."""
    _only(compiled, ("llama", "sdpa", "probe"))
    r = 10
    ids, am = make_inputs(2, N, left_pad=PAD, seed=15)
    ref = compiled.reference(ids, am)
    held = [[sum(p >= N - r for p in row.tolist()) for row in rec["kv_pos"]] for rec in ref["kept"]]
    assert any(h[0] != h[1] for h in held), held
    with torch.no_grad():
        cache = compiled.model(ids, attention_mask=am, use_cache=True).past_key_values
    before = [layer.keys for layer in cache.layers]
    with pytest.raises(spts_compile.CompactedCacheError, match="crop"):
        cache.crop(-r)
    assert all(layer.keys is k for layer, k in zip(cache.layers, before))


def test_prompt_lookup_decoding_crops_the_compacted_cache(compiled, monkeypatch):
    """Assisted generation without an assistant model (prompt_lookup_num_tokens): drafts from the sequence's own
    n-grams, verified in one call on the cache, rejected ones cropped. The prompt's last token occurs nowhere
    before it, so the first call (the SPTS prefill) carries no draft (see SEMANTICS.md on drafts in the prefill);
    greedy, so the tokens equal plain greedy decoding on the compacted cache (the reference's). The test checks
    that some crop removed tokens."""
    _only(compiled, ("llama", "sdpa", "probe"))
    import transformers
    crops = []
    real_crop = transformers.DynamicCache.crop

    def spy(self, tokens):
        crops.append(tokens)
        return real_crop(self, tokens)
    monkeypatch.setattr(transformers.DynamicCache, "crop", spy)
    ids, _ = make_inputs(1, N, seed=16)
    ids[0, -1] = min(set(range(3, 128)) - set(ids[0, :-1].tolist()))
    steps = 12
    with torch.no_grad():
        out = compiled.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                      min_new_tokens=steps, do_sample=False, prompt_lookup_num_tokens=3,
                                      pad_token_id=0)[:, N:]
    assert any(t < 0 for t in crops), crops
    want = reference_decode(compiled.model, compiled.reference(ids), steps=steps)
    assert out.tolist() == want.tolist()


def test_crop_into_the_prompt_of_a_sliding_cache(compiled):
    """Gemma 3 (sliding and full layers, window 8), batch 1, past recording on (assisted decoding turns it on
    before its prefill, so that crop can roll a sliding layer back): crop(-10) after the prefill, then a call with
    4 new tokens, equals the reference cropped by position."""
    _only(compiled, ("gemma3", "sdpa", "probe"))
    import transformers
    r = 10
    ids, am = make_inputs(1, N, seed=17)
    nxt, _ = make_inputs(1, 4, seed=18)
    cache = transformers.DynamicCache(config=compiled.model.config)
    cache.activate_past_recording()
    with torch.no_grad():
        compiled.model(ids, attention_mask=am, cache=cache, use_cache=True)
        cache.crop(-r)
        got = compiled.model(nxt, attention_mask=torch.cat([am[:, :N - r], _ones(1, 4)], 1), cache=cache,
                             use_cache=True).logits
    want = reference_step(compiled.model, reference_crop(reference_cache(compiled.reference(ids, am)), r), nxt)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_past_recording_sliding_layers_keep_their_window():
    """Past recording (assisted decoding turns it on before its prefill) keeps every row of a sliding layer, so
    the cache no longer shows the window; the attention's own window does. Gemma 3 with budgets under the window
    (a compacted sliding layer of 6 rows, window 8), 3 new tokens on the compacted cache: the per-layer masks
    keep the window, on the dense sliding layer 0 too (the reference masks by position; without the window the
    logits were off by 2)."""
    import transformers
    opts = dict(OPTS, budgets=[6, 5], prune=2)
    torch._dynamo.reset()
    model = make_model("gemma3", layers=4)
    forward = model.forward
    model.forward = torch.compile(forward, backend="spts", options=opts)
    try:
        ids, am = make_inputs(1, N, seed=17)
        more, _ = make_inputs(1, 3, seed=18)
        cache = transformers.DynamicCache(config=model.config)
        cache.activate_past_recording()
        with torch.no_grad():
            model(ids, attention_mask=am, cache=cache, use_cache=True)
            assert [layer.keys.shape[2] for layer in cache.layers] == [N, 6, 5, 5]
            got = model(more, attention_mask=_ones(1, N + 3), cache=cache, use_cache=True).logits
    finally:
        model.forward = forward
        torch._dynamo.reset()
    ref = reference_prefill(model, ids, am, schedule=SPTSConfig(**opts).resolve(4))
    want = reference_step(model, reference_cache(ref), more)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
