"""The selector registry: a selector registered from outside the library runs end to end, and the
registry is what the options accept. Compiled results are compared with the independent eager reference
(tests/reference.py) driven by the selector's own score function."""
from __future__ import annotations

import pytest
import torch

import spts_compile
from spts_compile import selectors
from spts_compile.config import SPTSConfig
from tests import toy_selector
from tests.reference import last_positions, reference_prefill
from tests.tiny_models import make_inputs, make_model

OPTS = dict(start_layer=1, stage_ends=[1, 2], budgets=[16, 12], prune=4, min_tokens=1, record_selection=True,
            selector="probe")


def test_registry_lists_every_built_in_and_the_registered_toy():
    assert {"probe", "recent", "norm", "random", "once", "stage", "toy_mod3"} <= set(selectors.names())
    assert selectors.get("toy_mod3") is toy_selector.TOY
    assert SPTSConfig(selector="toy_mod3").selector == "toy_mod3"
    default = SPTSConfig().selector
    assert "toy_mod3" in selectors.baselines() and default not in selectors.baselines()
    assert set(selectors.baselines()) | {default} == set(selectors.names())


def test_unregistered_selector_is_a_value_error_listing_the_registered_ones():
    with pytest.raises(ValueError, match="selector must be one of .*toy_mod3"):
        SPTSConfig(selector="toy_mod4")
    with pytest.raises(ValueError, match="Selector"):
        selectors.register(object())


@pytest.mark.parametrize("kind", ["pad", "cache"])
def test_a_selector_registered_in_its_own_file_runs_end_to_end(kind):
    """The toy selector's scores choose the attention rows, the FFN rows and the prune: logits, kept positions
    and the KV cache equal the reference run with the same score function."""
    model = make_model("llama", layers=4)
    opts = dict(OPTS, selector="toy_mod3", compiler="eager")   # what the selector chooses, not code generation
    if kind == "pad":
        ids, am = make_inputs(2, 40, left_pad=[0, 5], seed=3)
    else:
        ids, am = make_inputs(2, 40, seed=4)
    fn = torch.compile(model.forward, backend="spts", options=opts, dynamic=False)
    with torch.no_grad():
        out = fn(ids, attention_mask=am, use_cache=kind == "cache")
    plan = spts_compile.last_plan()
    assert plan["rewritten_layers"] == [1, 2, 3] and plan["selector"] == "toy_mod3", plan["reason"]
    ref = reference_prefill(model, ids, am, schedule=SPTSConfig(**opts).resolve(4), selector=toy_selector.mod3_scores)
    for b, last in enumerate(last_positions(am, 2, 40)):
        real = am[b].bool()
        torch.testing.assert_close(out.logits[b, real], ref["logits"][b, real], atol=1e-4, rtol=1e-5)
    for rec in spts_compile.recorded_selection():
        want = ref["kept"][rec["layer"]][rec["block"]]
        assert torch.equal(rec["active"].long(), want.long()), (rec["layer"], rec["block"])
    # the toy really chose: most kept positions at layer 3 are multiples of 3
    kept = ref["kept"][3]["attn"][0]
    assert (kept % 3 == 0).float().mean() > 0.9
    if kind == "cache":
        for (k, v), (rk, rv) in zip(((l.keys, l.values) for l in out.past_key_values.layers), ref["kv"]):
            torch.testing.assert_close(k, rk, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(v, rv, atol=1e-4, rtol=1e-5)


def test_recent_baseline_matches_a_reference_that_keeps_the_latest_tokens():
    """A built-in score selector against the reference with its own definition of "recent"."""
    model = make_model("qwen2", layers=4)
    opts = dict(OPTS, selector="recent", compiler="eager")
    ids, am = make_inputs(2, 40, left_pad=[0, 5], seed=5)
    with torch.no_grad():
        out = torch.compile(model.forward, backend="spts", options=opts, dynamic=False)(
            ids, attention_mask=am, use_cache=False)
    ref = reference_prefill(model, ids, am, schedule=SPTSConfig(**opts).resolve(4),
                            selector=lambda x, cand, layer, seed: cand.float())
    for b in range(2):
        real = am[b].bool()
        torch.testing.assert_close(out.logits[b, real], ref["logits"][b, real], atol=1e-4, rtol=1e-5)
    kept = {(r["layer"], r["block"]): r["active"] for r in spts_compile.recorded_selection()}
    assert kept[(1, "attn")][0].tolist() == list(range(40 - 16, 40))


def test_scoring_left_unset_takes_the_selectors_defaults_and_given_values_win():
    """probe_queries/heads/pool/pool_kind = None resolve per selector: the paper's scoring for probe and the
    score selectors, the retrieval-safe scoring for the keep-set modes; a value the user gives is kept."""
    def scoring(**kw):
        s = SPTSConfig(**kw).resolve(30)
        return s.probe_queries, s.heads, s.pool, s.pool_kind

    assert SPTSConfig().selector == "stage"
    assert scoring() == scoring(selector="stage") == scoring(selector="once") == (64, "max", 25, "max")
    assert scoring(selector="probe") == scoring(selector="recent") == (1, "mean", 1, "avg")
    assert scoring(selector="toy_mod3") == (1, "mean", 1, "avg")
    assert scoring(selector="probe", pool=7, heads="kv_union") == (1, "kv_union", 7, "avg")
    assert scoring(probe_queries=1, pool_kind="avg") == (1, "max", 25, "avg")
    with pytest.raises(ValueError, match="pool"):
        SPTSConfig(pool=4)
