"""vLLM's Qwen2 (q/k/v biases) with the SPTS decoder-layer variant (docs/vllm.md; what a layer computes:
prefill.py).

`Qwen2Model` takes the decoder-layer class as an argument, but `Qwen2ForCausalLM.__init__` builds its Qwen2Model
without it, by the module-level name. Building a second model and swapping it in is not possible (each attention
layer registers its name with the engine once), so for the length of the parent's __init__ that name points at
Qwen2Model with SPTSQwen2DecoderLayer bound: the parent's code runs unchanged and no line of it is copied.
"""
from __future__ import annotations

import contextlib
import functools

from vllm.model_executor.models import qwen2
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM

from .model import SPTSCausalLM, SPTSDecoderLayer


class SPTSQwen2DecoderLayer(SPTSDecoderLayer, Qwen2DecoderLayer):
    """vLLM's Qwen2 decoder layer; SPTS at skipping layers of pure-prefill steps."""


@contextlib.contextmanager
def _qwen2_model_with(layer_type):
    original = qwen2.Qwen2Model
    qwen2.Qwen2Model = functools.partial(original, decoder_layer_type=layer_type)
    try:
        yield
    finally:
        qwen2.Qwen2Model = original


class SPTSQwen2ForCausalLM(SPTSCausalLM, Qwen2ForCausalLM):
    """vLLM's Qwen2ForCausalLM built with SPTSQwen2DecoderLayer. Without SPTS_VLLM_OPTIONS it is vLLM's model."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        with _qwen2_model_with(SPTSQwen2DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        if not all(isinstance(l, SPTSQwen2DecoderLayer) for l in self.model.layers
                   if isinstance(l, Qwen2DecoderLayer)):
            raise RuntimeError("spts: this vLLM's Qwen2ForCausalLM did not build its Qwen2Model through the "
                               "module-level name; the SPTS layer is not in place")
        self._spts_init(vllm_config)
