"""Measurement primitives: one model object per configuration, and one instrumented `generate` call.

Every measurement is a greedy `generate` on the configuration's own model object, whose `forward` is the
compiled one (`model.forward = torch.compile(model.forward, backend=..., options=...)`), so that `generate`
uses it for prefill and decode alike. One call yields all of:

- time to first token (prefill), and the times at new token 16 and at the last new token (end-to-end),
  from a logits processor that stamps the clock each step;
- the KV-cache bytes after prefill, read at the first step from the DynamicCache passed in;
- the raw last-token logits of the prompt (`output_logits`), for fidelity against dense;
- the greedy continuation;
- the peak resident memory during the call (a sampling thread; psutil).

Compile time and graph count come from wrapping the registered backend: each backend call is timed
and counted per configuration, and for `spts` the plan (`spts_compile.last_plan()`) is captured right after
its prefill graph is compiled.
"""
from __future__ import annotations

import copy
import functools
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList


def setup_process(threads: int) -> None:
    """Pin the thread count, and lift Dynamo's recompile limits: a benchmark compiles many graphs (one
    set per configuration) in one process."""
    torch.set_num_threads(threads)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096


def spts_options(text: str) -> dict:
    """`--options`: a JSON object of spts options, checked by `SPTSConfig` before anything loads, so that a
    typo stops the run with the option's name rather than minutes later inside a compile. A bad option is
    the same ValueError naming the field as `SPTSConfig(...)` and `options=` raise (argparse would turn a
    ValueError from a `type=` function into a message without it, so call this after parsing)."""
    import json

    from spts_compile.config import SPTSConfig

    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"spts: --options is not JSON: {e}") from None
    if not isinstance(opts, dict):
        raise ValueError(f"spts: --options must be a JSON object of options, got {type(opts).__name__}")
    SPTSConfig(**opts)
    return opts


# -- configurations --------------------------------------------------------------------------------------

class CountingBackend:
    """Calls a registered torch.compile backend by name, timing and counting each graph it compiles."""

    def __init__(self, name: str, options: dict | None):
        from torch._dynamo.backends.registry import lookup_backend

        self.name, self.options = name, options
        self.fn = lookup_backend(name)
        self.calls: list[dict] = []

    def __call__(self, gm, example_inputs):
        t0 = time.perf_counter()
        if self.options is not None:
            out = self.fn(gm, example_inputs, options=self.options)
        else:
            out = self.fn(gm, example_inputs)
        call = {"seconds": time.perf_counter() - t0, "plan": None}
        if self.name == "spts":
            try:
                import spts_compile

                plan = spts_compile.last_plan() if hasattr(spts_compile, "last_plan") else None
                if plan is not None and (not self.calls or plan.get("graph") not in
                                         [c["plan"].get("graph") for c in self.calls if c["plan"]]):
                    call["plan"] = plan
            except Exception as e:  # the plan is a report, never a reason to fail a run
                call["plan_error"] = repr(e)
        self.calls.append(call)
        return out

    @property
    def prefill_plan(self) -> dict | None:
        """The plan of the most recent prefill graph compiled through this backend."""
        for c in reversed(self.calls):
            p = c.get("plan")
            if p and p.get("kind") == "prefill":
                return p
        return None


@dataclass
class Variant:
    name: str
    backend: str | None                 # None: eager Hugging Face
    options: dict | None = None
    group: str = "main"                 # "main" | "baseline" | "sweep"
    label: str = ""
    model: Any = None
    counter: CountingBackend | None = None
    first_call_seconds: float | None = None

    def describe(self) -> dict:
        return {"backend": self.backend or "eager", "options": _jsonable(self.options), "group": self.group,
                "label": self.label or self.name}

    @property
    def graphs(self) -> int:
        return len(self.counter.calls) if self.counter else 0

    @property
    def backend_seconds(self) -> float:
        return sum(c["seconds"] for c in self.counter.calls) if self.counter else 0.0


def make_variant(base_model, variant: Variant, dynamic: bool | None = None, tag: str | None = None) -> Variant:
    """A shallow copy of the model (weights shared) with its own compiled forward.

    Each configuration compiles its own entry function (a fresh code object). Dynamo keeps its
    automatic-dynamic state per code object: had every configuration compiled `LlamaForCausalLM.forward`
    itself, the second configuration's first graph would already be compiled with dynamic shapes (a
    "recompile" of the first one's), unlike what a user who compiles one model sees. A new `tag` gives the
    same configuration a fresh entry again (the main job does so per prompt length)."""
    m = copy.copy(base_model)
    if variant.backend is not None:
        variant.counter = CountingBackend(variant.backend, variant.options)
        m.forward = torch.compile(own_entry(type(m).forward.__get__(m), tag or variant.name), backend=variant.counter,
                                  dynamic=dynamic)
    variant.model = m
    return variant


def fx_cache_counts() -> dict:
    """This process's Inductor FX graph cache hits, misses and bypasses so far."""
    from torch._dynamo.utils import counters
    return {k: counters["inductor"][f"fxgraph_cache_{k}"] for k in ("hit", "miss", "bypass")}


def own_entry(fn, tag: str):
    """`fn` behind a function with a code object of its own (same signature, for `generate`'s inspection)."""
    namespace = {"fn": fn}
    exec(compile("def entry(*args, **kwargs):\n    return fn(*args, **kwargs)\n", f"<entry {tag}>", "exec"), namespace)
    return functools.wraps(fn)(namespace["entry"])


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return repr(x)


# -- one instrumented generate call ----------------------------------------------------------------------

class StepClock(LogitsProcessor):
    """Stamps the clock at each generation step; at the first step also reads the KV cache's size."""

    def __init__(self, cache: DynamicCache):
        self.cache = cache
        self.times: list[float] = []
        self.kv_bytes: int | None = None
        self.kv_tokens: list[int] | None = None

    def __call__(self, input_ids, scores):
        if scores.is_cuda:  # the logits of this step must exist before the clock is read
            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        if len(self.times) == 1:
            self.kv_bytes, self.kv_tokens = cache_size(self.cache)
        return scores


def cache_size(cache) -> tuple[int, list[int]]:
    """(bytes of keys + values over all layers, tokens held per layer)."""
    total, tokens = 0, []
    for layer in getattr(cache, "layers", []):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or not isinstance(k, torch.Tensor):
            tokens.append(0)
            continue
        total += k.numel() * k.element_size() + v.numel() * v.element_size()
        tokens.append(int(k.shape[-2]))
    return total, tokens


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every few ms)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.proc = psutil.Process()
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


@dataclass
class CallResult:
    ttft: float                          # seconds to the first new token (the prefill)
    step_times: list[float]              # seconds from the start to each new token
    total: float                         # seconds for the whole generate call
    new_tokens: list[int]
    kv_bytes: int | None
    kv_tokens: list[int] | None
    first_logits: torch.Tensor | None    # [vocab] fp32, raw
    peak_rss: int
    peak_rss_delta: int
    extra: dict = field(default_factory=dict)

    def e2e(self, n: int) -> float | None:
        """Seconds for prefill + n new tokens (None if fewer were generated)."""
        return self.step_times[n - 1] if len(self.step_times) >= n else None


@torch.no_grad()
def generate_once(model, input_ids: torch.Tensor, max_new_tokens: int, *, fixed_length: bool,
                  pad_token_id: int | None, keep_logits: bool = True) -> CallResult:
    """One greedy generate. `fixed_length`: exactly `max_new_tokens` tokens (EOS suppressed), for timing."""
    cache = DynamicCache(config=model.config)
    clock = StepClock(cache)
    kwargs = dict(attention_mask=torch.ones_like(input_ids), do_sample=False,
                  max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([clock]),
                  return_dict_in_generate=True, output_logits=keep_logits, pad_token_id=pad_token_id,
                  temperature=None, top_p=None, top_k=None)
    kwargs[_cache_kwarg()] = cache
    if fixed_length:
        kwargs["min_new_tokens"] = max_new_tokens
    cuda = input_ids.is_cuda
    if cuda:
        torch.cuda.synchronize(input_ids.device)
        torch.cuda.reset_peak_memory_stats(input_ids.device)
        base = torch.cuda.memory_allocated(input_ids.device)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = model.generate(input_ids, **kwargs)
        if cuda:
            torch.cuda.synchronize(input_ids.device)
        total = time.perf_counter() - t0
    n = input_ids.shape[1]
    first = out.logits[0][0].float().clone() if keep_logits and out.logits else None
    steps = [t - t0 for t in clock.times]
    extra = {}
    if cuda:
        peak = torch.cuda.max_memory_allocated(input_ids.device)
        extra = {"cuda_peak_bytes": peak, "cuda_peak_delta_bytes": peak - base}
    return CallResult(ttft=steps[0], step_times=steps, total=total, new_tokens=out.sequences[0, n:].tolist(),
                      kv_bytes=clock.kv_bytes, kv_tokens=clock.kv_tokens, first_logits=first.cpu() if first is not None else None,
                      peak_rss=mem.peak, peak_rss_delta=mem.peak - mem.start, extra=extra)


@dataclass
class BatchResult:
    ttft: float                          # seconds to the first new token of every row (the prefill)
    step_times: list[float]              # seconds from the start to each step
    total: float
    tokens: list[list[int]]              # per row, the new tokens
    kv_bytes: int | None
    kv_tokens: list[int] | None
    peak_rss: int
    peak_rss_delta: int


@torch.no_grad()
def generate_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int, *,
                   pad_token_id: int | None) -> BatchResult:
    """One greedy generate of a (left-padded) batch: exactly `new_tokens` per row (EOS suppressed)."""
    cache = DynamicCache(config=model.config)
    clock = StepClock(cache)
    kwargs = dict(attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, logits_processor=LogitsProcessorList([clock]),
                  return_dict_in_generate=True, pad_token_id=pad_token_id, temperature=None, top_p=None, top_k=None)
    kwargs[_cache_kwarg()] = cache
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = model.generate(input_ids, **kwargs)
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        total = time.perf_counter() - t0
    n = input_ids.shape[1]
    return BatchResult(ttft=clock.times[0] - t0, step_times=[t - t0 for t in clock.times], total=total,
                       tokens=out.sequences[:, n:].tolist(), kv_bytes=clock.kv_bytes, kv_tokens=clock.kv_tokens,
                       peak_rss=mem.peak, peak_rss_delta=mem.peak - mem.start)


@functools.lru_cache(maxsize=1)
def _cache_kwarg(_model_type=None) -> str:
    """Newer transformers 5.x name the cache argument of `generate` `cache` and deprecate `past_key_values`;
    older 5.x releases only know `past_key_values`. Read which from the installed source, once."""
    import inspect

    from transformers.generation import utils as gen_utils

    try:
        src = inspect.getsource(gen_utils)
    except OSError:
        return "past_key_values"
    return "cache" if re.search(r'deprecate_kwarg\("past_key_values",[^)]*new_name="cache"\)\s*(@[^\n]*\s*)*def generate', src) \
        else "past_key_values"


# -- statistics and fidelity -----------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "n": 0, "all": []}
    if len(v) >= 2:
        q = statistics.quantiles(v, n=4, method="inclusive")
        q1, q3 = q[0], q[2]
    else:
        q1 = q3 = v[0]
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q1, "q3": q3, "n": len(v),
            "all": [round(x, 4) for x in values if x is not None]}


def logit_fidelity(dense_logits: torch.Tensor, other_logits: torch.Tensor) -> dict:
    """KL(dense || other) of one next-token distribution (in float64), and whether the argmax agrees."""
    p = torch.log_softmax(dense_logits.double(), -1)
    q = torch.log_softmax(other_logits.double(), -1)
    return {"kl": float((p.exp() * (p - q)).sum()), "top1_agree": bool(dense_logits.argmax() == other_logits.argmax())}


def fidelity(dense: CallResult, other: CallResult, horizon: int = 32) -> dict:
    """KL(dense || other) of the last prompt token's next-token distribution, top-1 agreement, and the
    greedy continuations' token match over `horizon` tokens (fraction equal position by position, and
    the length of the common prefix)."""
    out: dict = {}
    if dense.first_logits is not None and other.first_logits is not None:
        out.update(logit_fidelity(dense.first_logits, other.first_logits))
    a, b = dense.new_tokens[:horizon], other.new_tokens[:horizon]
    h = min(len(a), len(b))
    if h:
        out["cont_match"] = sum(x == y for x, y in zip(a, b)) / h
        prefix = 0
        while prefix < h and a[prefix] == b[prefix]:
            prefix += 1
        out["cont_prefix"] = prefix
        out["cont_horizon"] = h
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval of a proportion k/n (95% for z = 1.96); (None, None) for n = 0."""
    import math

    if n <= 0:
        return None, None
    p = k / n
    den = 1 + z * z / n
    center = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, center - half), min(1.0, center + half)


def proportion(k: int, n: int) -> dict:
    """k of n, the fraction and its 95% Wilson interval, as one JSON-ready dict."""
    lo, hi = wilson(k, n)
    return {"correct": k, "n": n, "accuracy": (k / n) if n else None,
            "wilson95": [round(lo, 4), round(hi, 4)] if n else None}


def ids_hash(input_ids: torch.Tensor) -> str:
    """A short content hash of a prompt's token ids (for caches keyed by prompt)."""
    import hashlib

    return hashlib.sha1(input_ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]
