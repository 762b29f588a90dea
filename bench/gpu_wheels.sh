#!/usr/bin/env bash
# Wheels for bench/gpu.sh on a machine without network (the lent H200's image: Python 3.12, torch,
# triton, transformers, pytest, no fastapi/uvicorn/openai/liger): the serving stack and liger-kernel at
# the versions in lock/cpu.txt, for CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored).
#     bash bench/gpu_wheels.sh [PYTHON]      # PYTHON: one with pip (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
NAMES="fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn openai distro jiter sniffio
liger-kernel"
pins=()
for name in $NAMES; do
    pin=$(grep -E "^$name==" lock/cpu.txt | grep -v "python_full_version < '3.11'" | head -1 | cut -d' ' -f1)
    [ -n "$pin" ] || { echo "gpu_wheels.sh: $name is not in lock/cpu.txt" >&2; exit 1; }
    pins+=("$pin")
done
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${pins[@]}"
ls .whl
