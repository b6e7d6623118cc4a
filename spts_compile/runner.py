"""What the backend hands back to Dynamo: a runner that owns its compile record and its last selection.

`last_plan()` and `recorded_selection()` find the runners through a weak registry, so a record lives as long
as its compiled graph does (Dynamo's cache holds the runner), and nothing is kept for a graph that is gone.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from . import report as reporting
from .passes.locate import GraphAnalysis

log = logging.getLogger("spts_compile")


@dataclass
class CompileRecord:
    """What one backend call found and did; written to the dumps and returned by `last_plan()`."""

    graph_id: int
    kind: str = "prefill"
    reason: str | None = None
    analysis: GraphAnalysis | None = None
    plan: Any = None
    schedule: Any = None
    seq_len: Any = None
    verify_seconds: float = 0.0
    proxy_seconds: float = 0.0          # building the LTP proxies (channel ranking + low-rank factors)
    inductor_seconds: float = 0.0       # code generation of the rewritten graph (and of its dense twin)
    compile_seconds: float = 0.0        # the whole backend call
    ltp_mode: str | None = None
    cleanup_layers: list[int] = field(default_factory=list)
    rewritten_layers: list[int] = field(default_factory=list)


PADDED_CACHE_MESSAGE = (
    "spts: a padded batch (batch > 1 with padding in attention_mask) cannot keep a KV cache for decoding: "
    "each row keeps different tokens, while the decode step's mask assumes one length for every row. "
    "Run it as batch 1 (one prompt at a time), pass use_cache=False for a prefill-only pass, or disable "
    "cache compaction with options={'pap': False, 'msdp': False}.")


class PaddedCacheError(ValueError):
    """A padded batch asked for a compacted KV cache: refused, with how to run it instead."""


class LossError(ValueError):
    """A prefill that skips was asked for a loss (labels=): refused, with how to compute it instead."""


LOSS_MESSAGE = (
    "spts: labels= was passed with token skipping on: the loss would include the skipped and pruned positions, "
    "whose logits come from stale hidden states. The backend skips for generation, not for training or "
    "perplexity: compute the loss without labels on a dense model, or compile with "
    "options={'pap': False, 'ltp': False, 'msdp': False}.")


def is_padded_batch(padding_mask) -> bool:
    """Batch > 1 with padding somewhere in the 2D attention mask."""
    return padding_mask is not None and padding_mask.shape[0] > 1 and not bool(padding_mask.bool().all())


class Runner:
    """Runs one compiled graph: dispatches short prompts to the dense graph, refuses a padded batch that
    would compact the cache, keeps the LTP proxies in step with the weights, and strips the
    selection-recording outputs into `self.selection`."""

    def __init__(self, compiled, record: CompileRecord, *, dense=None, seq_source=None, min_tokens=1,
                 result=None, watched=(), pad_index=None):
        self.compiled, self.dense, self.record = compiled, dense, record
        self.seq_source, self.min_tokens, self.pad_index = seq_source, min_tokens, pad_index
        self.record_names = list(result.record_names) if result else []
        self.extra = list(result.extra_inputs) if result else []
        self.buffers = {l: [self.extra[i] for i in pos] for l, pos in result.proxy_buffers.items()} if result else {}
        self.watched = list(watched)
        self.selection: list[dict] | None = None
        _register(self)

    def __call__(self, *args):
        if self.dense is not None and self.seq_source is not None and args[self.seq_source].shape[1] < self.min_tokens:
            return self.dense(*args)
        if self.pad_index is not None and is_padded_batch(args[self.pad_index]):
            raise PaddedCacheError(PADDED_CACHE_MESSAGE)
        self._refresh_proxies()
        out = self.compiled(*args, *self.extra)
        if self.record_names:
            n = len(self.record_names)
            out, kept = list(out[:-n]), out[-n:]
            self.selection = [{"layer": l, "block": blk, "active": t} for (l, blk), t in zip(self.record_names, kept)]
            _REGISTRY["recorded"] = weakref.ref(self)
        return out

    def _refresh_proxies(self):
        for w in self.watched:
            if w.stale():
                with torch.no_grad():
                    for dst, src in zip(self.buffers[w.layer], w.rebuild().tensors()):
                        dst.copy_(src)
                log.info("spts: layer %d FFN weights changed since compiling; rebuilt its LTP proxy", w.layer)


# The weak registry: every live runner, in compile order, and the one whose call recorded a selection last.
_REGISTRY: dict[str, Any] = {"runners": [], "recorded": None}


def _register(runner: Runner) -> None:
    _REGISTRY["runners"] = [r for r in _REGISTRY["runners"] if r() is not None] + [weakref.ref(runner)]


def last_plan() -> dict | None:
    """A summary of the most recently compiled prefill graph's plan (FLOPs, KV tokens, layers), whatever
    became of it (rewritten, dense, or fallen back); not a decode step, nor a layer-less piece such as an
    lm_head split off by a graph break."""
    for ref in reversed(_REGISTRY["runners"]):
        runner = ref()
        if runner is not None and runner.record.kind in ("prefill", "fallback"):
            return reporting.summary(runner.record)
    return None


def recorded_selection() -> list[dict] | None:
    """With `record_selection=True`: per layer and block, the original positions of the active tokens
    of the most recent call of a graph that records them."""
    ref = _REGISTRY["recorded"]
    runner = ref() if ref is not None else None
    return None if runner is None else runner.selection
