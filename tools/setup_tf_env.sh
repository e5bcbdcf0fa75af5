#!/usr/bin/env bash
# Create or update .venv-tf, the environment in which the exporter runs TensorFlow and onnx2tf
# (tools/onnx2tf.py and tools/make_kaggle_model.py start its python as a subprocess).
#
#   bash tools/setup_tf_env.sh [VENV_DIR]
#
# VENV_DIR defaults to $PYMETRIC_TF_VENV, else .venv-tf in the repository root. Idempotent: when
# the environment was completed with the current requirements-tf.txt it only says so (well under a
# second). Otherwise it creates the venv if needed and pip-installs requirements-tf.txt (about
# 2.6 GB; ~1 min with a warm pip cache, a few minutes on a fresh machine), checks the imports and
# then writes the stamp file that the exporter looks for. A run that is interrupted leaves no
# stamp, so the next run installs again. Concurrent runs wait for each other (flock).
# Set PYTHON to choose the interpreter (Python 3.10-3.12; default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${PYMETRIC_TF_VENV:-$ROOT/.venv-tf}}"
REQ="$ROOT/requirements-tf.txt"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.pymetric-tf-ready"

[ -f "$REQ" ] || { echo "error: $REQ not found" >&2; exit 2; }
want="$(sha256sum "$REQ" | cut -d' ' -f1)"

is_ready() { [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; }

if is_ready; then
    echo "TensorFlow environment $VENV is up to date"
    exit 0
fi

mkdir -p "$VENV"
exec 9>"$VENV/.setup.lock"
flock 9
if is_ready; then  # another run finished it while we waited
    echo "TensorFlow environment $VENV is up to date"
    exit 0
fi
rm -f "$STAMP"

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)'; then
        echo "error: $PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); onnx2tf 1.29.24 and TensorFlow 2.19 need 3.10-3.12 (set PYTHON=...)" >&2
        exit 2
    fi
    echo "creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
echo "installing requirements-tf.txt into $VENV"
# (the grep drops the warnings of a pip configuration that lists local indexes which may be absent)
"$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$REQ" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
if ! out="$(TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/python" -c \
        'import tensorflow, tf_keras, onnx2tf, onnx, onnxruntime, ai_edge_litert.interpreter, cv2' 2>&1)"; then
    echo "$out" >&2
    echo "error: the packages in $VENV do not import (see above); delete $VENV and run this script again" >&2
    exit 1
fi
echo "$want" > "$STAMP"
echo "TensorFlow environment ready: $VENV ($(du -sh "$VENV" | cut -f1), $(( $(date +%s) - start )) s)"
