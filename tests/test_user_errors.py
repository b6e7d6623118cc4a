"""A user's mistake raises a ValueError that names it; it never falls back to dense. And the defects a new
user's probe found (calibration by path, stale proxies after `.data` writes, probe width, a loss over
skipped positions, the output_attentions reason) stay fixed. Compiles use compiler="eager" (no C++)."""
from __future__ import annotations

import pytest
import torch

import spts_compile
from spts_compile import Calibration
from tests.tiny_models import make_inputs, make_model

OPTS = dict(start_layer=1, stage_ends=[1, 2], budgets=[16, 12], prune=4, min_tokens=1, compiler="eager",
            selector="probe")


def compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model.forward, backend="spts", options=dict(OPTS, **options), dynamic=False)


def raised(fn, *args, **kwargs) -> list[BaseException]:
    """The exception chain of a call that must fail (Dynamo wraps a backend's exception)."""
    with pytest.raises(Exception) as info:
        with torch.no_grad():
            fn(*args, **kwargs)
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def assert_value_error(chain, field: str):
    errors = [e for e in chain if isinstance(e, ValueError)]
    assert errors and field in str(errors[0]), [f"{type(e).__name__}: {e}" for e in chain]


@pytest.fixture(scope="module")
def llama():
    return make_model("llama", layers=4)


@pytest.fixture(scope="module")
def ids():
    return make_inputs(1, 40)[0]


@pytest.mark.parametrize("options, field", [
    (dict(start_layer=7, stage_ends=None), "start_layer"),
    (dict(stage_ends=[1, 9]), "stage_ends"),
    (dict(calibration=3), "calibration"),
])
def test_bad_options_for_this_model_raise(llama, ids, options, field):
    assert_value_error(raised(compiled(llama, **options), ids, use_cache=False), field)


def test_unknown_keyword_is_a_value_error_everywhere():
    with pytest.raises(ValueError, match="bogus"):
        spts_compile.SPTSConfig(bogus=1)
    with pytest.raises(ValueError, match="bogus"):
        spts_compile.SPTSConfig.from_options({"bogus": 1})


def test_calibration_by_path_equals_the_object(llama, ids, tmp_path):
    cal = spts_compile.calibrate(llama, [ids[0]], progress=False)
    path = tmp_path / "cal.pt"
    cal.save(path)
    with torch.no_grad():
        by_path = compiled(llama, calibration=str(path))(ids, use_cache=False).logits
        plan = spts_compile.last_plan()
        by_object = compiled(llama, calibration=cal)(ids, use_cache=False).logits
    assert plan["kind"] == "prefill" and plan["rewritten_layers"] == [1, 2, 3] and plan["ltp_mode"] == "calibration"
    torch.testing.assert_close(by_path, by_object, atol=0, rtol=0)


def test_wrong_or_corrupt_calibrations_raise(llama, ids, tmp_path):
    other = make_model("llama", layers=3)
    cal = spts_compile.calibrate(other, [ids[0]], progress=False)
    assert_value_error(raised(compiled(llama, calibration=cal), ids, use_cache=False), "calibration")
    path = tmp_path / "other.pt"
    cal.save(path)
    assert_value_error(raised(compiled(llama, calibration=str(path)), ids, use_cache=False), "calibration")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a calibration")
    assert_value_error(raised(compiled(llama, calibration=str(corrupt)), ids, use_cache=False), "calibration")


def test_calibration_fields_are_validated(llama, ids):
    good = spts_compile.calibrate(llama, [ids[0]], progress=False)
    nan = Calibration([t.clone() for t in good.importance], good.hidden_size, good.rho, good.num_tokens, "llama")
    nan.importance[2][3] = float("nan")
    assert_value_error(raised(compiled(llama, calibration=nan), ids, use_cache=False), "NaN")
    # the same shapes, another family: a Qwen2 model's calibration on a Llama model
    qwen = Calibration(good.importance, good.hidden_size, good.rho, good.num_tokens, "qwen2")
    assert_value_error(raised(compiled(llama, calibration=qwen), ids, use_cache=False), "qwen2")


def test_weights_written_through_data_rebuild_the_proxies(ids):
    """`p.data.copy_(...)` does not bump the parameter's version; the proxies must follow it anyway."""
    model, other = make_model("llama", layers=4), make_model("llama", layers=4, seed=7)
    opts = dict(pap=False, msdp=False)       # LTP alone: the selection depends only on the proxy
    with torch.no_grad():
        f = compiled(model, **opts)
        f(ids, use_cache=False)
        for (name, p), q in zip(model.named_parameters(), other.parameters()):
            p.data.copy_(q.data)
        got = f(ids, use_cache=False).logits
        want = compiled(other, **opts)(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_probe_width_is_clamped_to_the_candidates(llama, ids):
    """probe_queries beyond N probes with every candidate, no more: the plan and the graph agree, and the FLOP
    ratio stays below 1 (it was 1.3 with 100 probe rows for 40 tokens)."""
    from spts_compile.config import SPTSConfig
    from tests.reference import reference_prefill
    with torch.no_grad():
        out = compiled(llama, probe_queries=100, ltp=False)(ids, use_cache=False)
    wide = spts_compile.last_plan()["flop_ratio"]
    with torch.no_grad():
        compiled(llama, probe_queries=40, ltp=False)(ids, use_cache=False)
    assert wide == pytest.approx(spts_compile.last_plan()["flop_ratio"]) and wide < 1
    ref = reference_prefill(llama, ids, None, schedule=SPTSConfig(**dict(OPTS, probe_queries=100, ltp=False)).resolve(4))
    torch.testing.assert_close(out.logits, ref["logits"], atol=1e-4, rtol=1e-5)


def test_budgets_that_save_nothing_say_so(llama, ids, caplog):
    with caplog.at_level("INFO", logger="spts_compile"), torch.no_grad():
        compiled(llama, budgets=[64, 64], prune=0)(ids, use_cache=False)
    assert any("saves no work" in r.getMessage() for r in caplog.records)


def test_a_loss_over_skipped_positions_is_refused(llama, ids):
    chain = raised(compiled(llama), ids, labels=ids, use_cache=False)
    assert any(type(e).__name__ == "LossError" and "labels=" in str(e) for e in chain), chain
    with torch.no_grad():   # with skipping off the loss is computed as usual
        loss = compiled(llama, pap=False, ltp=False, msdp=False)(ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(loss, llama(ids, labels=ids).loss, atol=1e-5, rtol=1e-5)


def test_output_attentions_gives_its_own_reason(ids, caplog):
    model = make_model("llama", attn="eager", layers=4)
    with torch.no_grad():
        out = compiled(model)(ids, use_cache=False, output_attentions=True)
    assert len(out.attentions) == 4 and out.attentions[0].shape[-1] == 40
    plan = spts_compile.last_plan()
    reasons = [l["reason"] for l in plan["layers"]]
    assert all("output_attentions" in r for r in reasons), reasons
    assert not any("K cache" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("selector, warns", [("probe", True), ("stage", False)])
def test_padded_batch_warns_about_fractions_only_where_the_selector_uses_them(llama, caplog, selector, warns):
    """A fractional prune is a fraction of the padded N, so `probe` warns; the keep-set modes never prune, so
    int budgets with the default fractional prune give no warning."""
    import logging
    spts_compile.reset_warnings()
    ids, am = make_inputs(2, 40, seed=1)
    am[1, :7] = 0
    with caplog.at_level(logging.WARNING, logger="spts_compile"), torch.no_grad():
        compiled(llama, **dict(OPTS, selector=selector, prune=0.125))(input_ids=ids, attention_mask=am)
    said = [r.getMessage() for r in caplog.records if "fractional budgets or prunes" in r.getMessage()]
    assert bool(said) == warns, said
