"""The verification pass on its own: a matched block reproduces its region; a spec that says something the
graph does not do is caught and named; verdicts are remembered per model, and die with it."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from spts_compile import runtime as rt
from spts_compile.passes import locate, verify
from spts_compile.passes.blocks import attention_args
from tests.tiny_models import SLIDING, capture_graph, make_inputs, make_model


def graph_of(family="llama", attn="sdpa", n=24, model=None):
    """With a KV cache, except for sliding-window families (whose cropped caches are never rewritten)."""
    model = model or make_model(family, attn=attn, layers=2)
    ids, am = make_inputs(1, n)
    gm, example = capture_graph(model.forward, ids, use_cache=family not in SLIDING)
    return model, gm, example, locate.analyse(gm)


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "phi3"])
def test_matched_layers_reproduce_their_regions(family):
    _, gm, example, a = graph_of(family)
    verify.verify(gm, a, example, a.layers)
    assert all(l.verified and l.verify_note == "reproduces the region" for l in a.layers), \
        [l.verify_note for l in a.layers]


def test_a_wrong_spec_is_caught_and_named():
    _, gm, example, a = graph_of()
    a.layers[0].attn.norm.eps = 0.5          # the model's eps is 1e-6
    a.layers[1].ffn.act = "gelu"             # the model's FFN is SiLU
    verify.verify(gm, a, example, a.layers)
    assert not a.layers[0].verified and "layer 0 attention" in a.layers[0].verify_note
    assert not a.layers[1].verified and "layer 1 FFN" in a.layers[1].verify_note


def test_the_dense_clean_up_form_is_verified_too(monkeypatch):
    """Eager attention builds its causal mask in-graph: the rewrite emits it as is_causal (mask None), and
    verification runs that form, including the clean-up's `attend_all`."""
    _, gm, example, a = graph_of(attn="eager")
    assert all(attention_args(l.attn, lambda x: x).mask is None for l in a.layers)
    real = rt.attend_all
    monkeypatch.setattr(rt, "attend_all", lambda *args: (real(*args)[0] + 1e-2, *real(*args)[1:]))
    verify.verify(gm, a, example, a.layers)
    assert not any(l.verified for l in a.layers)
    assert "dense form" in a.layers[0].verify_note


def test_verdicts_are_remembered_for_the_same_model_and_released_with_it():
    model, gm, example, a = graph_of()
    verify.verify(gm, a, example, a.layers)
    gm2, example2, a2 = graph_of(model=model, n=30)[1:]    # another length: the same signature
    verify.verify(gm2, a2, example2, a2.layers)
    assert all(l.verified and "(cached verdict)" in l.verify_note for l in a2.layers)
    other, gm3, example3, a3 = graph_of()                  # other weights: verified afresh
    verify.verify(gm3, a3, example3, a3.layers)
    assert all(l.verified and "cached" not in l.verify_note for l in a3.layers)
    ref = weakref.ref(next(model.parameters()))
    del model, gm, example, a, gm2, example2, a2
    torch._dynamo.reset()
    gc.collect()
    assert ref() is None, "the verdict cache keeps a dead model's weights alive"
