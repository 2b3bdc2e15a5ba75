#!/usr/bin/env bash
# Prepares gpu-wheels/: the wheels scripts/gpu-check.sh installs on a GPU machine that cannot reach
# an index. Run it here, where PyPI is reachable, then carry gpu-wheels/ with the working tree.
#
#   bash scripts/gpu-wheels.sh                 # for the lent H200 image: Python 3.12, x86-64
#   GPU_PYTHON_VERSION=3.11 bash scripts/gpu-wheels.sh
#
# The image has torch 2.11, transformers 5.17, peft, accelerate 1.15, huggingface_hub 1.33, pandas,
# pyarrow, fsspec, xxhash, jinja2 and pyyaml, but no trl, datasets or pydantic. So: trl (declares
# transformers>=4.56.2, accelerate>=1.10.1, datasets>=4.7, pyarrow>=21), datasets 5.2.0 as CI pins it
# (huggingface-hub>=1.31, pyarrow>=24, fsspec<=2026.9.0, dill<0.4.2, multiprocess<0.70.20) and what
# the image lacks of those, pydantic with its compiled core, and pyarrow 26 (the image's version is
# unknown; datasets needs >=24). Versions are requirements/ci.txt's where it pins them.
# --no-deps: pip resolves them against the image there (gpu-check.sh), not here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
VERSION=${GPU_PYTHON_VERSION:-3.12}
DIR=${GPU_CHECK_WHEELS:-gpu-wheels}
pin() { grep -E "^$1==" requirements/ci.txt || { echo "gpu-wheels: $1 is not pinned in requirements/ci.txt" >&2; exit 1; }; }
WHEELS=("$(pin trl)" "$(pin datasets)" "$(pin pydantic)" "$(pin pyarrow)"
        dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
        pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0)
mkdir -p "$DIR"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$VERSION" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DIR" "${WHEELS[@]}"
printf '%s\n' "${WHEELS[@]}" > "$DIR/requirements.txt"
size=$(du -sm "$DIR" | cut -f1)
echo "gpu-wheels: ${#WHEELS[@]} wheels for Python $VERSION in $DIR/ (${size} MiB; the device tool carries 64 MiB with the tree)"
if [ "$size" -gt 60 ]; then echo "gpu-wheels: over 60 MiB: the working tree may not fit beside it" >&2; exit 1; fi
