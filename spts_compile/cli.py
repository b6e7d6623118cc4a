"""`spts-compile demo`: compile a model with the spts backend and print what the passes matched and planned.

    spts-compile demo                       # the embedded default model (SmolLM2-135M-Instruct)
    spts-compile demo --model qwen05        # the judge model, Qwen2.5-Coder-0.5B-Instruct (extra [qwen])
    spts-compile demo --model PATH          # a Hugging Face folder (or .gguf file) on disk
    spts-compile demo --tokens 2048 --debug-dir dumps/
"""
from __future__ import annotations

import argparse
import sys
import time


def demo(args) -> int:
    import torch
    from tabulate import tabulate

    import spts_compile
    from spts_compile.report import plan_table
    from spts_compile.models import ModelNotInstalled, load_model

    torch.set_num_threads(args.threads)
    print(f"threads: {torch.get_num_threads()}")
    try:
        model, _tok = load_model(args.model)
    except (ModelNotInstalled, FileNotFoundError) as e:
        raise SystemExit(f"spts-compile: {e}") from None
    model.eval()
    ids = torch.randint(100, model.config.vocab_size - 1, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    options = {"min_tokens": 1}
    if args.debug_dir:
        options["debug_dir"] = args.debug_dir
    compiled = torch.compile(model.forward, backend="spts", options=options)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = compiled(ids, use_cache=True)
    seconds = time.perf_counter() - t0
    s = spts_compile.last_plan()
    print(f"\ncompiled a {args.tokens}-token prefill in {seconds:.1f} s (verification {s['verify_seconds']:.1f} s)")
    print(f"preset: {s['schedule']['preset']}  LTP proxy: {s['ltp_mode']} ranking, "
          f"D_low={s['ltp_channels']}, r={s['ltp_rank']}\n")
    print(tabulate(s["layers"], headers="keys"))
    print()
    print(plan_table(s))
    kv = sum(l.keys.numel() + l.values.numel() for l in out.cache.layers) * out.logits.element_size()
    print(f"\nplanned FLOPs: {s['flop_ratio']:.3f} of dense   KV cache: {s['kv_ratio']:.3f} of dense "
          f"({kv / 2**20:.1f} MiB)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="spts-compile")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="compile a model and print what was matched and planned")
    d.add_argument("--model", default="smollm2",
                   help="smollm2 (default), gemma3, qwen05, or a local HF folder or .gguf file")
    d.add_argument("--tokens", type=int, default=1024)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--debug-dir", default=None)
    args = parser.parse_args(argv)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
