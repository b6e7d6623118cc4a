"""The PAP / LTP / MSDP prefill rewrite against the independent eager reference (tests/reference.py).

Every check compares the compiled `spts` graph with something computed another way: the reference's
logits, hidden states, KV cache and kept positions; the graph's own hidden states (skipped rows must be
bit-for-bit identity); dense Inductor (when nothing can be skipped); the plan's KV-token counts.

Compiles dominate the run time (~10-25 s per graph on 2 cores), so each (model, options, input shape)
is compiled once, statically, and run once; the tests then read that one run (`Harness.run`). Only the
dynamic-shape tests compile symbolic graphs. Inductor compiles the reference cases that cover each family,
attention, selector and KV policy at least once; the others check what is kept and computed through the
rewritten graph itself (`compiler="eager"`, the same passes without code generation), which is what they are
about, at a few seconds per case instead of a minute.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import spts_compile
from spts_compile import runtime as rt
from spts_compile.config import SPTSConfig, budget_tokens
from spts_compile.passes.plan import ltp_dims
from tests.reference import build_proxies, last_positions, reference_prefill, select_top
from tests.tiny_models import make_inputs, make_model

torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)

ATOL = 1e-4     # compiled SPTS vs the eager reference (fp32)
DENSE_ATOL = 1e-5  # SPTS that cannot skip anything vs dense Inductor
DEPTH = 4
PAD = [0, 5]    # left padding of the two rows of a padded batch

FULL = dict(start_layer=1, stage_ends=[1, 2], budgets=[16, 12], prune=4, min_tokens=1, record_selection=True,
            selector="probe")
CONFIGS = {
    "int": FULL,                                                       # PAP + LTP + MSDP, token budgets
    "frac": dict(FULL, budgets=[0.5, 0.375], prune=0.125),             # budgets as fractions of N
    "pap": dict(FULL, ltp=False, msdp=False),                          # PAP only
    "ltp": dict(FULL, pap=False, msdp=False),                          # LTP only (its own score)
    "nomsdp": dict(FULL, msdp=False),                                  # PAP + LTP, no stages / pruning
    "once": dict(FULL, selector="once"),                               # prune-once mode
    "stage": dict(FULL, selector="stage"),                             # keep-set, re-probed per stage
    # retrieval protection (SEMANTICS.md): smoothing, forced sink/window tokens, head aggregation, KV policy
    "guard": dict(FULL, pool=3, pool_kind="max", sink=2, window=4, heads="kv_union", kv_cache="candidates"),
    "guard_avg": dict(FULL, pool=5, pool_kind="avg", sink=1, window=3, heads="max"),
    "once_guard": dict(FULL, selector="once", pool=3, sink=2, window=4, heads="kv_union"),
}


def schedule_of(cfg: str):
    return SPTSConfig(**CONFIGS[cfg]).resolve(DEPTH)


# Model variants for the identity tests: a skipping layer whose other block contributes exactly zero, so
# that the layer's output differs from its input in exactly the rows the tested block made active.
def _zero_ffn(model):
    for layer in model.model.layers[FULL["start_layer"]:]:
        layer.mlp.down_proj.weight.data.zero_()


def _zero_attn(model):
    for layer in model.model.layers[FULL["start_layer"]:]:
        layer.self_attn.o_proj.weight.data.zero_()
        if layer.self_attn.o_proj.bias is not None:
            layer.self_attn.o_proj.bias.data.zero_()


VARIANTS = {None: None, "zero_ffn": _zero_ffn, "zero_attn": _zero_attn}


def inputs(kind: str, n: int):
    """(input_ids, attention_mask, use_cache). A padded batch cannot keep a compacted cache (the backend
    refuses it), so the padded cases run with use_cache=False and the cached ones on an unpadded batch."""
    if kind == "pad":
        ids, am = make_inputs(2, n, left_pad=PAD, seed=n)
        return ids, am, False
    if kind == "cache":
        ids, am = make_inputs(2, n, seed=n)
        return ids, am, True
    if kind == "nopad":
        ids, am = make_inputs(2, n, seed=n)
        return ids, am, False
    raise ValueError(kind)


@dataclass(frozen=True)
class Case:
    family: str
    attn: str
    cfg: str
    kind: str
    n: int
    variant: str | None = None
    hidden: bool = False  # output_hidden_states
    compiler: str = "inductor"   # the spts option: "eager" runs the rewritten graph without Inductor

    @property
    def id(self) -> str:
        return "-".join(str(x) for x in (self.family, self.attn, self.cfg, self.kind, self.n,
                                         self.variant or "", "hs" if self.hidden else "",
                                         "" if self.compiler == "inductor" else self.compiler) if x != "")


@dataclass
class Run:
    case: Case
    out: object
    ref: dict
    selection: list | None
    plan: dict
    ids: torch.Tensor
    am: torch.Tensor
    last: list[int]


class Harness:
    """Models, compiled functions and runs, each made once per module."""

    def __init__(self):
        self.models, self.compiled, self.runs, self.dense = {}, {}, {}, {}

    def model(self, family, attn="sdpa", variant=None):
        key = (family, attn, variant)
        if key not in self.models:
            m = make_model(family, attn=attn, layers=DEPTH)
            if VARIANTS[variant] is not None:
                VARIANTS[variant](m)
            self.models[key] = m
        return self.models[key]

    def spts(self, model, options: dict, key):
        """A static compile of model.forward with the spts backend, counting the backend calls."""
        if key not in self.compiled:
            calls = []

            def backend(gm, example_inputs):
                calls.append(gm)
                return spts_compile.spts_backend(gm, example_inputs, options=options)
            self.compiled[key] = (torch.compile(model.forward, backend=backend, dynamic=False), calls)
        return self.compiled[key]

    def run(self, case: Case) -> Run:
        if case in self.runs:
            return self.runs[case]
        model = self.model(case.family, case.attn, case.variant)
        fn, calls = self.spts(model, dict(CONFIGS[case.cfg], compiler=case.compiler),
                              (case.family, case.attn, case.variant, case.cfg, case.compiler))
        ids, am, use_cache = inputs(case.kind, case.n)
        before = len(calls)
        with torch.no_grad():
            out = fn(ids, attention_mask=am, use_cache=use_cache, output_hidden_states=case.hidden)
        # A new static shape must have compiled a new graph, so last_plan() describes this very graph.
        # (output_hidden_states=True makes Dynamo break the graph before lm_head: two calls then.)
        assert len(calls) == before + 1 + case.hidden, f"{case.id}: {len(calls) - before} backend calls"
        plan = spts_compile.last_plan()
        selection = spts_compile.recorded_selection()
        sched = schedule_of(case.cfg)
        channels, rank = ltp_dims(sched, model.config.intermediate_size, model.config.hidden_size)
        ref = reference_prefill(model, ids, am, schedule=sched, proxies=build_proxies(model, channels, rank),
                                output_hidden_states=case.hidden, selector=CONFIGS[case.cfg].get("selector", "probe"))
        r = Run(case, out, ref, selection, plan, ids, am, last_positions(am, ids.shape[0], ids.shape[1]))
        self.runs[case] = r
        return r

    def inductor(self, family, attn, key, call):
        """Dense Inductor result of call(compiled_forward), once per key."""
        if (family, attn, key) not in self.dense:
            model = self.model(family, attn)
            fn = torch.compile(model.forward, backend="inductor", dynamic=False)
            with torch.no_grad():
                self.dense[family, attn, key] = call(fn)
        return self.dense[family, attn, key]


@pytest.fixture(scope="module")
def h():
    return Harness()


def assert_real_close(got, want, am, atol=ATOL, what=""):
    """Compare [B, N, ...] tensors at each row's real (unpadded) positions; the last real row first."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    for b in range(got.shape[0]):
        real = am[b].bool()
        last = int(real.nonzero()[-1])
        torch.testing.assert_close(got[b, last], want[b, last], atol=atol, rtol=1e-5,
                                   msg=lambda m: f"{what} row {b} last real position {last}: {m}")
        torch.testing.assert_close(got[b, real], want[b, real], atol=atol, rtol=1e-5,
                                   msg=lambda m: f"{what} row {b} real positions: {m}")


def cache_layers(out):
    cache = out.past_key_values
    assert cache is not None, "use_cache=True returned no cache"
    return [(layer.keys, layer.values) for layer in cache.layers]


def records(run: Run, block: str) -> dict[int, torch.Tensor]:
    assert run.selection is not None, "record_selection=True recorded nothing"
    return {r["layer"]: r["active"] for r in run.selection if r["block"] == block}


# ---------------------------------------------------------------------------------------------
# Reference equivalence: logits, kept positions, KV cache
# ---------------------------------------------------------------------------------------------
# Through Inductor: PAP + LTP + MSDP on a padded batch, LTP alone, the default selector with a
# cache, the retrieval guards with the "candidates" KV policy (Qwen2: biases). The rest with
# compiler="eager" (E).
E = "eager"
REF_CASES = [
    Case("llama", "sdpa", "int", "pad", 24),
    Case("llama", "sdpa", "int", "cache", 40, compiler=E),
    Case("llama", "sdpa", "frac", "pad", 40, compiler=E),
    Case("llama", "sdpa", "ltp", "pad", 24),
    Case("llama", "sdpa", "nomsdp", "cache", 24, compiler=E),
    Case("qwen2", "sdpa", "int", "pad", 40, compiler=E),
    Case("qwen2", "sdpa", "frac", "cache", 24, compiler=E),
    Case("qwen2", "sdpa", "pap", "pad", 24, compiler=E),
    Case("qwen2", "sdpa", "ltp", "pad", 24, compiler=E),
    Case("llama", "eager", "int", "pad", 40, compiler=E),   # eager attention through Inductor: test_support_matrix
    Case("llama", "sdpa", "once", "pad", 40, compiler=E),
    Case("qwen2", "sdpa", "once", "cache", 40, compiler=E),
    Case("llama", "sdpa", "stage", "cache", 40),
    Case("llama", "sdpa", "guard", "pad", 40, compiler=E),
    Case("qwen2", "sdpa", "guard", "cache", 40),
    Case("qwen2", "eager", "guard_avg", "pad", 40, compiler=E),
    Case("llama", "sdpa", "once_guard", "cache", 40, compiler=E),
]
CACHE_CASES = [c for c in REF_CASES if c.kind == "cache"]
SINK_CASE = Case("llama", "sdpa", "guard", "pad", 40, compiler=E)
assert SINK_CASE in REF_CASES


def _group(case: Case):
    """The xdist group of the tests that read one case's run (`--dist loadgroup`): they run on one worker, so the
    case compiles (Inductor for some) and its reference runs once, not once on each worker."""
    return pytest.mark.xdist_group(f"rewrite-{case.id}")


def by_case(cases):
    return [pytest.param(c, id=c.id, marks=_group(c)) for c in cases]


@pytest.mark.parametrize("case", by_case(REF_CASES))
def test_logits_match_reference(h, case):
    r = h.run(case)
    assert r.plan["kind"] == "prefill" and r.plan["rewritten_layers"] == [1, 2, 3], r.plan["reason"]
    assert r.out.logits.shape == (r.ids.shape[0], case.n, h.model(case.family).config.vocab_size)
    assert_real_close(r.out.logits, r.ref["logits"], r.am, what="logits")


@pytest.mark.parametrize("case", by_case(REF_CASES))
def test_kept_positions_match_reference(h, case):
    r = h.run(case)
    sched = schedule_of(case.cfg)
    attn, ffn = records(r, "attn"), records(r, "ffn")
    skipping = list(range(sched.start_layer, DEPTH))
    assert sorted(attn) == skipping
    assert sorted(ffn) == (skipping if sched.ltp else [])
    for block, rec in (("attn", attn), ("ffn", ffn)):
        for layer, active in rec.items():
            want = r.ref["kept"][layer][block]
            assert torch.equal(active.long(), want.long()), f"layer {layer} {block}: {active.tolist()} != {want.tolist()}"
            for b, last in enumerate(r.last):
                row = active[b]
                assert last in row.tolist(), f"layer {layer} {block} row {b}: last real token {last} not kept"
                assert bool((row[1:] > row[:-1]).all()), f"layer {layer} {block} row {b}: not sorted"
            if block == "attn" and sched.pap:
                m = max(1, min(budget_tokens(sched.budgets[sched.stage_of(layer) if sched.msdp else 0], case.n),
                               r.ref["kept"][layer]["cand"].shape[1]))
                assert active.shape[1] == m


@_group(SINK_CASE)
def test_sink_and_window_tokens_are_active_in_every_skipping_layer(h):
    """With sink=2, window=4: each row's first two and last four real tokens are in every attention and FFN
    active set (they count against the budget), and no stage end prunes them."""
    r = h.run(SINK_CASE)
    for block in ("attn", "ffn"):
        for layer, active in records(r, block).items():
            for b in range(2):
                real = r.am[b].nonzero().flatten().tolist()
                forced = set(real[:2]) | set(real[-4:])
                assert forced <= set(active[b].tolist()), (block, layer, b)
                assert active.shape[1] == max(1, min(FULL["budgets"][min(layer - 1, 1)], 40))


@pytest.mark.parametrize("case", by_case(CACHE_CASES))
def test_kv_cache_lengths_match_reference_and_plan(h, case):
    r = h.run(case)
    got = [k.shape[-2] for k, _ in cache_layers(r.out)]
    want = [k.shape[-2] for k, _ in r.ref["kv"]]
    planned = [int(row["kv_tokens_at_n"]) for row in r.plan["plan"]]
    assert got == want == planned
    assert got[0] == case.n and min(got[1:]) < case.n  # dense layer 0 full, skipping layers compacted


@pytest.mark.parametrize("case", by_case(CACHE_CASES))
def test_kv_cache_contents_match_reference(h, case):
    r = h.run(case)
    for i, ((k, v), (rk, rv)) in enumerate(zip(cache_layers(r.out), r.ref["kv"])):
        torch.testing.assert_close(k, rk, atol=ATOL, rtol=1e-5, msg=lambda m: f"layer {i} keys: {m}")
        torch.testing.assert_close(v, rv, atol=ATOL, rtol=1e-5, msg=lambda m: f"layer {i} values: {m}")


@_group(REF_CASES[0])
def test_no_cache_when_use_cache_is_false(h):
    r = h.run(REF_CASES[0])
    assert r.out.past_key_values is None


# ---------------------------------------------------------------------------------------------
# Hidden states: full length, equal to the reference, and skipped rows are identity
# ---------------------------------------------------------------------------------------------
def changed_rows(before: torch.Tensor, after: torch.Tensor) -> list[set[int]]:
    """Per batch row, the positions whose hidden state differs at all (bit-for-bit comparison)."""
    diff = (before != after).any(dim=-1)
    return [set(torch.nonzero(d).flatten().tolist()) for d in diff]


HS_CASE = Case("llama", "sdpa", "int", "pad", 24, hidden=True, compiler="eager")   # which outputs, not codegen


@_group(HS_CASE)
def test_hidden_states_are_full_length_and_match_reference(h):
    r = h.run(HS_CASE)
    hs, want = r.out.hidden_states, r.ref["hidden_states"]
    assert len(hs) == DEPTH + 1
    for i, (got, ref) in enumerate(zip(hs, want)):
        assert got.shape == (2, HS_CASE.n, 64)
        assert_real_close(got, ref, r.am, what=f"hidden_states[{i}]")
    assert_real_close(r.out.logits, r.ref["logits"], r.am, what="logits")


@_group(HS_CASE)
def test_rows_outside_the_active_sets_are_unchanged(h):
    """With PAP, LTP and MSDP on: a token neither block made active in a layer (a skipped candidate, or a
    token pruned earlier) leaves the layer bit-for-bit as it entered; the active ones change."""
    r = h.run(HS_CASE)
    hs = r.out.hidden_states
    attn, ffn = records(r, "attn"), records(r, "ffn")
    assert changed_rows(hs[0], hs[1]) == [set(range(HS_CASE.n))] * 2  # the dense layer changes every row
    for layer in range(FULL["start_layer"], DEPTH - 1):  # the last entry of hidden_states is after the norm
        got = changed_rows(hs[layer], hs[layer + 1])
        for b in range(2):
            active = set(attn[layer][b].tolist()) | set(ffn[layer][b].tolist())
            assert got[b] == active, f"layer {layer} row {b}: changed {sorted(got[b])} != active {sorted(active)}"
            assert len(active) < HS_CASE.n


@pytest.mark.parametrize("case", [Case("llama", "sdpa", "pap", "pad", 24, "zero_ffn", True),
                                  Case("qwen2", "sdpa", "ltp", "nopad", 24, "zero_attn", True)],
                         ids=["pap-only", "ltp-only"])
def test_exactly_budget_rows_change_when_one_block_skips(h, case):
    """Only one of PAP or LTP on, and the other block of each skipping layer contributes zero: exactly M
    rows of the layer's output differ from its input, they are the recorded active rows, and every
    other row is bit-for-bit the input. (LTP-only runs unpadded: with padding, padding tokens compete for
    the FFN budget; see test_padded_row_equals_the_row_alone.)"""
    r = h.run(case)
    block = "attn" if case.cfg == "pap" else "ffn"
    rec = records(r, block)
    m = FULL["budgets"][0]
    hs = r.out.hidden_states
    for layer in range(FULL["start_layer"], DEPTH - 1):
        got = changed_rows(hs[layer], hs[layer + 1])
        for b in range(2):
            assert len(got[b]) == m, f"layer {layer} row {b}: {len(got[b])} rows changed, budget {m}"
            assert got[b] == set(rec[layer][b].tolist())
    assert torch.equal(rec[1].long(), r.ref["kept"][1][block].long())
    for i, (got, ref) in enumerate(zip(hs, r.ref["hidden_states"])):
        assert_real_close(got, ref, r.am, what=f"hidden_states[{i}]")


# ---------------------------------------------------------------------------------------------
# The runtime helpers the rewrite calls
# ---------------------------------------------------------------------------------------------
def test_scatter_add_rows_leaves_other_rows_bit_identical():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 8, generator=g)
    idx = torch.tensor([[0, 3, 9], [2, 4, 5]])
    delta = torch.randn(2, 3, 8, generator=g)
    y = rt.scatter_add_rows(x, idx, delta)
    for b in range(2):
        for p in range(10):
            if p in idx[b].tolist():
                j = idx[b].tolist().index(p)
                torch.testing.assert_close(y[b, p], x[b, p] + delta[b, j], atol=0, rtol=0)
            else:
                assert torch.equal(y[b, p], x[b, p])
    assert torch.equal(x, rt.scatter_add_rows(x, idx, torch.zeros_like(delta)))


@pytest.mark.parametrize("budget,n", [(4, 10), (100, 10), (0.5, 11), (0.01, 10)])
def test_select_active_matches_reference_selection(budget, n):
    """Budget arithmetic (M = max(1, min(budget tokens, C))), the forced last token, sorted order and the
    tie rule, against the reference's select_top, including exact ties (masked keys score 0)."""
    g = torch.Generator().manual_seed(n)
    scores = torch.rand(3, n, generator=g)
    scores[1, : n // 2] = 0.0               # ties, as padding keys give
    scores[2] = 0.25                        # all tied
    last = torch.tensor([n - 1, n - 3, 2])
    act = rt.select_active(scores, last, budget, torch.zeros(1, n))
    m = max(1, min(budget_tokens(budget, n), n))
    assert act.shape == (3, m)
    for b in range(3):
        assert torch.equal(act[b], select_top(scores[b], m, int(last[b])))
        assert int(last[b]) in act[b].tolist()


def test_prune_keep_never_removes_the_last_token():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.0, 0.6]])
    keep = rt.prune_keep(scores, torch.tensor([3]), 2, torch.zeros(1, 5), None)
    assert keep.tolist() == [[0, 1, 3]]
    keep = rt.prune_keep(scores, torch.tensor([3]), 100, torch.zeros(1, 5), None)  # P = min(P, C - 1)
    assert keep.tolist() == [[3]]


# ---------------------------------------------------------------------------------------------
# Nothing to skip => dense Inductor
# ---------------------------------------------------------------------------------------------
OFF = dict(pap=False, ltp=False, msdp=False, min_tokens=1)
# budgets >= N: the rewrite runs and keeps every row (uncompiled: the other cases and REF_CASES run Inductor)
BIG = dict(start_layer=1, stage_ends=[1, 2], budgets=[1000, 1.0], prune=0, min_tokens=1, compiler="eager")
MIN_TOKENS = dict(FULL, min_tokens=1000, record_selection=False)                          # prompt too short

# (family, attn, use_cache, with attention_mask, batch): each value of each factor appears twice.
DENSE_CASES = [
    ("llama", "sdpa", True, True, 2),
    ("llama", "eager", False, False, 1),
    ("qwen2", "sdpa", False, False, 2),
    ("qwen2", "eager", True, True, 1),
]
DENSE_RUNS = [(*c, "off") for c in DENSE_CASES] + [
    ("qwen2", "sdpa", False, False, 2, "big"),
    ("qwen2", "eager", True, True, 1, "big"),
    ("llama", "eager", False, False, 1, "min_tokens"),
]
DENSE_OPTIONS = {"off": OFF, "big": BIG, "min_tokens": MIN_TOKENS}


def _dense_call(use_cache, with_mask, batch, n=24):
    ids, am = make_inputs(batch, n, left_pad=[0, 5][:batch] if with_mask and batch > 1 else None, seed=7)
    kwargs = dict(attention_mask=am) if with_mask else {}

    def call(fn):
        out = fn(ids, use_cache=use_cache, **kwargs)
        kv = [(l.keys.clone(), l.values.clone()) for l in out.past_key_values.layers] if use_cache else None
        return out.logits.clone(), kv
    return call, am


@pytest.mark.parametrize("family,attn,use_cache,with_mask,batch,opts", DENSE_RUNS,
                         ids=[f"{f}-{a}-{'cache' if c else 'nocache'}-{'mask' if m else 'nomask'}-b{b}-{o}"
                              for f, a, c, m, b, o in DENSE_RUNS])
def test_nothing_to_skip_equals_dense_inductor(h, family, attn, use_cache, with_mask, batch, opts):
    call, am = _dense_call(use_cache, with_mask, batch)
    want_logits, want_kv = h.inductor(family, attn, (use_cache, with_mask, batch), call)
    fn = torch.compile(h.model(family, attn).forward, backend="spts", options=DENSE_OPTIONS[opts], dynamic=False)
    with torch.no_grad():
        logits, kv = call(fn)
    plan = spts_compile.last_plan()
    if opts == "big":  # the rewrite really ran, with every budget >= N and nothing pruned
        assert plan["rewritten_layers"] == [1, 2, 3], plan["reason"]
    else:
        assert plan is None or plan["rewritten_layers"] == []
    mask = am if with_mask else torch.ones(batch, 24)
    assert_real_close(logits, want_logits, mask, atol=DENSE_ATOL, what="logits")
    if use_cache:
        assert [k.shape for k, _ in kv] == [k.shape for k, _ in want_kv]
        for (k, v), (wk, wv) in zip(kv, want_kv):
            for b in range(batch):
                real = mask[b].bool()
                torch.testing.assert_close(k[b][:, real], wk[b][:, real], atol=DENSE_ATOL, rtol=1e-5)
                torch.testing.assert_close(v[b][:, real], wv[b][:, real], atol=DENSE_ATOL, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Dynamic shapes: one graph for every later prompt length
# ---------------------------------------------------------------------------------------------
DYN_OPTS = dict(start_layer=1, stage_ends=[1, 2], budgets=[16, 0.375], prune=0.125, min_tokens=1, selector="probe")


def _counting_compile(model, options, **kw):
    calls = []

    def backend(gm, example_inputs):
        calls.append(gm)
        return spts_compile.spts_backend(gm, example_inputs, options=options)
    return torch.compile(model.forward, backend=backend, **kw), calls


def _run_lengths(model, fn, calls, lengths, mark: bool, options=DYN_OPTS) -> list[int]:
    """Run every length, check it against the reference; return the backend-call count after each."""
    sched = SPTSConfig(**options).resolve(DEPTH)
    proxies = build_proxies(model, *ltp_dims(sched, model.config.intermediate_size, model.config.hidden_size))
    counts = []
    for n in lengths:
        ids, am = make_inputs(2, n, left_pad=[0, 3], seed=100 + n)
        if mark:
            torch._dynamo.mark_dynamic(ids, 1)
            torch._dynamo.mark_dynamic(am, 1)
        with torch.no_grad():
            out = fn(ids, attention_mask=am, use_cache=False)
        counts.append(len(calls))
        ref = reference_prefill(model, ids, am, schedule=sched, proxies=proxies,
                                selector=options.get("selector", SPTSConfig().selector))
        assert_real_close(out.logits, ref["logits"], am, what=f"logits at N={n}")
        assert spts_compile.last_plan()["rewritten_layers"] == [1, 2, 3]
    assert spts_compile.last_plan()["seq_len_symbolic"] is True
    return counts


def test_new_lengths_recompile_at_most_once(h):
    """Without marking: the first length compiles a static graph, the second Dynamo's dynamic one, and
    no later length compiles again. Recompiles are Dynamo's (its guards on the rewritten graph's inputs), so
    the rewritten graph runs without Inductor here; Inductor on symbolic lengths is the next test's."""
    torch._dynamo.reset()  # Dynamo's automatic-dynamic memory of earlier lengths is per code object
    model = h.model("llama")
    opts = dict(DYN_OPTS, compiler="eager")
    fn, calls = _counting_compile(model, opts)
    lengths = [24, 40, 33, 57, 20]
    counts = _run_lengths(model, fn, calls, lengths, mark=False, options=opts)
    assert counts == [1, 2, 2, 2, 2], list(zip(lengths, counts))


def test_mark_dynamic_compiles_one_graph_for_all_lengths(h):
    """mark_dynamic on the sequence dim of input_ids and attention_mask, through Inductor, with the default
    `stage` selector and fractional budgets and prune: one backend call serves every length. The selector
    smooths its scores with a max-pool over the candidates, and the pool must keep the candidate count
    symbolic (F.max_pool1d's shape check guarded on it, so every new length recompiled under Inductor, while
    the FX graph alone kept the symbol). An int budget adds a regime where it exceeds the prompt or, with a
    keep-set selector, a later stage's fractional budget (runtime.size_min guards on which side wins): one
    more graph for the lengths on the other side (SEMANTICS.md, dynamic lengths)."""
    torch._dynamo.reset()
    model = h.model("qwen2")
    opts = dict(DYN_OPTS, budgets=[0.5, 0.375], selector="stage", pool=5, pool_kind="max")
    fn, calls = _counting_compile(model, opts)
    lengths = [24, 57, 33, 17, 10, 9]
    counts = _run_lengths(model, fn, calls, lengths, mark=True, options=opts)
    assert counts == [1] * len(lengths), list(zip(lengths, counts))


# ---------------------------------------------------------------------------------------------
# Batches: a padded row's answer must not depend on its padding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", ["nomsdp", "ltp", "int", "stage"])
def test_padded_row_equals_the_row_alone(h, cfg):
    """Issue 4 item 5: with left padding, a row's answer equals running that row alone (int budgets, so
    M does not depend on N). RoPE is relative, so the shifted positions do not matter. Padding must
    neither take FFN budget (LTP-only scores every candidate by its proxy norm) nor count towards a
    stage's prune (padding scores 0 and would be pruned instead of real tokens), nor take a keep-set
    selector's budget (stage's 25-token max-pool lifts the padding next to a high-scoring token)."""
    model = h.model("llama")
    # what is kept, not code generation (the padded batch through Inductor: REF_CASES): eager saves CI time
    opts = dict(CONFIGS[cfg], record_selection=False, compiler="eager")
    fn = torch.compile(model.forward, backend="spts", options=opts, dynamic=False)
    pad = 5
    ids, am = make_inputs(2, 24, left_pad=[0, pad], seed=11)
    with torch.no_grad():
        both = fn(ids, attention_mask=am, use_cache=False).logits
        alone = fn(ids[1:, pad:], attention_mask=am[1:, pad:], use_cache=False).logits
    torch.testing.assert_close(both[1, pad:], alone[0], atol=ATOL, rtol=1e-5,
                               msg=lambda m: f"{cfg}: padded row vs the row alone: {m}")
