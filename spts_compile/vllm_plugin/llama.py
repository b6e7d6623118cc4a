"""vLLM's Llama with the SPTS decoder-layer variant (docs/vllm.md; what a layer computes: prefill.py).

vLLM's `LlamaForCausalLM` and `LlamaModel` take the decoder-layer class as an argument, so the variant is a
subclass of each, not a copy.
"""
from __future__ import annotations

from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from .model import SPTSCausalLM, SPTSDecoderLayer


class SPTSLlamaDecoderLayer(SPTSDecoderLayer, LlamaDecoderLayer):
    """vLLM's Llama decoder layer; SPTS at skipping layers of pure-prefill steps."""


class SPTSLlamaForCausalLM(SPTSCausalLM, LlamaForCausalLM):
    """vLLM's LlamaForCausalLM built with SPTSLlamaDecoderLayer. Without SPTS_VLLM_OPTIONS it is vLLM's model."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=SPTSLlamaDecoderLayer)
        self._spts_init(vllm_config)
