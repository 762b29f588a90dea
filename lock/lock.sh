#!/usr/bin/env sh
# Resolves the locked dependency set: lock/cuda.txt (PyPI's torch, a CUDA build, and its CUDA runtime
# wheels) and lock/cpu.txt (the same versions of everything, with PyTorch's CPU build and no CUDA
# wheels). Universal lock for Linux x86-64, Python 3.10-3.12 (pyproject's [tool.uv] environments).
# torch's version is chosen in lock/torch.txt; every other version is the newest that resolves.
#
#   lock/lock.sh UV OUT_DIR            keep today's pins where they still resolve (after a pyproject edit)
#   lock/lock.sh UV OUT_DIR --upgrade  re-resolve everything to the newest releases (`make upgrade`)
set -eu
uv=$1 out=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
mkdir -p "$out"
# keep the committed pins as preferences: uv reads an existing output file and reuses its versions
for v in cuda cpu; do
    [ "$out/$v.txt" -ef "$here/$v.txt" ] || { [ -f "$here/$v.txt" ] && cp "$here/$v.txt" "$out/$v.txt"; } || true
done
compile() {  # compile OUTPUT [extra uv args]: the header names the command that regenerates it
    o=$1
    shift
    (cd "$root" && "$uv" pip compile pyproject.toml --extra dev --extra runtimes --constraints lock/torch.txt --universal \
        --python-version 3.10 --no-python-downloads --quiet --annotation-style line \
        --custom-compile-command "make lock  (lock/lock.sh; make upgrade re-resolves to the newest)" \
        --output-file "$o" "$@")
}
compile "$out/cuda.txt" "$@"
# the CPU set: the CUDA set's versions as constraints, minus the CUDA runtime wheels that only PyPI's
# torch build needs; torch's CPU build has the same version with the local label +cpu
grep -oE '^(nvidia-|cuda-)[A-Za-z0-9._-]+' "$out/cuda.txt" | sort -u > "$out/.cuda-only.txt"
grep -E '^[A-Za-z0-9]' "$out/cuda.txt" > "$out/.cuda-pins.txt"
compile "$out/cpu.txt" --constraints "$out/.cuda-pins.txt" --excludes "$out/.cuda-only.txt"
rm -f "$out/.cuda-only.txt" "$out/.cuda-pins.txt"
sed -i -E "s/,? -c [^ ,]*\\.cuda-pins\\.txt//; s/# via ,/# via/" "$out/cpu.txt"  # the constraint file was a temporary
torch=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$out/cpu.txt")
sed -i "s/^torch==$torch\b/torch==${torch%+cpu}+cpu/" "$out/cpu.txt"
if grep -qE '^(nvidia-|cuda-)' "$out/cpu.txt"; then
    echo "lock.sh: CUDA wheels left in $out/cpu.txt" >&2
    exit 1
fi
echo "locked: $out/cuda.txt ($(grep -cE '^[A-Za-z0-9]' "$out/cuda.txt") pins), $out/cpu.txt ($(grep -cE '^[A-Za-z0-9]' "$out/cpu.txt") pins)"
