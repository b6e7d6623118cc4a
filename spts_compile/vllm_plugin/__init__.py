"""SPTS prefill inside vLLM: a `vllm.general_plugins` entry point (prototype; docs/vllm.md).

vLLM calls `register()` in every one of its processes (front end, engine core, workers). It replaces the
model class vLLM picks for the "LlamaForCausalLM" architecture with `SPTSLlamaForCausalLM`
(`spts_compile.vllm_plugin.llama`). That class is vLLM's own Llama with one decoder-layer variant: on a step
whose every request is a whole fresh prompt (a pure-prefill step), skipping layers run SPTS; every other step
runs vLLM's own dense code, compiled or eager as the engine is configured.

Skipping is configured by the environment of the vLLM process (it reaches the spawned engine and worker
processes unchanged):

- `SPTS_VLLM_OPTIONS`: a JSON object of `SPTSConfig` options. Unset or empty: skipping is off and the model
  is exactly vLLM's. The prototype supports `selector="probe"` with `ltp=False`, `msdp=False`,
  `kv_cache="candidates"` (PAP with every token's K/V in the paged cache), any `start_layer`, `budgets`,
  `probe_queries`, `min_tokens`, and `heads` "mean" or "max". Anything else is refused at model load.
- `SPTS_VLLM_RECORD`: a file to which every SPTS step appends one JSON line per request and skipping layer
  (the active positions): what the check script reads to show that the plugin ran.

The entry point, once the package declares it:

    [project.entry-points."vllm.general_plugins"]
    spts = "spts_compile.vllm_plugin:register"
"""
from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger("vllm.spts_compile")

ARCHITECTURES = {"LlamaForCausalLM": "spts_compile.vllm_plugin.llama:SPTSLlamaForCausalLM"}

_registered = False


def options_from_env() -> dict | None:
    """The SPTS options of this process, or None when skipping is off."""
    raw = os.environ.get("SPTS_VLLM_OPTIONS", "").strip()
    if not raw or raw.lower() in ("0", "off", "none"):
        return None
    opts = json.loads(raw)
    if not isinstance(opts, dict):
        raise ValueError(f"spts: SPTS_VLLM_OPTIONS must be a JSON object, got {raw!r}")
    return opts


def register() -> None:
    """The general plugin: point vLLM's Llama architecture at the SPTS variant. Safe to call more than once
    (vLLM loads plugins once per process, but tests may call it again)."""
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
