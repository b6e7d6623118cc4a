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


def _record_ops(monkeypatch) -> list:
    """The op nodes the verification's eager run executes, in order (placeholders left out)."""
    ran = []
    real = verify._Capture.run_node
    monkeypatch.setattr(verify._Capture, "run_node",
                        lambda self, n: (n.op != "placeholder" and ran.append(n), real(self, n))[1])
    return ran


def _layers_run(ran) -> set:
    """The decoder layers whose ops ran (weights are inputs, so only ops name a layer)."""
    return {w[0] for w in map(verify.module_path, ran) if w is not None}


def test_alike_layers_take_the_earliest_ones_verdict_and_the_run_stops_there(monkeypatch):
    """Layers 2 and 3 are the same code as layer 1 (layer 0 reads the embedding, the others the layer before):
    layer 1's check stands for them, and the eager run ends once layers 0 and 1 are captured."""
    model = make_model("llama", layers=4)
    _, gm, example, a = graph_of(model=model)
    ran = _record_ops(monkeypatch)
    verify.verify(gm, a, example, a.layers)
    assert all(l.verified for l in a.layers), [l.verify_note for l in a.layers]
    assert [l.verify_note for l in a.layers[:2]] == ["reproduces the region"] * 2
    assert all("as layer 1" in l.verify_note for l in a.layers[2:])
    assert _layers_run(ran) == {0, 1}, _layers_run(ran)


def test_layers_that_skip_late_are_checked_on_an_early_dense_layer_with_their_code(monkeypatch):
    """Only layers 2 and 3 are to be verified (the passes skip from layer 2), but layer 1 is the same code:
    its check stands for them, the eager run stops after layer 1, and layers 0 and 1 stay unmarked (they are
    left as compiled). A wrong spec on the dense layer 1 is caught in 2 and 3's verdict."""
    model = make_model("llama", layers=4)
    _, gm, example, a = graph_of(model=model)
    ran = _record_ops(monkeypatch)
    verify.verify(gm, a, example, a.layers[2:])
    assert all(l.verified and "as layer 1" in l.verify_note for l in a.layers[2:]), [l.verify_note for l in a.layers]
    assert [(l.verified, l.verify_note) for l in a.layers[:2]] == [(False, "")] * 2
    assert _layers_run(ran) == {0, 1}, _layers_run(ran)

    _, gm2, example2, a2 = graph_of(model=make_model("llama", layers=4))
    a2.layers[1].ffn.act = "gelu"              # what layer 1's check runs differs from its graph
    for l in a2.layers[2:]:
        l.ffn.act = "gelu"                     # and 2 and 3 read alike, so layer 1 stands for them
    verify.verify(gm2, a2, example2, a2.layers[2:])
    assert not any(l.verified for l in a2.layers[2:])
    assert all("layer 1 FFN" in l.verify_note for l in a2.layers[2:]), [l.verify_note for l in a2.layers]


def test_a_layer_the_matcher_read_differently_is_checked_on_its_own():
    """Same code, but layer 3's spec says something else (a wrong eps): it is not grouped with layer 1, and its
    own check catches it; layer 2 still shares layer 1's verdict."""
    model = make_model("llama", layers=4)
    _, gm, example, a = graph_of(model=model)
    a.layers[3].attn.norm.eps = 0.5
    verify.verify(gm, a, example, a.layers)
    assert [l.verified for l in a.layers] == [True, True, True, False]
    assert "layer 3 attention" in a.layers[3].verify_note


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


def _twin(model, change=None):
    """Another model object with the same weight values (a second process, as far as verification can tell:
    new weight ids miss the in-process verdicts), optionally changed by `change(twin)`."""
    twin = make_model("llama", layers=4)
    twin.load_state_dict(model.state_dict())
    if change is not None:
        with torch.no_grad():
            change(twin)
    return twin


def test_a_verdict_on_disk_serves_a_model_with_the_same_weights_and_nothing_else(monkeypatch, tmp_path):
    monkeypatch.setenv("SPTS_VERIFY_CACHE", "1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = make_model("llama", layers=4)
    _, gm, example, a = graph_of(model=model)
    verify.verify(gm, a, example, a.layers)
    assert all(l.verified for l in a.layers) and not any("disk" in l.verify_note for l in a.layers)
    assert len(list((tmp_path / "spts-verify").iterdir())) == 2      # layers 0 and 1 stand for all four

    ran = []
    real = verify._Capture.run_node
    monkeypatch.setattr(verify._Capture, "run_node", lambda self, n: (ran.append(n), real(self, n))[1])
    _, gm2, example2, a2 = graph_of(model=_twin(model))
    verify.verify(gm2, a2, example2, a2.layers)
    assert all(l.verified and "verdict from the disk cache" in l.verify_note for l in a2.layers), \
        [l.verify_note for l in a2.layers]
    assert not ran, "the graph ran although every verdict was on disk"

    _, gm3, example3, a3 = graph_of(model=_twin(model))
    a3.layers[3].attn.norm.eps = 0.5            # what the matcher read differs: its own check, which fails
    verify.verify(gm3, a3, example3, a3.layers)
    assert [l.verified for l in a3.layers] == [True, True, True, False]
    assert "layer 3 attention" in a3.layers[3].verify_note

    changed = _twin(model, lambda m: m.model.layers[2].mlp.up_proj.weight.mul_(1.001))
    _, gm4, example4, a4 = graph_of(model=changed)
    verify.verify(gm4, a4, example4, a4.layers)  # other values, other key: verified afresh
    assert all(l.verified and "disk" not in l.verify_note for l in a4.layers), [l.verify_note for l in a4.layers]
    assert ran


@pytest.mark.parametrize("family", SLIDING)
def test_a_sliding_window_cache_is_checked_past_the_prefix(monkeypatch, family):
    """Past PREFIX tokens the block is checked on a prefix, but a sliding-window cache holds the newest rows of
    the whole prompt: its K/V are checked at full length (once compared against the prefix's rows, so every
    real model longer than 256 tokens failed, and Gemma 3 with a cache skipped one layer of 18). A wrong
    spec is still caught."""
    monkeypatch.setattr(verify, "PREFIX", 8)                # tiny window 8, 24 tokens: the real models' case
    model = make_model(family, layers=2)
    ids, _ = make_inputs(1, 24)
    gm, example = capture_graph(model.forward, ids, use_cache=True)
    a = locate.analyse(gm)
    windowed = [l for l in a.layers if l.attn.cache is not None and l.attn.cache.keep is not None]
    assert windowed and all(l.attn.cache.keep < 24 for l in windowed)
    verify.verify(gm, a, example, a.layers)
    assert all(l.verified for l in a.layers), [l.verify_note for l in a.layers]

    gm2, example2 = capture_graph(make_model(family, layers=2).forward, ids, use_cache=True)
    a2 = locate.analyse(gm2)
    bad = next(l for l in a2.layers if l.attn.cache is not None and l.attn.cache.keep is not None)
    bad.attn.norm.eps = 0.5
    verify.verify(gm2, a2, example2, a2.layers)
    assert not bad.verified and f"layer {bad.index}" in bad.verify_note
