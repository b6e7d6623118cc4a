"""The main job: eager, Inductor, spts with skipping off, and spts, side by side on a real model.

    python -m benchmarks.run --quick                   # ~12 min on 2 CPU cores: 8K, main configurations
    python -m benchmarks.run                           # full: 2K/4K/8K, accuracy suite, baselines, budget sweep, batch
    python -m benchmarks.run --only batch              # the batch section alone (benchmarks/batch.py)
    python -m benchmarks.run --lengths 2048 4096 --threads 2 --out results/ --model smollm2|gemma3|qwen05|PATH

Everything runs in one process. Each configuration has its own model object (weights shared) whose
`forward` is compiled with its backend; `generate` uses it. Per prompt length the configurations run
round-robin (the starting one rotates each repetition) after a warm-up call that also compiles.
See benchmarks/README.md for what each JSON field means.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from . import batch as BATCH  # noqa: E402
from . import data as D  # noqa: E402
from . import harness as H  # noqa: E402
from . import report as R  # noqa: E402
from .models import calibration_for, load_model, sanity_check  # noqa: E402
from spts_compile import selectors  # noqa: E402

MIN_TOKENS = 256          # spts option: prompts shorter than this run dense; well below every benchmark length
QUICK = dict(lengths=[8192], reps=2, extra_warmup=0, tasks=["niah_single", "niah_multikey", "passkey", "hard_needle"],
             per_task=1, depths=[0.5], fidelity_texts=1, baselines=False, sweep=False, spts_off_accuracy=False,
             batch=False)
FULL = dict(lengths=[2048, 4096, 8192], reps=3, extra_warmup=1, tasks=list(D.TASKS), per_task=None,
            depths=[0.25, 0.75], fidelity_texts=3, baselines=True, sweep=True, spts_off_accuracy=True, batch=True)
SWEEP_SCALES = [0.25, 0.5, 2.0]
WARM_NEW_TOKENS = 4   # x1 is the default preset itself


_T0 = time.perf_counter()
DYNAMIC = {"auto": None, "true": True, "false": False}   # --dynamic -> torch.compile(dynamic=...)


def log(msg: str) -> None:
    el = time.perf_counter() - _T0
    print(f"[{int(el // 60):3d}:{int(el % 60):02d}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8K only, 2 reps, 4 accuracy samples, no baselines/sweep")
    p.add_argument("--lengths", type=int, nargs="+", help="prompt lengths in tokens (default 2048 4096 8192; quick: 8192)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", default="results", help="output folder for bench.json and the plots")
    p.add_argument("--model", default="smollm2", help="smollm2 | gemma3 | qwen05 | a local model folder or .gguf")
    p.add_argument("--reps", type=int, help="timed repetitions per configuration and length")
    p.add_argument("--new-tokens", type=int, nargs=2, default=[16, 64], metavar=("A", "B"),
                   help="end-to-end times are reported for prefill + A and + B new tokens")
    p.add_argument("--tasks", nargs="+", choices=D.TASKS, help="accuracy tasks")
    p.add_argument("--per-task", type=int, help="samples per task and length (default: one per depth)")
    p.add_argument("--depths", type=float, nargs="+", help="needle depths (fractions)")
    p.add_argument("--fidelity-texts", type=int, help="natural texts for fidelity (the timing prompt is the first)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                   help="selection baselines recent/norm/random/once at the preset budgets")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=None,
                   help=f"budget sweep: the preset's budgets scaled by {SWEEP_SCALES}")
    p.add_argument("--sweep-length", type=int, help="length for baselines and sweep (default: the longest)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy suite")
    p.add_argument("--batch", action=argparse.BooleanOptionalAction, default=None,
                   help="the batch section: prompts of --batch-lengths left-padded to the longest, prefill + "
                        "--batch-new-tokens greedy tokens, Inductor vs spts (default: on in the full job, off in --quick)")
    p.add_argument("--batch-lengths", type=int, nargs="+", default=BATCH.LENGTHS,
                   help=f"one prompt length per batch row (default {' '.join(map(str, BATCH.LENGTHS))})")
    p.add_argument("--batch-new-tokens", type=int, default=BATCH.NEW_TOKENS,
                   help=f"greedy new tokens per row in the batch section (default {BATCH.NEW_TOKENS})")
    p.add_argument("--batch-reps", type=int, help="timed rounds of the batch section (default: --reps)")
    p.add_argument("--only", choices=["batch"], help="run only this section (batch: implies --batch)")
    p.add_argument("--calibrate", action="store_true",
                   help="LTP channels ranked by a calibration (pydoc text, computed once and cached) instead of "
                        "the default weights-only ranking")
    p.add_argument("--options", default="{}", metavar="JSON",
                   help='spts options for the spts configurations (baselines and sweep build on them), e.g. '
                        '\'{"start_layer": 9, "stage_ends": [12, 16, 21, 26]}\' or \'{"selector": "once"}\'')
    p.add_argument("--dynamic", choices=["auto", "true", "false"], default="auto",
                   help="torch.compile(dynamic=...): auto (None, the default) compiles static first")
    p.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=True,
                   help="compile cold and warm: this process compiles into a fresh Inductor cache folder "
                        "(OUT/inductor-cache), then a second process per compiled configuration and length "
                        "repeats the warm-up call on that folder (its first call is the 'warm 1st s' column)")
    # Development only: stand-in backends (e.g. "eager") to exercise the harness without compiling.
    p.add_argument("--spts-backend", default="spts", help=argparse.SUPPRESS)
    p.add_argument("--warm-child", default=None, metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--dense-backend", default="inductor", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.options = H.spts_options(a.options)   # a bad option: the ValueError naming it, before anything loads
    mode = QUICK if a.quick else FULL
    for k, v in mode.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.only == "batch":
        a.batch = True
    a.batch_reps = a.batch_reps or a.reps
    a.sweep_length = a.sweep_length or max(a.lengths)
    if a.sweep_length not in a.lengths:
        p.error(f"--sweep-length {a.sweep_length} must be one of --lengths {a.lengths}")
    return a


def prompt_tokens(length: int, model, args) -> int:
    """Prompt tokens for a nominal length: the length itself, unless prompt plus new tokens would run past
    the positions the model was trained on (SmolLM2: 8192), then that many fewer (8K -> 8192 - 64)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    reserve = max(args.new_tokens[1], 40)  # the longest generation: timing runs, or a task's answer
    return min(length, limit - reserve) if limit else length


def build_variants(args, schedule, calibration=None) -> list[H.Variant]:
    """The configurations; `schedule` is the spts configuration's resolved schedule (the sweep scales its budgets)."""
    sb = args.spts_backend
    skip = dict(args.options, **({} if calibration is None else {"calibration": calibration}))
    off = lambda **kw: dict(min_tokens=MIN_TOKENS, **kw)  # noqa: E731
    on = lambda **kw: {"min_tokens": MIN_TOKENS, **skip, **kw}  # noqa: E731
    if sb != "spts":
        off = on = lambda **kw: None  # noqa: E731
    vs = [H.Variant("eager", None, label="eager HF"),
          H.Variant("inductor", args.dense_backend, label="Inductor (dense)"),
          H.Variant("spts_off", sb, off(pap=False, ltp=False, msdp=False), label="spts, skipping off"),
          H.Variant("spts", sb, on(record_selection=True), label="spts (default preset)" if not args.options else "spts (--options)")]
    if args.baselines:
        for s in selectors.baselines():
            vs.append(H.Variant(f"sel_{s}", sb, on(selector=s), group="baseline", label=f"selector={s}"))
    if args.sweep:
        for f in SWEEP_SCALES:
            vs.append(H.Variant(f"budget_x{f:g}", sb, on(budgets=scale_budgets(schedule.budgets, f)),
                                group="sweep", label=f"budgets x{f:g}"))
    return vs


def scale_budgets(budgets, f: float) -> list:
    """The preset's per-stage budgets times f: token counts stay ints, fractions of N stay in (0, 1]."""
    out = []
    for b in budgets:
        if isinstance(b, int):
            out.append(max(1, int(round(b * f))))
        else:
            out.append(min(1.0, max(1e-4, float(b) * f)))
    return out


# -- phases ----------------------------------------------------------------------------------------------

def warm(v: H.Variant, ids, tok, length, new_tokens, store) -> H.CallResult:
    """First call at this length: compiles what it needs. Records the wall time and graphs compiled."""
    before_graphs, before_s = v.graphs, v.backend_seconds
    t = time.perf_counter()
    r = H.generate_once(v.model, ids, new_tokens, fixed_length=True, pad_token_id=tok.pad_token_id)
    wall = time.perf_counter() - t
    store.setdefault(v.name, {})[length] = {
        "first_call_seconds": wall, "graphs_compiled": v.graphs - before_graphs,
        "backend_seconds": v.backend_seconds - before_s}
    log(f"  {length} warm-up {v.name:12s} {wall:7.1f}s  (+{v.graphs - before_graphs} graphs, "
        f"{v.backend_seconds - before_s:.1f}s in the backend)")
    return r


def warm_start(args, variants, length, n_tok, tagged: bool, compile_log) -> None:
    """The warm column: per compiled main configuration, a second process repeats this length's warm-up call
    on the Inductor cache folder this process filled; its first call is what a user's next process pays."""
    for v in variants:
        if v.group != "main" or v.backend is None:
            continue
        options = None if v.options is None else {k: x for k, x in v.options.items() if k != "calibration"}
        spec = {"name": v.name, "backend": v.backend, "options": options, "tokens": n_tok,
                "calibrated": options is not None and "calibration" in v.options,
                "tag": f"{v.name}@{length}" if tagged else None}   # the entry make_variant gave it here
        cmd = [sys.executable, "-m", "benchmarks.run", "--model", args.model, "--threads", str(args.threads),
               "--dynamic", args.dynamic, "--warm-child", json.dumps(spec)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        entry = compile_log.setdefault(v.name, {}).setdefault(length, {})
        if proc.returncode:
            entry["warm_error"] = proc.stderr[-2000:]
            log(f"  {length} warm start {v.name}: the second process failed (rc {proc.returncode}); see bench.json")
            continue
        entry.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        entry["warm_process_seconds"] = time.perf_counter() - t
        log(f"  {length} warm start {v.name:12s} {entry['warm_first_call_seconds']:7.1f}s  (cold "
            f"{entry.get('first_call_seconds', float('nan')):.1f}s; FX graph cache {entry['warm_fx_cache']})")


def warm_child(args) -> int:
    """The second process of `warm_start`: the same configuration, length and call; prints one JSON line."""
    spec = json.loads(args.warm_child)
    if spec["backend"] == "spts":
        import spts_compile  # noqa: F401  registers the backend
    model, tok = load_model(args.model)
    options = spec["options"]
    if spec["calibrated"]:
        options = dict(options, calibration=calibration_for(model, tok, args.model))
    v = H.make_variant(model, H.Variant(spec["name"], spec["backend"], options),
                       dynamic=DYNAMIC[args.dynamic], tag=spec["tag"])
    ids = D.fidelity_texts(tok, spec["tokens"], count=1, seed=1)[0][1]
    store: dict = {}
    warm(v, ids, tok, spec["tokens"], WARM_NEW_TOKENS, store)
    first = store[v.name][spec["tokens"]]
    print(json.dumps({"warm_first_call_seconds": first["first_call_seconds"],
                      "warm_graphs_compiled": first["graphs_compiled"],
                      "warm_fx_cache": H.fx_cache_counts()}))
    return 0


def speed_phase(args, variants, length, ids, tok, results, compile_log, save):
    main = [v for v in variants if v.group == "main"]
    n16, n64 = args.new_tokens
    for v in main:  # a few new tokens compile every graph: prefill, the first decode step, the dynamic one
        warm(v, ids, tok, length, WARM_NEW_TOKENS, compile_log)
        results["compile"] = compile_log
        save()
    for _ in range(args.extra_warmup):
        for v in main:
            H.generate_once(v.model, ids, n64, fixed_length=True, pad_token_id=tok.pad_token_id)
    runs = {v.name: [] for v in main}
    for rep in range(args.reps):
        order = main[rep % len(main):] + main[:rep % len(main)]
        for v in order:
            r = H.generate_once(v.model, ids, n64, fixed_length=True, pad_token_id=tok.pad_token_id)
            runs[v.name].append(r)
            log(f"  {length} rep {rep + 1}/{args.reps} {v.name:12s} prefill {r.ttft:6.2f}s  "
                f"+{n16}: {r.e2e(n16):6.2f}s  +{n64}: {r.e2e(n64):6.2f}s  KV {r.kv_bytes / 2**20:6.1f} MiB")
            # raw times as they come, so an interrupted run keeps them (the summary rows follow the last rep)
            results.setdefault("speed_raw", []).append({"length": length, "rep": rep, "variant": v.name,
                                                        "prefill_s": r.ttft, "e2e_s": r.step_times[-1],
                                                        "kv_bytes": r.kv_bytes})
            save()
    dense = runs["inductor"][0]
    for v in main:
        rs = runs[v.name]
        plan = v.counter.prefill_plan if v.counter else None
        row = {
            "length": length, "n_tokens": int(ids.shape[1]), "variant": v.name,
            "prefill_s": H.spread([r.ttft for r in rs]),
            f"e2e_{n16}_s": H.spread([r.e2e(n16) for r in rs]),
            f"e2e_{n64}_s": H.spread([r.e2e(n64) for r in rs]),
            "kv_bytes": rs[0].kv_bytes, "kv_tokens_per_layer": rs[0].kv_tokens,
            "peak_rss_bytes": max(r.peak_rss for r in rs),
            "peak_rss_delta_bytes": max(r.peak_rss_delta for r in rs),
            "compile": compile_log.get(v.name, {}).get(length),
            "graphs_total": v.graphs, "backend_seconds_total": v.backend_seconds,
            "plan": R.plan_at(plan, length),
            "fidelity_vs_inductor": H.fidelity(dense, rs[0]),
        }
        results["speed"].append(row)
    R.add_speedups(results["speed"], length, (n16, n64))
    results["fidelity"].append({"length": length, "text": "timing prompt (essays)", "index": 0, **{
        v.name: H.fidelity(dense, runs[v.name][0]) for v in main if v.name != "inductor"}})
    return dense


def accuracy_phase(args, variants, length, samples, tok, results, keep_selection, save):
    names = ["inductor", "spts"] + (["spts_off"] if args.spts_off_accuracy else [])
    if length == args.sweep_length:
        names += [v.name for v in variants if v.group in ("baseline", "sweep")]
    by = {v.name: v for v in variants}
    for i, s in enumerate(samples):
        line = []
        for name in names:
            r = H.generate_once(by[name].model, s.input_ids, s.max_new_tokens, fixed_length=False,
                                pad_token_id=tok.pad_token_id, keep_logits=False)
            text = tok.decode(r.new_tokens, skip_special_tokens=True)
            score = s.score(text)
            results["accuracy_samples"].append({**s.describe(), "variant": name, "score": score,
                                                "output": text, "prefill_s": r.ttft})
            line.append(f"{name}={score:.2f}")
            if name == "spts" and keep_selection and s.task == "niah_single" and "selection" not in results:
                sel = _selection()
                if sel:
                    results["selection"] = {"length": length, "task": s.task, "depth": s.depth,
                                            "needle_tokens": _needle_tokens(s, tok), **sel}
        log(f"  {length} accuracy {i + 1}/{len(samples)} {s.task:15s} depth {s.depth:.2f}: " + " ".join(line))
        save()


def fidelity_phase(args, variants, length, n_tok, tok, results, save):
    names = ["spts"] + (["spts_off"] if args.spts_off_accuracy else [])
    if length == args.sweep_length:
        names += [v.name for v in variants if v.group in ("baseline", "sweep")]
    by = {v.name: v for v in variants}
    texts = D.fidelity_texts(tok, n_tok, count=args.fidelity_texts, seed=1)[1:] if args.fidelity_texts > 1 else []
    for i, (kind, ids) in enumerate(texts, start=1):
        dense = H.generate_once(by["inductor"].model, ids, 32, fixed_length=True, pad_token_id=tok.pad_token_id)
        row = {"length": length, "text": kind, "index": i}
        for name in names:
            r = H.generate_once(by[name].model, ids, 32, fixed_length=True, pad_token_id=tok.pad_token_id)
            row[name] = H.fidelity(dense, r)
        results["fidelity"].append(row)
        log(f"  {length} fidelity {kind}: " + " ".join(
            f"{n}: KL {row[n].get('kl', float('nan')):.3f}" for n in names))
        save()


def _selection():
    try:
        import spts_compile

        sel = spts_compile.recorded_selection() if hasattr(spts_compile, "recorded_selection") else None
    except Exception:
        return None
    if not sel:
        return None
    return {"layers": [{"layer": int(d["layer"]), "block": str(d["block"]),
                        "active": d["active"][0].tolist()} for d in sel]}


def _needle_tokens(s: D.Sample, tok) -> list[int]:
    """Token positions of the needle sentences in the prompt, for the plot (found by their inner tokens, which
    do not depend on how the sentence's first and last tokens merged with the haystack)."""
    ids = s.input_ids[0].tolist()
    found = []
    for needle in s.meta.get("needles", []):
        inner = tok(" " + needle.strip(), add_special_tokens=False).input_ids[1:-1]
        if len(inner) < 2:
            continue
        for i in range(len(ids) - len(inner) + 1):
            if ids[i:i + len(inner)] == inner:
                found.append(i)
                break
    return found


# -- main ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    H.setup_process(args.threads)
    if args.warm_child:
        return warm_child(args)
    dynamic = DYNAMIC[args.dynamic]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.warm_start:  # before anything compiles: this process's first calls are cold, the children's warm
        cache = out / "inductor-cache"
        shutil.rmtree(cache, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache.resolve())
    log(f"torch {torch.__version__}, threads: torch.get_num_threads() = {torch.get_num_threads()}, "
        f"mode: {'quick' if args.quick else 'full'}, " +
        (f"lengths {args.lengths}, reps {args.reps}" if args.only is None else f"only {args.only}") +
        (f", batch {args.batch_lengths} +{args.batch_new_tokens}, reps {args.batch_reps}" if args.batch else ""))
    if args.spts_backend == "spts":
        import spts_compile  # noqa: F401  registers the backend
    model, tok = load_model(args.model)
    answer = sanity_check(model, tok)
    log(f"model {args.model}: {type(model).__name__}, {model.config.num_hidden_layers} layers; sanity: {answer!r}")
    calibration = None
    if args.calibrate and args.spts_backend == "spts":
        t = time.perf_counter()
        calibration = calibration_for(model, tok, args.model)
        log(f"LTP calibration: {calibration!r} ({time.perf_counter() - t:.1f}s)")
    from spts_compile.config import SPTSConfig

    sched = SPTSConfig(**dict(args.options, min_tokens=MIN_TOKENS)).resolve(model.config.num_hidden_layers)
    variants = build_variants(args, sched, calibration)
    for v in variants:
        H.make_variant(model, v, dynamic=dynamic)
    results = {
        "meta": {
            "argv": sys.argv[1:], "quick": args.quick, "model": args.model, "model_class": type(model).__name__,
            "layers": model.config.num_hidden_layers, "dtype": "float32", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "lengths": args.lengths, "reps": args.reps,
            "extra_warmup": args.extra_warmup, "new_tokens": args.new_tokens, "sweep_length": args.sweep_length,
            "dynamic": args.dynamic, "sanity_answer": answer, "options": args.options, "only": args.only,
            "batch": {"lengths": args.batch_lengths, "new_tokens": args.batch_new_tokens, "reps": args.batch_reps}
            if args.batch else None,
            "ltp_calibration": None if calibration is None else repr(calibration),
            "preset": {"name": sched.preset, "start_layer": sched.start_layer, "stage_ends": sched.stage_ends,
                       "budgets": sched.budgets, "prune": sched.prune},
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": os.getloadavg(),
        },
        "variants": {v.name: v.describe() for v in variants},
        "speed": [], "accuracy_samples": [], "fidelity": [], "compile": {},
    }
    compile_log: dict = {}

    def save():  # everything measured so far, after every step: an interrupted run keeps it
        _save(results, out)
    save()
    for i, length in enumerate(args.lengths if args.only is None else []):
        n_tok = prompt_tokens(length, model, args)
        if i:  # a fresh entry per length: each length compiles its own static prefill graph (see README)
            for v in variants:
                H.make_variant(model, v, dynamic=dynamic, tag=f"{v.name}@{length}")
        log(f"length {length}: timing prompt = {n_tok} tokens of the essays")
        kind, ids = D.fidelity_texts(tok, n_tok, count=1, seed=1)[0]
        dense = speed_phase(args, variants, length, ids, tok, results, compile_log, save)
        if args.warm_start:
            warm_start(args, variants, length, n_tok, i > 0, compile_log)
            results["compile"] = compile_log
            save()
        extra = [v for v in variants if v.group != "main"] if length == args.sweep_length else []
        for v in extra:  # compile baselines and sweep points before they are timed on the suite
            r = warm(v, ids, tok, length, 32, compile_log)
            results["fidelity"][-1][v.name] = H.fidelity(dense, r)
            save()
        if not args.no_accuracy:
            samples = D.build_suite(tok, [n_tok], depths=tuple(args.depths), per_task=args.per_task,
                                    tasks=tuple(args.tasks))
            for s in samples:
                s.length = length  # grouped under the nominal length
            log(f"length {length}: accuracy suite, {len(samples)} samples")
            accuracy_phase(args, variants, length, samples, tok, results, keep_selection=length == max(args.lengths),
                           save=save)
        fidelity_phase(args, variants, length, n_tok, tok, results, save)
        results["compile"] = compile_log
        save()
    if args.batch:
        def save_batch(section):
            results["batch"] = section
            save()
        BATCH.run(model, tok, lengths=args.batch_lengths, new_tokens=args.batch_new_tokens, reps=args.batch_reps,
                  options=dict(args.options, **({} if calibration is None else {"calibration": calibration})),
                  dynamic=dynamic, spts_backend=args.spts_backend, dense_backend=args.dense_backend, log=log,
                  save=save_batch)
    if args.only is None:
        results["accuracy"] = R.accuracy_table(results["accuracy_samples"])
        results["sweep"] = R.sweep_rows(results, variants, args.sweep_length)
        results["targets"] = R.targets(results, max(args.lengths))
    results["meta"]["wall_seconds"] = time.perf_counter() - _T0
    results["meta"]["loadavg_end"] = os.getloadavg()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    results["meta"]["cpu_seconds"] = ru.ru_utime + ru.ru_stime
    results["meta"]["max_rss_bytes"] = ru.ru_maxrss * 1024
    _save(results, out)
    print()
    print(R.render(results))
    plots = R.plots(results, out) if args.only is None else []
    log(f"wrote {out / 'bench.json'}" + "".join(f", {p}" for p in plots) +
        f"; wall {results['meta']['wall_seconds']:.0f}s")
    return 0


def _save(results: dict, out: Path) -> None:
    """Write bench.json atomically: an interruption leaves the previous complete file, never half of one."""
    tmp = out / ".bench.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out / "bench.json")


if __name__ == "__main__":
    sys.exit(main())
