"""Planned FLOPs against measured prefill time, on one random-init Llama (issue 3, item 6).

    python -m benchmarks.skip_speed [--tokens 4096] [--threads 2] [--reps 3]

The model: hidden 1024, 8 layers, 16 heads, 4 KV heads, fp32. Configurations, interleaved in one process
after warm-up: the same spts graph dense (skipping off) and SPTS at several budgets in the second half of
the layers. Reports, for each, the planned FLOP ratio, the measured time ratio, and measured speedup as a
fraction of the planned one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate
from transformers import LlamaConfig, LlamaForCausalLM

import spts_compile


def make_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="results/skip_speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads: {torch.get_num_threads()}  tokens: {args.tokens}")
    model = make_model()
    ids = torch.randint(0, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    # Skip in the second half (layers 4..7): half the tokens, a quarter, an eighth. One stage, no pruning,
    # so the planned ratio is the per-layer skipping alone.
    configs = {"dense": dict(pap=False, ltp=False, msdp=False)}
    for frac in (0.5, 0.25, 0.125):
        configs[f"skip {frac:g}"] = dict(start_layer=4, stage_ends=[7], budgets=[frac], prune=0, min_tokens=1)
    fns, plans = {}, {}
    for name, opts in configs.items():
        torch._dynamo.reset()
        f = torch.compile(model.forward, backend="spts", options=opts)
        t0 = time.perf_counter()
        with torch.no_grad():
            f(ids, use_cache=False)
        print(f"compiled {name} in {time.perf_counter() - t0:.0f} s")
        fns[name], plans[name] = f, spts_compile.last_plan()
    times = {name: [] for name in fns}
    with torch.no_grad():
        for name, f in fns.items():  # warm-up
            f(ids, use_cache=False)
        for _ in range(args.reps):
            for name, f in fns.items():  # interleaved
                t0 = time.perf_counter()
                f(ids, use_cache=False)
                times[name].append(time.perf_counter() - t0)
    dense_t = statistics.median(times["dense"])
    rows = []
    for name in fns:
        t = statistics.median(times[name])
        planned = plans[name].get("flop_ratio") or 1.0
        rows.append({"config": name, "median_s": round(t, 3), "min_s": round(min(times[name]), 3),
                     "max_s": round(max(times[name]), 3), "planned_flop_ratio": round(planned, 3),
                     "speedup": round(dense_t / t, 3),
                     "speedup_over_planned": round((dense_t / t) / (1 / planned), 3)})
    print(tabulate(rows, headers="keys"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "tokens": args.tokens, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
