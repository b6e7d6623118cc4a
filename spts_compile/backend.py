"""The `spts` torch.compile backend: analyse -> verify -> plan -> rewrite -> Inductor.

`spts_backend(gm, example_inputs, *, mode=None, options=None)` receives Dynamo's torch-level FX graph.
Anything it cannot match falls back to plain Inductor with one warning that names the reason.
"""
from __future__ import annotations

import copy
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._inductor.compile_fx import compile_fx

from .config import KEEP_SET_SELECTORS, SPTSConfig
from .passes import cleanup, locate, plan as planning, rewrite as rewriting, verify as verifying
from .passes.locate import GraphAnalysis
from . import calibration as calib
from . import report as reporting

log = logging.getLogger("spts_compile")

_warned: set[str] = set()
_LAST: dict[str, Any] = {"plan": None, "selection": None}


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


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


_graph_counter = 0


def spts_backend(gm: torch.fx.GraphModule, example_inputs, *, mode=None, options=None):
    """Compile a Dynamo graph with SPTS token skipping applied to its decoder layers."""
    global _graph_counter
    cfg = SPTSConfig.from_options(options)  # bad options raise here, before any work
    if mode not in (None, "default"):
        raise ValueError(f"spts: mode={mode!r} is not supported; pass settings through options=")
    _graph_counter += 1
    record = CompileRecord(graph_id=_graph_counter)
    t0 = time.perf_counter()
    before = gm.code if cfg.debug_dir else None
    work = _clone(gm)  # Dynamo reads its own graph after we return: never edit it in place
    try:
        compiled = _compile(work, example_inputs, cfg, record, original=gm)
    except (PaddedCacheError, torch._dynamo.exc.TorchDynamoException):
        raise  # refusals, and Dynamo's own control flow (e.g. restart analysis), are not ours to swallow
    except Exception as e:  # never crash the user's model on an analysis problem: fall back to dense
        _warn_once(f"spts: falling back to dense Inductor for this graph: {type(e).__name__}: {e}")
        log.debug("spts: analysis failure", exc_info=True)
        record.kind, record.reason = "fallback", f"{type(e).__name__}: {e}"
        compiled = _inner_compile(cfg, gm, example_inputs)
    record.compile_seconds = time.perf_counter() - t0
    if record.kind in ("prefill", "fallback"):
        _LAST["plan"] = record  # the latest prefill graph, whatever became of it (not a decode step, nor a
        #                         layer-less piece such as an lm_head split off by a graph break)
    if cfg.debug_dir:
        reporting.write_dump(cfg.debug_dir, record, before, work)
    return compiled


def _inner_compile(cfg: SPTSConfig, gm: torch.fx.GraphModule, example_inputs):
    """Inductor by default; with compiler="eager" the (rewritten) FX graph itself runs."""
    if cfg.compiler == "eager":
        gm.recompile()
        return gm.forward
    return compile_fx(gm, example_inputs)


def _clone(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of Dynamo's graph module that keeps what AOTAutograd reads from it."""
    graph = copy.deepcopy(gm.graph)
    new = torch.fx.GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old, node in zip(gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            node._dynamo_source = old._dynamo_source
    return new


def _compile(gm, example_inputs, cfg: SPTSConfig, record: CompileRecord, original=None):
    # A graph the backend leaves as it is compiles from Dynamo's own module, not from the working copy,
    # so that Inductor's cache (keyed on the module) is shared with plain `backend="inductor"` compiles.
    original = gm if original is None else original
    analysis = locate.analyse(gm)
    record.analysis, record.kind, record.seq_len = analysis, analysis.kind, analysis.seq_len
    if analysis.kind == "none":
        _warn_once(f"spts: no decoder layers matched, compiling with plain Inductor: {analysis.reason}")
        record.reason = analysis.reason
        return _inner_compile(cfg, original, example_inputs)
    unmatched = [l for l in analysis.layers if not l.matched]
    if unmatched and len(unmatched) == len(analysis.layers):
        _warn_once(f"spts: no decoder layer could be matched (layer {unmatched[0].index}: {unmatched[0].reason}); "
                   "compiling with plain Inductor")
        record.reason = unmatched[0].reason
        return _inner_compile(cfg, original, example_inputs)
    schedule = cfg.resolve(len(analysis.layers))
    record.schedule = schedule
    static_n = analysis.seq_len if isinstance(analysis.seq_len, int) else None
    skipping = cfg.skipping and analysis.kind == "prefill"
    if skipping and static_n is not None and static_n < schedule.min_tokens:
        skipping = False
        record.reason = f"prompt of {static_n} tokens is shorter than min_tokens={schedule.min_tokens}: dense"
    elif analysis.kind != "prefill":
        record.reason = analysis.reason
    if skipping and any(l.cache == "window" for l in analysis.layers if l.matched):
        skipping = False
        record.reason = ("the KV cache has sliding-window layers, whose cache layout SPTS cannot compact: "
                         "this prefill runs dense (pass use_cache=False for a skipping prefill-only pass)")
        _warn_once(f"spts: {record.reason}")
    # Verify the layers we will touch: the skipping range, and dense layers the clean-up may rewrite.
    first_skip = None
    to_verify = [l for l in analysis.layers if l.matched and (
        (skipping and l.index >= schedule.start_layer) or (cfg.causal_cleanup and cleanup.wants(l)))]
    if cfg.verify:
        record.verify_seconds = verifying.verify(gm, analysis, example_inputs, to_verify)
    else:
        for l in to_verify:
            l.verified, l.verify_note = True, "verification disabled"
    if skipping:
        first_skip = _first_skipping_layer(analysis, schedule.start_layer)
        if first_skip is None:
            bad = next(l for l in analysis.layers[::-1] if not (l.matched and l.verified))
            _warn_once(f"spts: no layer can skip (layer {bad.index}: {bad.reason or bad.verify_note}); dense Inductor")
    plan = planning.make_plan(analysis, schedule, first_skip, cfg.selector)
    record.plan = plan
    compacts_cache = first_skip is not None and (schedule.pap or schedule.msdp or cfg.selector in KEEP_SET_SELECTORS) and \
        any(l.attn.k_out is not None for l in analysis.layers if l.matched)
    padded = _is_padded_batch(params_value(gm, example_inputs, analysis.padding_mask))
    if first_skip is not None and padded and any(isinstance(v, float) for v in schedule.budgets + schedule.prune):
        _warn_once("spts: fractional budgets or prunes in a padded batch are fractions of the padded length N, so a "
                   "row's selection depends on the batch's padding; give int budgets for row-independent results")
    if compacts_cache and padded:
        raise PaddedCacheError(PADDED_CACHE_MESSAGE)
    dense_gm = None
    if first_skip is not None and isinstance(analysis.seq_len, torch.SymInt) and schedule.min_tokens > 1:
        dense_gm = _clone(gm)  # short prompts at run time take the dense graph
    params = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
    proxies, watched = {}, []
    if first_skip is not None and schedule.ltp and cfg.selector == "probe":  # only the probe uses the proxies
        t = time.perf_counter()
        proxies, watched, record.ltp_mode = _build_proxies(analysis, plan, cfg, params)
        record.proxy_seconds = time.perf_counter() - t
    if cfg.causal_cleanup:
        record.cleanup_layers = cleanup.apply(gm, analysis, plan)
    result = rewriting.rewrite(gm, analysis, plan, cfg, proxies) if first_skip is not None else None
    if result is not None:
        record.rewritten_layers = result.rewritten_layers
    extra = _static_fakes(result.extra_inputs if result is not None else [], example_inputs)
    t = time.perf_counter()
    untouched = result is None and not record.cleanup_layers
    compiled = _inner_compile(cfg, original if untouched else gm, list(example_inputs) + extra)
    dense = None
    if dense_gm is not None:
        changed = cleanup.apply(dense_gm, locate.analyse(dense_gm), None, verified_from=analysis) \
            if cfg.causal_cleanup else []
        dense = _inner_compile(cfg, dense_gm if changed else original, example_inputs)
    record.inductor_seconds = time.perf_counter() - t
    if result is None and dense is None:
        return compiled
    pad_index = _placeholder_index(gm, analysis.padding_mask) if compacts_cache else None
    return _Runner(compiled, dense, analysis.seq_source, schedule.min_tokens, result, watched, pad_index)


PADDED_CACHE_MESSAGE = (
    "spts: a padded batch (batch > 1 with padding in attention_mask) cannot keep a KV cache for decoding: "
    "each row keeps different tokens, while the decode step's mask assumes one length for every row. "
    "Run it as batch 1 (one prompt at a time), pass use_cache=False for a prefill-only pass, or disable "
    "cache compaction with options={'pap': False, 'msdp': False}.")


class PaddedCacheError(ValueError):
    """A padded batch asked for a compacted KV cache: refused, with how to run it instead."""


def _is_padded_batch(padding_mask) -> bool:
    """Batch > 1 with padding somewhere in the 2D attention mask."""
    return padding_mask is not None and padding_mask.shape[0] > 1 and not bool(padding_mask.bool().all())


def _placeholder_index(gm, node) -> int | None:
    if node is None:
        return None
    return [n for n in gm.graph.nodes if n.op == "placeholder"].index(node)


def params_value(gm, example_inputs, node):
    i = _placeholder_index(gm, node)
    return None if i is None else example_inputs[i]


def _static_fakes(tensors, example_inputs) -> list:
    """Example values for the extra (proxy) inputs: fake tensors of fixed shape in Dynamo's fake mode, so
    that a dynamic compile does not make symbols for them (they have no Dynamo source to guard on)."""
    if not tensors:
        return []
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        return list(tensors)
    return [fake_mode.from_tensor(t, static_shapes=True) for t in tensors]


def _first_skipping_layer(analysis: GraphAnalysis, start: int) -> int | None:
    """Skipping needs every layer from the first skipping one to the last to be matched and verified."""
    first = None
    for l in reversed(analysis.layers):
        if l.index < start:
            break
        if not (l.matched and l.verified):
            break
        first = l.index
    return first


def _build_proxies(analysis, plan, cfg: SPTSConfig, params):
    calibration = calib.resolve_calibration(cfg.calibration)
    ffns = [l.ffn for l in analysis.layers]
    if calibration is not None:
        calibration.check_fits(len(ffns), analysis.layers[0].attn.hidden, [f.intermediate for f in ffns])
    proxies, watched = {}, []
    for spec, lp in zip(analysis.layers, plan.layers):
        if lp.mode != "skip":
            continue
        f = spec.ffn
        w_gate, w_up, w_down = (locate.slice_value(w, params.__getitem__) for w in (f.w_gate, f.w_up, f.w_down))
        channels, rank = planning.ltp_dims(plan.schedule, f.intermediate, spec.attn.hidden)
        importance = calibration.importance_for(spec.index) if calibration is not None else None
        proxy = calib.build_ltp_proxy(w_gate, w_up, w_down, channels=channels, rank=rank, importance=importance)
        proxies[spec.index] = tuple(t.contiguous() for t in proxy.tensors())
        watched.append(_ProxyWatch(spec.index, (w_gate, w_up, w_down), channels, rank, importance))
    return proxies, watched, ("calibration" if calibration is not None else "weights")


@dataclass
class _ProxyWatch:
    """Rebuilds a layer's LTP proxy in place when its FFN weights change after compiling."""

    layer: int
    weights: tuple
    channels: int
    rank: int
    importance: Any
    versions: tuple = ()

    def __post_init__(self):
        self.versions = tuple(w._version for w in self.weights)

    def stale(self) -> bool:
        return tuple(w._version for w in self.weights) != self.versions


class _Runner:
    """The callable handed back to Dynamo: dispatches short prompts to the dense graph, strips the
    selection-recording outputs, and keeps LTP proxies in step with the weights."""

    def __init__(self, compiled, dense, seq_source, min_tokens, result, watched, pad_index):
        self.compiled, self.dense = compiled, dense
        self.pad_index = pad_index
        self.seq_source, self.min_tokens = seq_source, min_tokens
        self.n_records = len(result.record_names) if result else 0
        self.record_names = result.record_names if result else []
        self.watched = watched
        self.extra = list(result.extra_inputs) if result else []
        self.buffers = {l: [self.extra[i] for i in pos] for l, pos in result.proxy_buffers.items()} if result else {}

    def __call__(self, *args):
        if self.dense is not None and self.seq_source is not None:
            n = args[self.seq_source].shape[1]
            if n < self.min_tokens:
                return self.dense(*args)
        if self.pad_index is not None and _is_padded_batch(args[self.pad_index]):
            raise PaddedCacheError(PADDED_CACHE_MESSAGE)
        self._refresh_proxies()
        out = self.compiled(*args, *self.extra) if self.extra else self.compiled(*args)
        if self.n_records:
            out, kept = list(out[:-self.n_records]), out[-self.n_records:]
            _LAST["selection"] = [{"layer": l, "block": blk, "active": t}
                                  for (l, blk), t in zip(self.record_names, kept)]
        return out

    def _refresh_proxies(self):
        for w in self.watched:
            if w.stale():
                proxy = calib.build_ltp_proxy(*w.weights, channels=w.channels, rank=w.rank, importance=w.importance)
                with torch.no_grad():
                    for dst, src in zip(self.buffers[w.layer], proxy.tensors()):
                        dst.copy_(src)
                w.versions = tuple(x._version for x in w.weights)
                log.info("spts: layer %d FFN weights changed since compiling; rebuilt its LTP proxy", w.layer)


def last_plan() -> dict | None:
    """A summary of the most recently compiled prefill graph's plan (FLOPs, KV tokens, layers)."""
    rec = _LAST["plan"]
    return None if rec is None else reporting.summary(rec)


def recorded_selection() -> list[dict] | None:
    """With `record_selection=True`: per layer and block, the original positions of the active tokens
    of the most recent call."""
    return _LAST["selection"]
