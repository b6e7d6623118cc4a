"""Tests of LTP calibration and the low-rank proxy (spts_compile.calibration).

Everything runs on tiny random-init models built from configs, so no download is needed."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
import transformers

from spts_compile.calibration import (
    Calibration, LTPProxy, build_ltp_proxy, calibrate, channel_importance_from_weights, find_mlps, mlp_weights,
    proxy_act, proxy_norm, resolve_calibration, top_rho_count,
)

HIDDEN, WIDTH, LAYERS = 64, 128, 2


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=WIDTH,
                                   num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_phi3(seed: int = 0) -> transformers.Phi3ForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.Phi3Config(vocab_size=128, hidden_size=HIDDEN, intermediate_size=WIDTH,
                                  num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                  pad_token_id=0)
    return transformers.Phi3ForCausalLM(cfg).eval()


def token_batches() -> list[torch.Tensor]:
    """Batches of mixed shapes; total 20 + 30 + 30 = 80 tokens."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (20,), generator=g), torch.randint(0, 128, (2, 15), generator=g),
            torch.randint(0, 128, (30,), generator=g)]


def ffn_inputs(model, batches) -> list[torch.Tensor]:
    """Every FFN's input over all batches, [tokens, D] per layer, captured independently of calibrate."""
    captured = [[] for _ in range(LAYERS)]
    handles = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: captured[i].append(a[0].reshape(-1, HIDDEN)))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b if b.dim() == 2 else b[None])
    for h in handles:
        h.remove()
    return [torch.cat(c) for c in captured]


def brute_force_top_rho(saliency: torch.Tensor, rho: float) -> torch.Tensor:
    k = top_rho_count(rho, saliency.shape[0])
    return saliency.sort(dim=0, descending=True).values[:k].mean(dim=0)


# -- the proxy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
def test_full_rank_proxy_reproduces_ffn_output_norm(act):
    model = tiny_llama()
    mlp = model.model.layers[1].mlp
    mlp.act_fn = {"silu": torch.nn.SiLU(), "gelu_tanh": torch.nn.GELU("tanh"), "gelu": torch.nn.GELU()}[act]
    proxy = build_ltp_proxy(*mlp_weights(mlp), channels=WIDTH, rank=HIDDEN)
    # Scaled so the gate pre-activations reach the range where the activations differ (|g| ~ 1-3).
    x = 10 * torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        expected = mlp(x).norm(dim=-1)
    got = proxy_norm(x, proxy.tensors(), act)
    assert got.shape == (2, 9)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_reduced_proxy_is_an_approximation_not_the_ffn():
    # Guards the exactness test above: a genuinely truncated proxy must differ from the FFN.
    mlp = tiny_llama().model.layers[0].mlp
    proxy = build_ltp_proxy(*mlp_weights(mlp), channels=32, rank=4)
    x = torch.randn(5, HIDDEN)
    with torch.no_grad():
        assert not torch.allclose(proxy_norm(x, proxy.tensors(), "silu"), mlp(x).norm(dim=-1), rtol=1e-2)


def test_proxy_shapes_and_clamping():
    w_gate, w_up, w_down = mlp_weights(tiny_llama().model.layers[0].mlp)
    proxy = build_ltp_proxy(w_gate, w_up, w_down, channels=24, rank=8)
    assert [tuple(t.shape) for t in proxy.tensors()] == [(8, HIDDEN), (24, 8), (8, HIDDEN), (24, 8), (HIDDEN, 24)]
    assert proxy.channels.dtype == torch.long and torch.equal(proxy.channels, proxy.channels.sort().values)
    # Requests beyond the FFN clamp to I channels and min(D_low, D) rank.
    big = build_ltp_proxy(w_gate, w_up, w_down, channels=10_000, rank=10_000)
    assert big.channels.numel() == WIDTH and big.gate_in.shape[0] == HIDDEN
    small = build_ltp_proxy(w_gate, w_up, w_down, channels=5, rank=100)
    assert small.gate_in.shape[0] == 5


def test_proxy_keeps_weight_dtype_and_no_autograd_history():
    w_gate, w_up, w_down = (w.detach().to(torch.bfloat16).requires_grad_() for w in
                            mlp_weights(tiny_llama().model.layers[0].mlp))
    proxy = build_ltp_proxy(w_gate, w_up, w_down, channels=16, rank=4)
    for t in proxy.tensors():
        assert t.dtype == torch.bfloat16
        assert not t.requires_grad and t.grad_fn is None


def test_proxy_is_deterministic():
    weights = mlp_weights(tiny_llama().model.layers[0].mlp)
    a = build_ltp_proxy(*weights, channels=40, rank=12)
    b = build_ltp_proxy(*weights, channels=40, rank=12)
    assert torch.equal(a.channels, b.channels)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


def test_unknown_activation_is_rejected():
    proxy = build_ltp_proxy(*mlp_weights(tiny_llama().model.layers[0].mlp), channels=8, rank=4)
    with pytest.raises(ValueError, match="unknown LTP activation 'relu'"):
        proxy_norm(torch.randn(3, HIDDEN), proxy.tensors(), "relu")


def test_hf_activation_names_map_onto_proxy_names():
    assert proxy_act("silu") == "silu"
    assert proxy_act("gelu_pytorch_tanh") == "gelu_tanh"
    with pytest.raises(ValueError, match="relu"):
        proxy_act("relu")


def test_bad_weight_shapes_are_rejected():
    w = torch.randn(WIDTH, HIDDEN)
    with pytest.raises(ValueError, match="down weight"):
        build_ltp_proxy(w, w, torch.randn(WIDTH, HIDDEN), channels=8, rank=4)
    with pytest.raises(ValueError, match="importance has shape"):
        build_ltp_proxy(w, w, w.T, channels=8, rank=4, importance=torch.ones(WIDTH - 1))


# -- channel ranking ----------------------------------------------------------------------------
def test_weights_only_importance_is_the_norm_product():
    w_gate, w_up, w_down = (w.detach() for w in mlp_weights(tiny_llama().model.layers[0].mlp))
    expected = torch.tensor([w_gate[j].norm() * w_up[j].norm() * w_down[:, j].norm() for j in range(WIDTH)])
    got = channel_importance_from_weights(w_gate, w_up, w_down)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)

    proxy = build_ltp_proxy(w_gate, w_up, w_down, channels=20, rank=4)
    assert proxy.mode == "weights"
    assert torch.equal(proxy.channels, expected.topk(20).indices.sort().values)


def test_given_importance_picks_the_channels_and_sets_mode():
    w_gate, w_up, w_down = mlp_weights(tiny_llama().model.layers[0].mlp)
    importance = torch.zeros(WIDTH)
    wanted = torch.tensor([3, 17, 64, 100])
    importance[wanted] = torch.tensor([1.0, 4.0, 2.0, 3.0])
    proxy = build_ltp_proxy(w_gate, w_up, w_down, channels=4, rank=4, importance=importance)
    assert proxy.mode == "calibration"
    assert torch.equal(proxy.channels, wanted)
    torch.testing.assert_close(proxy.down, w_down[:, wanted].detach())


# -- calibrate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.2, 0.5])   # k = 16 and 40: the latter exceeds every single batch
def test_calibrate_matches_brute_force_top_rho_mean(rho):
    model = tiny_llama()
    batches = token_batches()
    calib = calibrate(model, batches, rho=rho, progress=False)
    assert calib.num_tokens == 80 and calib.num_layers == LAYERS and calib.hidden_size == HIDDEN
    assert calib.model_type == "llama" and calib.rho == rho
    for layer, x in enumerate(ffn_inputs(model, batches)):
        mlp = model.model.layers[layer].mlp
        saliency = (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)).abs()
        torch.testing.assert_close(calib.importance_for(layer), brute_force_top_rho(saliency, rho),
                                   rtol=1e-5, atol=1e-7)


def test_calibrate_splits_fused_gate_up_projection():
    model = tiny_phi3()
    batches = token_batches()[:2]
    calib = calibrate(model, batches, rho=0.2, progress=False)
    for layer, x in enumerate(ffn_inputs(model, batches)):
        gate_up = x @ model.model.layers[layer].mlp.gate_up_proj.weight.T
        gate, up = gate_up[:, :WIDTH], gate_up[:, WIDTH:]
        saliency = (F.silu(gate) * up).abs()
        torch.testing.assert_close(calib.importance_for(layer), brute_force_top_rho(saliency, 0.2),
                                   rtol=1e-5, atol=1e-7)


class CharTokenizer:
    """A stand-in tokenizer: one token per character, honouring truncation like a HF tokenizer."""

    def __call__(self, text, return_tensors=None, truncation=False, max_length=None):
        ids = [ord(c) % 128 for c in text]
        if truncation and max_length is not None:
            ids = ids[:max_length]
        return {"input_ids": torch.tensor([ids], dtype=torch.long)}


def test_calibrate_tokenizes_strings_and_truncates():
    model = tiny_llama()
    calib = calibrate(model, ["hello world", "x" * 50, ""], tokenizer=CharTokenizer(), max_length=16,
                      progress=False)
    assert calib.num_tokens == 11 + 16   # the empty string adds nothing, the long one is cut to 16


def test_calibrate_truncates_token_tensors():
    calib = calibrate(tiny_llama(), [torch.randint(0, 128, (40,)), torch.randint(0, 128, (2, 10))],
                      max_length=16, progress=False)
    assert calib.num_tokens == 16 + 2 * 10


def test_calibrate_restores_training_mode_and_removes_hooks():
    model = tiny_llama().train()
    calibrate(model, token_batches()[:1], progress=False)
    assert model.training
    assert all(not layer.mlp._forward_hooks for layer in model.model.layers)


def test_calibrate_progress_runs(capsys):
    calibrate(tiny_llama(), token_batches()[:1], progress=True)   # must not fail with or without tqdm


def test_calibrate_rejects_bad_data():
    model = tiny_llama()
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        calibrate(model, ["some text"], progress=False)
    with pytest.raises(ValueError, match="integer token tensor"):
        calibrate(model, [torch.randn(4, 5)], progress=False)
    with pytest.raises(ValueError, match="rho"):
        calibrate(model, token_batches(), rho=0.0, progress=False)


def test_calibrate_rejects_a_model_without_gated_ffns():
    model = torch.nn.Sequential(torch.nn.Embedding(128, 8), torch.nn.Linear(8, 8))
    assert find_mlps(model) == []
    with pytest.raises(ValueError, match="no gated FFN"):
        calibrate(model, token_batches(), progress=False)


def test_top_rho_count_rounds_up_exactly():
    assert top_rho_count(0.2, 80) == 16
    assert top_rho_count(0.28, 25) == 7      # float 0.28 * 25 is 7.000000000000001
    assert top_rho_count(0.2, 3) == 1
    assert top_rho_count(0.2, 11) == math.ceil(2.2)


# -- Calibration: persistence and fit checks ----------------------------------------------------
def sample_calibration() -> Calibration:
    g = torch.Generator().manual_seed(2)
    return Calibration(importance=[torch.rand(WIDTH, generator=g), torch.rand(WIDTH // 2, generator=g)],
                       hidden_size=HIDDEN, rho=0.2, num_tokens=1234, model_type="llama")


def test_save_load_round_trip(tmp_path):
    calib = sample_calibration()
    path = tmp_path / "calib.pt"
    calib.save(path)
    loaded = Calibration.load(path)
    assert loaded.num_layers == calib.num_layers
    for a, b in zip(loaded.importance, calib.importance):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert (loaded.hidden_size, loaded.rho, loaded.num_tokens, loaded.model_type) == (HIDDEN, 0.2, 1234, "llama")
    assert os.listdir(tmp_path) == ["calib.pt"]   # the temporary file was renamed, not left behind


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "calib.pt"
    sample_calibration().save(path)
    newer = Calibration([torch.ones(8)], hidden_size=4, rho=0.5, num_tokens=3, model_type=None)
    newer.save(str(path))
    loaded = Calibration.load(str(path))
    assert loaded.model_type is None and torch.equal(loaded.importance[0], torch.ones(8))


def test_calibrate_result_survives_round_trip(tmp_path):
    calib = calibrate(tiny_llama(), token_batches()[:1], progress=False)
    calib.save(tmp_path / "c.pt")
    loaded = resolve_calibration(tmp_path / "c.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.importance, calib.importance))


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, reason", [
    (lambda p: write_bytes(p, os.urandom(256)), "not a readable calibration file"),
    (lambda p: (sample_calibration().save(p), write_bytes(p, p.read_bytes()[:300]))[1],
     "not a readable calibration file"),
    (lambda p: (torch.save({"weights": torch.ones(3)}, p), p)[1], "format tag"),
    (lambda p: (torch.save([1, 2, 3], p), p)[1], "expected a dict"),
    (lambda p: (torch.save({**sample_calibration().to_dict(), "version": 99}, p), p)[1], "version 99"),
    (lambda p: (torch.save({**sample_calibration().to_dict(), "importance": []}, p), p)[1], "importance"),
    (lambda p: (torch.save({**sample_calibration().to_dict(), "hidden_size": "64"}, p), p)[1], "hidden_size"),
], ids=["random-bytes", "truncated", "foreign-dict", "not-a-dict", "future-version", "no-layers", "bad-field"])
def test_load_rejects_corrupt_and_foreign_files(tmp_path, make, reason):
    path = make(tmp_path / "bad.pt")
    with pytest.raises(ValueError) as info:
        Calibration.load(path)
    message = str(info.value)
    assert str(path) in message and reason in message


def test_load_missing_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Calibration.load(tmp_path / "nope.pt")


def test_check_fits_accepts_the_matching_model():
    sample_calibration().check_fits(2, HIDDEN, [WIDTH, WIDTH // 2])


def test_check_fits_names_the_mismatch():
    calib = sample_calibration()
    with pytest.raises(ValueError, match="covers 2 FFN layers but the model has 3"):
        calib.check_fits(3, HIDDEN, [WIDTH, WIDTH // 2, WIDTH])
    with pytest.raises(ValueError, match="hidden size 64 but the model's hidden size is 32"):
        calib.check_fits(2, 32, [WIDTH, WIDTH // 2])
    with pytest.raises(ValueError, match=r"layer 1: calibration 64 vs model 128") as info:
        calib.check_fits(2, HIDDEN, [WIDTH, WIDTH])
    assert "layer 0" not in str(info.value)


def test_importance_for_checks_the_layer():
    calib = sample_calibration()
    assert calib.importance_for(1).numel() == WIDTH // 2
    with pytest.raises(ValueError, match="no layer 2"):
        calib.importance_for(2)


def test_resolve_calibration_accepts_none_object_and_path(tmp_path):
    calib = sample_calibration()
    assert resolve_calibration(None) is None
    assert resolve_calibration(calib) is calib
    calib.save(tmp_path / "c.pt")
    assert isinstance(resolve_calibration(str(tmp_path / "c.pt")), Calibration)
    with pytest.raises(ValueError, match="calibration must be"):
        resolve_calibration(42)


def test_ltp_proxy_is_a_dataclass_with_tensors_in_order():
    t = [torch.full((1,), float(i)) for i in range(5)]
    proxy = LTPProxy(*t, channels=torch.arange(1), mode="weights")
    assert [float(x) for x in proxy.tensors()] == [0.0, 1.0, 2.0, 3.0, 4.0]
