#!/usr/bin/env bash
# Fills dist/ with what benches/gpu/run.sh installs on the GPU machine (no network there),
# after benches/build_cuda_wheel.sh has put the lugh CUDA wheel in it:
#
#   benches/gpu/prepare_dist.sh          # [DIST] (default dist); PYVER (default 3.12)
#
# - wheels of pytest, gguf, safetensors, tqdm and their dependencies for CPython $PYVER on
#   manylinux x86_64, numpy left out: the GPU machine has it (PyTorch's), and it would take
#   16 MB of the 64 MiB that can travel with the tree;
# - curand-stub/libcurand.so.10: PyTorch's newer CUDA 13 wheels do not ship cuRAND (the
#   nvidia-curand wheel is 77 MB, too big to carry), yet the module needs libcurand.so.10 to
#   load: candle creates a cuRAND generator with each CUDA device (lugh never draws from it).
#   The stub defines every curand* function the module imports: creating, seeding and
#   destroying a generator succeed and do nothing, drawing numbers fails with
#   CURAND_STATUS_NOT_INITIALIZED, so a use would raise instead of returning garbage. run.sh
#   puts it on LD_LIBRARY_PATH only if `import lugh` fails for want of libcurand.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIST="${1:-dist}"
PYVER="${PYVER:-3.12}"

wheel="$(ls -t "$DIST"/lugh-*.whl 2>/dev/null | head -n 1)"
[ -n "$wheel" ] || { echo "no lugh wheel in $DIST: run benches/build_cuda_wheel.sh first" >&2; exit 1; }
echo "lugh wheel: $wheel"

pip download --only-binary=:all: --python-version "$PYVER" --platform manylinux2014_x86_64 \
    -d "$DIST" pytest gguf safetensors tqdm
rm -f "$DIST"/numpy-*.whl

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
unzip -q -o "$wheel" 'lugh/_lugh*.so' -d "$tmp"
so="$(ls "$tmp"/lugh/_lugh*.so | head -n 1)"
nm -D --undefined-only "$so" | awk '{print $NF}' | sed 's/@.*//' | grep '^curand' | sort -u \
    > "$tmp/curand.txt" || true
rm -rf "$DIST/curand-stub"
if [ -s "$tmp/curand.txt" ]; then
    {
        echo "/* libcurand.so.10 stub for lugh on machines without cuRAND: see prepare_dist.sh */"
        while read -r fn; do
            case "$fn" in
                curandCreateGenerator|curandCreateGeneratorHost)
                    echo "int $fn(void **generator, int kind) { (void)kind; *generator = (void *)generator; return 0; }" ;;
                curandGenerate*)
                    echo "int $fn(void) { return 101; /* CURAND_STATUS_NOT_INITIALIZED */ }" ;;
                *)
                    echo "int $fn(void) { return 0; }" ;;
            esac
        done < "$tmp/curand.txt"
    } > "$tmp/curand_stub.c"
    mkdir -p "$DIST/curand-stub"
    cc -shared -fPIC -O2 -Wl,-soname,libcurand.so.10 -o "$DIST/curand-stub/libcurand.so.10" \
        "$tmp/curand_stub.c"
    echo "curand-stub/libcurand.so.10: $(wc -l < "$tmp/curand.txt") functions ($(tr '\n' ' ' < "$tmp/curand.txt"))"
else
    echo "the module imports no curand function (a CPU build?): no stub"
fi

echo
ls -la "$DIST"
[ -d "$DIST/curand-stub" ] && ls -la "$DIST/curand-stub"
echo "total: $(du -sh "$DIST" | cut -f1) (at most 64 MiB travel with the tree)"
