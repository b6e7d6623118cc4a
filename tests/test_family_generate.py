"""End-to-end generation per family: `model.forward = torch.compile(..., backend="spts")`, then
`model.generate`, against the eager reference's decode on the compacted cache (sliding-window families keep the
newest of their kept rows and mask by original position). tests/test_decode_masks.py covers masks, padded
batches and second calls per family and attention. Gemma 3 (sliding and full layers) decodes through Inductor
here, llama in test_generate.py; the other families run their rewritten graphs with compiler="eager" (what is
computed, at a few seconds a family instead of two minutes)."""
from __future__ import annotations

import pytest
import torch

import spts_compile
from reference import build_proxies, reference_decode, reference_prefill
from spts_compile.config import SPTSConfig
from spts_compile.passes.plan import ltp_dims
from tiny_models import family_names, make_inputs, make_model

OPTS = dict(start_layer=1, stage_ends=[1, 2], budgets=[16, 12], prune=4, min_tokens=1, selector="probe")
STEPS = 8


INDUCTOR_FAMILIES = ("gemma3",)


# llama generates in test_generate.py
@pytest.mark.parametrize("family", [f for f in family_names() if f != "llama"])
def test_generate_matches_reference(family):
    model = make_model(family, layers=4)
    ids, am = make_inputs(1, 32, seed=3)
    schedule = SPTSConfig(**OPTS).resolve(4)
    opts = OPTS if family in INDUCTOR_FAMILIES else dict(OPTS, compiler="eager")
    with torch.no_grad():
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="spts", options=opts)
        got = model.generate(ids, attention_mask=am, max_new_tokens=STEPS, do_sample=False)[0, 32:]
        plan = spts_compile.last_plan()
    assert plan["rewritten_layers"] == [1, 2, 3]
    channels, rank = ltp_dims(schedule, model.config.intermediate_size, model.config.hidden_size)
    with torch.no_grad():
        ref = reference_prefill(model, ids, am, schedule=schedule, proxies=build_proxies(model, channels, rank))
        want = reference_decode(model, ref, steps=STEPS)[0]
    assert got.tolist() == want.tolist()


def test_sampling_runs_on_the_compacted_cache():
    """Sampling uses the same prefill and decode graphs; with a fixed seed it is reproducible."""
    model = make_model("llama", layers=4)
    ids, am = make_inputs(1, 32, seed=4)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="spts", options=dict(OPTS, compiler="eager"))
    runs = []
    with torch.no_grad():
        for _ in range(2):
            torch.manual_seed(0)
            runs.append(model.generate(ids, attention_mask=am, max_new_tokens=STEPS, do_sample=True, top_k=20))
    assert runs[0].shape == (1, 32 + STEPS)
    assert torch.equal(runs[0], runs[1])
    assert spts_compile.last_plan()["rewritten_layers"] == [1, 2, 3]
