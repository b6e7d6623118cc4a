"""The accuracy suite: retrieval accuracy with 95% intervals and fidelity against dense, for candidate configs.

    python -m benchmarks.accuracy --model smollm2 --length 4096 --dense-only            # dense per task
    python -m benchmarks.accuracy --table benchmarks/measured/accuracy-dense-*.json      # their table
    python -m benchmarks.accuracy --table-json benchmarks/measured/accuracy-dense-*.json # ... as JSON
    python -m benchmarks.accuracy --suite smollm2 --configs preset sel_once \\
        --set 'wide={"budgets": [0.5, 0.375, 0.25, 0.1875]}' --out results/acc-smollm2-4k.json

Samples: each task of the suite (`--suite`, default the model's entry in `SUITES`, or `--tasks`) at
sample indices 0 .. `--per-task` - 1. A sample is reproducible from (task, length, index, seed)
(`data.make_sample`); tasks with a needle depth put it at `data.depth_for_index(index)` (0.1, 0.9, 0.5,
0.3, 0.7, 0.2, 0.6, 0.4, ...), the others draw their layout from the seed. A sample is correct when its
score is 1 (every answer string in the output).

Dense (eager Hugging Face) answers are cached per sample in a JSON-lines file (`--cache`), keyed by model,
prompt tokens, task, index, seed, depth, answer budget and a hash of the prompt ids, so a sweep never
recomputes them; the dense fidelity runs (last-token logits and 32 greedy tokens per text) are cached in
`--fidelity-cache`. Candidates run through the spts backend with `compiler="eager"` (the rewritten FX graph,
no code generation) unless their options name another `compiler` (`--set 'ind={"compiler": "inductor"}'`
runs the default through Inductor), given by name (`tune.CANDIDATES`) or `--set NAME=JSON`. The output JSON is rewritten
after every config (and in `--dense-only` mode after every sample), so an interrupted run keeps what it
measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from . import data as D  # noqa: E402
from .harness import Variant, fidelity, generate_once, ids_hash, make_variant, proportion, setup_process  # noqa: E402

# Named suites: the tasks on which dense (eager HF, fp32, greedy) answers >= 80% correctly, chosen by
# `python -m benchmarks.accuracy --model M --length L --dense-only --stop-below 0.8 ...` (threads 2, seed 0;
# benchmarks/measured/accuracy-dense-*.json, benchmarks/README.md "Accuracy suite"). Measured 2026-12-01:
# - qwen05 at 4096: niah_single 8/8, secret_code 8/8, passkey 7/7, niah_multikey 7/7 (30/30, Wilson95
#   0.89-1.00); nothing else was run on it (budget: 30 prompts of ~1 min).
# - smollm2 at 4096: magic_number 22/24 (0.74-0.98) is the only task >= 80%. Dropped: niah_single 9/12
#   (the San Francisco needle half fails: "to not give information"), niah_multikey 6/12 (answers another
#   city's number), hard_needle 1/3, passkey 0/6, secret_code 0/6, word_pair 0/2, kv_retrieval 0/2,
#   niah_multivalue 0/2 (n < 8: stopped once 80% was out of reach).
# - smollm2 at 8128 ("8K"): magic_number 15/24 (0.43-0.79): no task; SmolLM2 cannot judge at 8K.
# - smollm2 at 2048: niah_single 23/24 (0.80-0.99); niah_multikey 5/7, hard_needle 1/3, passkey,
#   secret_code, word_pair 0/2.
SUITES: dict[str, list[str]] = {
    "qwen05": ["niah_single", "secret_code", "passkey", "niah_multikey"],   # chosen at 4K
    "smollm2": ["magic_number"],                                            # chosen at 4K
    "smollm2-2k": ["niah_single"],                                          # chosen at 2K
}
SUITE_LENGTHS = {"qwen05": 4096, "smollm2": 4096, "smollm2-2k": 2048}   # the default --length of each
SUITE_MODELS = {"qwen05": "qwen05", "smollm2": "smollm2", "smollm2-2k": "smollm2"}  # the model each was chosen on

DEFAULT_CACHE = "benchmarks/measured/dense-answers.jsonl"
DEFAULT_FIDELITY_CACHE = "results/accuracy-cache"
PASS = 0.8            # a task belongs to a suite when dense is at least this often right


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the dense answer cache ------------------------------------------------------------------------------

def sample_key(model: str, s: D.Sample, seed: int) -> str:
    """The cache key of one sample's dense answer."""
    return json.dumps({"model": model, "n_tokens": s.n_tokens, "task": s.task, "index": s.index, "seed": seed,
                       "depth": None if s.depth is None else round(float(s.depth), 6),
                       "max_new_tokens": s.max_new_tokens, "ids": ids_hash(s.input_ids)}, sort_keys=True)


class AnswerCache:
    """Dense answers, one JSON object a line (append-only: an interrupted run keeps every finished sample)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict) -> None:
        row = dict(row, key=key)
        self.rows[key] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def answer(model, tok, s: D.Sample) -> dict:
    """One greedy answer (EOS ends it) and its score."""
    r = generate_once(model, s.input_ids, s.max_new_tokens, fixed_length=False, pad_token_id=tok.pad_token_id,
                      keep_logits=False)
    out = tok.decode(r.new_tokens, skip_special_tokens=True)
    score = s.score(out)
    return {"output": out, "score": score, "correct": score >= 1.0, "prefill_s": round(r.ttft, 3),
            "seconds": round(r.total, 3)}


def dense_answer(model, tok, s: D.Sample, cache: AnswerCache, model_name: str, seed: int) -> tuple[dict, bool]:
    """(dense answer, whether it came from the cache)."""
    key = sample_key(model_name, s, seed)
    row = cache.get(key)
    if row is not None:
        return row, True
    row = dict(answer(model, tok, s), task=s.task, index=s.index, depth=s.depth, answers=s.answers,
               measured=time.strftime("%Y-%m-%d %H:%M:%S"), threads=torch.get_num_threads())
    cache.put(key, row)
    return cache.get(key), False


# -- aggregation ---------------------------------------------------------------------------------------

def summarize(rows: list[dict], tasks: list[str]) -> dict:
    """Per task and overall: correct / n with the 95% Wilson interval, and the mean score."""
    out = {"tasks": {}}
    for t in tasks:
        rs = [r for r in rows if r["task"] == t]
        out["tasks"][t] = dict(proportion(sum(r["correct"] for r in rs), len(rs)),
                               mean_score=(sum(r["score"] for r in rs) / len(rs)) if rs else None)
    out["overall"] = dict(proportion(sum(r["correct"] for r in rows), len(rows)),
                          mean_score=(sum(r["score"] for r in rows) / len(rows)) if rows else None)
    return out


def versus_dense(rows: list[dict], dense_rows: list[dict], judged: list[str]) -> dict:
    """On the judged tasks (where dense is right): samples right dense and here, lost and gained, and
    whether this config is within one sample of dense."""
    pairs = [(r, d) for r, d in zip(rows, dense_rows) if r["task"] in judged]
    dense_k = sum(d["correct"] for _, d in pairs)
    k = sum(r["correct"] for r, _ in pairs)
    lost = sum(d["correct"] and not r["correct"] for r, d in pairs)
    gained = sum(r["correct"] and not d["correct"] for r, d in pairs)
    return {"judged_tasks": judged, "n": len(pairs), "dense_correct": dense_k, "correct": k, "lost": lost,
            "gained": gained, "within_1_sample": k >= dense_k - 1}


def fidelity_summary(fid: list[dict], kinds: list[str]) -> dict:
    kls = [f["kl"] for f in fid]
    return {"n_texts": len(fid), "kinds": kinds, "kl": [round(x, 5) for x in kls],
            "kl_mean": statistics.fmean(kls) if kls else None, "kl_median": statistics.median(kls) if kls else None,
            "top1_agree": sum(f["top1_agree"] for f in fid), "top1_agree_fraction": (sum(f["top1_agree"] for f in fid) / len(fid)) if fid else None,
            "greedy_match": [round(f.get("cont_match", 0.0), 4) for f in fid],
            "greedy_match_mean": statistics.fmean(f.get("cont_match", 0.0) for f in fid) if fid else None,
            "greedy_prefix": [f.get("cont_prefix") for f in fid], "horizon": fid[0].get("cont_horizon") if fid else None}


# -- the run -------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="smollm2 | qwen05 | gemma3 | a local model folder or .gguf (default: the suite's, else smollm2)")
    p.add_argument("--length", type=int, default=None,
                   help="prompt tokens, shortened to stay 64 inside the model's positions (default: the suite's, else 4096)")
    p.add_argument("--suite", help=f"a named task list from SUITES {list(SUITES)} (default: the model's, if any)")
    p.add_argument("--tasks", nargs="+", choices=D.ALL_TASKS, help="tasks (instead of --suite)")
    p.add_argument("--per-task", type=int, default=None,
                   help="samples per task: indices 0 .. N-1 (default: 24 samples in all, at least 6 per task)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-only", action="store_true", help="measure dense accuracy per task, nothing else")
    p.add_argument("--stop-below", type=float, default=None, metavar="P",
                   help="--dense-only: stop a task once it can no longer reach accuracy P over --per-task samples")
    p.add_argument("--configs", nargs="*", default=["preset"], help="candidate names from benchmarks.tune.CANDIDATES")
    p.add_argument("--set", action="append", default=[], metavar="NAME=JSON", help="an extra candidate (spts options)")
    p.add_argument("--texts", type=int, default=8, help="natural texts for fidelity (essays / pydoc alternating); 0: none")
    p.add_argument("--horizon", type=int, default=32, help="greedy tokens compared against dense")
    p.add_argument("--cache", default=DEFAULT_CACHE, help="dense answers per sample (JSON lines)")
    p.add_argument("--fidelity-cache", default=DEFAULT_FIDELITY_CACHE, help="folder for dense fidelity runs (.pt)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="result JSON (default results/accuracy-MODEL-LEN[-dense].json)")
    a = p.parse_args(argv)
    if a.model is None:
        a.model = SUITE_MODELS.get(a.suite, "smollm2")
    elif a.suite in SUITE_MODELS and SUITE_MODELS[a.suite] != a.model:
        p.error(f"suite {a.suite!r} was chosen on {SUITE_MODELS[a.suite]}, not {a.model}; give --tasks for another model")
    if a.tasks is None:
        name = a.suite or (a.model if a.model in SUITES else None)
        if name is None or name not in SUITES:
            p.error(f"no task list: give --tasks, or --suite from {list(SUITES)}")
        if not SUITES[name]:
            p.error(f"suite {name!r} is empty; give --tasks")
        a.tasks, a.suite = list(SUITES[name]), name
    if a.length is None:
        a.length = SUITE_LENGTHS.get(a.suite, 4096)
    if a.per_task is None:
        a.per_task = max(6, -(-24 // len(a.tasks)))
    from .tune import CANDIDATES

    unknown = [c for c in a.configs if c not in CANDIDATES]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CANDIDATES)} or add one with --set")
    a.candidates = {c: CANDIDATES[c] for c in a.configs}
    for item in a.set:
        name, _, js = item.partition("=")
        try:
            opts = json.loads(js)
        except json.JSONDecodeError as e:
            p.error(f"--set {item!r}: {e}")
        if not name or not isinstance(opts, dict):
            p.error(f"--set {item!r}: expected NAME={{json object}}")
        a.candidates[name] = opts
    if a.out is None:
        a.out = f"results/accuracy-{Path(a.model).name}-{a.length}{'-dense' if a.dense_only else ''}.json"
    return a


def n_prompt_tokens(length: int, model) -> int:
    """The prompt length for a nominal length: 64 tokens inside the model's positions at most (as benchmarks.run)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(length, limit - 64) if limit else length


def _versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def dense_summary(paths: list[str]) -> list[dict]:
    """Dense accuracy per (model, prompt tokens, task) over result files; runs of one setting are merged by
    sample index (a later file's sample wins), each with correct / n, the Wilson interval and seconds."""
    merged: dict[tuple, dict] = {}
    runs: dict[tuple, list] = {}
    for p in sorted(paths):
        d = json.loads(Path(p).read_text())
        if "meta" not in d or "samples" not in d.get("dense", {}):
            continue  # not a result of this script
        m = d["meta"]
        for r in d["dense"].get("samples", []):
            merged[(m["model"], m["n_tokens"], r["task"], r["index"])] = r
            runs.setdefault((m["model"], m["n_tokens"], r["task"]), [])
            if Path(p).name not in runs[(m["model"], m["n_tokens"], r["task"])]:
                runs[(m["model"], m["n_tokens"], r["task"])].append(Path(p).name)
    rows: dict[tuple, list] = {}
    for (model, n, task, _), r in merged.items():
        rows.setdefault((model, n, task), []).append(r)
    out = []
    for (model, n, task), rs in sorted(rows.items()):
        secs = [r["seconds"] for r in rs if r.get("seconds") is not None]
        out.append(dict(model=model, n_tokens=n, task=task, **proportion(sum(r["correct"] for r in rs), len(rs)),
                        depths=sorted(round(r["depth"], 3) for r in rs if r.get("depth") is not None),
                        wrong_at_depths=sorted(round(r["depth"], 3) for r in rs if not r["correct"] and r.get("depth") is not None),
                        seconds_median=statistics.median(secs) if secs else None, files=runs[(model, n, task)]))
    return out


def dense_table(paths: list[str]) -> str:
    """The markdown table of `dense_summary`."""
    lines = ["| task | model | prompt tokens | correct / n | accuracy | Wilson 95% | s per sample (median) |",
             "|---|---|---|---|---|---|---|"]
    for r in dense_summary(paths):
        lines.append(f"| {r['task']} | {r['model']} | {r['n_tokens']} | {r['correct']}/{r['n']} | {r['accuracy']:.2f} | "
                     f"{r['wilson95'][0]:.2f}-{r['wilson95'][1]:.2f} | {r['seconds_median']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] in (["--table"], ["--table-json"]):
        files = sys.argv[2:]
        print(dense_table(files) if sys.argv[1] == "--table" else
              json.dumps({"suites": SUITES, "pass_threshold": PASS, "dense": dense_summary(files)}, indent=1))
        return 0
    args = parse_args(argv)
    setup_process(args.threads)
    from .models import calibration_for, load_model

    t_start = time.perf_counter()
    model, tok = load_model(args.model)
    n_tok = n_prompt_tokens(args.length, model)
    log(f"{args.model}: {model.config.num_hidden_layers} layers, {n_tok} prompt tokens, threads {torch.get_num_threads()}, "
        f"tasks {args.tasks} x {args.per_task}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cache = AnswerCache(args.cache)
    meta = {"model": args.model, "layers": model.config.num_hidden_layers, "length": args.length, "n_tokens": n_tok,
            "suite": args.suite, "tasks": args.tasks, "per_task": args.per_task, "seed": args.seed,
            "texts": 0 if args.dense_only else args.texts, "horizon": args.horizon, "pass_threshold": PASS}
    result = {"meta": dict(meta, threads=torch.get_num_threads(), argv=sys.argv[1:] if argv is None else list(argv),
                           versions=_versions(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                           loadavg_start=os.getloadavg(), cache=str(args.cache)),
              "dense": {}, "configs": {}}
    if out_path.exists() and not args.dense_only:  # keep earlier configs of the same setting
        try:
            old = json.loads(out_path.read_text())
            if {k: old.get("meta", {}).get(k) for k in meta} == meta:
                result["configs"] = old.get("configs", {})
        except (json.JSONDecodeError, OSError):
            pass

    def write():
        result["meta"]["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        result["meta"]["loadavg_end"] = os.getloadavg()
        out_path.write_text(json.dumps(result, indent=1, default=str))

    # Samples and dense answers, task by task.
    samples: list[D.Sample] = []
    dense_rows: list[dict] = []
    stopped = {}
    for task in args.tasks:
        wrong = 0
        for i in range(args.per_task):
            t0 = time.perf_counter()
            s = D.make_sample(tok, task, n_tok, i, seed=args.seed)
            row, cached = dense_answer(model, tok, s, cache, args.model, args.seed)
            samples.append(s)
            dense_rows.append(row)
            wrong += not row["correct"]
            log(f"dense {task} #{i} depth {s.depth if s.depth is None else round(s.depth, 3)}: "
                f"{'RIGHT' if row['correct'] else 'wrong'} {row['output'][:60]!r} (want {s.answers}) "
                f"{'cached' if cached else f'{time.perf_counter() - t0:.0f}s'}")
            if args.dense_only:
                result["dense"] = summarize(_rows_of(samples, dense_rows), args.tasks)
                result["dense"]["samples"] = _rows_of(samples, dense_rows)
                result["dense"]["stopped_early"] = stopped
                write()
            if args.dense_only and args.stop_below is not None and wrong > (1 - args.stop_below) * args.per_task + 1e-9 \
                    and i + 1 < args.per_task:
                stopped[task] = f"stopped after {i + 1} samples: {wrong} wrong, {args.stop_below:.0%} of {args.per_task} is out of reach"
                log(f"{task}: {stopped[task]}")
                break
    rows = _rows_of(samples, dense_rows)
    result["dense"] = summarize(rows, args.tasks)
    result["dense"]["samples"] = rows
    result["dense"]["stopped_early"] = stopped
    judged = list(args.tasks) if args.suite else [t for t, v in result["dense"]["tasks"].items()
                                                    if v["n"] and v["accuracy"] >= PASS]
    result["dense"]["judged_tasks"] = judged
    for t, v in result["dense"]["tasks"].items():
        log(f"dense {t:16s} {v['correct']}/{v['n']}  Wilson95 {v['wilson95']}")
    o = result["dense"]["overall"]
    log(f"dense overall {o['correct']}/{o['n']}  Wilson95 {o['wilson95']}")
    write()
    if args.dense_only:
        log(f"wrote {out_path} ({time.perf_counter() - t_start:.0f}s)")
        return 0

    # Dense fidelity runs, cached per text.
    import spts_compile

    texts = D.fidelity_texts(tok, n_tok, count=args.texts, seed=7) if args.texts else []
    fcache_path = Path(args.fidelity_cache) / f"fidelity-{Path(args.model).name}-{n_tok}.pt"
    fcache = torch.load(fcache_path, weights_only=False) if fcache_path.exists() else {}
    dense_fid = []
    for i, (kind, ids) in enumerate(texts):
        k = (args.model, n_tok, kind, i, args.horizon, ids_hash(ids))
        if k not in fcache:
            t0 = time.perf_counter()
            r = generate_once(model, ids, args.horizon, fixed_length=True, pad_token_id=tok.pad_token_id)
            fcache[k] = {"first_logits": r.first_logits, "new_tokens": r.new_tokens}
            fcache_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(fcache, fcache_path)
            log(f"dense fidelity text {i} ({kind}) {time.perf_counter() - t0:.0f}s")
        dense_fid.append(SimpleNamespace(**fcache[k]))
    result["dense"]["fidelity_texts"] = [{"kind": kind, "ids": ids_hash(ids)} for kind, ids in texts]
    write()

    for name, opts in args.candidates.items():
        opts = dict(opts)
        if opts.get("calibration") == "CALIBRATION":
            opts["calibration"] = calibration_for(model, tok, args.model)
        t0 = time.perf_counter()
        log(f"{name}: {opts if 'calibration' not in opts else dict(opts, calibration='pydoc 64x512')}")
        try:
            v = make_variant(model, Variant(name, "spts", {"min_tokens": 256, "compiler": "eager", **opts}))
            m = v.model
            fid = []
            for (kind, ids), dense in zip(texts, dense_fid):
                r = generate_once(m, ids, args.horizon, fixed_length=True, pad_token_id=tok.pad_token_id)
                fid.append(fidelity(dense, r, horizon=args.horizon))
            plan = (v.counter.prefill_plan if v.counter else None) or spts_compile.last_plan() or {}
            crow = []
            for s in samples:
                a = answer(m, tok, s)
                crow.append(dict(a, task=s.task, index=s.index, depth=s.depth))
        except Exception as e:  # one broken candidate must not lose the others
            import traceback

            result["configs"][name] = {"options": _opts_json(opts), "error": repr(e),
                                       "traceback": traceback.format_exc()[-4000:]}
            write()
            log(f"{name}: FAILED {e!r}")
            torch._dynamo.reset()
            continue
        acc = summarize(crow, args.tasks)
        row = {"options": _opts_json(opts), "flop_ratio": plan.get("flop_ratio"), "kv_ratio": plan.get("kv_ratio"),
               "schedule": plan.get("schedule"), "plan_kind": plan.get("kind"),
               "accuracy": acc["tasks"], "overall": acc["overall"],
               "vs_dense": versus_dense(crow, rows, judged),
               "fidelity": fidelity_summary(fid, [k for k, _ in texts]),
               "samples": crow, "seconds": round(time.perf_counter() - t0, 1)}
        result["configs"][name] = row
        write()
        f, vd = row["fidelity"], row["vs_dense"]
        log(f"{name}: FLOP {_fmt(row['flop_ratio'])} KV {_fmt(row['kv_ratio'])}  acc {acc['overall']['correct']}/"
            f"{acc['overall']['n']}  judged {vd['correct']}/{vd['n']} (dense {vd['dense_correct']}, lost {vd['lost']}, "
            f"within 1: {vd['within_1_sample']})  KL mean {_fmt(f['kl_mean'])} median {_fmt(f['kl_median'])}  "
            f"top1 {f['top1_agree']}/{f['n_texts']}  match{args.horizon} {_fmt(f['greedy_match_mean'])}  {row['seconds']:.0f}s")
        torch._dynamo.reset()
    log(f"wrote {out_path} ({time.perf_counter() - t_start:.0f}s)")
    return 0


def _rows_of(samples: list[D.Sample], dense_rows: list[dict]) -> list[dict]:
    keep = ("output", "score", "correct", "prefill_s", "seconds", "measured")
    return [dict(task=s.task, index=s.index, depth=s.depth, n_tokens=s.n_tokens, answers=s.answers,
                 ids=ids_hash(s.input_ids), **{k: r.get(k) for k in keep}) for s, r in zip(samples, dense_rows)]


def _opts_json(opts: dict) -> dict:
    return {k: (v if k != "calibration" else "pydoc, 64x512 tokens") for k, v in opts.items()}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
