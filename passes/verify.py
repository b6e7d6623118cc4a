"""Verification by execution: the canonical block must reproduce the original region.

The graph is run once, eagerly, on the real example inputs; the values that each matched layer reads
and writes are captured. Each block's canonical implementation (the runtime helpers the rewrite will
call, with every candidate active) is then run on the captured inputs and compared with the captured
outputs. A layer that does not reproduce its region is left dense, and the reason is recorded.

Layers whose regions are the same code (`layer_signatures`: the same ops on the same kinds of inputs, with
only their weights differing) compute the same function of their inputs and weights, so one of them, the
earliest, stands for the group: its verdict is every member's. The earliest is chosen among every matched
layer, also the ones the passes leave dense, so the representative of layers that skip from layer 11 may be
layer 1. The eager run stops as soon as the representatives' values are captured, so for a model whose layers
are all alike it runs the embedding and the first layer or two, not the whole prompt through every layer and
the LM head.

A success is also written to disk, beside Inductor's caches (`<TORCHINDUCTOR_CACHE_DIR>/spts-verify`), keyed by
the layer's signature, a fingerprint of the weights' values, this package's source and the torch version: a
second process that compiles the same model with the same options takes the verdict instead of running the
graph again (its note says so). `SPTS_VERIFY_CACHE=0` turns the disk cache off.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
import weakref
from collections import defaultdict
from typing import Any

import torch
import torch.fx
from torch.fx import GraphModule, Node
from torch.utils.weak import WeakIdKeyDictionary

from spts_compile import runtime as rt

from .blocks import attention_args, ffn_args
from .graph_utils import layer_ops, module_path, shape_of, source_hash
from .locate import GraphAnalysis, LayerSpec, slice_value


class _Captured(Exception):
    """Every wanted value is in: the rest of the graph need not run."""


class _Capture(torch.fx.Interpreter):
    def __init__(self, gm: GraphModule, wanted: set[Node]):
        super().__init__(gm, garbage_collect_values=True)
        self.wanted = wanted
        self.values: dict[Node, Any] = {}

    def run_node(self, n: Node):
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out  # no detach: under no_grad it is not needed, and vmapped masks forbid it
            if len(self.values) == len(self.wanted):
                raise _Captured
        return out


def layer_signatures(gm: GraphModule, layers: list[LayerSpec]) -> dict[int, str]:
    """layer index -> its region's code and its spec with the layer's identity taken out. In the code, a node
    of the same region is its position in the region, a node of another layer is that layer's offset from this
    one (layer i reads layer i-1's output), a placeholder is its shape and dtype (the weights: only their values
    differ between alike layers), a constant made from no other node is its own code, and any other node keeps
    its name (the shared masks and RoPE tables: a sliding-window layer reads another mask than a full one, so
    the two differ). In the spec (what the matcher found), each node field is written the same way, and a
    placeholder field (a weight) as the region op that first reads it and where: two layers share a signature
    only if the matcher read their alike code alike."""
    owner: dict[Node, int] = {}
    nodes_of: dict[int, list[Node]] = defaultdict(list)
    for n, where in layer_ops(gm.graph):
        owner[n] = where[0]
        nodes_of[where[0]].append(n)
    out = {}
    for spec in layers:
        idx = spec.index
        local = {n: i for i, n in enumerate(nodes_of[idx])}

        def token(a, idx=idx, local=local):
            if a in local:
                return f"%{local[a]}"
            if a in owner:
                return f"layer{owner[a] - idx:+d}"
            if a.op == "placeholder":
                v = a.meta.get("example_value", a.meta.get("val"))
                return f"input{shape_of(a)}{getattr(v, 'dtype', '')}"
            if not a.all_input_nodes:   # a constant made outside the layer for it (torch.tensor(window))
                return f"({a.op} {_target_text(a.target)} {a.args!r} {a.kwargs!r})"
            return a.name

        def field_token(a, local=local):
            if isinstance(a, Node) and a.op == "placeholder":
                reader = next((local[u] for u in a.users if u in local), None)
                return f"{token(a)} read by %{reader}"
            return token(a)

        lines = [f"{n.op} {_target_text(n.target)} {torch.fx.node.map_arg((n.args, n.kwargs), token)!r}"
                 for n in nodes_of[idx]]
        lines.append(_spec_text(spec.attn, field_token))
        lines.append(_spec_text(spec.ffn, field_token))
        out[idx] = _ADDRESS.sub("", "\n".join(lines))
    return out


# A signature is a disk key too (`_DiskVerdicts`), so it must read the same in every process: a function's
# repr holds its address (`<function silu at 0x7f..>`), which differs between processes.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _target_text(target) -> str:
    """A call target as text that is the same in every process: a method or module name as written, a
    function by its qualified name (`torch.nn.functional.silu`)."""
    if isinstance(target, str):
        return repr(target)
    try:
        return torch.fx.node._get_qualified_name(target)
    except Exception:   # a callable without a usable qualified name: its repr, without the address
        return _ADDRESS.sub("", repr(target))


def _spec_text(value, token) -> str:
    """A spec dataclass as text, its nodes through `token`."""
    if isinstance(value, Node):
        return token(value)
    if dataclasses.is_dataclass(value):
        inner = ", ".join(f"{f.name}={_spec_text(getattr(value, f.name), token)}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({inner})"
    return repr(value)


def concrete(x):
    """A SymInt example input as the int it stands for."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint)
    if isinstance(x, torch.SymFloat):
        return float(x.node.hint)
    return x


def _nodes_of(spec: LayerSpec) -> set[Node]:
    a, f = spec.attn, spec.ffn
    nodes = {a.x_in, a.out, a.cos, a.sin, f.out}
    for extra in (a.mask, a.k_out, a.v_out, a.norm.eps, a.scale):
        if isinstance(extra, Node):
            nodes.add(extra)
    for norm in (a.q_norm, a.k_norm, a.post_norm, f.norm, f.post_norm):
        if norm is not None and isinstance(norm.eps, Node):
            nodes.add(norm.eps)
    return nodes


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> str | None:
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    tol = 1e-4 if want.dtype == torch.float32 else 2e-2
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    if not err <= tol * (1.0 + scale):
        return f"{what}: max abs error {err:.3g} (tolerance {tol * (1 + scale):.3g})"
    return None


PREFIX = 256  # causal blocks: the first T outputs depend only on the first T inputs


def _prefix(values: dict, spec: LayerSpec, t: int) -> dict:
    """The captured per-token values cut to the first t tokens (masks to [t, t])."""
    a, f = spec.attn, spec.ffn
    out = dict(values)
    for node in (a.x_in, a.out, a.cos, a.sin, f.out):
        out[node] = values[node][:, :t]
    for node in (a.k_out, a.v_out):
        if node is not None:
            out[node] = values[node][:, :, :t]
    if a.mask is not None:
        out[a.mask] = values[a.mask][..., :t, :t]
    return out


def run_canonical_layer(spec: LayerSpec, values, params, padding_mask) -> tuple[dict, str | None]:
    """The block as the rewrite emits it, with every token active, on the captured inputs (the first PREFIX
    tokens: attention is causal, so they are a complete test of the block and cost little): probe, attention
    on the active rows and FFN, with the helpers' arguments from the one builder (`blocks`), and the dense
    clean-up's form of the attention too."""
    a, f = spec.attn, spec.ffn
    n = values[a.x_in].shape[1]
    keep = a.cache.keep if a.k_out is not None and a.cache is not None else None
    problems = []
    if n > PREFIX and keep is not None:
        # A sliding-window cache holds the newest `keep` rows of all n, which a prefix does not compute: its K/V
        # are checked at full length, with the O(n) parts of the block (the probe's K, V's projection).
        problems += _window_cache_problems(spec, values, params, padding_mask, keep)
    if n > PREFIX:
        values = _prefix(values, spec, PREFIX)
        padding_mask = padding_mask[:, :PREFIX] if padding_mask is not None else None

    def value(x):
        return slice_value(x, lambda node: values[node] if node in values else params[node])
    aa, fa = attention_args(a, value), ffn_args(f, value)
    x = values[a.x_in]
    cand = rt.initial_candidates(x)
    last = rt.last_real_position(x, padding_mask)
    xn = rt.norm_apply(x, aa.norm)
    k_all, _scores = rt.probe_attention(*aa.probe(xn, cand, last, 1))
    delta, k_act, v_act = rt.attend_active(*aa.attend(xn, cand, cand, k_all))
    h = rt.scatter_add_rows(x, cand, delta)
    h_all, k_dense, v_dense = rt.attend_all(*aa.attend_all(x))
    problems += [_close(h, values[a.out], f"layer {spec.index} attention"),
                 _close(h_all, values[a.out], f"layer {spec.index} attention (dense form)")]
    if a.k_out is not None and keep is not None and n > PREFIX:
        # the active form's cache was checked at full length above; on the prefix, the dense form must agree
        problems += [_close(k_dense, k_act, f"layer {spec.index} K cache (dense form against the active form)"),
                     _close(v_dense, v_act, f"layer {spec.index} V cache (dense form against the active form)")]
    elif a.k_out is not None:
        if keep is not None:   # a sliding-window cache keeps the newest rows
            k_act, v_act, k_dense, v_dense = (rt.newest_rows(t, 2, keep) for t in (k_act, v_act, k_dense, v_dense))
        problems += [_close(k_act, values[a.k_out], f"layer {spec.index} K cache"),
                     _close(v_act, values[a.v_out], f"layer {spec.index} V cache"),
                     _close(k_dense, values[a.k_out], f"layer {spec.index} K cache (dense form)"),
                     _close(v_dense, values[a.v_out], f"layer {spec.index} V cache (dense form)")]
    h_in = values[a.out]
    y = h_in + rt.ffn_rows(*fa.ffn(rt.norm_apply(h_in, fa.norm)))
    problems.append(_close(y, values[f.out], f"layer {spec.index} FFN"))
    problems = [p for p in problems if p]
    return {"h": h, "y": y}, (problems[0] if problems else None)


def _window_cache_problems(spec: LayerSpec, values, params, padding_mask, keep: int) -> list:
    """A sliding-window layer's cache outputs against the block's K (as the probe computes it for every
    candidate) and V (its projection), at the captured full length, cut to the newest `keep` rows."""
    a = spec.attn

    def value(x):
        return slice_value(x, lambda node: values[node] if node in values else params[node])
    aa = attention_args(a, value)
    x = values[a.x_in]
    cand = rt.initial_candidates(x)
    xn = rt.norm_apply(x, aa.norm)
    k_all, _scores = rt.probe_attention(*aa.probe(xn, cand, rt.last_real_position(x, padding_mask), 1))
    v_all = rt.project_heads(*aa.values(xn))
    return [_close(rt.newest_rows(k_all, 2, keep), values[a.k_out], f"layer {spec.index} K cache"),
            _close(rt.newest_rows(v_all, 2, keep), values[a.v_out], f"layer {spec.index} V cache")]


# Verdicts per model, weakly keyed by its first weight (a verdict dies with its model): the graph's code
# with its numbers blanked (lengths differ between compiles of one model) and the identity of every weight.
_VERDICTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _verdicts_for(gm: GraphModule, example_inputs) -> dict[int, str]:
    """The remembered successes (layer -> note) of graphs with this graph's signature: a verdict holds for
    every graph with the same code and the same weights. Weak references guard against a dead weight's id
    being reused by a new one while the first weight lives."""
    weights = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]
    if not weights:
        return {}
    key = (re.sub(r"\b\d+\b", "#", gm.code), tuple(id(w) for w in weights))
    per_model = _VERDICTS.setdefault(weights[0], {})
    refs, verdicts = per_model.get(key, ((), None))
    if verdicts is None or any(r() is not w for r, w in zip(refs, weights)):
        verdicts = {}
        per_model[key] = ([weakref.ref(w) for w in weights], verdicts)
    return verdicts


def verify(gm: GraphModule, analysis: GraphAnalysis, example_inputs, layers: list[LayerSpec]) -> float:
    """Run the graph once and mark each layer in `layers` verified or not. Returns seconds spent.
    Only the earliest matched layer of each group of alike layers (`layer_signatures`) is run through its
    canonical block, and it may be a layer outside `layers` that the passes leave dense: the code is the
    same, so its check is theirs, and the eager run to capture its values is short (SmolLM2 skips from layer
    11; its layer 1 stands for layers 11-29). A representative outside `layers` is not marked. Verdicts are
    cached by graph signature, so a recompile for a new length does not run it again."""
    t0 = time.perf_counter()
    if not layers:
        return 0.0
    cached = _verdicts_for(gm, example_inputs)
    if all(l.index in cached for l in layers):
        for l in layers:
            l.verified, l.verify_note = True, cached[l.index] + " (cached verdict)"
        return time.perf_counter() - t0
    pool = {l.index: l for l in analysis.layers if l.matched}
    pool.update((l.index, l) for l in layers)
    signatures = layer_signatures(gm, list(pool.values()))
    wanted_groups = {signatures[l.index] for l in layers}
    group_of: dict[str, LayerSpec] = {}
    for l in sorted(pool.values(), key=lambda l: l.index):
        if signatures[l.index] in wanted_groups:
            group_of.setdefault(signatures[l.index], l)
    disk = _DiskVerdicts(example_inputs)
    verdicts: dict[int, str | None] = {}   # representative -> its problem (None: it reproduces its region)
    notes: dict[int, str] = {}
    for rep in group_of.values():
        note = disk.get(signatures[rep.index])
        if note is not None:
            verdicts[rep.index], notes[rep.index] = None, note
    reps = [l for l in group_of.values() if l.index not in verdicts]   # one per signature, in layer order
    if not reps:
        _take_verdicts(layers, group_of, signatures, verdicts, notes, cached)
        return time.perf_counter() - t0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = dict(zip(placeholders, example_inputs))
    wanted = set().union(*(_nodes_of(l) for l in reps))
    if analysis.padding_mask is not None:
        wanted.add(analysis.padding_mask)
    inputs = [concrete(x) for x in example_inputs]
    interp = _Capture(gm, wanted)
    try:
        with torch.no_grad():
            interp.run(*inputs)
    except _Captured:
        pass
    except Exception as e:  # the graph itself failed to run eagerly: nothing can be trusted
        for l in layers:
            l.verified, l.verify_note = False, f"verification run failed: {type(e).__name__}: {e}"
        return time.perf_counter() - t0
    values = interp.values
    pm = values.get(analysis.padding_mask) if analysis.padding_mask is not None else None
    for rep in reps:
        try:
            with torch.no_grad():
                _, problem = run_canonical_layer(rep, values, params, pm)
        except Exception as e:
            problem = f"canonical block failed: {type(e).__name__}: {e}"
        verdicts[rep.index] = problem
        notes[rep.index] = "reproduces the region" if problem is None else problem
        if problem is None:
            disk.put(signatures[rep.index], notes[rep.index])
    _take_verdicts(layers, group_of, signatures, verdicts, notes, cached)
    return time.perf_counter() - t0


def _take_verdicts(layers, group_of, signatures, verdicts, notes, cached) -> None:
    """Every layer takes its group representative's verdict (`verdicts`: None = verified; `notes`: how)."""
    for l in layers:
        rep = group_of[signatures[l.index]]
        l.verified = verdicts[rep.index] is None
        note = notes[rep.index]
        l.verify_note = note if rep is l else f"{note} (as layer {rep.index}, whose code it shares)"
        if l.verified:  # only successes are remembered: a failure is checked again next time
            cached[l.index] = l.verify_note


class _DiskVerdicts:
    """Successful verdicts that outlive the process (module docstring). A key is the layer signature plus a
    fingerprint of every weight's shape, dtype, sum and norm (float64): other values, other key."""

    NOTE = "reproduces the region (verdict from the disk cache)"

    def __init__(self, example_inputs):
        self.folder = None
        if os.environ.get("SPTS_VERIFY_CACHE", "1") == "0":
            return
        weights = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]
        if not weights:
            return
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        h = hashlib.sha256(f"{source_hash()} {torch.__version__}".encode())
        with torch.no_grad():
            for w in weights:
                stats = torch.stack([w.sum(dtype=torch.float64), torch.linalg.vector_norm(w, dtype=torch.float64)])
                h.update(f"{tuple(w.shape)} {w.dtype} {stats.tolist()}".encode())
        self.model = h.hexdigest()
        self.folder = os.path.join(cache_dir(), "spts-verify")

    def _path(self, signature: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(f"{self.model}\n{signature}".encode()).hexdigest() + ".ok")

    def get(self, signature: str) -> str | None:
        if self.folder is not None and os.path.exists(self._path(signature)):
            return self.NOTE
        return None

    def put(self, signature: str, note: str) -> None:
        if self.folder is None:
            return
        try:
            os.makedirs(self.folder, exist_ok=True)
            tmp = self._path(signature) + f".{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(note + "\n")
            os.replace(tmp, self._path(signature))
        except OSError:   # a read-only or full cache folder costs the next process a run, nothing else
            pass
