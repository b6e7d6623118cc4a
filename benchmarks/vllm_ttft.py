"""Time to first token of one long SmolLM2 request through vLLM, with the SPTS plugin against without it
(issue 16; docs/vllm.md section 5.4).

Runs in the vLLM venv (docs/vllm.md section 1, or benchmarks/vllm_leg.sh), from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/vllm_ttft.py [--model DIR] [--tokens 4096] [--repeats 3]
                                                     [--options JSON] [--out FILE]

Two engines live side by side in this process (each in its own engine-core process): vLLM without the plugin
(VLLM_PLUGINS="": its processes do not load it) and the plugin's (SPTS_VLLM_OPTIONS = --options, default "{}":
the project's default options, selector "stage" with the depth's preset, kv_cache "all"). The prompt is the first --tokens tokens of Python's pydoc
topics text (SmolLM2's tokenizer), sent as token ids. One warm-up request goes to each engine, then --repeats
interleaved pairs (dense, SPTS) are timed: the wall time of `generate(max_tokens=1)`, which is the prefill plus
one sampling step. Chunked prefill and prefix caching are off (the plugin needs the first; the second would turn
every repeat into a cache hit). The figures are medians; the load average of the machine is recorded before and
after, and so is the first token of each engine (SPTS may change it).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from vllm_check import _env_defaults, plugin_env  # noqa: E402  (same discovery of the plugin as the check)

DEFAULT_MODEL = Path(os.environ.get("SPTS_CACHE_DIR", Path.home() / ".cache" / "spts-compile")) / \
    "smollm2-135m-instruct-fp32"


def prompt_ids(model: Path, tokens: int, offset: int = 0) -> list[int]:
    """`tokens` token ids of Python's pydoc topics, from token `offset` on."""
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = AutoTokenizer.from_pretrained(model)(text, add_special_tokens=False)["input_ids"]
    if len(ids) < offset + tokens:
        raise SystemExit(f"the pydoc text has {len(ids)} tokens, fewer than --offset {offset} + --tokens {tokens}")
    return ids[offset:offset + tokens]


def engine_args(tokens: int) -> dict:
    """vllm.LLM's arguments for one request of `tokens` token ids: fp32, eager, the whole prompt in one step
    (chunked prefill off, so the plugin can run; prefix caching off, so every request prefills)."""
    return dict(skip_tokenizer_init=True, dtype="float32", seed=0, enforce_eager=True, max_model_len=tokens + 64,
                max_num_batched_tokens=tokens + 64, enable_chunked_prefill=False, enable_prefix_caching=False)


def engine(model: Path, tokens: int, options: dict | None, work: Path):
    """A vllm.LLM. With options, its engine-core and worker processes (spawned with this environment) find the
    plugin and read its options at model load; without, they do not see the plugin at all: vLLM as it is."""
    from vllm import LLM
    saved = dict(os.environ)
    if options is not None:
        env = plugin_env(work, options, None)
    else:   # VLLM_PLUGINS names the plugins to load: none (the editable install declares the entry point)
        env = {k: v for k, v in saved.items() if not k.startswith("SPTS_VLLM_")}
        env["VLLM_PLUGINS"] = ""
    os.environ.clear()
    os.environ.update(env)
    try:
        t = time.perf_counter()
        llm = LLM(model=str(model), **engine_args(tokens))
        return llm, time.perf_counter() - t
    finally:
        os.environ.clear()
        os.environ.update(saved)


def first_token(llm, ids: list[int]) -> tuple[float, int]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    sp = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
    t = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0]
    return time.perf_counter() - t, out.outputs[0].token_ids[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--options", default="{}", help="SPTS_VLLM_OPTIONS of the SPTS engine (JSON)")
    ap.add_argument("--workdir", default="/tmp/spts-vllm-ttft")
    ap.add_argument("--out", default=None, help="write the figures here (JSON)")
    args = ap.parse_args()
    _env_defaults()
    model, work = Path(args.model), Path(args.workdir)
    if not (model / "config.json").exists():
        raise SystemExit(f"{model} is not an HF model folder; make it with: python -c \"from benchmarks.models "
                         f"import load_model; load_model('smollm2')\" (the project's own Python)")
    work.mkdir(parents=True, exist_ok=True)
    options = json.loads(args.options)
    ids = prompt_ids(model, args.tokens)
    load_before = os.getloadavg()
    dense, dense_load = engine(model, args.tokens, None, work)
    spts, spts_load = engine(model, args.tokens, options, work)
    warm = {"dense": first_token(dense, ids), "spts": first_token(spts, ids)}
    times, tokens = {"dense": [], "spts": []}, {"dense": set(), "spts": set()}
    for i in range(args.repeats):
        for name, llm in (("dense", dense), ("spts", spts)):
            s, tok = first_token(llm, ids)
            times[name].append(s)
            tokens[name].add(tok)
            print(f"repeat {i}: {name} {s:.2f} s (first token {tok})", flush=True)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "what": "vLLM time to first token, one SmolLM2-135M-Instruct fp32 request, SPTS plugin vs vLLM's dense model",
        "model": str(model), "prompt_tokens": args.tokens, "prompt": "pydoc_data.topics, first tokens",
        "spts_options": options, "vllm": __import__("vllm").__version__, "torch": __import__("torch").__version__,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")), "enforce_eager": True,
        "chunked_prefill": False, "prefix_caching": False, "repeats": args.repeats, "interleaved": True,
        "engine_load_s": {"dense": round(dense_load, 1), "spts": round(spts_load, 1)},
        "warmup_s": {k: round(v[0], 3) for k, v in warm.items()},
        "ttft_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "speedup_dense_over_spts": round(med["dense"] / med["spts"], 3),
        "first_token": {k: sorted(v) for k, v in tokens.items()},
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(), "machine": platform.machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
