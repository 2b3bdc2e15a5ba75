#!/usr/bin/env bash
# What to run when a GPU machine is lent: bf16 rm, sft and dpo on one GPU (tokens/s, peak memory,
# MFU), then multi_gpu / fsdp2 / zero3 compared when there are 2+ GPUs. Under 10 minutes.
#
#   bash scripts/gpu-check.sh            # on the GPU machine, from the repository root
#   bash scripts/gpu-check.sh --dry-run  # here, on the CPU: tiny model, checks the script's logic (CI runs it)
#
# The GPU image has torch, transformers, peft and accelerate but not trl, datasets or pydantic, and
# cannot install from an index. Bring wheels along: `bash scripts/gpu-wheels.sh` here fills gpu-wheels/
# (git-ignored, under 64 MiB), which travels with the working tree (the device tool's
# `carry: ["gpu-wheels"]`). Here pip's resolver decides, against this Python's own packages and with
# no index, which carried wheels are needed; those are installed into a temporary folder on
# PYTHONPATH, so the machine's environment is left as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && [ "${1:-}" = "--dry-run" ]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi
echo "gpu-check: Python $("$PY" -c 'import sys; print(sys.version.split()[0])') ($PY)"
WHEELS=${GPU_CHECK_WHEELS:-gpu-wheels}
SITE=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT
# Every module posttrain's training stages import; the pip name where it differs.
missing() {
  "$PY" - <<'PYEOF'
import importlib.util
need = {"torch": "torch", "transformers": "transformers", "accelerate": "accelerate", "peft": "peft",
        "trl": "trl", "datasets": "datasets", "pyarrow": "pyarrow", "dill": "dill", "multiprocess": "multiprocess",
        "xxhash": "xxhash", "fsspec": "fsspec", "pandas": "pandas", "safetensors": "safetensors",
        "tokenizers": "tokenizers", "pydantic": "pydantic", "yaml": "PyYAML", "jinja2": "jinja2"}
print(" ".join(pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
}
lacking=$(missing)
if [ -n "$lacking" ] && [ -f "$WHEELS/requirements.txt" ]; then
  echo "gpu-check: missing $lacking; installing from $WHEELS/ (no index)"
  "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" --dry-run \
    --report "$SITE/plan.json" -r "$WHEELS/requirements.txt"
  needed=$("$PY" -c 'import json, sys, urllib.parse as u
print(" ".join(u.unquote(u.urlparse(i["download_info"]["url"]).path) for i in json.load(open(sys.argv[1]))["install"]))' "$SITE/plan.json")
  if [ -n "$needed" ]; then
    # shellcheck disable=SC2086  # one wheel path per word
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$SITE" $needed
    echo "gpu-check: installed $(cd "$SITE" && ls -d ./*.dist-info | sed 's#^\./##; s#\.dist-info$##' | tr '\n' ' ')"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  lacking=$(missing)
fi
if [ -n "$lacking" ]; then
  echo "gpu-check: missing Python packages: $lacking" >&2
  echo "  Run \`bash scripts/gpu-wheels.sh\` on a machine with PyPI (GPU_PYTHON_VERSION=<this Python's X.Y>) and" >&2
  echo "  carry gpu-wheels/ with the working tree." >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false POSTTRAIN_PROGRESS=0
export HF_HOME=${HF_HOME:-$(mktemp -d /tmp/gpu-check-hf.XXXXXX)}
"$PY" -c "import torch, transformers, trl, peft, accelerate, datasets; print('gpu-check: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)"
"$PY" scripts/gpu_check.py "$@"
