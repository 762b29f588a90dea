#!/usr/bin/env sh
# Makes VENV hold exactly the packages of LOCK (lock/cpu.txt or lock/cuda.txt) plus minimind itself,
# editable; creates VENV with PYTHON if needed.   lock/sync.sh PYTHON VENV LOCK
#
# torch's CPU build (`torch==X+cpu` in lock/cpu.txt) is not on PyPI: it comes from a local wheel folder
# when one holds it (TORCH_FIND_LINKS, PIP_FIND_LINKS or pip's find-links setting), else from PyPI's
# sibling index for PyTorch CPU builds. Everything else comes from PyPI.
set -eu
python=$1 venv=$2 lock=$3
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
uv="$venv/bin/uv"
if [ ! -x "$uv" ]; then  # bootstrap with the venv's pip; from then on the lock keeps uv itself pinned
    "$py" -m pip install -q --disable-pip-version-check "uv==$(sed -n 's/^uv==\([^ ;]*\).*/\1/p' "$lock")"
fi
torch=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$lock")
case "$torch" in
*+cpu)
    tag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    source="--index-url https://download.pytorch.org/whl/cpu"
    pip_links=$("$python" -m pip config get global.find-links 2>/dev/null || true)
    for dir in ${TORCH_FIND_LINKS:-} ${PIP_FIND_LINKS:-} $pip_links; do
        if ls "$dir/torch-$torch-$tag-"*manylinux*x86_64.whl >/dev/null 2>&1; then
            source="--no-index --find-links $dir"
            break
        fi
    done
    # torch first, alone, from its own source; the sync below then finds it installed and keeps it
    # shellcheck disable=SC2086
    "$uv" pip install --quiet --python "$py" --no-deps $source "torch==$torch"
    ;;
esac
# llama-cpp-python (the runtimes extra: tests load our GGUF exports with it) compiles llama.cpp from its
# source distribution, once (uv caches the wheel, keyed by these settings; ~6 CPU-minutes): the library
# only, for AVX2 rather than this CPU (-march=native on a CPU with AMX compiles ggml's AMX matmul, which
# segfaults on q8_0 weights: llama.cpp issue #20824; and a portable build runs on every CI machine)
llama_cpp=""
for define in GGML_NATIVE=OFF GGML_AVX=ON GGML_AVX2=ON GGML_FMA=ON GGML_F16C=ON GGML_BMI2=ON GGML_AVX512=OFF \
    GGML_AMX_TILE=OFF GGML_AMX_INT8=OFF GGML_AMX_BF16=OFF LLAVA_BUILD=OFF LLAMA_BUILD_TOOLS=OFF \
    LLAMA_BUILD_EXAMPLES=OFF LLAMA_BUILD_TESTS=OFF LLAMA_BUILD_SERVER=OFF LLAMA_CURL=OFF; do
    llama_cpp="$llama_cpp --config-settings-package llama-cpp-python:cmake.define.$define"
done
# --compile-bytecode: pip compiles at install time, uv only when asked; without it every process
# recompiles what it imports wherever PYTHONDONTWRITEBYTECODE is set (torch alone: ~5 s a process)
# shellcheck disable=SC2086
"$uv" pip sync --quiet --compile-bytecode --python "$py" $llama_cpp "$lock"
"$uv" pip install --quiet --python "$py" --no-deps --editable "$(dirname "$0")/.."
echo "$venv: $(grep -cE '^[A-Za-z0-9]' "$lock") packages of $lock, torch $torch, minimind editable"
