#!/usr/bin/env bash
# Creates .venv and installs posttrain with the exact versions CI uses (requirements/ci.txt).
# torch goes in first and alone: pinned, it takes the CPU build where one is provided (as on
# these machines), instead of letting a dependency pull a multi-GB CUDA build.
# Idempotent: a second run only checks. Override the interpreter with PYTHON=..., the torch
# requirement with TORCH_SPEC=... (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${POSTTRAIN_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_q() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
want_torch=${TORCH_SPEC:-$(grep -E '^torch==' requirements/ci.txt)}
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "install: torch ($want_torch) into $VENV, about half a minute"
  pip_q "$want_torch"
fi
if ! "$VENV/bin/python" -c "import posttrain, trl, peft, pytest" >/dev/null 2>&1 \
   || [ requirements/ci.txt -nt "$VENV/.posttrain-installed" ] \
   || [ requirements/bench.txt -nt "$VENV/.posttrain-installed" ] || [ pyproject.toml -nt "$VENV/.posttrain-installed" ]; then
  echo "install: posttrain and its dependencies (requirements/ci.txt), about a minute"
  pip_q -r requirements/ci.txt
  pip_q -r requirements/bench.txt
  pip_q --no-deps -e .
  touch "$VENV/.posttrain-installed"
fi
# The instruction-following reward's checkers (an optional extra: posttrain runs without them).
# --no-deps: requirements/ifeval.txt pins every dependency itself (see the file for why).
if ! "$VENV/bin/python" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then
  echo "install: skipping the instruction-following checkers (if-verifiable needs Python 3.11+)"
elif ! "$VENV/bin/python" -c "import if_verifiable, nltk, langdetect, emoji, syllapy, immutabledict" >/dev/null 2>&1 \
   || [ requirements/ifeval.txt -nt "$VENV/.posttrain-ifeval-installed" ]; then
  echo "install: the instruction-following checkers (requirements/ifeval.txt), a few seconds"
  pip_q --no-deps -r requirements/ifeval.txt
  touch "$VENV/.posttrain-ifeval-installed"
fi
"$VENV/bin/python" -c "import posttrain, torch, transformers, trl; print('posttrain', posttrain.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__)"
