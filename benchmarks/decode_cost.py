"""What decoding costs with spts_compile imported (issue 13): the process-wide attention wrapper, and decode on a
compacted cache.

    python -m benchmarks.decode_cost [--model smollm2] [--length 2048] [--new-tokens 33] [--reps 3] [--threads 2]

Importing spts_compile wraps transformers' "sdpa" and "eager" attention functions (`kv_positions.
install_attention_masks`): every attention that reads a cache passes its mask through `spts::layer_mask`, which
on a dense cache returns the model's mask. That wrapper is on for every model in the process, also one that never
sees the spts backend. This benchmark puts a number on it: the same model decodes through the wrapped "sdpa" and
through "spts_plain", the unwrapped sdpa function registered under its own name (with sdpa's mask), eager and
under Inductor. It also times decode steps of the spts backend on the cache its prefill compacted, against
Inductor's on a dense cache.

A decode step's time is (time to the last token - time to the first) / (new tokens - 1), from one greedy
`generate` (EOS suppressed). All configurations run interleaved in one process after a warm-up call each; the
report gives medians over reps and ratios against the unwrapped twin (wrapper) or Inductor (spts).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

import spts_compile  # noqa: F401  (installs the wrapper, as any user's import does)

from . import data as D
from .harness import generate_once, setup_process
from .models import load_model

PLAIN = "spts_plain"


def register_plain() -> None:
    """Register transformers' own sdpa attention and mask, unwrapped, under the name `spts_plain`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert not getattr(sdpa_attention_forward, "spts_layer_mask", False)
    ALL_ATTENTION_FUNCTIONS.register(PLAIN, sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PLAIN, sdpa_mask)


def with_attention(model, name: str):
    m = copy.deepcopy(model)
    m.config._attn_implementation = name
    for sub in m.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/decode-cost.json")
    args = p.parse_args(argv)
    setup_process(args.threads)
    register_plain()
    model, tok = load_model(args.model)
    ids = D.fidelity_texts(tok, args.length, count=1, seed=1)[0][1]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    base = {"sdpa": with_attention(model, "sdpa"), PLAIN: with_attention(model, PLAIN)}
    configs = {}
    for attn, m in base.items():
        configs[f"eager, {attn}"] = m
        c = copy.copy(m)
        c.forward = torch.compile(type(m).forward.__get__(c), backend="inductor")
        configs[f"inductor, {attn}"] = c
    s = copy.copy(base["sdpa"])
    s.forward = torch.compile(type(s).forward.__get__(s), backend="spts")
    configs["spts, sdpa (compacted cache)"] = s

    def run(m):
        r = generate_once(m, ids, args.new_tokens, fixed_length=True, pad_token_id=pad, keep_logits=False)
        return (r.step_times[-1] - r.step_times[0]) / (len(r.step_times) - 1), r.new_tokens, r.kv_tokens

    t0 = time.perf_counter()
    tokens, kv = {}, {}
    for name, m in configs.items():       # warm-up: compiles every graph the timed calls use
        _, tokens[name], kv[name] = run(m)
        print(f"[{time.perf_counter() - t0:6.0f}s] warm: {name}", flush=True)
    steps = {name: [] for name in configs}
    for rep in range(args.reps):
        for name, m in configs.items():
            steps[name].append(run(m)[0])
        print(f"[{time.perf_counter() - t0:6.0f}s] rep {rep + 1}/{args.reps}", flush=True)

    med = {name: statistics.median(v) for name, v in steps.items()}
    ref = {"eager, sdpa": "eager, " + PLAIN, "inductor, sdpa": "inductor, " + PLAIN,
           "spts, sdpa (compacted cache)": "inductor, sdpa"}
    rows = []
    for name in configs:
        against = ref.get(name)
        rows.append([name, f"{med[name] * 1e3:.1f}", f"{med[name] / med[against]:.3f} vs {against}" if against else "",
                     sum(kv[name]) // len(kv[name]), tokens[name] == tokens["inductor, sdpa"]])
    print(f"\n{args.model}, prompt {ids.shape[1]} tokens, {args.new_tokens} new, threads {torch.get_num_threads()}, "
          f"median of {args.reps} interleaved reps")
    print(tabulate(rows, headers=["config", "ms / decode step", "ratio", "mean KV rows", "tokens = Inductor's"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "argv": argv, "model": args.model, "prompt_tokens": int(ids.shape[1]), "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(), "reps": args.reps, "torch": torch.__version__,
        "seconds_per_step": steps, "median_seconds_per_step": med, "ratios": {
            n: med[n] / med[a] for n, a in ref.items()}, "kv_tokens_per_layer": kv,
        "same_tokens_as_inductor": {n: tokens[n] == tokens["inductor, sdpa"] for n in configs},
        "wall_seconds": time.perf_counter() - t0}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
