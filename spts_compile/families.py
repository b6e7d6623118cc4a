"""The model families the backend knows: one row each.

A row says how a family's decoder layer differs from Llama's, in the terms the passes need. `locate` finds
the row of each decoder layer by its class (from `nn_module_stack`) and holds the graph to it; the runtime
helpers, the calibration and the plan's FLOP count read the row's kinds through the specs. A decoder whose
class is not in the table is matched by pattern alone, as the generic row (every field detected).

Adding a Llama-like family is one row. A family that differs in a way no column describes needs a new
column, read where the difference matters (and a tiny config in `tests/tiny_models.py`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str                        # Hugging Face `model_type` (and the name options and tests use)
    layer_class: str                 # the decoder layer's class name, as nn_module_stack records it
    norm: str | None = "rms"         # "rms": w * x / rms(x); "rms_offset": (1 + w) * x / rms(x) (Gemma); None: detect
    mlp: str = "gated"               # "gated": down(act(gate(x)) * up(x)); the only FFN the passes rewrite
    fused_qkv: str | None = None     # the fused q/k/v projection's module name, when there is one
    fused_gate_up: str | None = None  # the fused gate/up projection's module name, when there is one
    qk_norm: bool | None = False     # RMSNorm on q and k over the head dim, before RoPE; None: detect
    sandwich_norms: bool = False     # norms after the attention and after the FFN (Gemma)
    sliding: str = "none"            # which layers attend in a sliding window: "none", "all", "interleaved"
    embed_scale: bool = False        # embeddings multiplied by sqrt(hidden) (outside the layers: not rewritten)
    qkv_bias: bool = False           # q/k/v projections carry biases
    model_types: tuple[str, ...] = ()  # other `model_type`s of the family (Gemma 3's text-only model)


FAMILIES: tuple[Family, ...] = (
    Family("llama", "LlamaDecoderLayer"),
    Family("qwen2", "Qwen2DecoderLayer", qkv_bias=True),
    Family("mistral", "MistralDecoderLayer", sliding="all"),
    Family("qwen3", "Qwen3DecoderLayer", qk_norm=True),
    Family("gemma3", "Gemma3DecoderLayer", norm="rms_offset", qk_norm=True, sandwich_norms=True,
           sliding="interleaved", embed_scale=True, model_types=("gemma3_text",)),
    Family("phi3", "Phi3DecoderLayer", fused_qkv="qkv_proj", fused_gate_up="gate_up_proj"),
)

# Decoders not in the table: matched by pattern (norm kind and q/k norms detected, either fused layout).
GENERIC = Family("generic", "", norm=None, qk_norm=None, fused_qkv="qkv_proj", fused_gate_up="gate_up_proj")

FFN_MATMULS = {"gated": 3}           # matmuls of one FFN, for the plan's FLOP count
NORM_KINDS = ("rms", "rms_offset")

# Hugging Face `hidden_act` spellings, mapped onto the names of the activations the runtime implements.
HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh",
}

_BY_CLASS = {f.layer_class: f for f in FAMILIES}
_BY_NAME = {f.name: f for f in FAMILIES}


def names() -> list[str]:
    return [f.name for f in FAMILIES]


def by_name(name: str) -> Family:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"spts: unknown family {name!r}; known: {names()}") from None


def for_model_type(model_type: str | None) -> Family | None:
    """The row of a Hugging Face `config.model_type`, or None."""
    return next((f for f in FAMILIES if model_type == f.name or model_type in f.model_types), None)


def for_layer_class(cls) -> Family:
    """The row of a decoder layer class (a class or its name); GENERIC when the table has none."""
    name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return _BY_CLASS.get(name, GENERIC)


def fused_names(column: str) -> set[str]:
    """Every module name a fused projection has in some row (`column`: "fused_qkv" or "fused_gate_up")."""
    return {getattr(f, column) for f in FAMILIES + (GENERIC,) if getattr(f, column)}
