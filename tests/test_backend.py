"""The backend as a product: registration, options, fallback, dumps, the dense clean-up, verification,
and the cases it must refuse or leave dense. Each test compares against an independent result."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import spts_compile
from spts_compile import runtime
from tiny_models import make_inputs, make_model

SKIP_OPTS = dict(start_layer=1, stage_ends=[1, 2], budgets=[16, 12], prune=4, min_tokens=1, selector="probe")


def compile_fn(fn, **options):
    torch._dynamo.reset()
    return torch.compile(fn, backend="spts", options=options)


def inductor(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="inductor")


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def test_entry_point_in_a_fresh_interpreter_without_import():
    code = (
        "import torch, sys\n"
        "fn = torch._dynamo.lookup_backend('spts')\n"
        "assert fn.__module__ == 'spts_compile.backend', fn.__module__\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "x = torch.randn(2, 4)\n"
        "out = torch.compile(m, backend='spts')(x)\n"
        "assert torch.allclose(out, m(x), atol=1e-6)\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


def test_import_registers_and_twice_is_harmless():
    import importlib
    importlib.reload(spts_compile)
    importlib.reload(spts_compile)
    assert torch._dynamo.lookup_backend("spts") is not None
    code = "import spts_compile, spts_compile, torch; print(torch._dynamo.lookup_backend('spts').__name__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "spts_backend", res.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, field", [
    ({"budget": [1]}, "unknown option"),
    ({"pap": "yes"}, "pap"),
    ({"budgets": [0]}, "budgets"),
    ({"budgets": [-3]}, "budgets"),
    ({"budgets": [1.5]}, "budgets"),
    ({"prune": -1}, "prune"),
    ({"stage_ends": [5, 3]}, "stage_ends"),
    ({"stage_ends": [2, 3], "budgets": [8]}, "budgets"),
    ({"start_layer": -1}, "start_layer"),
    ({"probe_queries": 0}, "probe_queries"),
    ({"ltp_rho": 0.0}, "ltp_rho"),
    ({"min_tokens": "many"}, "min_tokens"),
    ({"selector": "best"}, "selector"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        spts_compile.SPTSConfig.from_options(options)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        spts_compile.SPTSConfig.from_options({"budgetz": 3})
    for name in ("start_layer", "stage_ends", "budgets", "prune", "pap", "ltp", "msdp", "probe_queries",
                 "ltp_channels", "ltp_rank", "calibration", "min_tokens", "debug_dir",
                 "record_selection"):
        assert name in str(info.value)


def test_stage_ends_past_the_depth_are_rejected():
    with pytest.raises(ValueError, match="stage_ends"):
        spts_compile.SPTSConfig(stage_ends=[2, 9]).resolve(4)
    with pytest.raises(ValueError, match="start_layer"):
        spts_compile.SPTSConfig(start_layer=7).resolve(4)


def test_bad_options_reach_the_user_through_torch_compile():
    m = nn.Linear(4, 4)
    f = compile_fn(m, budgets=[0])
    with pytest.raises(Exception, match="budgets"):
        f(torch.randn(2, 4))


def test_presets_reproduce_the_papers_schedules():
    s = spts_compile.SPTSConfig().resolve(32)
    assert (s.start_layer, s.stage_ends, s.budgets, s.prune) == (10, [13, 18, 23, 28], [9216, 7168, 4096, 2048],
                                                                [1024] * 4)
    s = spts_compile.SPTSConfig().resolve(28)
    assert (s.start_layer, s.stage_ends, s.budgets[0], s.prune[0]) == (9, [12, 16, 20, 24], 13312, 2048)
    s = spts_compile.SPTSConfig().resolve(26)
    assert (s.start_layer, s.stage_ends, s.budgets[-1]) == (11, [13, 16, 19, 22], 4096)


# ------------------------------------------------------------------------------------------------
# Fallback: graphs without decoder layers, and decoders of an unfamiliar shape
# ------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    """A GPT-2-like block: LayerNorm, single-matrix attention via softmax, GELU MLP."""

    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        q, k, v = self.attn(self.ln1(x)).chunk(3, dim=-1)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.mlp(self.ln2(x))


class _Decoder(nn.Module):
    def __init__(self, d=32, n=2):
        super().__init__()
        self.layers = nn.ModuleList(_Block(d) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("model, x", [
    (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(3, 8)),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten()), torch.randn(2, 3, 8, 8)),
    (_Decoder(), torch.randn(1, 12, 32)),
], ids=["mlp", "conv", "unfamiliar-decoder"])
def test_unmatched_graphs_fall_back_to_inductor_with_one_warning(model, x, caplog):
    model.eval()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="spts_compile"):
        f = compile_fn(model, min_tokens=1)
        got = f(x)
        got2 = f(x)
    torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got2, got)
    warnings = [r for r in caplog.records if r.name == "spts_compile" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "plain Inductor" in warnings[0].getMessage()


def test_unfamiliar_decoder_warning_names_the_first_mismatch(caplog):
    model = _Decoder().eval()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="spts_compile"):
        compile_fn(model, min_tokens=1)(torch.randn(1, 12, 32))
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "layer 0" in msg and "attention" in msg


# ------------------------------------------------------------------------------------------------
# Verification by execution
# ------------------------------------------------------------------------------------------------
def test_a_block_that_does_not_reproduce_its_region_stays_dense(monkeypatch, caplog):
    """Break the canonical RoPE: verification must catch it, leave every layer dense, and say why."""
    model = make_model("llama", layers=4)
    ids, _ = make_inputs(1, 24)
    wrong = lambda x, cos, sin: x * cos  # noqa: E731  (drops the rotate-half term)
    monkeypatch.setattr(runtime, "apply_rope", wrong)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="spts_compile"):
        got = compile_fn(model.forward, **SKIP_OPTS)(ids).logits
        summary = spts_compile.last_plan()
    monkeypatch.undo()
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert summary["rewritten_layers"] == []
    assert all(l["verified"] == "no" for l in summary["layers"][1:])
    assert "attention" in summary["layers"][1]["reason"]
    assert any("no layer can skip" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# Dumps
# ------------------------------------------------------------------------------------------------
def test_debug_dir_dumps_graph_layers_and_plan(tmp_path):
    model = make_model("qwen2", layers=4)
    ids, am = make_inputs(1, 24)
    with torch.no_grad():
        compile_fn(model.forward, debug_dir=str(tmp_path), **SKIP_OPTS)(ids, attention_mask=am)
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 1
    d = folders[0]
    for name in ("before.py", "after.py", "layers.txt", "plan.txt", "summary.json"):
        assert (d / name).exists(), name
    after = (d / "after.py").read_text()
    # each layer's steps, in the outlined module it calls (share_layers), headed by its layers and mode
    summary = json.loads((d / "summary.json").read_text())
    modules = {r["layer"]: r["module"] for r in summary["layers"]}
    assert modules[0] != modules[1] and all(m.startswith("spts_layer_") for m in modules.values())
    assert f"# {modules[0]}: dense layers 0\n" in after
    assert f"# {modules[1]}: skipping layers 1" in after
    for step in ("probe", "select", "gather", "attend", "scatter", "ltp_score", "prune"):
        assert f"    {step} = spts_compile_runtime" in after, step
    assert "l0_probe" not in after  # layer 0 is dense
    assert summary["ltp_mode"] == "weights"
    modes = [row["mode"] for row in summary["plan"]]
    assert modes == ["dense", "skip", "skip", "skip"]
    assert 0 < summary["flop_ratio"] < 1
    assert "attention" in (d / "layers.txt").read_text() or "sdpa" in (d / "layers.txt").read_text()
    assert modules[1] in (d / "layers.txt").read_text()
    assert summary["kernels"] > 0 and summary["inductor_cache"] in ("hit", "miss")
    assert f"kernels: {summary['kernels']}" in (d / "plan.txt").read_text()


def test_dumps_from_the_environment_and_symbolic_flops(tmp_path, monkeypatch):
    monkeypatch.setenv("SPTS_DEBUG_DIR", str(tmp_path))
    model = make_model("llama", layers=4)
    ids, _ = make_inputs(1, 24)
    torch._dynamo.reset()
    f = torch.compile(model.forward, backend="spts", options=dict(SKIP_OPTS, compiler="eager"), dynamic=True)
    with torch.no_grad():
        f(ids)
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert summary["seq_len_symbolic"] is True
    assert summary["rewritten_layers"] == [1, 2, 3]
    assert "N" in summary["flops_dense"] and "N" in summary["flops_planned"]


_WARM_CHILD = """
import json, sys, torch
from torch._dynamo.utils import counters
import spts_compile
from tiny_models import make_inputs, make_model
torch.set_num_threads(1)
model = make_model("llama", layers=3)
ids, _ = make_inputs(1, 40)
opts = dict(start_layer=1, stage_ends=[1, 2], budgets=[20, 10], prune=2, min_tokens=8)
model.forward = torch.compile(model.forward, backend="spts", options=opts)   # generate uses it too
with torch.no_grad():
    logits = model(input_ids=ids, use_cache=False).logits
    plan = spts_compile.last_plan()
    tokens = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
torch.save((logits, tokens), sys.argv[1])
print(json.dumps({"cache": plan["inductor_cache"], "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
                  "aot_bypass": counters["aot_autograd"]["autograd_cache_bypass"], "kind": plan["kind"],
                  "rewritten": plan["rewritten_layers"], "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
                  "notes": {r["layer"]: r["reason"] for r in plan["layers"] if r["verified"] == "yes"}}))
"""


def test_a_second_process_loads_the_rewritten_graph_from_inductors_caches(tmp_path):
    """Two processes, one Inductor cache folder: the first compiles the rewritten graph, the second loads it
    (FX graph cache and AOTAutograd cache hits, nothing bypassed) and computes the same logits. Then each
    generates: the second process compiles nothing at all (the cache-keeping prefill graph and the decode
    graphs hit too; the marked-function dict in the cache key was once in set order, which differs between
    processes at random, so this catches that only sometimes). The second process also takes the first's
    verification verdicts from disk (their key once held function addresses, which differ per process)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), OMP_NUM_THREADS="1",
               SPTS_VERIFY_CACHE="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    runs = []
    for i in range(2):
        res = subprocess.run([sys.executable, "-c", _WARM_CHILD, str(tmp_path / f"logits{i}.pt")], env=env,
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["kind"] == "prefill" and cold["rewritten"] == [1, 2], cold
    assert cold["cache"] == "miss" and cold["aot_bypass"] == 0, cold
    assert warm["cache"] == "hit" and warm["aot_hit"] >= 1 and warm["aot_bypass"] == 0, warm
    assert cold["fx_miss"] >= 2 and warm["fx_miss"] == 0, (cold, warm)
    assert cold["notes"] and not any("disk cache" in n for n in cold["notes"].values()), cold
    assert warm["notes"].keys() == cold["notes"].keys(), (cold, warm)
    assert all("verdict from the disk cache" in n for n in warm["notes"].values()), warm
    (l0, t0), (l1, t1) = (torch.load(tmp_path / f"logits{i}.pt") for i in range(2))
    assert torch.equal(l0, l1) and torch.equal(t0, t1)


def test_short_prompts_compile_their_dense_graph_on_demand_once():
    """A dynamic graph with min_tokens compiles no dense graph up front; the first prompt below min_tokens
    compiles one (dense_seconds > 0) that equals eager, and later short lengths reuse it without a new graph."""
    model = make_model("llama", layers=2)
    opts = dict(start_layer=1, stage_ends=[1], budgets=[16], prune=4, min_tokens=20, selector="probe")
    torch._dynamo.reset()
    f = torch.compile(model.forward, backend="spts", options=opts, dynamic=True)
    stats = torch._dynamo.utils.counters["stats"]
    with torch.no_grad():
        f(make_inputs(1, 24)[0])
        assert spts_compile.last_plan()["dense_seconds"] == 0
        for n in (10, 13):
            ids = make_inputs(1, n)[0]
            torch.testing.assert_close(f(ids).logits, model.forward(ids).logits, atol=1e-4, rtol=1e-4)
            if n == 10:
                assert spts_compile.last_plan()["dense_seconds"] > 0
                graphs = stats["unique_graphs"]
        assert stats["unique_graphs"] == graphs


# ------------------------------------------------------------------------------------------------
# Dense clean-up: an in-graph causal mask becomes is_causal SDPA
# ------------------------------------------------------------------------------------------------
def test_causal_cleanup_on_eager_attention_matches_inductor(tmp_path):
    model = make_model("llama", attn="eager", layers=2)
    ids, _ = make_inputs(2, 24)
    with torch.no_grad():
        want = inductor(model.forward)(ids).logits
        got = compile_fn(model.forward, pap=False, ltp=False, msdp=False, debug_dir=str(tmp_path))(ids).logits
        summary = spts_compile.last_plan()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert summary["causal_cleanup_layers"] == [0, 1]
    after = next(tmp_path.rglob("after.py")).read_text()
    assert "softmax" not in after and "attend_causal" in after


def test_user_masks_are_never_cleaned_up():
    model = make_model("llama", attn="eager", layers=2)
    ids, am = make_inputs(2, 24, left_pad=[0, 4])
    with torch.no_grad():
        want = inductor(model.forward)(ids, attention_mask=am).logits
        got = compile_fn(model.forward, pap=False, ltp=False, msdp=False)(ids, attention_mask=am).logits
        summary = spts_compile.last_plan()
    assert summary["causal_cleanup_layers"] == []
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 4:], want[1, 4:], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# What must be refused or left dense
# ------------------------------------------------------------------------------------------------
def test_padded_batch_keeps_its_compacted_cache():
    """A padded batch with use_cache=True is no longer refused: each row's cache holds the rows it kept (the
    reference's), and the logits of its real tokens are the reference's (decoding on it: test_decode_masks.py)."""
    from reference import build_proxies, reference_prefill
    from spts_compile.config import SPTSConfig
    from spts_compile.passes.plan import ltp_dims
    model = make_model("llama", layers=4)
    ids, am = make_inputs(2, 24, left_pad=[0, 3])
    f = compile_fn(model.forward, **SKIP_OPTS)
    with torch.no_grad():
        out = f(ids, attention_mask=am, use_cache=True)
    sched = SPTSConfig(**SKIP_OPTS).resolve(4)
    proxies = build_proxies(model, *ltp_dims(sched, model.config.intermediate_size, model.config.hidden_size))
    want = reference_prefill(model, ids, am, schedule=sched, proxies=proxies)
    real = am.bool()
    torch.testing.assert_close(out.logits[real], want["logits"][real], atol=1e-4, rtol=1e-4)
    for layer, (k, _) in zip(out.past_key_values.layers, want["kv"]):
        torch.testing.assert_close(layer.keys, k, atol=1e-4, rtol=1e-4)


def test_static_cache_falls_back_to_dense_with_a_warning(caplog):
    from transformers import StaticCache
    model = make_model("llama", layers=4)
    ids, _ = make_inputs(1, 24)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="spts_compile"):
        cache = StaticCache(config=model.config, max_cache_len=64)
        got = compile_fn(model.forward, **SKIP_OPTS)(ids, past_key_values=cache, use_cache=True).logits
        want = model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=64), use_cache=True).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert any("StaticCache" in r.getMessage() for r in caplog.records)


def test_weights_changed_after_compiling_rebuild_the_ltp_proxy():
    """After load_state_dict, the compiled model must equal a model compiled fresh on the new weights."""
    model = make_model("llama", layers=4)
    other = make_model("llama", layers=4, seed=7)
    ids, _ = make_inputs(1, 24)
    opts = dict(SKIP_OPTS, pap=False, msdp=False)  # LTP alone: the selection depends only on the proxy
    with torch.no_grad():
        f = compile_fn(model.forward, **opts)
        f(ids)
        model.load_state_dict(other.state_dict())
        got = f(ids).logits
        want = compile_fn(other.forward, **opts)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compiler_eager_runs_the_rewrite_without_inductor(monkeypatch):
    """compiler="eager": the rewritten graph itself runs (no Inductor call at all), and it skips: the
    logits and KV lengths equal the independent reference's, not dense."""
    from spts_compile import backend
    from spts_compile.config import SPTSConfig
    from spts_compile.passes.plan import ltp_dims
    from tests.reference import build_proxies, reference_prefill

    def no_inductor(*a, **k):
        raise AssertionError("Inductor was called with compiler='eager'")

    monkeypatch.setattr(backend, "compile_fx", no_inductor)
    model = make_model("llama", layers=4)
    ids, am = make_inputs(1, 40)
    opts = dict(SKIP_OPTS, compiler="eager")
    with torch.no_grad():
        out = compile_fn(model.forward, **opts)(ids, attention_mask=am, use_cache=True)
    plan = spts_compile.last_plan()
    assert plan["kind"] == "prefill" and plan["rewritten_layers"] == [1, 2, 3], plan
    sched = SPTSConfig(**SKIP_OPTS).resolve(4)
    cfg = model.config
    channels, rank = ltp_dims(sched, cfg.intermediate_size, cfg.hidden_size)
    ref = reference_prefill(model, ids, am, schedule=sched, proxies=build_proxies(model, channels, rank))
    torch.testing.assert_close(out.logits, ref["logits"], atol=1e-4, rtol=1e-5)
    got_len = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert got_len == [k.shape[-2] for k, _ in ref["kv"]] and got_len[0] == 40 and got_len[-1] < 40, got_len


def test_unknown_compiler_is_rejected():
    with pytest.raises(ValueError, match="compiler"):
        spts_compile.SPTSConfig(compiler="tvm")


# ------------------------------------------------------------------------------------------------
# The plan counts what the rewritten graph executes
# ------------------------------------------------------------------------------------------------
FLOP_MODEL = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@pytest.mark.parametrize("opts", [
    dict(pap=False, ltp=False, msdp=False),     # dense: the plan's dense count
    {},                                         # SPTS (probe, LTP proxy, prune)
    dict(selector="once"),
    dict(selector="stage"),
    dict(selector="toy_mod3"),                  # registered from tests/toy_selector.py
    dict(pool=3, sink=2, window=4, heads="kv_union", kv_cache="candidates"),   # V of every candidate
], ids=["dense", "probe", "once", "stage", "toy", "guard"])
def test_planned_flops_match_the_matmuls_executed(opts):
    """The rewritten graph (compiler="eager") runs under torch's FlopCounterMode, which counts every matmul
    but not the SDPA core on CPU; the plan's FLOPs for the decoder layers must match that count plus the
    causal cores (computed here from the rows each layer attends over, as executed), to 0.2%. The hidden size
    is large against N, so that the matmuls dominate and a missing or extra term (a probe, the LTP proxy)
    shows. The executed count comes from the model, not the plan: lm_head is subtracted from it."""
    from torch.utils.flop_counter import FlopCounterMode

    from tests import toy_selector  # noqa: F401  (registers "toy_mod3")
    model = make_model("llama", layers=4, **FLOP_MODEL)
    cfg = model.config
    n = 64
    ids, _ = make_inputs(1, n)
    captured = []

    def backend(gm, example_inputs):
        fn = spts_compile.spts_backend(gm, example_inputs, options=dict(SKIP_OPTS, compiler="eager",
                                                                         record_selection=True, **opts))
        captured.append((fn, example_inputs))
        return fn

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model.forward, backend=backend)(ids, use_cache=False)
        plan = spts_compile.last_plan()
        # a graph with no rewritten layer records nothing (recorded_selection() still holds an earlier graph's)
        selection = (spts_compile.recorded_selection() or []) if plan["rewritten_layers"] else []
        fn, example = captured[-1]
        counter = FlopCounterMode(display=False)
        with counter:
            fn(*example)
    executed = counter.get_total_flops() - 2 * n * cfg.hidden_size * cfg.vocab_size   # without lm_head
    # the causal SDPA cores FlopCounterMode does not see: QK^T and AV over the rows each layer attends
    rows = {d["layer"]: d["active"].shape[-1] for d in selection if d["block"] == "attn"}
    q_width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    cores = sum(2 * q_width * rows.get(layer, n) ** 2 for layer in range(cfg.num_hidden_layers))
    planned = plan["flops_planned_at_n"]
    assert planned == pytest.approx(executed + cores, rel=0.002), (planned, executed, cores)
    if opts.get("pap") is False:
        assert plan["flops_dense_at_n"] == pytest.approx(planned)
    else:
        assert planned < 0.8 * plan["flops_dense_at_n"]
