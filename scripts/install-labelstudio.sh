#!/usr/bin/env bash
# Build the separate environment Label Studio (the human annotation tool) runs in:
#
#   scripts/install-labelstudio.sh [VENV_DIR]     # default: .venv-labelstudio beside this repo's root
#   .venv-labelstudio/bin/label-studio start --no-browser --port 8080
#
# Why a separate environment: Label Studio is a Django application that pins its own versions
# of many common packages (Django, numpy, pydantic, ...). posttrain never imports it: the
# `labelstudio` annotator talks to a running server over its REST API, so the two
# environments never have to agree. POSTTRAIN_LABEL_STUDIO names the `label-studio` command
# for tests that start a server (default: .venv-labelstudio/bin/label-studio).
#
# Idempotent: an environment whose `label-studio --version` already works is left alone.
# Takes a few minutes and about 1 GB the first time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-labelstudio}"
PYTHON="${PYTHON:-python3}"
LABEL_STUDIO_VERSION="${LABEL_STUDIO_VERSION:-1.23.2}"

check() {
    "$VENV/bin/python" -c 'import label_studio; print("label-studio", label_studio.__version__)'
}

if [[ -x "$VENV/bin/label-studio" ]] && check 2>/dev/null; then
    echo "Label Studio environment already complete: $VENV"
    exit 0
fi

echo "creating $VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "label-studio==$LABEL_STUDIO_VERSION"

check
echo "done. Start it with: $VENV/bin/label-studio start --no-browser"
