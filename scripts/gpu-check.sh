#!/usr/bin/env bash
# What to run when a GPU machine is lent: bf16 rm, sft and dpo on one GPU (tokens/s, peak memory,
# MFU), then multi_gpu / fsdp2 / zero3 compared when there are 2+ GPUs. Under 10 minutes.
#
#   bash scripts/gpu-check.sh            # on the GPU machine, from the repository root
#   bash scripts/gpu-check.sh --dry-run  # here, on the CPU: tiny model, checks the script's logic
#
# The GPU image has torch, transformers, peft and accelerate but not trl (nor, possibly, datasets
# and the rest posttrain imports), and cannot install from an index. Bring wheels along: on a
# machine with PyPI,
#   pip download --no-deps -d .gpu-wheels trl==1.16.0 <whatever this script reports missing>
# and carry `.gpu-wheels` with the working tree (the device tool's `carry: [".gpu-wheels"]`).
# Wheels are unpacked into a temporary folder on PYTHONPATH (no pip, no index). Wheels with
# compiled code (pyarrow, xxhash) must match the GPU machine's Python version.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && [ "${1:-}" = "--dry-run" ]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi
WHEELS=${GPU_CHECK_WHEELS:-.gpu-wheels}
SITE=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" - "$WHEELS" "$SITE" <<'PYEOF'
import sys, zipfile, pathlib
wheels, site = pathlib.Path(sys.argv[1]), sys.argv[2]
for whl in sorted(wheels.glob("*.whl")):
    zipfile.ZipFile(whl).extractall(site)
    print(f"gpu-check: using {whl.name}")
PYEOF
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false POSTTRAIN_PROGRESS=0
export HF_HOME=${HF_HOME:-$(mktemp -d /tmp/gpu-check-hf.XXXXXX)}
# Every module posttrain's training stages import; the pip name where it differs.
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"torch": "torch", "transformers": "transformers", "accelerate": "accelerate", "peft": "peft",
        "trl": "trl", "datasets": "datasets", "pyarrow": "pyarrow", "dill": "dill", "multiprocess": "multiprocess",
        "xxhash": "xxhash", "fsspec": "fsspec", "pandas": "pandas", "safetensors": "safetensors",
        "tokenizers": "tokenizers", "pydantic": "pydantic", "yaml": "PyYAML", "jinja2": "jinja2"}
print(" ".join(pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "gpu-check: missing Python packages: $missing" >&2
  echo "  On a machine with PyPI, for this machine's Python ($("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')):" >&2
  echo "    pip download --no-deps --only-binary=:all: --python-version $("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])') -d .gpu-wheels $missing" >&2
  echo "  (trl: trl==1.16.0, datasets: datasets==5.2.0, as in requirements/ci.txt) and carry .gpu-wheels." >&2
  exit 2
fi
"$PY" -c "import torch, transformers, trl, peft, accelerate; print('gpu-check: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"
exec "$PY" scripts/gpu_check.py "$@"
