"""Choose a preset: accuracy and planned cost of candidate schedules on a real model, without Inductor.

    python -m benchmarks.tune                          # the candidate grid below, SmolLM2, 8K
    python -m benchmarks.tune --configs preset wide --length 4096 --out results/tune.json
    python -m benchmarks.tune --suite smollm2 --length 4096 --configs preset sel_once   # the accuracy suite

With `--suite` (a name from `benchmarks.accuracy.SUITES`) the run is `benchmarks.accuracy`'s: the suite's
tasks with `--per-task` samples each, 95% Wilson intervals, cached dense answers, fidelity on `--texts`
texts (default 8 there) with 32-token greedy match, written after every candidate.

Each candidate is the `spts` backend with `compiler="eager"`: the same rewritten graph that Inductor
would compile, run as an FX graph, so a candidate costs a trace and a few forwards instead of minutes
of code generation. Speed is represented by the plan's FLOP ratio (the benchmark measured 96-107% of the
planned speed-up on this CPU, see README); `benchmarks.run` then measures the chosen preset for real.

Per candidate: last-token KL / top-1 agreement / 16-token greedy match against dense (eager HF) on
natural texts, exact-match accuracy on needle tasks, and the plan's FLOP and KV ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from . import data as D  # noqa: E402
from .harness import Variant, fidelity, generate_once, make_variant, setup_process  # noqa: E402
from .models import calibration_for, load_model  # noqa: E402
from spts_compile import selectors  # noqa: E402

# Candidate schedules (options for the backend; unset fields come from the preset for the model's depth).
# Layer indices are written for SmolLM2's 30 layers. "CALIBRATION" stands for the cached pydoc calibration.
# The default preset for 30 layers is `preset`: selector stage, start 12, ends 15/19/23/27, budgets
# 0.25/0.125/0.09375/0.0625 of N (until session 5: selector probe and 0.375/0.25/0.1875/0.125, which `X` scales);
# `early` is the paper's Llama schedule scaled by depth alone (the first generic preset).
EARLY = dict(start_layer=9, stage_ends=[12, 16, 21, 26])
X = lambda f: dict(budgets=[0.375 * f, 0.25 * f, 0.1875 * f, 0.125 * f])  # noqa: E731
CAL = dict(calibration="CALIBRATION")
CANDIDATES: dict[str, dict] = {
    "preset": {},
    "cal": dict(CAL),
    "x1.5_cal": dict(CAL, **X(1.5)),
    "early": dict(EARLY),
    "early_cal": dict(EARLY, **CAL),
    "early_no_prune": dict(EARLY, prune=0),
    "early_pap_only": dict(EARLY, ltp=False),
    "early_ltp_only": dict(EARLY, pap=False),
    "early_x1.25_cal": dict(EARLY, **CAL, **X(1.25)),
    "early_x1.5_cal": dict(EARLY, **CAL, **X(1.5)),
    "early_x2": dict(EARLY, **X(2)),
    "early_x2_cal": dict(EARLY, **CAL, **X(2)),
    "early_cal_rank": dict(EARLY, **CAL, ltp_channels=512, ltp_rank=128),
    "early_2stage_cal": dict(CAL, start_layer=9, stage_ends=[14, 22], budgets=[0.4375, 0.21875], prune=0.0625),
    "start6_wide": dict(start_layer=6, stage_ends=[10, 15, 20, 25], budgets=[0.5, 0.375, 0.25, 0.1875]),
    # the same budgets as `preset`, other selection rules (issue 5's baselines)
    **{f"sel_{k}": dict(selector=k) for k in selectors.baselines()},
    # keep-set modes on the faster early schedule, and wider probes (the last q tokens' queries)
    "once_early": dict(EARLY, selector="once"),
    "stage_early": dict(EARLY, selector="stage"),
    "pq16": dict(probe_queries=16),
    "pq64": dict(probe_queries=64),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | gemma3 | qwen05 | a local model folder or .gguf")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--configs", nargs="*", default=list(CANDIDATES), help=f"from {list(CANDIDATES)} (none: only --set ones)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=JSON",
                   help='an extra candidate, e.g. --set \'wide={"budgets": [0.6, 0.5, 0.4, 0.3]}\'')
    p.add_argument("--texts", type=int, default=3, help="natural texts for KL / top-1 / greedy match")
    p.add_argument("--tasks", nargs="*", default=["niah_single", "niah_multikey", "passkey", "hard_needle"],
                   choices=D.ALL_TASKS, help="accuracy tasks (none: fidelity only)")
    p.add_argument("--suite", default=None,
                   help="run benchmarks.accuracy on this named suite (SUITES there) instead of the sweep below")
    p.add_argument("--per-task", type=int, default=None, help="with --suite: samples per task (default there: 24 in all)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/tune.json")
    a = p.parse_args(argv)
    unknown = [c for c in a.configs if c not in CANDIDATES]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CANDIDATES)} or add one with --set")
    a.extra = {}
    for item in a.set:
        name, _, js = item.partition("=")
        try:
            a.extra[name] = json.loads(js)
        except json.JSONDecodeError as e:
            p.error(f"--set {item!r}: {e}")
    return a


def suite_argv(args) -> list[str]:
    """The `benchmarks.accuracy` command line of a `--suite` run: the suite's own model and length unless
    --model / --length are given."""
    given = set(a.split("=")[0] for a in (sys.argv[1:] if args.argv is None else args.argv))
    argv = ["--suite", args.suite, "--threads", str(args.threads), "--configs", *args.configs]
    for flag, value in (("--model", args.model), ("--length", args.length), ("--texts", args.texts),
                        ("--per-task", args.per_task), ("--out", args.out)):
        if flag in given:
            argv += [flag, str(value)]
    for item in args.set:
        argv += ["--set", item]
    return argv


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = argv
    if args.suite:
        from . import accuracy

        return accuracy.main(suite_argv(args))
    setup_process(args.threads)
    import spts_compile
    from .run import prompt_tokens

    model, tok = load_model(args.model)
    args.new_tokens = [16, 64]
    n_tok = prompt_tokens(args.length, model, args)
    log(f"{args.model}: {model.config.num_hidden_layers} layers, {n_tok} tokens, threads {torch.get_num_threads()}")
    texts = D.fidelity_texts(tok, n_tok, count=args.texts, seed=7)
    samples = D.build_suite(tok, [n_tok], depths=tuple(args.depths), tasks=tuple(args.tasks)) if args.tasks else []
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": {"model": args.model, "n_tokens": n_tok, "threads": torch.get_num_threads(),
                       "texts": args.texts, "samples": len(samples), "tasks": args.tasks, "depths": args.depths},
              "dense": {}, "candidates": {}}

    # Dense runs are cached beside the output (keyed by model, text and sample), so a rerun with other
    # candidates, or a subset of the samples, does not repeat them.
    cache_path = out_path.with_suffix(".dense.pt")
    cache = torch.load(cache_path, weights_only=False) if cache_path.exists() else {}
    key = lambda kind, what: (args.model, n_tok, kind, what)  # noqa: E731
    dense_texts = []
    for i, (kind, ids) in enumerate(texts):
        k = key("text", (kind, i, tuple(ids[0, :8].tolist())))
        if k not in cache:
            cache[k] = generate_once(model, ids, 16, fixed_length=True, pad_token_id=tok.pad_token_id)
            torch.save(cache, cache_path)
        dense_texts.append(cache[k])
    dense_scores = []
    for s in samples:
        k = key("sample", json.dumps(s.describe(), sort_keys=True, default=str))
        if k not in cache:
            r = generate_once(model, s.input_ids, s.max_new_tokens, fixed_length=False,
                              pad_token_id=tok.pad_token_id, keep_logits=False)
            cache[k] = s.score(tok.decode(r.new_tokens, skip_special_tokens=True))
            torch.save(cache, cache_path)
        dense_scores.append(cache[k])
    result["dense"] = {"accuracy": sum(dense_scores) / len(dense_scores) if samples else None,
                       "scores": dense_scores, "samples": [s.describe() for s in samples]}
    log(f"dense (eager HF): {len(texts)} texts, {len(samples)} samples, accuracy {result['dense']['accuracy']}")

    configs = {c: CANDIDATES[c] for c in args.configs} | args.extra
    if out_path.exists():  # keep earlier candidates of the same setting
        old = json.loads(out_path.read_text())
        if old.get("meta") == result["meta"]:
            result["candidates"] = old.get("candidates", {})
    for name, opts in configs.items():
        opts = dict(opts)
        if opts.get("calibration") == "CALIBRATION":
            opts["calibration"] = calibration_for(model, tok, args.model)
        t0 = time.perf_counter()
        m = make_variant(model, Variant(name, "spts", dict(min_tokens=256, compiler="eager", **opts))).model
        fid = []
        for (_, ids), dense in zip(texts, dense_texts):
            fid.append(fidelity(dense, generate_once(m, ids, 16, fixed_length=True, pad_token_id=tok.pad_token_id)))
        plan = spts_compile.last_plan() or {}
        scores = []
        for s in samples:
            r = generate_once(m, s.input_ids, s.max_new_tokens, fixed_length=False, pad_token_id=tok.pad_token_id,
                              keep_logits=False)
            scores.append(s.score(tok.decode(r.new_tokens, skip_special_tokens=True)))
        row = {
            "options": {k: (v if k != "calibration" else "pydoc, 64x512 tokens") for k, v in opts.items()},
            "flop_ratio": plan.get("flop_ratio"), "kv_ratio": plan.get("kv_ratio"),
            "schedule": plan.get("schedule"),
            "kl": [f.get("kl") for f in fid], "kl_mean": sum(f["kl"] for f in fid) / len(fid),
            "top1": sum(f["top1_agree"] for f in fid) / len(fid),
            "cont_match": sum(f["cont_match"] for f in fid) / len(fid),
            "accuracy": sum(scores) / len(scores) if scores else None, "scores": scores, "seconds": time.perf_counter() - t0,
        }
        result["candidates"][name] = row
        out_path.write_text(json.dumps(result, indent=1, default=str))
        log(f"{name:12s} FLOP {row['flop_ratio']:.3f} KV {row['kv_ratio']:.3f}  KL {row['kl_mean']:.3f} "
            f"{[round(k, 3) for k in row['kl']]}  top1 {row['top1']:.2f}  match16 {row['cont_match']:.2f}  "
            f"acc {row['accuracy']} (dense {result['dense']['accuracy']})  {row['seconds']:.0f}s")
        torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
