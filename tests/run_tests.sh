#!/usr/bin/env bash
# The project's test command: a fresh virtual environment (.venv), the pinned requirements,
# this package in editable mode, then the whole CPU suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MOR_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt
PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install -q --no-deps -e .  # setuptools notes on the kernels/tools links
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# DeepSpeed JIT-compiles a C++ op on first use; keep that build (and its lock file) inside the
# venv, so a build killed elsewhere can never leave a stale lock that blocks this run.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(cd "$VENV" && pwd)/torch_extensions}"
# Build it once up front (best effort), so no test's own time limit pays for the cold compile.
DS_ACCELERATOR=cpu "$VENV/bin/python" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
    >/dev/null 2>&1 || echo "note: DeepSpeed shm op was not prebuilt; the first training test will build it" >&2
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
