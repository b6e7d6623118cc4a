"""The planning pass on its own: gating, the first skipping layer, candidates, budgets, prunes, KV tokens
and FLOPs per layer, against counts worked out here from the schedule and the model's shapes."""
from __future__ import annotations

import sympy

from spts_compile import selectors
from spts_compile.config import SPTSConfig
from spts_compile.passes import locate
from spts_compile.passes import plan as planning
from spts_compile.passes.plan import N
from tests.tiny_models import capture_graph, make_inputs, make_model

OPTS = dict(start_layer=1, stage_ends=[1, 2], budgets=[16, 12], prune=4, min_tokens=1, selector="probe")


def analysis_of(family="llama", n=40, use_cache=False, layers=4):
    model = make_model(family, layers=layers)
    ids, _ = make_inputs(1, n)
    gm, _ = capture_graph(model.forward, ids, use_cache=use_cache)
    a = locate.analyse(gm)
    for l in a.layers:
        l.verified = True
    return model, a


def at(expr, n):
    return int(sympy.sympify(expr).subs(N, n))


def test_candidates_budgets_prunes_and_kv_of_spts():
    _, a = analysis_of()
    sched = SPTSConfig(**OPTS).resolve(4)
    plan = planning.make_plan(a, sched, 1, selectors.get("probe"))
    rows = [(lp.mode, at(lp.candidates, 40), at(lp.active, 40), lp.prune, at(lp.kv_tokens, 40)) for lp in plan.layers]
    # layer 1 ends stage 0 (prune 4), layer 2 ends stage 1 (prune 4), layer 3 keeps the last stage's budget
    assert rows == [("dense", 40, 40, None, 40), ("skip", 40, 16, 4, 16), ("skip", 36, 12, 4, 12),
                    ("skip", 32, 12, None, 12)]
    # short prompts: the budget is min(budget, candidates), and a prune never takes the last candidate
    assert [at(lp.active, 10) for lp in plan.skipping] == [10, 6, 2]


def test_keep_set_candidates_shrink_to_each_budget_and_never_prune():
    _, a = analysis_of()
    plan = planning.make_plan(a, SPTSConfig(**OPTS).resolve(4), 1, selectors.get("once"))
    assert [(at(lp.candidates, 40), at(lp.active, 40), lp.prune) for lp in plan.skipping] == [
        (40, 16, None), (16, 12, None), (12, 12, None)]


def test_dense_flops_are_the_layers_matmuls():
    model, a = analysis_of()
    c = model.config
    d, q, kv, i = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
    plan = planning.make_plan(a, SPTSConfig(**OPTS).resolve(4), None, selectors.get("probe"))
    n = 40
    per_layer = 2 * n * d * (q + 2 * kv) + 2 * q * n * n + 2 * n * q * d + 3 * 2 * n * d * i
    assert all(at(lp.flops_dense, n) == at(lp.flops_planned, n) == per_layer for lp in plan.layers)
    assert all(lp.mode == "dense" and lp.note for lp in plan.layers[1:])


def test_fractional_budgets_are_integer_arithmetic_on_n():
    _, a = analysis_of()
    plan = planning.make_plan(a, SPTSConfig(**dict(OPTS, budgets=[0.5, 0.375])).resolve(4), 1, selectors.get("probe"))
    assert sympy.sympify(plan.layers[1].active) == sympy.Min(sympy.floor(N / 2), N)
    assert [at(lp.active, 41) for lp in plan.skipping] == [20, 15, 15]


def test_gate():
    _, a = analysis_of()
    sched = SPTSConfig(**OPTS).resolve(4)
    assert planning.gate(a, sched, SPTSConfig(**OPTS)).skipping
    off = SPTSConfig(**dict(OPTS, pap=False, ltp=False, msdp=False))
    assert not planning.gate(a, off.resolve(4), off).skipping
    short = SPTSConfig(**dict(OPTS, min_tokens=100))
    g = planning.gate(a, short.resolve(4), short)
    assert not g.skipping and "min_tokens=100" in g.reason
    _, windowed = analysis_of("mistral", use_cache=True)   # a sliding-window cache keeps its newest kept rows
    assert planning.gate(windowed, sched, SPTSConfig(**OPTS)).skipping


def test_first_skipping_layer_needs_every_later_layer_verified():
    _, a = analysis_of()
    assert planning.first_skipping_layer(a, 1) == 1
    a.layers[1].verified = False
    assert planning.first_skipping_layer(a, 1) == 2
    a.layers[3].verified = False
    assert planning.first_skipping_layer(a, 1) is None


def test_layers_to_verify():
    _, a = analysis_of()
    sched = SPTSConfig(**OPTS).resolve(4)
    assert [l.index for l in planning.layers_to_verify(a, sched, True, lambda l: False)] == [1, 2, 3]
    assert [l.index for l in planning.layers_to_verify(a, sched, False, lambda l: l.index == 0)] == [0]
