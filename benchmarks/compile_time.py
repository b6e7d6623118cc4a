"""Compile time: spts against dense Inductor, cold and warm processes, and one dynamic graph over many lengths.

    python -m benchmarks.compile_time                      # SmolLM2 at 8K, 2 threads
    python -m benchmarks.compile_time --length 4096 --dynamic-lengths 1536:4096:10

Every measurement runs in a child process of its own, so nothing compiled stays in memory between them:
- **cold**: a fresh, empty `TORCHINDUCTOR_CACHE_DIR`;
- **warm**: a second process on the cache folder the cold one filled (what a user's next process sees).

A child loads the model, makes one prefill call (`use_cache=False`) that compiles, then `--steady` more
calls; compile seconds = first call - median steady call. The warm child's last logits must equal the
cold child's (a cache hit that changed the answer would be a bug, not a speed-up). The dynamic child
compiles spts with `dynamic=True` at the first length and calls every other length once: the graphs
compiled after the first call are the recompiles. Writes a JSON file (`--out`) and prints a table of
ratios. Issue 15's targets: spts cold <= 1.5x Inductor cold, warm <= 25% of cold, <= 1 recompile.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the child: one process, one configuration -----------------------------------------------------------

def child(args) -> dict:
    import torch

    from . import data as D
    from .harness import Variant, fx_cache_counts, make_variant, spts_options
    from .models import load_model

    torch.set_num_threads(args.threads)
    import spts_compile  # noqa: F401  registers the backend
    from torch._dynamo.utils import counters

    model, tok = load_model(args.model)
    lengths = [int(x) for x in args.child_lengths.split(",")]
    backend = "inductor" if args.config == "inductor" else "spts"
    options = None if backend == "inductor" else dict(min_tokens=256, **spts_options(args.options or "{}"))
    v = make_variant(model, Variant(args.config, backend, options), dynamic=True if args.dynamic else None)
    texts = {n: D.fidelity_texts(tok, n, count=1, seed=11)[0][1] for n in lengths}

    def call(ids):
        with torch.no_grad():
            t = time.perf_counter()
            out = v.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            return time.perf_counter() - t, out.logits[0, -1].float()

    first, logits = call(texts[lengths[0]])
    graphs_first = v.graphs
    steady = [call(texts[lengths[0]])[0] for _ in range(args.steady)]
    others = {n: call(texts[n])[0] for n in lengths[1:]}
    plan = v.counter.prefill_plan if backend == "spts" else None
    return {
        "config": args.config, "options": options, "dynamic": bool(args.dynamic), "lengths": lengths,
        "threads": torch.get_num_threads(), "first_call_seconds": first, "steady_seconds": steady,
        "compile_seconds": first - statistics.median(steady), "backend_seconds": v.backend_seconds,
        "graphs_first_call": graphs_first, "graphs_total": v.graphs,
        "recompiles": v.graphs - graphs_first, "other_lengths_seconds": others,
        "fx_cache": fx_cache_counts(),
        "aot_cache": {k: counters["aot_autograd"][f"autograd_cache_{k}"] for k in ("hit", "miss", "bypass")},
        "plan": {k: (plan or {}).get(k) for k in ("flop_ratio", "kv_ratio", "kernels", "inductor_cache",
                                                   "verify_seconds", "inductor_seconds", "compile_seconds")},
        "logits": logits.tolist(), "loadavg": os.getloadavg(),
    }


def run_child(args, config: str, options: str | None, lengths: list[int], cache_dir: str,
              dynamic: bool = False) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.compile_time", "--child", "--config", config,
           "--model", args.model, "--threads", str(args.threads), "--steady", str(args.steady),
           "--child-lengths", ",".join(map(str, lengths))]
    if options:
        cmd += ["--options", options]
    if dynamic:
        cmd.append("--dynamic")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child {config} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t
    return out


def parse_lengths(text: str) -> list[int]:
    """'lo:hi:count' (evenly spaced, inclusive) or 'a,b,c'."""
    if ":" in text:
        lo, hi, count = (int(x) for x in text.split(":"))
        if count < 2 or hi <= lo:
            raise ValueError(f"--dynamic-lengths {text!r}: give lo:hi:count with hi > lo and count >= 2")
        return [lo + (hi - lo) * i // (count - 1) for i in range(count)]
    return [int(x) for x in text.split(",")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_time", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steady", type=int, default=2, help="steady calls after the first, per child")
    p.add_argument("--options", default=None, help="spts options as JSON (default: the backend's defaults)")
    p.add_argument("--dynamic-lengths", default="1536:4096:10",
                   help="lengths for the dynamic child, lo:hi:count or a,b,c; 'none' to skip it")
    p.add_argument("--inline", action="store_true",
                   help="also a cold spts child with share_layers=False (every skipping layer inline)")
    p.add_argument("--out", default="results/compile-time.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-lengths", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dynamic", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args), default=str))
        return 0
    dyn = None if args.dynamic_lengths == "none" else parse_lengths(args.dynamic_lengths)
    result = {"meta": {"model": args.model, "length": args.length, "threads": args.threads,
                       "steady": args.steady, "options": args.options, "loadavg_start": os.getloadavg()}}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="spts-compile-time-") as root:
        for config in ("inductor", "spts"):
            cache = os.path.join(root, config)
            for phase in ("cold", "warm"):
                r = run_child(args, config, args.options if config == "spts" else None, [args.length], cache)
                runs[f"{config}/{phase}"] = r
                log(f"{config:8s} {phase}: first call {r['first_call_seconds']:.1f}s, compile "
                    f"{r['compile_seconds']:.1f}s, FX cache {r['fx_cache']}, AOT cache {r['aot_cache']}")
            same = runs[f"{config}/cold"]["logits"] == runs[f"{config}/warm"]["logits"]
            result[f"{config}_warm_logits_equal_cold"] = same
            if not same:
                log(f"WARNING: {config}: the warm process's logits differ from the cold one's")
        if args.inline:   # the same spts options with every layer inline (share_layers=False), cold only
            inline = json.dumps(dict(json.loads(args.options or "{}"), share_layers=False))
            r = run_child(args, "spts-inline", inline, [args.length], os.path.join(root, "inline"))
            runs["spts-inline/cold"] = r
            log(f"spts-inline cold: first call {r['first_call_seconds']:.1f}s, compile {r['compile_seconds']:.1f}s, "
                f"kernels {r['plan'].get('kernels')}")
        if dyn:
            r = run_child(args, "spts", args.options, dyn, os.path.join(root, "dynamic"), dynamic=True)
            runs["spts/dynamic"] = r
            log(f"spts dynamic over {len(dyn)} lengths {dyn[0]}..{dyn[-1]}: {r['graphs_first_call']} graph(s) at "
                f"the first call, {r['recompiles']} recompile(s) after it; first call {r['first_call_seconds']:.1f}s")
    for r in runs.values():
        r.pop("logits", None)
    c = {k: r["compile_seconds"] for k, r in runs.items()}
    result["runs"] = runs
    result["ratios"] = {
        "spts_cold_over_inductor_cold": c["spts/cold"] / c["inductor/cold"],
        "spts_warm_over_spts_cold": c["spts/warm"] / c["spts/cold"],
        "inductor_warm_over_inductor_cold": c["inductor/warm"] / c["inductor/cold"],
        "spts_steady_over_inductor_steady": (statistics.median(runs["spts/cold"]["steady_seconds"])
                                             / statistics.median(runs["inductor/cold"]["steady_seconds"])),
    }
    if args.inline:
        result["ratios"]["spts_inline_cold_over_inductor_cold"] = c["spts-inline/cold"] / c["inductor/cold"]
        result["ratios"]["spts_steady_over_spts_inline_steady"] = (
            statistics.median(runs["spts/cold"]["steady_seconds"])
            / statistics.median(runs["spts-inline/cold"]["steady_seconds"]))
    if dyn:
        result["dynamic"] = {"lengths": dyn, "recompiles": runs["spts/dynamic"]["recompiles"],
                             "graphs_total": runs["spts/dynamic"]["graphs_total"]}
    result["meta"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    ra = result["ratios"]
    print(f"\n{args.model} at {args.length} tokens, {args.threads} threads (compile = first call - median steady call)")
    print("| config | cold compile s | warm compile s | warm / cold | kernels |")
    print("|---|---|---|---|---|")
    for config in ("inductor", "spts"):
        cold, warm = runs[f"{config}/cold"], runs[f"{config}/warm"]
        print(f"| {config} | {cold['compile_seconds']:.1f} | {warm['compile_seconds']:.1f} | "
              f"{warm['compile_seconds'] / cold['compile_seconds']:.2f} | {cold['plan'].get('kernels') or '-'} |")
    print(f"spts cold / Inductor cold: {ra['spts_cold_over_inductor_cold']:.2f} (target <= 1.5); "
          f"spts warm / cold: {ra['spts_warm_over_spts_cold']:.2f} (target <= 0.25)")
    if args.inline:
        r = runs["spts-inline/cold"]
        print(f"| spts, share_layers=False | {r['compile_seconds']:.1f} | - | - | {r['plan'].get('kernels') or '-'} |")
    if dyn:
        print(f"dynamic: {len(dyn)} lengths, {result['dynamic']['recompiles']} recompile(s) after the first (target <= 1)")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
