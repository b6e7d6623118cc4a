"""Every family x attention implementation x use_cache, against the eager reference.

Each case records what happened (rewritten / dense / fail) into `results/support/<transformers version>.json`
(or $SPTS_SUPPORT_DIR); `python -m benchmarks.support_matrix` turns those files into the README's table.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers

import spts_compile
from reference import build_proxies, reference_prefill, sliding_window
from spts_compile.config import SPTSConfig
from spts_compile.passes.plan import ltp_dims
from tiny_models import SLIDING, family_names, make_inputs, make_model

FAMILIES = family_names()
# Sliding-window caches are compacted too (the newest kept rows): on transformers 5 every case is rewritten. On 4.x
# the sliding-window cache's layout is not asserted (a layer the backend cannot match there runs dense).
UNASSERTED = set(SLIDING) if int(transformers.__version__.split(".")[0]) < 5 else set()
OPTS = dict(start_layer=1, stage_ends=[1], budgets=[10], prune=3, min_tokens=1, selector="probe")
RESULTS: dict[str, dict] = {}
# One xdist worker runs every case (`--dist loadgroup`), so the results file it writes at the end holds them all.
pytestmark = pytest.mark.xdist_group("support_matrix")


def _cache_of(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    folder = Path(os.environ.get("SPTS_SUPPORT_DIR", Path(__file__).resolve().parent.parent / "results" / "support"))
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": RESULTS}
    (folder / f"transformers-{transformers.__version__}.json").write_text(json.dumps(payload, indent=2))


@pytest.mark.parametrize("use_cache", [False, True], ids=["nocache", "cache"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family(family, attn, use_cache):
    key = f"{family}|{attn}|{'cache' if use_cache else 'nocache'}"
    RESULTS[key] = {"outcome": "fail"}
    model = make_model(family, attn=attn, layers=2)
    ids, am = make_inputs(2, 20, left_pad=[0, 3]) if not use_cache else make_inputs(1, 20)
    schedule = SPTSConfig(**OPTS).resolve(2)
    channels, rank = ltp_dims(schedule, model.config.intermediate_size, model.config.hidden_size)
    torch._dynamo.reset()
    f = torch.compile(model.forward, backend="spts", options=OPTS)
    with torch.no_grad():
        out = f(ids, attention_mask=am, use_cache=use_cache)
        summary = spts_compile.last_plan()
        rewritten = bool(summary and summary["rewritten_layers"])
        if rewritten:
            want = reference_prefill(model, ids, am, schedule=schedule, proxies=build_proxies(model, channels, rank))
        else:
            want = {"logits": model(ids, attention_mask=am, use_cache=use_cache).logits}
    real = am.bool()
    torch.testing.assert_close(out.logits[real], want["logits"][real], atol=1e-4, rtol=1e-4)
    if rewritten and use_cache:
        lengths = [l.keys.shape[-2] for l in _cache_of(out).layers]
        windows = [sliding_window(model.config, i) for i in range(len(lengths))]   # a window keeps its newest
        assert lengths == [k.shape[-2] if w is None else min(k.shape[-2], w - 1) for (k, _), w in zip(want["kv"], windows)]
    RESULTS[key] = {"outcome": "rewritten" if rewritten else "dense",
                    "reason": None if rewritten else (summary or {}).get("reason")}
    if not (use_cache and family in UNASSERTED):
        assert rewritten, summary and summary.get("reason")
