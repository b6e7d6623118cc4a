"""The vLLM plugin's option handling (spts_compile/vllm_plugin/prefill.py), which needs no vLLM: what it honours,
and a ValueError naming the option for what it cannot (refused at model load, never a silent dense run).
Serving itself is checked in vLLM's own venv by benchmarks/vllm_check.py (docs/vllm.md)."""
from __future__ import annotations

import pytest

from spts_compile.vllm_plugin import options_from_env
from spts_compile.vllm_plugin.prefill import plugin_config


def test_defaults_are_the_projects_with_every_token_cached():
    cfg = plugin_config({})
    assert (cfg.selector, cfg.ltp, cfg.msdp, cfg.kv_cache) == ("stage", True, True, "all")
    sched = cfg.resolve(30)
    assert (sched.probe_queries, sched.heads, sched.pool, sched.pool_kind) == (64, "max", 25, "max")


@pytest.mark.parametrize("opts", [
    dict(selector="probe", ltp=True, msdp=True, sink=4, window=8, heads="kv_union", pool=3),
    dict(selector="once", budgets=0.25),
    dict(selector="probe", msdp=False, kv_cache="candidates"),     # every token stays a candidate: = "all"
    dict(verify=False, share_layers=False, compiler="eager"),      # how the backend compiles: nothing to honour
])
def test_honoured(opts):
    plugin_config(opts)


@pytest.mark.parametrize("opts, field", [
    (dict(selector="recent"), "selector"),
    (dict(kv_cache="active"), "kv_cache"),
    (dict(selector="probe", msdp=True, kv_cache="candidates"), "kv_cache"),
    (dict(selector="stage", kv_cache="candidates"), "kv_cache"),
    (dict(debug_dir="/tmp/x"), "debug_dir"),
    (dict(record_selection=True), "record_selection"),
    (dict(kv_cache="every"), "kv_cache"),
    (dict(budgetz=3), "budgetz"),
])
def test_refused_naming_the_option(opts, field):
    with pytest.raises(ValueError, match=field):
        plugin_config(opts)


def test_options_from_env(monkeypatch):
    monkeypatch.delenv("SPTS_VLLM_OPTIONS", raising=False)
    assert options_from_env() is None
    monkeypatch.setenv("SPTS_VLLM_OPTIONS", "off")
    assert options_from_env() is None
    monkeypatch.setenv("SPTS_VLLM_OPTIONS", '{"budgets": 0.5}')
    assert options_from_env() == {"budgets": 0.5}
    for bad in ("[1, 2]", "{budgets: 1}"):
        monkeypatch.setenv("SPTS_VLLM_OPTIONS", bad)
        with pytest.raises(ValueError, match="SPTS_VLLM_OPTIONS"):
            options_from_env()
