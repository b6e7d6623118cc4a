"""Prefill only (`use_cache=False`): dense Inductor against spts on any model, speed and fidelity.

    python -m benchmarks.prefill --model gemma3 --length 4096
    python -m benchmarks.prefill --model /path/to/hf-folder --length 8192 --reps 3
    python -m benchmarks.prefill --length 8192 --set 'paper={"selector": "probe"}'   # more spts configs

For models whose KV cache SPTS cannot compact (sliding-window layers: Mistral, Gemma 3), a prefill that
keeps a cache runs dense by design; without a cache the rewrite applies, and this is how to measure it.
One process, both configurations compiled statically at one length, then timed round-robin after a
warm-up (medians of `--reps`). Fidelity: last-token KL / top-1 against dense Inductor on `--texts`
natural texts of the same length. Writes a JSON file (`--out`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from . import data as D  # noqa: E402
from .harness import Variant, logit_fidelity, make_variant, spts_options  # noqa: E402
from .models import calibration_for, load_model  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefill", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | gemma3 | qwen05 | a local model folder or .gguf")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--texts", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibrate", action="store_true", help="calibrated LTP ranking (default: from the weights)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=JSON",
                   help="one more spts configuration (options as JSON), timed in the same round-robin")
    p.add_argument("--out", default="results/prefill.json")
    args = p.parse_args(argv)
    extra = {}
    for item in args.set:
        name, _, text = item.partition("=")
        if not name or name in ("inductor", "spts") or name in extra:
            p.error(f"--set {item!r}: give NAME=JSON with a new NAME (not inductor or spts)")
        extra[name] = spts_options(text)
    torch.set_num_threads(args.threads)
    import spts_compile

    model, tok = load_model(args.model)
    log(f"{args.model}: {type(model).__name__}, {model.config.num_hidden_layers} layers, "
        f"threads {torch.get_num_threads()}, N={args.length}")
    opts = dict(min_tokens=256)
    if args.calibrate:
        opts["calibration"] = calibration_for(model, tok, args.model)
    variants = [Variant("inductor", "inductor"), Variant("spts", "spts", opts)]
    variants += [Variant(name, "spts", dict(opts, **o)) for name, o in extra.items()]
    runs = {v.name: make_variant(model, v).model for v in variants}
    spts_names = [v.name for v in variants if v.backend == "spts"]
    texts = D.fidelity_texts(tok, args.length, count=max(args.texts, 1), seed=11)

    def call(name, ids):
        with torch.no_grad():
            t = time.perf_counter()
            out = runs[name](input_ids=ids, use_cache=False, logits_to_keep=1)
            return time.perf_counter() - t, out.logits[0, -1]

    result = {"meta": {"model": args.model, "model_class": type(model).__name__, "length": args.length,
                       "threads": torch.get_num_threads(), "reps": args.reps, "torch": torch.__version__,
                       "transformers": __import__("transformers").__version__,
                       "ltp_calibration": repr(opts.get("calibration")), "loadavg_start": os.getloadavg()}}
    first = {}
    plans = {}
    for name in runs:
        first[name], _ = call(name, texts[0][1])
        if name in spts_names:
            plans[name] = spts_compile.last_plan()
        log(f"{name}: first call (compile) {first[name]:.1f}s")
    plan = plans["spts"]
    times = {n: [] for n in runs}
    for rep in range(args.reps):
        for name in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
            times[name].append(call(name, texts[0][1])[0])
        log(f"rep {rep + 1}: " + "  ".join(f"{n} {times[n][-1]:.2f}s" for n in runs))
    fids = {n: [] for n in spts_names}
    for kind, ids in texts[:args.texts]:
        dense = call("inductor", ids)[1]
        for n in spts_names:
            fids[n].append({"text": kind, **logit_fidelity(dense, call(n, ids)[1])})
    fid = fids["spts"]
    med = {n: statistics.median(t) for n, t in times.items()}
    keys = ("kind", "reason", "seq_len", "flop_ratio", "kv_ratio", "rewritten_layers", "schedule", "ltp_mode",
            "verify_seconds", "inductor_seconds", "compile_seconds")
    result.update({
        "first_call_seconds": first, "prefill_s": {n: {"median": med[n], "all": times[n]} for n in runs},
        "speedup_vs_inductor": med["inductor"] / med["spts"],
        "plan": {k: (plan or {}).get(k) for k in keys},
        "fidelity": fid, "kl_mean": sum(f["kl"] for f in fid) / len(fid) if fid else None,
        "top1": sum(f["top1_agree"] for f in fid) / len(fid) if fid else None,
    })
    if extra:
        result["configs"] = {n: {"options": o, "speedup_vs_inductor": med["inductor"] / med[n],
                                 "plan": {k: (plans[n] or {}).get(k) for k in keys}, "fidelity": fids[n],
                                 "kl_mean": sum(f["kl"] for f in fids[n]) / len(fids[n]) if fids[n] else None}
                             for n, o in extra.items()}
        for n, c in result["configs"].items():
            log(f"{n}: prefill x{c['speedup_vs_inductor']:.2f} vs Inductor (planned FLOP ratio "
                f"{c['plan']['flop_ratio']}), KL {c['kl_mean']}")
    result["meta"]["loadavg_end"] = os.getloadavg()
    ratio = (plan or {}).get("flop_ratio")
    if ratio:
        result["fraction_of_planned"] = result["speedup_vs_inductor"] * ratio
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    log(f"prefill x{result['speedup_vs_inductor']:.2f} vs Inductor (planned FLOP ratio {ratio}), "
        f"KL {result['kl_mean']}, top-1 {result['top1']}, rewritten layers {(plan or {}).get('rewritten_layers')}; "
        f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
