#!/usr/bin/env bash
# Fresh machine -> a trained tiny MoR: venv, dependencies, the built-in corpus, a short CPU run.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: launch/quickstart.sh [trainer overrides ...]      (e.g. launch/quickstart.sh training.lr=1e-3)

Creates .venv (if missing), installs requirements.txt and this package, tokenizes the Python
standard library into data/stdlib_{train,valid} (skipped when the shards exist), trains
configs/tiny.yaml on this machine (CPU is fine: a few minutes), and prints where the checkpoints
and the TensorBoard logs are and the commands to try next. Safe to rerun: finished steps are skipped.

Environment:
  QUICKSTART_STEPS     training steps                               [200]
  QUICKSTART_RUN_DIR   checkpoints + TensorBoard logs               [runs/quickstart]
  QUICKSTART_VENV      virtual environment to create/use            [.venv]
  QUICKSTART_PYTHON    interpreter that creates the venv (>= 3.11)  [python3]
  QUICKSTART_REINSTALL=1  run pip again even if requirements are unchanged
  PIP_* variables reach pip (e.g. an extra index with CPU-only torch wheels).
EOF
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

# --- what the trainer is told: the only place these keys appear ---------------------------------
STEPS="${QUICKSTART_STEPS:-200}"
RUN_DIR="${QUICKSTART_RUN_DIR:-runs/quickstart}"
CONFIG=configs/tiny.yaml
DATA_PREFIX=data/stdlib
VOCAB_SIZE=4096              # must equal model.vocab_size in configs/tiny.yaml
OVERRIDES=(
    "logging.dir=$RUN_DIR"
    "data.train=${DATA_PREFIX}_train"
    "data.valid=${DATA_PREFIX}_valid"
    "data.tokenizer=$(dirname "$DATA_PREFIX")/tokenizer"   # written by --train-tokenizer; checked against the vocab
    "training.train_steps=$STEPS"
)
# -------------------------------------------------------------------------------------------------

VENV="${QUICKSTART_VENV:-.venv}"
BASE_PY="${QUICKSTART_PYTHON:-python3}"

step() { printf '\n==> %s\n' "$*" >&2; }
die() { echo "quickstart.sh: error: $*" >&2; exit 1; }

[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || die "QUICKSTART_STEPS must be a positive integer, got '$STEPS'"
cd "$(dirname "${BASH_SOURCE[0]}")/.."   # relative paths (configs/, data/, runs/) start at the repo root
START=$SECONDS

# 1. Virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
    command -v "$BASE_PY" >/dev/null 2>&1 || die "'$BASE_PY' not found; install Python >= 3.11 or set QUICKSTART_PYTHON"
    "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$("$BASE_PY" -V 2>&1) is too old: Python >= 3.11 is needed (set QUICKSTART_PYTHON)"
    step "Creating virtual environment $VENV"
    "$BASE_PY" -m venv "$VENV" || die "'$BASE_PY -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi
PY="$VENV/bin/python"

# 2. Dependencies; a stamp of requirements.txt + pyproject.toml skips pip when nothing changed.
STAMP="$VENV/.quickstart-installed"
WANT=$(cat requirements.txt pyproject.toml | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [ "${QUICKSTART_REINSTALL:-0}" = 1 ] || [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    step "Installing requirements.txt and mor-megatron (editable) into $VENV"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -r requirements.txt
    # the editable install of a package with linked subfolders warns about same-named folders
    PYTHONWARNINGS=ignore "$PY" -m pip install -q --no-deps -e .
    echo "$WANT" > "$STAMP"
else
    step "Dependencies already installed in $VENV (QUICKSTART_REINSTALL=1 to redo)"
fi

# 3. Data: the Python standard library's sources, tokenized with a freshly trained BPE.
if [ -f "${DATA_PREFIX}_train.bin" ] && [ -f "${DATA_PREFIX}_train.idx" ] \
   && [ -f "${DATA_PREFIX}_valid.bin" ] && [ -f "${DATA_PREFIX}_valid.idx" ]; then
    step "Data shards ${DATA_PREFIX}_{train,valid}.{bin,idx} exist; skipping preprocessing"
else
    WORKERS=$(nproc 2>/dev/null || echo 1); [ "$WORKERS" -le 4 ] || WORKERS=4
    step "Tokenizing the Python standard library into ${DATA_PREFIX}_{train,valid} (vocab $VOCAB_SIZE, $WORKERS workers)"
    mkdir -p "$(dirname "$DATA_PREFIX")"
    # --overwrite: whatever an interrupted earlier quickstart left under data/ is replaced, once whole
    "$PY" tools/preprocess_data.py --input stdlib --output-prefix "$DATA_PREFIX" \
        --train-tokenizer --vocab-size "$VOCAB_SIZE" --workers "$WORKERS" --overwrite
fi

# 4. Train: one process on this machine through the same launcher as multi-node runs; a free
# loopback port so a second run on this machine cannot collide with this one.
PORT="${MASTER_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
step "Training $CONFIG for $STEPS steps into $RUN_DIR"
PYTHON="$PY" launch/torchrun.sh --nnodes 1 --nproc-per-node 1 --master-addr 127.0.0.1 --master-port "$PORT" \
    --rdzv-id quickstart -- --config "$CONFIG" "${OVERRIDES[@]}" "$@"

# 5. The trainer has printed where the checkpoints and TensorBoard logs are, and what to try next.
step "Done in $((SECONDS - START)) s"
