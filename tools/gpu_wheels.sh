#!/usr/bin/env bash
# Build the offline wheel folder that `tools/gpu_check.py --wheels DIR` installs on a GPU host
# without network: the packages such a host lacks (megatron-core, DeepSpeed and their needs,
# datasets and its needs), as CPython 3.12 / manylinux x86_64 wheels, pinned like requirements.txt.
#
#   bash tools/gpu_wheels.sh [DIR]        # default DIR: .whl (git-ignored)
#
# torch, triton, transformers, tokenizers, safetensors, pyarrow, numpy, PyYAML, pytest and
# tensorboard are expected on the host already (they are large, and CUDA-specific for torch).
# gpu_check.py installs a wheel only where the host lacks that package or has an older version.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR="${1:-.whl}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "$DIR"

pin() {  # the version requirements.txt pins for a package
    grep -i "^$1==" requirements.txt | cut -d= -f3
}

# package==version for everything the host lacks; requirements.txt pins where it names one,
# otherwise the versions this project's CPU environment was tested with.
PACKAGES=(
    "megatron-core==$(pin megatron-core)"     # has a compiled helper: a cp312 wheel
    # DeepSpeed's runtime requirements (its wheel is built below)
    einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 py-cpuinfo==9.0.0
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 packaging==26.4
    # datasets and what it needs beyond the host's pyarrow, numpy, tqdm, filelock, PyYAML and
    # huggingface-hub (transformers brings those)
    "datasets==$(pin datasets)" dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0
    pandas==3.1.1 python-dateutil==4.0.0 tzdata==2026.6
)

echo "==> downloading ${#PACKAGES[@]} wheels for CPython 3.12, manylinux x86_64, into $DIR" >&2
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DIR" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    "${PACKAGES[@]}"

# DeepSpeed is published as an sdist only. Without DS_BUILD_* variables its setup builds no
# C++/CUDA op (they are JIT-compiled when first used), so the result is a pure-Python wheel
# that works on any Python 3 host; --no-build-isolation builds it against this venv's torch.
DS="deepspeed==$(pin deepspeed)"
if ! ls "$DIR"/deepspeed-*.whl >/dev/null 2>&1; then
    echo "==> building a pure-Python wheel of $DS" >&2
    DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$PY" -m pip wheel --quiet --no-deps --no-build-isolation \
        --wheel-dir "$DIR" "$DS"
fi

count=$(ls "$DIR"/*.whl | wc -l)
size=$(du -sh "$DIR" | cut -f1)
echo "==> $DIR: $count wheels, $size" >&2
ls -1 "$DIR"
echo "carry it to the GPU host with the tree and run: python tools/gpu_check.py --wheels $DIR" >&2
