"""The vLLM plugin on a real model against tests/reference.py: one SmolLM2-135M-Instruct request with the
project's default options (docs/vllm.md section 5.4). Opt-in: the reference is slow (a Python loop per layer).

Runs in the vLLM venv, from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/vllm_real_check.py [--model DIR] [--tokens 2048] [--options JSON]

The prompt is --tokens tokens of Python's pydoc topics starting --offset tokens in (benchmarks/vllm_ttft.py
uses the text's first tokens), sent as token ids, 4 greedy tokens. The plugin runs with SPTS_VLLM_OPTIONS =
--options (default "{}": selector "stage", the depth's preset, kv_cache "all"); the reference with the same
options. Checks: every skipping layer's candidates, attention rows, FFN rows and prunes equal the reference's;
the first token's top-20 log-probabilities equal the reference's last-logit log-softmax (< 1e-3: 30 fp32 layers);
the greedy tokens equal `reference_decode` on the reference's "all" cache. Exit status 0 when all pass.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from vllm_check import Checks, _env_defaults, plugin_env  # noqa: E402
from vllm_ttft import DEFAULT_MODEL, engine_args, prompt_ids  # noqa: E402

NEW_TOKENS = 4
TOL = 1e-3


def child(model: str, spec: str, out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    ids = json.loads(Path(spec).read_text())
    llm = LLM(model=model, **engine_args(len(ids)))
    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=20, detokenize=False)
    t = time.perf_counter()
    r = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0]
    Path(out).write_text(json.dumps({"tokens": list(r.outputs[0].token_ids), "seconds": time.perf_counter() - t,
                                     "logprobs": {str(k): v.logprob for k, v in r.outputs[0].logprobs[0].items()}}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "SPEC", "OUT"))
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--offset", type=int, default=20000)
    ap.add_argument("--options", default="{}")
    ap.add_argument("--workdir", default="/tmp/spts-vllm-real-check")
    args = ap.parse_args()
    _env_defaults()
    if args.child:
        child(*args.child)
        return 0
    import torch
    torch.set_num_threads(1)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from transformers import AutoModelForCausalLM
    from reference import reference_decode, reference_prefill
    from spts_compile.config import SPTSConfig

    model, work = Path(args.model), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    options = dict(json.loads(args.options))
    options.setdefault("kv_cache", "all")
    ids = prompt_ids(model, args.tokens, args.offset)
    spec, out, log, record = (work / n for n in ("prompt.json", "out.json", "vllm.log", "record.jsonl"))
    spec.write_text(json.dumps(ids))
    record.unlink(missing_ok=True)
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.call([sys.executable, __file__, "--child", str(model), str(spec), str(out)],
                             env=plugin_env(work, options, record), stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        print(log.read_text()[-4000:])
        raise SystemExit(f"vllm child failed (rc {rc}); log {log}")
    got = json.loads(out.read_text())
    recs = {r["layer"]: r for r in map(json.loads, record.read_text().splitlines())}
    print(f"vLLM: {time.perf_counter() - t:.0f} s (generate {got['seconds']:.1f} s), tokens {got['tokens']}",
          flush=True)

    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    sched = SPTSConfig(**options).resolve(hf.config.num_hidden_layers)
    selector = options.get("selector", SPTSConfig.selector)
    ref = reference_prefill(hf, torch.tensor([ids]), schedule=sched, selector=selector)
    ref_tokens = reference_decode(hf, ref, steps=NEW_TOKENS)[0].tolist()
    print(f"reference: {time.perf_counter() - t:.0f} s, tokens {ref_tokens}", flush=True)

    check = Checks()
    log_text = log.read_text()
    check("spts plugin registered" in log_text and "pure-prefill step" in log_text,
          "the plugin was loaded and ran SPTS on the prefill step")
    layers = range(sched.start_layer, sched.depth)
    same, shown = True, []
    for l in layers:
        rec, want = recs.get(l, {}), ref["kept"][l]
        for key in ("cand", "attn", "ffn", "pruned"):
            same &= rec.get(key) == want[key][0].tolist()
        shown.append(f"L{l} {len(want['attn'][0])}")
    check(same, f"every skipping layer's candidates, attention rows, FFN rows and prunes equal the reference's "
                f"(active rows: {', '.join(shown)})")
    lsm = torch.log_softmax(ref["logits"][0, -1].double(), dim=-1)
    worst = max(abs(lp - float(lsm[int(tok)])) for tok, lp in got["logprobs"].items())
    check(worst < TOL, f"first-token top-20 log-probabilities equal the reference's (max abs diff {worst:.2e})")
    check(got["tokens"] == ref_tokens, f"greedy tokens equal the reference's decode on its 'all' cache {ref_tokens}")
    print(f"{check.passed} passed, {len(check.failures)} failure(s)")
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
