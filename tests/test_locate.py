"""The analysis pass on its own: what it finds in each family's Dynamo graph, read against the models'
own configs and modules (not against the family table)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from spts_compile import families
from spts_compile.passes import locate
from spts_compile.passes.locate import RowSlice
from tests.tiny_models import SLIDING, capture_graph, family_names, make_inputs, make_model


def analysed(family, attn="sdpa", use_cache=False, n=12, model=None):
    model = model or make_model(family, attn=attn, layers=2)
    ids, am = make_inputs(1, n)
    gm, _ = capture_graph(model.forward, ids, use_cache=use_cache)
    return model, locate.analyse(gm)


@pytest.mark.parametrize("family", family_names())
def test_each_family_is_found_and_described(family):
    model, a = analysed(family)
    cfg = model.config
    assert a.kind == "prefill" and a.seq_len == 12 and a.batch == 1
    assert [l.index for l in a.layers] == [0, 1] and all(l.matched for l in a.layers), [l.reason for l in a.layers]
    for spec, layer in zip(a.layers, model.model.layers):
        assert spec.family.name == family
        att, ffn = spec.attn, spec.ffn
        assert (att.n_heads, att.n_kv_heads, att.head_dim, att.hidden) == (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size)
        assert ffn.intermediate == cfg.intermediate_size and ffn.kind == "gated"
        sa = layer.self_attn
        assert (att.bq is not None) == (getattr(getattr(sa, "q_proj", None), "bias", None) is not None)
        assert (att.q_norm is not None) == hasattr(sa, "q_norm") == (att.k_norm is not None)
        fused = hasattr(sa, "qkv_proj")
        assert isinstance(att.wq, RowSlice) == fused == isinstance(ffn.w_gate, RowSlice)
        offset = family == "gemma3"           # Gemma's norms scale by (1 + w)
        assert att.norm.kind == ("rms_offset" if offset else "rms")
        assert (att.post_norm is not None) == hasattr(layer, "post_feedforward_layernorm") == (ffn.post_norm is not None)
        assert ffn.act == ("gelu_tanh" if family == "gemma3" else "silu")
        assert spec.cache == "none"


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_cache_kinds(family):
    _, a = analysed(family, use_cache=True)
    want = "window" if family in SLIDING else "fresh"
    assert [l.cache for l in a.layers] == [want, want]
    assert all(l.attn.k_out is not None and l.attn.v_out is not None for l in a.layers)


def test_eager_attention_and_its_mask():
    _, a = analysed("llama", attn="eager")
    assert all(l.attn.kind == "eager" and l.attn.mask is not None for l in a.layers)


def test_padding_mask_and_sequence_source_are_found():
    model = make_model("qwen2", layers=2)
    ids, am = make_inputs(2, 12, left_pad=[0, 3])
    gm, example = capture_graph(model.forward, ids, attention_mask=am, use_cache=False)
    a = locate.analyse(gm)
    assert a.padding_mask is not None and a.padding_mask.op == "placeholder"
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    assert torch.equal(example[placeholders.index(a.padding_mask)], am)
    assert example[a.seq_source].shape[1] == 12


def test_decode_step_is_left_dense():
    model = make_model("llama", layers=2)
    ids, _ = make_inputs(1, 12)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    gm, _ = capture_graph(model.forward, ids[:, -1:], past_key_values=cache, use_cache=True)
    a = locate.analyse(gm)
    assert a.kind in ("decode", "cached") and a.reason


def test_a_graph_without_layers():
    gm, _ = capture_graph(torch.nn.Linear(4, 4), torch.randn(2, 4))
    a = locate.analyse(gm)
    assert a.kind == "none" and "no decoder layers" in a.reason


def test_an_unknown_layer_class_is_matched_by_pattern_as_the_generic_row():
    model = make_model("llama", layers=2)

    class MyDecoderLayer(transformers.models.llama.modeling_llama.LlamaDecoderLayer):
        pass
    for layer in model.model.layers:
        layer.__class__ = MyDecoderLayer
    _, a = analysed("llama", model=model)
    assert all(l.matched and l.family is families.GENERIC for l in a.layers), [l.reason for l in a.layers]


def test_a_graph_that_contradicts_its_family_row_is_unmatched(monkeypatch):
    """The row is not decoration: a Llama layer held to a row that says it has q/k norms does not match."""
    wrong = dataclasses.replace(families.by_name("llama"), qk_norm=True)
    monkeypatch.setattr(families, "for_layer_class", lambda cls: wrong)
    _, a = analysed("llama")
    assert all(not l.matched and "q/k norms" in l.reason for l in a.layers)
    wrong = dataclasses.replace(families.by_name("llama"), norm="rms_offset")
    monkeypatch.setattr(families, "for_layer_class", lambda cls: wrong)
    _, a = analysed("llama")
    assert all(not l.matched and "norm" in l.reason for l in a.layers)
