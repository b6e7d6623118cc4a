"""Real models for the benchmarks: the loader lives in the package (`spts_compile.models`, re-exported
here so that `from .models import load_model, sanity_check` keeps working); this module adds what only
the benchmarks need, the cached LTP calibration of a benchmark model.

Models: `smollm2` (SmolLM2-135M-Instruct, the default), `gemma3` (extra `[gemma]`), `qwen05`
(Qwen2.5-Coder-0.5B-Instruct, the accuracy judge, extra `[qwen]`), or a path. Each is converted once to
an fp32 folder under `$SPTS_CACHE_DIR`, else `~/.cache/spts-compile`.

    python -m benchmarks.models --model qwen05     # load (on first use convert) a model, check it answers
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from spts_compile.models import (  # noqa: F401  (re-exported for the benchmark scripts)
    CACHE_VERSION,
    MODEL_NAMES,
    ModelFileMismatch,
    ModelNotInstalled,
    cache_root,
    chat_ids,
    greedy_answer,
    load_gemma3_270m,
    load_local,
    load_model,
    load_qwen05,
    load_smollm2,
    package_folder,
    sanity_check,
)

log = logging.getLogger("spts_compile.benchmarks")


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


if __name__ == "__main__":
    from spts_compile.models import main

    raise SystemExit(main())
