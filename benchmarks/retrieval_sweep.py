"""A quick needle sweep of the retrieval options (issue 12), with compiler="eager".

    python -m benchmarks.retrieval_sweep --model qwen05 --length 4096 --configs preset stage stage_guard
    python -m benchmarks.retrieval_sweep --model smollm2 --length 4096 --multikey 3

Samples: niah_single at depths 0.2 / 0.35 / 0.5 / 0.65 / 0.8 and `--multikey` niah_multikey samples (seed 1).
Dense (eager HF) runs once and is kept in the output JSON; each configuration reports its answers, the
last-token KL against dense per prompt, and the plan's FLOP and KV ratios. The output is rewritten after
every configuration. `benchmarks.accuracy` is the suite with more samples and intervals; this is the
small first look that chose what to try there.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from . import data as D  # noqa: E402
from .harness import Variant, generate_once, logit_fidelity, make_variant, setup_process  # noqa: E402

GUARD = dict(pool=7, pool_kind="max", sink=4, window=64, heads="kv_union")
CONFIGS = {
    "preset": {},
    "guard": GUARD,
    "guard_kvc": dict(GUARD, kv_cache="candidates"),
    "stage": dict(selector="stage"),
    "stage_window": dict(selector="stage", sink=4, window=64),
    "stage_guard": dict(GUARD, selector="stage"),
    "once_guard": dict(GUARD, selector="once"),
    "window_pool": dict(sink=4, window=64, pool=7, pool_kind="max"),
    "kvc": dict(kv_cache="candidates"),
    "stage_question": dict(selector="stage", probe_queries=48, heads="max"),
    "stage_x2": dict(selector="stage", budgets=[0.75, 0.5, 0.375, 0.25]),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieval_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--multikey", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/retrieval_sweep.json")
    args = p.parse_args(argv)
    setup_process(args.threads)
    import spts_compile
    from spts_compile.models import load_model

    model, tok = load_model(args.model)
    samples = [D.niah_single(tok, args.length, d, index=i, seed=1) for i, d in enumerate([0.2, 0.35, 0.5, 0.65, 0.8])]
    samples += [D.niah_multikey(tok, args.length, index=i, seed=1) for i in range(args.multikey)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(out.read_text()) if out.exists() else {}
    if res.get("meta", {}).get("samples") != [s.describe() for s in samples]:
        res = {"meta": {"model": args.model, "length": args.length, "threads": torch.get_num_threads(),
                        "samples": [s.describe() for s in samples]}, "dense": None, "configs": {}}
    if res["dense"] is None:
        t = time.time()
        res["dense"] = []
        for s in samples:
            r = generate_once(model, s.input_ids, s.max_new_tokens, fixed_length=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(r.new_tokens, skip_special_tokens=True)
            res["dense"].append({"score": s.score(text), "text": text, "logits": r.first_logits.tolist()})
        out.write_text(json.dumps(res))
        print(f"dense {[d['score'] for d in res['dense']]} {time.time() - t:.0f}s", flush=True)
    for name in args.configs:
        t = time.time()
        m = make_variant(model, Variant(name, "spts", dict(min_tokens=256, compiler="eager", **CONFIGS[name]))).model
        scores, kls, texts = [], [], []
        for s, d in zip(samples, res["dense"]):
            r = generate_once(m, s.input_ids, s.max_new_tokens, fixed_length=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(r.new_tokens, skip_special_tokens=True)
            scores.append(s.score(text))
            texts.append(text)
            kls.append(logit_fidelity(torch.tensor(d["logits"]), r.first_logits)["kl"])
        plan = spts_compile.last_plan() or {}
        res["configs"][name] = {"options": CONFIGS[name], "scores": scores, "kl": kls, "outputs": texts,
                                "flop_ratio": plan.get("flop_ratio"), "kv_ratio": plan.get("kv_ratio"),
                                "seconds": time.time() - t}
        out.write_text(json.dumps(res))
        med = sorted(kls)[len(kls) // 2]
        print(f"{name:12s} right {sum(scores):.0f}/{len(scores)} {scores}  KL median {med:.3f}  "
              f"FLOP {plan.get('flop_ratio', float('nan')):.3f}  KV {plan.get('kv_ratio', float('nan')):.3f}  "
              f"{time.time() - t:.0f}s", flush=True)
        torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
