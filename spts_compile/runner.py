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

from . import kv_positions
from . import report as reporting
from .kv_positions import CompactedCacheError
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
    inductor_seconds: float = 0.0       # code generation of the rewritten graph
    dense_seconds: float = 0.0          # the first short prompt's call of the dense graph (its compile), if any
    compile_seconds: float = 0.0        # the whole backend call
    kernels: int | None = None          # distinct C++ kernels in the graph's Inductor output code (None: no code)
    cache: str | None = None            # "hit" when Inductor's FX graph cache had the graph, else "miss"
    layer_modules: dict = field(default_factory=dict)   # layer (dense or skipping) -> its outlined module (share_layers)
    subgraphs: int | None = None        # compiled layer functions in the output code: one per (region, shapes)
    ltp_mode: str | None = None
    cleanup_layers: list[int] = field(default_factory=list)
    rewritten_layers: list[int] = field(default_factory=list)


class PaddedCacheError(ValueError):
    """Kept for compatibility: padded batches now keep a compacted cache and decode on it (nothing raises it)."""


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
    """Runs one compiled graph: dispatches short prompts to the dense graph, keeps the LTP proxies in step with
    the weights, strips the selection-recording and cache-position outputs, and keeps the side table of which
    positions each compacted cache holds (`kv_positions`): a prefill registers the caches it compacts, a
    decode or continuation graph publishes them to its mask ops and registers the caches it writes."""

    def __init__(self, compiled, record: CompileRecord, *, dense=None, seq_source=None, min_tokens=1,
                 result=None, watched=(), cache=None, rope_from_input=True, pad_index=None):
        self.compiled, self.dense, self.record = compiled, dense, record
        self.seq_source, self.min_tokens = seq_source, min_tokens
        self.record_names = list(result.record_names) if result else []
        self.kv_layers = list(result.kv_layers) if result else []
        self.extra = list(result.extra_inputs) if result else []
        self.buffers = {l: [self.extra[i] for i in pos] for l, pos in result.proxy_buffers.items()} if result else {}
        self.watched = list(watched)
        self.cache = {c.layer: c for c in cache} if cache else {}   # layer -> passes.decode.LayerCache
        self.reads_cache = any(c.k_in is not None for c in self.cache.values())
        self.rope_from_input, self.pad_index = rope_from_input, pad_index
        self.selection: list[dict] | None = None
        _register(self)

    def __call__(self, *args):
        if self.dense is not None and self.seq_source is not None and args[self.seq_source].shape[1] < self.min_tokens:
            _refuse_compacted(args)
            return self.dense(*args)
        if self.reads_cache:
            return self._decode(args)
        _refuse_compacted(args)
        self._refresh_proxies()
        out = self.compiled(*args, *self.extra)
        n_kv, n_rec = len(self.kv_layers), len(self.record_names)
        if n_kv or n_rec:
            out = list(out)
            positions = out[len(out) - n_kv:] if n_kv else []
            kept = out[len(out) - n_kv - n_rec:len(out) - n_kv] if n_rec else []
            out = out[:len(out) - n_kv - n_rec]
            if n_rec:
                self.selection = [{"layer": l, "block": blk, "active": t} for (l, blk), t in zip(self.record_names, kept)]
                _REGISTRY["recorded"] = weakref.ref(self)
            if n_kv:
                self._register_prefill(args, out, positions)
        return out

    # -- the side table --------------------------------------------------------------------------------
    def _register_prefill(self, args, out, positions):
        seen = args[self.seq_source].shape[1] if self.seq_source is not None else None
        for layer, pos in zip(self.kv_layers, positions):
            c = self.cache.get(layer)
            if c is None or c.k_out is None or seen is None:
                continue
            kv_positions.register(out[c.k_out], layer, pos, seen, c.window)

    def _decode(self, args):
        """A graph that reads a filled cache: find the positions each layer holds, run, register the new caches."""
        layers, seen = self._resolve(args)
        padding = args[self.pad_index] if self.pad_index is not None else None
        windows = {c.layer: c.window for c in self.cache.values()}
        with kv_positions.call_context(layers, seen, padding, windows):
            out = self.compiled(*args, *self.extra)
        if layers:
            q = self._query_length(args, out)
            for layer, pos in layers.items():
                c = self.cache[layer]
                if c.k_out is None:
                    continue
                k = out[c.k_out]
                new = torch.arange(seen, seen + q, device=pos.device).expand(pos.shape[0], q)
                full = torch.cat([pos, new], dim=1)
                kv_positions.register(k, layer, full[:, full.shape[1] - k.shape[2]:], seen + q, c.window)
        return out

    def _query_length(self, args, out) -> int:
        if self.seq_source is not None:
            return args[self.seq_source].shape[1]
        c = next(c for c in self.cache.values() if not c.window and c.k_out is not None)
        return out[c.k_out].shape[2] - args[c.k_in].shape[2]

    def _resolve(self, args):
        """layer -> positions of every layer whose cache the side table knows (None when none does: a dense
        cache, decoded with the model's own masks), and the sequence length they share. A cache that is
        compacted but not known, or that does not fit the others, raises."""
        inputs = {c.k_in for c in self.cache.values()}
        _refuse_compacted([a for i, a in enumerate(args) if i not in inputs])
        known, unknown, seens = {}, [], set()
        for c in self.cache.values():
            if c.k_in is None:
                continue
            k = args[c.k_in]
            found = kv_positions.lookup(k)
            entry = found[1] if found is not None and found[0] == c.layer else kv_positions.recognise(k, c.layer)
            if entry is None:
                unknown.append((c, k))
            else:
                if entry.compacted and not c.own_mask:
                    raise CompactedCacheError(
                        f"spts: layer {c.layer} keeps a compacted KV cache, but its attention takes the model's mask "
                        "for every layer (this transformers version's attention functions could not be wrapped): "
                        "decoding on it would be wrong. Use the sdpa attention on transformers 5, or run the prefill "
                        "with use_cache=False")
                known[c.layer], seens = entry.positions, seens | {entry.seen}
                if entry is not (found[1] if found else None):
                    kv_positions.register(k, c.layer, entry.positions, entry.seen, c.window)
        if not known:
            full = {k.shape[2] for c, k in unknown if not c.window}
            if len(full) > 1:
                raise CompactedCacheError(
                    f"spts: the KV cache's full-attention layers hold different lengths {sorted(full)}: it was "
                    "compacted by an SPTS prefill, but the tensors are not the ones that prefill returned (was the "
                    "cache copied or edited outside the model?); spts cannot tell which positions they hold")
            return None, None
        if len(seens) > 1:
            raise CompactedCacheError(f"spts: the KV cache's layers come from different sequences (lengths {sorted(seens)})")
        seen = seens.pop()
        for c, k in unknown:
            # a dense sliding cache holds its newest window - 1 rows, or more while it records its past
            dense = seen if not c.window else min(seen, c.window - 1)
            if not (k.shape[2] == dense or c.window and dense < k.shape[2] <= seen):
                raise CompactedCacheError(
                    f"spts: layer {c.layer}'s KV cache holds {k.shape[2]} rows, neither the {dense} of a dense cache "
                    "nor a compacted cache the backend knows (was it copied or edited outside the model?)")
        first = min(self.cache)
        if not self.rope_from_input and first in known and not self.cache[first].window \
                and known[first].shape[1] != seen:
            raise CompactedCacheError(
                f"spts: layer {first} (the first) keeps a compacted cache and no position_ids were given: transformers "
                "would take the new tokens' positions from its length. Pass position_ids (generate does), or start "
                "skipping after layer 0 (start_layer >= 1)")
        return known, seen

    def _refresh_proxies(self):
        for w in self.watched:
            if w.stale():
                with torch.no_grad():
                    for dst, src in zip(self.buffers[w.layer], w.rebuild().tensors()):
                        dst.copy_(src)
                log.info("spts: layer %d FFN weights changed since compiling; rebuilt its LTP proxy", w.layer)


def _refuse_compacted(args) -> None:
    """A graph that cannot decode a compacted cache (not rewritten for it) must not be given one."""
    for a in args:
        if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter) and a.dim() == 4 \
                and kv_positions.is_compacted(a):
            raise CompactedCacheError(
                "spts: this graph was given a compacted KV cache (left by an SPTS prefill) but was not rewritten to "
                "decode on it (see the warnings above for why it fell back); decode with the same backend and "
                "options, or run the prefill with use_cache=False")


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
