"""SPTS prefill inside vLLM: a `vllm.general_plugins` entry point (docs/vllm.md).

vLLM calls `register()` in every one of its processes (front end, engine core, workers). It replaces the
model classes vLLM picks for the "LlamaForCausalLM" and "Qwen2ForCausalLM" architectures with SPTS variants
(`llama.SPTSLlamaForCausalLM`, `qwen2.SPTSQwen2ForCausalLM`): vLLM's own models with one decoder-layer variant.
On a step whose every request is a whole fresh prompt (a pure-prefill step), skipping layers run SPTS
(`prefill.py`); every other step runs vLLM's own dense code, compiled or eager as the engine is configured.

Skipping is configured by the environment of the vLLM process (it reaches the spawned engine and worker
processes unchanged):

- `SPTS_VLLM_OPTIONS`: a JSON object of `SPTSConfig` options. Unset or empty: skipping is off and the model
  is exactly vLLM's. The plugin implements the selectors "probe" (PAP, LTP, MSDP: stages and prunes), "once"
  and "stage" (the default), every scoring option (`probe_queries`, `heads`, `pool`, `pool_kind`, `sink`,
  `window`), `min_tokens`, `calibration`, and `kv_cache="all"` (its default here: every token's K/V in the
  paged cache, the dropped tokens' from their frozen hidden states). It refuses at model load, naming the
  option, what it cannot honour: the score selectors, kv_cache "active" (and "candidates" where tokens leave
  the candidates), `debug_dir`, `record_selection`, LTP on an FFN with biases, and sliding-window attention.
- `SPTS_VLLM_RECORD`: a file to which every SPTS step appends one JSON line per request and skipping layer
  (the candidates, the attention's and the FFN's rows, the pruned positions): what the check script reads.

The entry point (pyproject.toml):

    [project.entry-points."vllm.general_plugins"]
    spts = "spts_compile.vllm_plugin:register"
"""
from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger("vllm.spts_compile")

ARCHITECTURES = {"LlamaForCausalLM": "spts_compile.vllm_plugin.llama:SPTSLlamaForCausalLM",
                 "Qwen2ForCausalLM": "spts_compile.vllm_plugin.qwen2:SPTSQwen2ForCausalLM"}

_registered = False


def options_from_env() -> dict | None:
    """The SPTS options of this process, or None when skipping is off."""
    raw = os.environ.get("SPTS_VLLM_OPTIONS", "").strip()
    if not raw or raw.lower() in ("0", "off", "none"):
        return None
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"spts: SPTS_VLLM_OPTIONS is not valid JSON ({e}): {raw!r}") from None
    if not isinstance(opts, dict):
        raise ValueError(f"spts: SPTS_VLLM_OPTIONS must be a JSON object, got {raw!r}")
    return opts


def register() -> None:
    """The general plugin: point vLLM's Llama and Qwen2 architectures at the SPTS variants. Safe to call more
    than once (vLLM loads plugins once per process, but tests may call it again)."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry
    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    _registered = True
    opts = options_from_env()
    logger.info("spts plugin registered %s in pid %d; skipping %s", ", ".join(ARCHITECTURES), os.getpid(),
                "off" if opts is None else f"on: {json.dumps(opts, sort_keys=True)}")
