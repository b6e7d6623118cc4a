"""Where in the network the probe can see a needle: its rank among all N tokens at every layer.

    python -m benchmarks.needle_ranks --model qwen05 --task secret_code --indices 3 4
    python -m benchmarks.needle_ranks --model smollm2 --task magic_number --indices 3 4 12 --heads max

A probe runs at every layer from layer 1 on, over every token, with budgets of N - 4 (nothing that matters is
skipped, so each layer sees dense hidden states) and compiler="eager". A wrapper around
`spts_compile.runtime.probe_attention` (installed before compiling, so the graph calls it) ranks the probe's
score of every token and records the best and the median rank of the needle's answer tokens (found by their
token ids in the prompt). A needle is safe at budget M in a layer whose best rank is well under M. This is how
the README's "The default and the paper" chose the first skipping layer. Writes JSON (`--out`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from . import data as D  # noqa: E402
from .harness import Variant, make_variant, setup_process  # noqa: E402


def answer_span(tok, sample) -> list[int]:
    """Token indices of the last occurrence of the first answer in the prompt, matched case-insensitively on
    the text of each token (so that "dolores park" finds "Dolores Park", whatever the token boundaries)."""
    ids = sample.input_ids[0].tolist()
    pieces = [tok.decode([t]) for t in ids]
    ends, at = [], 0
    for piece in pieces:
        at += len(piece)
        ends.append(at)
    text = "".join(pieces).lower()
    start = text.rfind(sample.answers[0].lower())
    if start < 0:
        raise ValueError(f"the answer {sample.answers[0]!r} is not in the prompt")
    stop = start + len(sample.answers[0])
    return [i for i, end in enumerate(ends) if end > start and end - len(pieces[i]) < stop]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.needle_ranks", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default="magic_number", choices=D.ALL_TASKS)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--indices", type=int, nargs="+", default=[3, 4])
    p.add_argument("--probe-queries", type=int, default=64)
    p.add_argument("--heads", default="max")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/needle_ranks.json")
    args = p.parse_args(argv)
    setup_process(args.threads)
    import spts_compile.runtime as rt
    from spts_compile.models import load_model

    model, tok = load_model(args.model)
    depth = model.config.num_hidden_layers
    watch: dict = {"span": None, "ranks": []}
    probe = rt.probe_attention

    def ranking_probe(xn, cand, *rest, **kw):
        k, scores = probe(xn, cand, *rest, **kw)
        span = watch["span"]
        hit = (cand[0].unsqueeze(-1) == span.view(1, -1)).any(-1)
        order = torch.argsort(scores[0], descending=True)
        ranks = torch.nonzero(hit[order]).flatten().tolist()
        watch["ranks"].append({"candidates": int(cand.shape[1]), "best": min(ranks) if ranks else None,
                               "median": statistics.median(ranks) if ranks else None})
        return k, scores

    rt.probe_attention = ranking_probe
    try:
        opts = dict(selector="probe", start_layer=1, stage_ends=[depth - 1], budgets=args.length - 4, prune=0,
                    ltp=False, probe_queries=args.probe_queries, heads=args.heads, min_tokens=256, compiler="eager",
                    verify=False)   # verification would call the probe on its own inputs
        m = make_variant(model, Variant("ranks", "spts", opts)).model
        rows = []
        for i in args.indices:
            s = D.make_sample(tok, args.task, args.length, i)
            watch["span"], watch["ranks"] = torch.tensor(answer_span(tok, s)), []
            with torch.no_grad():
                m(input_ids=s.input_ids, use_cache=False, logits_to_keep=1)
            rows.append({"index": i, "depth": s.depth, "span": watch["span"].tolist(),
                         "layers": {l + 1: r for l, r in enumerate(watch["ranks"])}})
            print(f"{args.task} #{i} depth {s.depth}: best rank per layer 1..{depth - 1} of {s.input_ids.shape[1]}: "
                  f"{[r['best'] for r in watch['ranks']]}", flush=True)
    finally:
        rt.probe_attention = probe
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": {"model": args.model, "task": args.task, "length": args.length,
                                        "probe_queries": args.probe_queries, "heads": args.heads,
                                        "threads": torch.get_num_threads()}, "samples": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
