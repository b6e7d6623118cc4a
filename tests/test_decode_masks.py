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
from reference import build_proxies, reference_cache, reference_prefill, reference_step
from spts_compile.config import SPTSConfig
from spts_compile.passes.plan import ltp_dims
from tiny_models import make_inputs, make_model

OPTS = dict(start_layer=1, stage_ends=[1, 2], budgets=[16, 12], prune=4, min_tokens=1, selector="probe",
            compiler="eager")
N = 32
STEPS = 6
PAD = [0, 5]          # the padded batch: row 1 has 5 padding tokens on the left
# (family, attention, selector). Both attentions on llama and on gemma3 (sliding and full layers, q/k norms);
# mistral (sliding only), phi3 (fused projections), qwen2 (q/k/v biases) and qwen3 (q/k norms) with one each, all
# with the paper's per-layer selector "probe". The default selector "stage" (keep-set, re-probed at each stage
# start, with its own probe defaults: the last 64 queries, max over heads, a 25-token max-pool) on llama sdpa.
CASES = [("llama", "sdpa", "probe"), ("llama", "eager", "probe"), ("gemma3", "sdpa", "probe"),
         ("gemma3", "eager", "probe"), ("mistral", "eager", "probe"), ("phi3", "sdpa", "probe"),
         ("qwen2", "eager", "probe"), ("qwen3", "sdpa", "probe"), ("llama", "sdpa", "stage")]


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


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{a}" + ("" if s == "probe" else f"-{s}") for f, a, s in CASES])
def compiled(request):
    c = Compiled(*request.param)
    yield c
    c.model.forward = c.eager_forward
    torch._dynamo.reset()


def test_generate_batch_one_without_padding(compiled):
    """No attention_mask reaches the decode steps (generate drops an all-ones mask): sdpa decodes unmasked,
    eager with the model's causal mask, sliding layers with their window. (tests/test_family_generate.py runs
    this case with Inductor on every family.)"""
    if compiled.family not in ("llama", "gemma3"):
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


def test_second_call_continues_the_compacted_cache(compiled):
    """A prefill that keeps its cache, then a call with 5 new tokens on it (a next turn): every layer runs
    dense on the new tokens over its own compacted entries. Logits of the real rows equal the reference's."""
    ids, am = make_inputs(2, N, left_pad=PAD, seed=6)
    more, _ = make_inputs(2, 5, seed=7)
    am2 = torch.cat([am, torch.ones_like(more)], dim=1)
    ref = compiled.reference(ids, am)
    real = am.bool()
    with torch.no_grad():
        first = compiled.model(ids, attention_mask=am, use_cache=True)
        torch.testing.assert_close(first.logits[real], ref["logits"][real], atol=1e-4, rtol=1e-4)
        second = compiled.model(more, attention_mask=am2, cache=first.past_key_values, use_cache=True)
    cache = reference_cache(ref)
    want = reference_step(compiled.model, cache, more)
    torch.testing.assert_close(second.logits, want, atol=1e-4, rtol=1e-4)
    # and one more decode step on top of the continued cache
    nxt = second.logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        third = compiled.model(nxt, attention_mask=torch.cat([am2, torch.ones_like(nxt)], 1),
                               cache=second.past_key_values, use_cache=True)
    torch.testing.assert_close(third.logits, reference_step(compiled.model, cache, nxt), atol=1e-4, rtol=1e-4)


def _path_log_prob(model, ref, cache, tokens):
    """The reference's log-probability of generating `tokens` [T] after the prefill `ref` (batch 1)."""
    total = torch.log_softmax(ref["logits"][0, -1].float(), -1)[tokens[0]]
    for prev, tok in zip(tokens[:-1], tokens[1:]):
        logits = reference_step(model, cache, prev.view(1, 1))[0, -1]
        total = total + torch.log_softmax(logits.float(), -1)[tok]
    return float(total)


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

