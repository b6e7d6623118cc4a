"""The `spts` torch.compile backend: analyse -> verify -> plan -> rewrite -> compile.

`spts_backend(gm, example_inputs, *, mode=None, options=None)` receives Dynamo's torch-level FX graph.
Anything it cannot match falls back to plain Inductor with one warning that names the reason. Each step
lives in the module that owns it: `passes.locate`, `passes.verify`, `passes.plan` (gating, the first skipping
layer, budgets and FLOPs), `proxies` (LTP), `passes.cleanup` and `passes.rewrite`, and `runner` (what Dynamo
calls, which owns the compile record).
"""
from __future__ import annotations

import copy
import itertools
import logging
import re
import time

import torch
from torch._dynamo.utils import counters
from torch._inductor.compile_fx import compile_fx
from torch._inductor.graph import GraphLowering

from . import proxies as ltp_proxies
from . import report as reporting
from .config import OptionError, SPTSConfig
from . import kv_positions
from .kv_positions import CompactedCacheError
from .passes import cleanup, decode as decoding, locate, plan as planning, rewrite as rewriting, verify as verifying
from .passes.graph_utils import source_hash
from .runner import LOSS_MESSAGE, CompileRecord, LossError, PaddedCacheError, Runner, is_padded_batch, last_plan, \
    recorded_selection
from .selectors import get as get_selector

__all__ = ["spts_backend", "last_plan", "recorded_selection", "reset_warnings", "PaddedCacheError", "LossError",
           "OptionError", "CompileRecord", "CompactedCacheError"]

log = logging.getLogger("spts_compile")

kv_positions.install_attention_masks()   # attention on a cache takes each layer's own mask (kv_positions)
kv_positions.install_cache_crop()        # DynamicCache.crop forgets positions on a compacted cache

_warned: set[str] = set()
_graph_ids = itertools.count(1)


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def reset_warnings() -> None:
    """Forget which one-time warnings were given (each is logged once per process otherwise)."""
    _warned.clear()


def spts_backend(gm: torch.fx.GraphModule, example_inputs, *, mode=None, options=None):
    """Compile a Dynamo graph with SPTS token skipping applied to its decoder layers."""
    cfg = SPTSConfig.from_options(options)  # bad options raise here, before any work
    if mode not in (None, "default"):
        raise ValueError(f"spts: mode={mode!r} is not supported; pass settings through options=")
    record = CompileRecord(graph_id=next(_graph_ids))
    t0 = time.perf_counter()
    before = gm.code if cfg.debug_dir else None
    work = _clone(gm)  # Dynamo reads its own graph after we return: never edit it in place
    try:
        runner = _compile(work, example_inputs, cfg, record, original=gm)
    except (OptionError, LossError, CompactedCacheError, torch._dynamo.exc.TorchDynamoException):
        raise  # the user's mistakes, refusals, and Dynamo's own control flow are not ours to swallow
    except Exception as e:  # never crash the user's model on an analysis problem: fall back to dense
        _warn_once(f"spts: falling back to dense Inductor for this graph: {type(e).__name__}: {e}")
        log.debug("spts: analysis failure", exc_info=True)
        record.kind, record.reason = "fallback", f"{type(e).__name__}: {e}"
        runner = Runner(_inner_compile(cfg, gm, example_inputs, record), record)
    record.compile_seconds = time.perf_counter() - t0
    if cfg.debug_dir:
        reporting.write_dump(cfg.debug_dir, record, before, work)
    return runner


def _compile(gm, example_inputs, cfg: SPTSConfig, record: CompileRecord, original) -> Runner:
    """The five steps. A graph the backend leaves as it is compiles from Dynamo's own module (`original`),
    not from the working copy, so that Inductor's cache (keyed on the module) is shared with plain
    `backend="inductor"` compiles."""
    analysis = _analyse(gm, record)
    if analysis is None:
        return Runner(_inner_compile(cfg, original, example_inputs, record), record)
    if analysis.kind in ("decode", "cached"):
        return _compile_decode(gm, example_inputs, cfg, record, analysis, original)
    schedule = cfg.resolve(len(analysis.layers))
    record.schedule = schedule
    gate = planning.gate(analysis, schedule, cfg)
    record.reason = gate.reason
    if gate.warn:
        _warn_once(f"spts: {gate.reason}")
    _verify(gm, analysis, example_inputs, schedule, gate, cfg, record)
    selector = get_selector(cfg.selector)
    first_skip = _first_skip(analysis, schedule, gate)
    plan = record.plan = planning.make_plan(analysis, schedule, first_skip, selector)
    _check_call(gm, example_inputs, analysis, schedule, first_skip, selector)
    _note_no_savings(plan, analysis, first_skip)
    params = dict(zip(gm.graph.find_nodes(op="placeholder"), example_inputs))
    proxies, watched = {}, []
    if first_skip is not None and schedule.ltp and selector.uses_proxy:
        t = time.perf_counter()
        proxies, watched, record.ltp_mode = ltp_proxies.build(analysis, plan, cfg, params)
        record.proxy_seconds = time.perf_counter() - t
    dense_gm = _clone(gm) if first_skip is not None and isinstance(analysis.seq_len, torch.SymInt) \
        and schedule.min_tokens > 1 else None   # short prompts at run time take a dense graph
    if cfg.causal_cleanup:
        record.cleanup_layers = cleanup.apply(gm, analysis, plan)
    result = None if first_skip is None else \
        rewriting.rewrite(gm, analysis, plan, cfg, proxies, inline=record.cleanup_layers)
    if result is not None:
        record.rewritten_layers, record.layer_modules = result.rewritten_layers, result.shared_modules
    return _hand_over(gm, original, example_inputs, cfg, record, analysis, result, watched, dense_gm)


def _compile_decode(gm, example_inputs, cfg, record, analysis, original) -> Runner:
    """A graph on a filled cache (decode step, next turn, chunked prefill) runs dense as it is; each layer's
    attention takes its own mask through `spts::layer_mask` (kv_positions), which the runner feeds with the
    positions each layer's cache holds (passes/decode.py finds the cache inputs and outputs)."""
    layout = decoding.cache_layout(gm, analysis)
    t = time.perf_counter()
    compiled = _inner_compile(cfg, original, example_inputs, record)
    record.inductor_seconds = time.perf_counter() - t
    return Runner(compiled, record, seq_source=analysis.seq_source, cache=layout,
                  rope_from_input=decoding.rope_from_input(gm, analysis),
                  pad_index=_placeholder_index(gm, analysis.padding_mask))


def _analyse(gm, record: CompileRecord):
    """Step 1: the decoder layers and their blocks; None when there is nothing to rewrite (with the reason)."""
    analysis = locate.analyse(gm)
    record.analysis, record.kind, record.seq_len = analysis, analysis.kind, analysis.seq_len
    if analysis.kind == "none":
        _warn_once(f"spts: no decoder layers matched, compiling with plain Inductor: {analysis.reason}")
        record.reason = analysis.reason
        return None
    unmatched = [l for l in analysis.layers if not l.matched]
    if unmatched and len(unmatched) == len(analysis.layers):
        _warn_once(f"spts: no decoder layer could be matched (layer {unmatched[0].index}: {unmatched[0].reason}); "
                   "compiling with plain Inductor")
        record.reason = unmatched[0].reason
        return None
    return analysis


def _verify(gm, analysis, example_inputs, schedule, gate, cfg, record) -> None:
    """Step 2: the layers the passes will touch reproduce their regions (or are left dense, with the reason)."""
    to_verify = planning.layers_to_verify(analysis, schedule, gate.skipping,
                                          lambda l: cfg.causal_cleanup and cleanup.wants(l))
    if cfg.verify:
        record.verify_seconds = verifying.verify(gm, analysis, example_inputs, to_verify)
    else:
        for l in to_verify:
            l.verified, l.verify_note = True, "verification disabled"


def _first_skip(analysis, schedule, gate) -> int | None:
    if not gate.skipping:
        return None
    first = planning.first_skipping_layer(analysis, schedule.start_layer)
    if first is None:
        bad = next(l for l in analysis.layers[::-1] if not (l.matched and l.verified))
        _warn_once(f"spts: no layer can skip (layer {bad.index}: {bad.reason or bad.verify_note}); dense Inductor")
    return first


def _check_call(gm, example_inputs, analysis, schedule, first_skip, selector) -> None:
    """Refusals and warnings that depend on the call: a loss over skipped positions, fractional budgets in a
    padded batch."""
    if first_skip is not None and analysis.computes_loss:
        raise LossError(LOSS_MESSAGE)
    padded = is_padded_batch(_input_of(gm, example_inputs, analysis.padding_mask))
    used = schedule.budgets + ([] if selector.keeps_set else schedule.prune)   # keep-set modes never prune
    if first_skip is not None and padded and any(isinstance(v, float) for v in used):
        _warn_once("spts: fractional budgets or prunes in a padded batch are fractions of the padded length N, so a "
                   "row's selection depends on the batch's padding; give int budgets for row-independent results")


def _note_no_savings(plan, analysis, first_skip) -> None:
    n = analysis.seq_len
    if first_skip is None or not isinstance(n, int):
        return
    dense, planned = (plan.at(e, n) for e in plan.totals())
    if planned >= dense:
        log.info("spts: every budget is at least the prompt's %d tokens: this prefill saves no work (planned FLOPs "
                 "%.3f of dense); smaller budgets or a longer prompt would", n, planned / dense)


def _hand_over(gm, original, example_inputs, cfg, record, analysis, result, watched, dense_gm):
    """Step 5: compile the rewritten graph (and the dense twin for short prompts), and wrap it in a Runner."""
    extra = _static_fakes(result.extra_inputs if result is not None else [], example_inputs)
    t = time.perf_counter()
    untouched = result is None and not record.cleanup_layers
    compiled = _inner_compile(cfg, original if untouched else gm, list(example_inputs) + extra, record)
    dense = None
    if dense_gm is not None:
        changed = cleanup.apply(dense_gm, locate.analyse(dense_gm), None, verified_from=analysis) \
            if cfg.causal_cleanup else []
        dense = OnDemand(cfg, dense_gm if changed else original, record)
    record.inductor_seconds = time.perf_counter() - t
    layout = decoding.cache_layout(gm, analysis) if result is not None and result.kv_layers else None
    return Runner(compiled, record, dense=dense, seq_source=analysis.seq_source, min_tokens=record.schedule.min_tokens,
                  result=result, watched=watched, cache=layout)


class OnDemand:
    """The dense graph that prompts shorter than `min_tokens` run, compiled at the first such prompt rather
    than up front (a user who never sends one never pays its code generation). With Inductor it goes through
    `torch.compile(dynamic=True)`, so one dense graph serves every short length; its compile seconds are added
    to the record's `dense_seconds` when it happens."""

    def __init__(self, cfg: SPTSConfig, gm: torch.fx.GraphModule, record: CompileRecord):
        self.cfg, self.gm, self.record, self.fn = cfg, gm, record, None

    def __call__(self, *args):
        # the graph reads scalars with .item() (e.g. RoPE's attention scaling): trace them, do not break there
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            if self.fn is not None:
                return self.fn(*args)
            self.gm.recompile()
            self.fn = self.gm.forward if self.cfg.compiler == "eager" else torch.compile(self.gm, dynamic=True)
            t = time.perf_counter()
            out = self.fn(*args)
            self.record.dense_seconds += time.perf_counter() - t
            return out


def _inner_compile(cfg: SPTSConfig, gm: torch.fx.GraphModule, example_inputs, record: CompileRecord | None = None):
    """Inductor by default; with compiler="eager" the (rewritten) FX graph itself runs. The rewritten graph
    calls this package's runtime helpers; AOTAutograd's cache refuses functions it does not know, so they are
    marked cacheable for this compile, keyed by a hash of this package's source: a second process with the
    same model and options loads the compiled graph (AOTAutograd and FX graph caches) instead of recompiling
    it, and an edited helper misses the cache instead of loading stale code. The record gets how many distinct
    C++ kernels the graph's output code defines (Inductor hands over that code on a cache hit too; None when it
    gave none) and whether Inductor's FX graph cache had the graph."""
    if cfg.compiler == "eager":
        gm.recompile()
        return gm.forward
    ours = {f"{t.__module__}.{t.__name__}": source_hash() for t in _our_targets(gm)}
    # sorted: the dict is part of the FX graph cache key, and a set of functions iterates in an order that
    # changes from process to process (it follows their ids), which would make every warm start miss
    marked = dict(sorted(dict(torch._inductor.config.unsafe_marked_cacheable_functions, **ours).items()))
    codes: list[str] = []
    hook = GraphLowering.save_output_code
    hits = counters["inductor"]["fxgraph_cache_hit"]

    def save(code: str) -> None:
        codes.append(code)
        if hook is not None:
            hook(code)

    GraphLowering.save_output_code = save
    try:
        with torch._inductor.config.patch(unsafe_marked_cacheable_functions=marked):
            compiled = compile_fx(gm, example_inputs)
    finally:
        GraphLowering.save_output_code = hook
    if record is not None:
        record.kernels = len({k for c in codes for k in _KERNEL_DEF.findall(c)}) if codes else None
        record.subgraphs = len({k for c in codes for k in _SUBGRAPH_DEF.findall(c)}) if codes else None
        record.cache = "hit" if counters["inductor"]["fxgraph_cache_hit"] > hits else "miss"
    return compiled


# A kernel the wrapper code defines: `cpp_fused_add_mul_0 = async_compile.cpp_pybinding(...)`
_KERNEL_DEF = re.compile(r"^(\w+) = async_compile\.\w+\(", re.M)
# A compiled invoke_subgraph body (an outlined skipping layer): `def repeated_subgraph0(args):`
_SUBGRAPH_DEF = re.compile(r"^def (repeated_subgraph\d+)\(", re.M)


def _our_targets(gm: torch.fx.GraphModule) -> set:
    """This package's functions the graph calls, in the outlined layer modules too (passes/outline.py)."""
    return {n.target for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
            if n.op == "call_function" and getattr(n.target, "__module__", "").startswith(__package__ + ".")}


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


def _placeholder_index(gm, node) -> int | None:
    if node is None:
        return None
    return list(gm.graph.find_nodes(op="placeholder")).index(node)


def _input_of(gm, example_inputs, node):
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
