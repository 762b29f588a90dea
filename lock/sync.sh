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
# source distribution, once (uv caches the wheel; ~6 CPU-minutes): the library only, not its tools,
# server or multimodal parts
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF}"
# --compile-bytecode: pip compiles at install time, uv only when asked; without it every process
# recompiles what it imports wherever PYTHONDONTWRITEBYTECODE is set (torch alone: ~5 s a process)
"$uv" pip sync --quiet --compile-bytecode --python "$py" "$lock"
"$uv" pip install --quiet --python "$py" --no-deps --editable "$(dirname "$0")/.."
echo "$venv: $(grep -cE '^[A-Za-z0-9]' "$lock") packages of $lock, torch $torch, minimind editable"
