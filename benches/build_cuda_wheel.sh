#!/usr/bin/env bash
# Builds lugh's CUDA wheel (abi3, features python+cuda) on a machine with no GPU and no CUDA
# driver, to be copied to a GPU machine and installed there:
#
#   . .venv-bench/bin/activate            # any venv: maturin and NVIDIA's nvcc wheels go into it
#   benches/build_cuda_wheel.sh           # prints the wheel's path; ~13 min cold on 2 cores
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200), CUDAFORGE_THREADS (nvcc jobs, default
# every core), CARGO_BUILD_JOBS, CARGO_TARGET_DIR (default target/cuda-wheel).
#
# The link asks (cudarc's `dynamic-linking`, candle-kernels' cudart) for libcuda.so.1,
# libnvrtc.so.13, libcurand.so.10, libcublas.so.13, libcublasLt.so.13 and libcudart.so.13; the
# module keeps those it calls (printed at the end; with candle 0.11.1: libcuda, libcurand,
# libcublas, libcudart). None of them is bundled (--auditwheel skip) and there is no rpath to
# them, so on the GPU machine the loader must find them: libcuda.so.1 comes with the driver, the
# others with PyTorch's CUDA 13 wheels (or `pip install "cuda-toolkit[cudart,nvrtc,cublas,curand]==13.0.*"`),
# all in site-packages/nvidia/cu13/lib. Set before importing lugh:
#
#   export LD_LIBRARY_PATH="$(python -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${VIRTUAL_ENV:-}" ] || { echo "activate a venv first: pip installs into it" >&2; exit 1; }

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda-wheel}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"  # cudaforge cannot ask nvidia-smi here

# nvcc (candle-kernels' build script compiles its .cu files; cudarc reads `nvcc --version`)
# and the real libcudart.so.13, from NVIDIA's pip wheels under site-packages/nvidia/cu13.
python -m pip install --quiet "maturin>=1.9.4,<2.0"
. .ci/cuda_toolkit.sh

# Link-only stubs: no package ships a libcuda.so for a machine without a driver, and the real
# nvrtc/cuBLAS/cuRAND (~1 GB) are not needed to link. Each stub defines, as empty functions,
# every function cudarc's bindings declare for that library, under the real library's soname
# (which is what the module records as NEEDED). They are never loaded: only the linker reads them.
stubs="$CARGO_TARGET_DIR/cuda-stubs"
rm -rf "$stubs" && mkdir -p "$stubs"
cudarc_src="$(cargo metadata --format-version 1 --features cuda | python -c '
import json, os, sys
meta = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in meta["packages"] if p["name"] == "cudarc"))')"
echo "stubs from $cudarc_src"
for spec in driver:cuda:1 nvrtc:nvrtc:13 curand:curand:10 cublas:cublas:13 cublaslt:cublasLt:13; do
    IFS=: read -r module lib major <<< "$spec"
    # The functions are declared one per line inside `extern "C" { ... }` blocks, indented.
    sed -n 's/^ \{8,\}fn \([A-Za-z_][A-Za-z0-9_]*\)(.*/void \1(void) {}/p' \
        "$cudarc_src/src/$module/sys/mod.rs" | sort -u > "$stubs/$lib.c"
    [ -s "$stubs/$lib.c" ] || { echo "no functions found for lib$lib" >&2; exit 1; }
    cc -shared -fPIC -Wl,-soname,"lib$lib.so.$major" -o "$stubs/lib$lib.so.$major" "$stubs/$lib.c"
    ln -s "lib$lib.so.$major" "$stubs/lib$lib.so"
    echo "  lib$lib.so.$major: $(wc -l < "$stubs/$lib.c") functions"
done
# libcudart: the real one from the nvcc wheel (libmoe.a, nvcc's output, needs its internals).
ln -s "$CUDA_HOME/lib/libcudart.so.13" "$stubs/libcudart.so"
# LIBRARY_PATH: searched by the linker for -lcuda etc.; LD_LIBRARY_PATH would load the stubs.
export LIBRARY_PATH="$(realpath "$stubs")${LIBRARY_PATH:+:$LIBRARY_PATH}"

stamp="$CARGO_TARGET_DIR/wheel-stamp" && touch "$stamp"
maturin build --release --features python,cuda --auditwheel skip -o dist/
wheel="$(find dist -maxdepth 1 -name 'lugh-*.whl' -newer "$stamp" | head -n 1)"
[ -n "$wheel" ] || { echo "maturin wrote no new wheel to dist/" >&2; exit 1; }

# What the GPU machine's loader will have to find (see the top of this file).
python - "$wheel" <<'EOF'
import subprocess, sys, tempfile, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl, tempfile.TemporaryDirectory() as tmp:
    so = next(n for n in whl.namelist() if n.endswith(".so"))
    dyn = subprocess.run(["readelf", "-d", whl.extract(so, tmp)], capture_output=True, text=True, check=True)
    print(so, "needs:", ", ".join(l.split("[")[1].rstrip("]") for l in dyn.stdout.splitlines() if "(NEEDED)" in l))
EOF
echo "wheel: $(realpath "$wheel") ($(du -h "$wheel" | cut -f1))"
