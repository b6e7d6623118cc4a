"""`model.generate` on an SPTS-compiled forward: the prefill graph is rewritten and leaves a compacted KV
cache, the decode graphs stay dense and continue on that cache. Judged by the eager reference
(`reference_prefill` + `reference_decode`), by dense greedy generation, and by counting backend calls."""
from __future__ import annotations

import pytest
import torch

import spts_compile
from spts_compile.config import SPTSConfig
from spts_compile.passes.plan import ltp_dims
from tests.reference import build_proxies, reference_decode, reference_prefill
from tests.tiny_models import make_inputs, make_model

torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

DEPTH = 4
N = 24
NEW = 32
GEN = dict(start_layer=1, stage_ends=[1, 2], budgets=[16, 12], prune=4, min_tokens=1, selector="probe")
OFF = dict(pap=False, ltp=False, msdp=False, min_tokens=1)


def _generate(model, ids, am, new, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=am, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0, **kw)


# The tests that read the one generation run on one xdist worker (`--dist loadgroup`): it compiles once.
ONE_WORKER = pytest.mark.xdist_group("generate-spts")


PAD = [0, 5]


@pytest.fixture(scope="module")
def spts_generation():
    """One 32-token greedy generation of a left-padded batch of two (Inductor) through a counting wrapper
    around the spts backend. Each backend call records the plan summary of the graph it compiled."""
    torch._dynamo.reset()
    model = make_model("llama", layers=DEPTH)
    calls = []

    def backend(gm, example_inputs):
        before = spts_compile.last_plan()
        compiled = spts_compile.spts_backend(gm, example_inputs, options=GEN)
        plan = spts_compile.last_plan()
        fresh = plan is not None and (before is None or plan["graph"] != before["graph"])
        calls.append(plan if fresh else None)
        return compiled

    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend=backend)
    ids, am = make_inputs(2, N, left_pad=PAD, seed=9)
    out = _generate(model, ids, am, NEW, return_dict_in_generate=True)
    model.forward = eager_forward
    return model, ids, am, out, calls


@ONE_WORKER
def test_generate_matches_the_reference_on_the_compacted_cache(spts_generation):
    """A padded batch keeps its compacted cache and decodes on it: each row's tokens are what the reference
    gives that row alone, without its padding (int budgets, so M does not depend on the padding)."""
    model, ids, am, out, _ = spts_generation
    sched = SPTSConfig(**GEN).resolve(DEPTH)
    proxies = build_proxies(model, *ltp_dims(sched, model.config.intermediate_size, model.config.hidden_size))
    got = out.sequences[:, N:]
    for b, pad in enumerate(PAD):
        ref = reference_prefill(model, ids[b:b + 1, pad:], schedule=sched, proxies=proxies)
        want = reference_decode(model, ref, steps=NEW)
        assert got[b].tolist() == want[0].tolist(), f"row {b} (left padding {pad})"


@ONE_WORKER
def test_decode_appends_to_the_compacted_cache(spts_generation):
    """Every layer holds its prefill entries (N dense, the active tokens when skipping) plus one entry per
    decode step: the decode graphs neither compact nor re-expand the cache."""
    model, ids, am, out, _ = spts_generation
    sched = SPTSConfig(**GEN).resolve(DEPTH)
    proxies = build_proxies(model, *ltp_dims(sched, model.config.intermediate_size, model.config.hidden_size))
    ref = reference_prefill(model, ids, am, schedule=sched, proxies=proxies)
    got = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert got == [k.shape[-2] + NEW - 1 for k, _ in ref["kv"]]
    assert got[0] == N + NEW - 1 and got[-1] < got[0]


@ONE_WORKER
def test_prefill_rewritten_once_and_decode_graphs_dense(spts_generation):
    *_, calls = spts_generation
    assert 1 <= len(calls) <= 3, f"{len(calls)} backend calls over a {NEW}-token generation"
    prefill = calls[0]
    assert prefill is not None and prefill["kind"] == "prefill" and prefill["rewritten_layers"] == [1, 2, 3]
    for plan in calls[1:]:
        assert plan is None or (plan["kind"] != "prefill" and plan["rewritten_layers"] == []), plan


def test_generate_with_skipping_off_equals_dense_greedy():
    torch._dynamo.reset()
    model = make_model("qwen2", layers=DEPTH)
    ids, am = make_inputs(1, N, seed=5)
    want = _generate(model, ids, am, 16)
    eager_forward = model.forward
    # the backend's dense hand-over, uncompiled: Inductor's dense graphs are test_rewrite.py's baselines
    model.forward = torch.compile(eager_forward, backend="spts", options=dict(OFF, compiler="eager"))
    try:
        got = _generate(model, ids, am, 16)
    finally:
        model.forward = eager_forward
    assert got.tolist() == want.tolist()


def test_padded_cache_error_is_still_importable():
    from spts_compile.backend import PaddedCacheError
    assert issubclass(PaddedCacheError, ValueError)
