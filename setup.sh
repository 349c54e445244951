#!/usr/bin/env bash
# Sets up a fresh machine for hashindex: Fashion-MNIST from Debian (where apt exists), a virtualenv
# in .venv with torch and the package installed editable with its test extras. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    echo "setup: installing dataset-fashion-mnist (Debian)"
    if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null; then
        echo "setup: could not install dataset-fashion-mnist; the demo falls back to scikit-learn's digits" >&2
    fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: pip takes these two from the local wheel mirror where there is one
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import hashindex, torch, faiss, zarr, numba, dask.distributed" \
    || { echo "setup: installation failed" >&2; exit 1; }
# the search kernels compile once here (~50 s on 2 cores) into numba's cache, not in a user's first search
.venv/bin/python -m hashindex.search || echo "setup: search kernels not precompiled; they compile on first use" >&2
echo "setup: ready (.venv)"
