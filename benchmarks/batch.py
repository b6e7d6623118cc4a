"""Batch throughput (issue 13 item 4): a batch of prompts of mixed lengths, left-padded to the longest, prefill
plus a fixed number of greedy new tokens, dense Inductor against spts, in one process.

    python -m benchmarks.batch                                  # SmolLM2, 4 prompts of 3584/3840/4096/4352, +32
    python -m benchmarks.batch --lengths 448 480 512 544 --new-tokens 4 --reps 1    # a short check of the path
    python -m benchmarks.run ...                                # the main job runs it too (--batch / --no-batch)

Each row is a different natural text (essays and pydoc topics alternating) of its own length; shorter rows get
left padding (attention_mask 0). Each configuration has its own model object (weights shared) whose `forward`
is compiled with its backend and a fresh entry function, so the batch compiles its own graphs. One warm-up call
per configuration (it compiles the prefill and decode graphs), then `--reps` timed rounds, round-robin, the first
configuration rotating each round. Each call is one `generate` (greedy, EOS suppressed) of exactly `--new-tokens`
tokens per row; a logits processor stamps the clock at each step. The JSON fields: benchmarks/README.md, `batch`.
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
from . import harness as H  # noqa: E402
from . import report as R  # noqa: E402

LENGTHS = [3584, 3840, 4096, 4352]
NEW_TOKENS = 32
REPS = 3
MIN_TOKENS = 256        # as in benchmarks.run: prompts shorter than this run dense
WARM_NEW_TOKENS = 4     # the warm-up compiles the prefill, the first decode step and the dynamic one


def batch_prompts(tok, lengths: list[int], seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, max(lengths)], attention_mask): row b is `lengths[b]` tokens of its own natural text,
    left-padded with the tokenizer's pad id (mask 0)."""
    texts = D.fidelity_texts(tok, max(lengths), count=len(lengths), seed=seed)
    width = max(lengths)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, (n, (_, row)) in enumerate(zip(lengths, texts)):
        ids[b, width - n:] = row[0, :n]
        mask[b, width - n:] = 1
    return ids, mask


def variants(options: dict | None = None, spts_backend: str = "spts", dense_backend: str = "inductor") -> list[H.Variant]:
    """Dense Inductor and spts with the given options (default: none, the project's defaults)."""
    opts = {"min_tokens": MIN_TOKENS, **(options or {})} if spts_backend == "spts" else None
    return [H.Variant("inductor", dense_backend, label="Inductor (dense)"),
            H.Variant("spts", spts_backend, opts, label="spts (default options)" if not options else "spts (options)")]


def match(dense: list[list[int]], other: list[list[int]]) -> dict:
    """Per row: the fraction of positions where `other`'s greedy token equals dense's, and the common prefix."""
    rows = []
    for a, b in zip(dense, other):
        h = min(len(a), len(b))
        prefix = 0
        while prefix < h and a[prefix] == b[prefix]:
            prefix += 1
        rows.append({"match": sum(x == y for x, y in zip(a, b)) / h if h else None, "prefix": prefix, "horizon": h})
    fractions = [r["match"] for r in rows if r["match"] is not None]
    return {"rows": rows, "greedy_match_fraction": sum(fractions) / len(fractions) if fractions else None,
            "rows_equal": sum(r["prefix"] == r["horizon"] for r in rows)}


def run(model, tok, *, lengths=LENGTHS, new_tokens=NEW_TOKENS, reps=REPS, options=None, dynamic=None,
        spts_backend="spts", dense_backend="inductor", log=print, save=lambda part: None) -> dict:
    """The batch measurement on a loaded model. Returns the JSON section (`save(section)` after every step, so an
    interrupted run keeps what it measured)."""
    ids, am = batch_prompts(tok, list(lengths))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    vs = variants(options, spts_backend, dense_backend)
    for v in vs:
        H.make_variant(model, v, dynamic=dynamic, tag=f"{v.name}@batch")
    out = {"lengths": list(lengths), "batch": len(lengths), "padded_to": int(ids.shape[1]),
           "real_tokens": int(am.sum()), "new_tokens": new_tokens, "reps": reps,
           "variants": {v.name: v.describe() for v in vs}, "compile": {}, "raw": [], "configs": {}}
    save(out)
    log(f"batch: {len(lengths)} prompts of {list(lengths)} tokens, padded to {ids.shape[1]}, +{new_tokens} tokens")
    for v in vs:
        graphs, seconds = v.graphs, v.backend_seconds
        t = time.perf_counter()
        H.generate_batch(v.model, ids, am, min(WARM_NEW_TOKENS, new_tokens), pad_token_id=pad)
        wall = time.perf_counter() - t
        out["compile"][v.name] = {"first_call_seconds": wall, "graphs_compiled": v.graphs - graphs,
                                  "backend_seconds": v.backend_seconds - seconds}
        log(f"  batch warm-up {v.name:10s} {wall:7.1f}s  (+{v.graphs - graphs} graphs)")
        save(out)
    runs = {v.name: [] for v in vs}
    for rep in range(reps):
        for v in vs[rep % len(vs):] + vs[:rep % len(vs)]:
            r = H.generate_batch(v.model, ids, am, new_tokens, pad_token_id=pad)
            runs[v.name].append(r)
            out["raw"].append({"rep": rep, "variant": v.name, "prefill_s": r.ttft, "e2e_s": r.step_times[-1]})
            log(f"  batch rep {rep + 1}/{reps} {v.name:10s} prefill {r.ttft:6.2f}s  +{new_tokens}: "
                f"{r.step_times[-1]:6.2f}s  {len(lengths) * new_tokens / r.step_times[-1]:6.1f} tokens/s")
            save(out)
    b = len(lengths)
    for v in vs:
        rs = runs[v.name]
        prefill, e2e = H.spread([r.ttft for r in rs]), H.spread([r.step_times[-1] for r in rs])
        decode = H.spread([r.step_times[-1] - r.ttft for r in rs])
        out["configs"][v.name] = {
            "prefill_s": prefill, "e2e_s": e2e, "decode_s": decode,
            "tokens_per_s": b * new_tokens / e2e["median"],
            "decode_tokens_per_s": b * (new_tokens - 1) / decode["median"] if new_tokens > 1 else None,
            "kv_bytes": rs[0].kv_bytes, "kv_tokens_per_layer": rs[0].kv_tokens,
            "peak_rss_delta_bytes": max(r.peak_rss_delta for r in rs),
            "plan": R.plan_at(v.counter.prefill_plan, int(ids.shape[1])) if v.counter else None,
        }
    d, s = out["configs"]["inductor"], out["configs"]["spts"]
    out["throughput_ratio_vs_inductor"] = s["tokens_per_s"] / d["tokens_per_s"]
    out["decode_throughput_ratio_vs_inductor"] = (s["decode_tokens_per_s"] / d["decode_tokens_per_s"]
                                                  if d["decode_tokens_per_s"] else None)
    out["prefill_time_ratio_vs_inductor"] = s["prefill_s"]["median"] / d["prefill_s"]["median"]
    out["kv_fraction_of_dense"] = s["kv_bytes"] / d["kv_bytes"] if d["kv_bytes"] else None
    out["greedy_vs_inductor"] = match(runs["inductor"][0].tokens, runs["spts"][0].tokens)
    save(out)
    log(f"  batch: spts/Inductor throughput {out['throughput_ratio_vs_inductor']:.2f}x, prefill time ratio "
        f"{out['prefill_time_ratio_vs_inductor']:.2f}, greedy match "
        f"{out['greedy_vs_inductor']['greedy_match_fraction']:.2f} ({out['greedy_vs_inductor']['rows_equal']}/{b} rows equal)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | gemma3 | qwen05 | a local model folder or .gguf")
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, help="one prompt length per row")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="greedy new tokens per row")
    p.add_argument("--reps", type=int, default=REPS, help="timed rounds after the warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", default="results", help="output folder for batch.json")
    p.add_argument("--options", default="{}", metavar="JSON", help="spts options (default: none)")
    p.add_argument("--dynamic", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--spts-backend", default="spts", help=argparse.SUPPRESS)
    p.add_argument("--dense-backend", default="inductor", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    options = H.spts_options(a.options)
    H.setup_process(a.threads)
    from .models import load_model
    if a.spts_backend == "spts":
        import spts_compile  # noqa: F401  registers the backend
    model, tok = load_model(a.model)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"argv": sys.argv[1:], "model": a.model, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "loadavg_start": os.getloadavg()}

    def save(section):
        tmp = out / ".batch.json.tmp"
        tmp.write_text(json.dumps({"meta": meta, "batch": section}, indent=1, default=str))
        tmp.replace(out / "batch.json")
    section = run(model, tok, lengths=a.lengths, new_tokens=a.new_tokens, reps=a.reps, options=options,
                  dynamic={"auto": None, "true": True, "false": False}[a.dynamic], spts_backend=a.spts_backend,
                  dense_backend=a.dense_backend, save=save)
    meta["loadavg_end"] = os.getloadavg()
    save(section)
    print()
    print(R.render_batch(section))
    print(f"wrote {out / 'batch.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
