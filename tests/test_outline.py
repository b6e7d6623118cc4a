"""share_layers: skipping layers with the same rewritten code and shapes become one outlined subgraph that
Inductor compiles once (passes/outline.py). The computation must not change: the shared graph is compared
with the inline one and with the eager reference. How much compile time it saves is a benchmark's question
(benchmarks.compile_time --inline), not a test's."""
from __future__ import annotations

import pytest
import torch

import spts_compile
from spts_compile.config import SPTSConfig
from spts_compile.passes.plan import ltp_dims
from tests.reference import build_proxies, reference_prefill
from tests.tiny_models import make_inputs, make_model

# 12 layers: skipping from 2, stages end at 6 and 10, 48 tokens. With selector "stage": layer 2 scores and
# keeps 24; 3-6 keep what it chose (the same code; 6's kept scores are an output nobody reads); 7 scores again
# and keeps 12; 8-10 keep those; 11 scores again among 12 and keeps them all (7's code on other shapes). So
# five compiled layer functions serve ten skipping layers, and a sixth the two dense layers.
OPTS = dict(start_layer=2, stage_ends=[6, 10], budgets=[24, 12], prune=4, min_tokens=1)


def _run(model, ids, mask, **options):
    torch._dynamo.reset()
    fn = torch.compile(model, backend="spts", options=dict(OPTS, **options))
    with torch.no_grad():
        out = fn(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return out, spts_compile.last_plan()


@pytest.fixture(scope="module")
def case():
    model = make_model("llama", layers=12)
    ids, mask = make_inputs(2, 48, left_pad=[0, 5])
    return model, ids, mask


@pytest.mark.parametrize("selector", ["stage", "probe"])
def test_layers_of_a_stage_call_one_module(case, selector):
    model, ids, mask = case
    shared, plan = _run(model, ids, mask, selector=selector, compiler="eager")
    modules = {int(k): v for k, v in plan["layer_modules"].items()}
    assert plan["rewritten_layers"] == list(range(2, 12))
    assert sorted(modules) == list(range(12))                    # the dense layers 0-1 are outlined too
    assert modules[0] == modules[1] and modules[0] not in {modules[l] for l in range(2, 12)}, modules
    if selector == "stage":
        assert len({modules[l] for l in range(3, 7)}) == 1 and len({modules[l] for l in range(8, 11)}) == 1
        assert modules[7] == modules[11], modules                 # a stage start: score again, keep the budget
        assert len({modules[2], modules[3], modules[7], modules[8]}) == 4, modules
    else:   # per-layer selection: 2-5 alike, 6 prunes at its stage end, 7-9 alike with stage 2's budget
        assert len({modules[l] for l in range(2, 6)}) == 1 and len({modules[l] for l in range(7, 10)}) == 1
        assert modules[6] != modules[5] and modules[7] != modules[5], modules
    inline, plan_inline = _run(model, ids, mask, selector=selector, compiler="eager", share_layers=False)
    assert plan_inline["layer_modules"] == {}
    assert torch.equal(shared, inline)
    sched = SPTSConfig(**OPTS, selector=selector).resolve(len(model.model.layers))
    channels, rank = ltp_dims(sched, model.config.intermediate_size, model.config.hidden_size)
    ref = reference_prefill(model, ids, mask, schedule=sched, proxies=build_proxies(model, channels, rank),
                            selector=selector)["logits"]
    torch.testing.assert_close(shared[:, -1], ref[:, -1], atol=1e-4, rtol=1e-4)


def test_inductor_compiles_one_function_per_region_and_shapes_and_gives_the_inline_result(case):
    """Inductor on the outlined graph gives what the rewritten graph gives uncompiled, which the test above
    holds equal to the inline graph (compiling the inline graph with Inductor as well doubled this test's
    time for no other check)."""
    model, ids, mask = case
    shared, plan = _run(model, ids, mask)
    uncompiled, _ = _run(model, ids, mask, compiler="eager")
    torch.testing.assert_close(shared, uncompiled, atol=1e-5, rtol=1e-5)
    assert plan["kernels"] > 0
    # ten skipping layers, five (code, shapes): see OPTS; and one for the two dense layers
    assert plan["subgraphs"] == 6, plan["subgraphs"]


def test_share_layers_must_be_a_bool():
    with pytest.raises(ValueError, match="share_layers"):
        spts_compile.SPTSConfig(share_layers="yes")
