#!/usr/bin/env bash
# Compile-checks the GPU back ends, which this CI machine (no GPU, x86-64 Linux) cannot run:
# `cargo check` of lugh with candle's CUDA and Metal features.
# Called from .ci/run with the repo root as cwd, inside an activated venv that has pip.
set -euo pipefail

# Their own target dir: other features and targets would otherwise invalidate the main build.
export CARGO_TARGET_DIR="${DEVICE_CHECK_TARGET_DIR:-target/device-check}"

# --- CUDA ---
# candle-core's `cuda` feature runs nvcc at build time (candle-kernels' build script, through
# cudaforge), even under `cargo check`, and cudarc asks `nvcc --version` which CUDA it targets.
# NVIDIA's pip wheels ship nvcc, its headers and CCCL under site-packages/nvidia/cu13.
python -m pip install --quiet "cuda-toolkit[nvcc,cccl]==13.0.*"
CUDA_HOME="$(python - <<'EOF'
import os, nvidia  # a namespace package: look in each of its folders
for p in nvidia.__path__:
    d = os.path.join(p, "cu13")
    if os.path.isfile(os.path.join(d, "bin", "nvcc")):
        print(d)
        break
else:
    raise SystemExit("no nvidia/cu13/bin/nvcc in site-packages")
EOF
)"
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
nvcc_release="$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
echo "nvcc $nvcc_release ($(command -v nvcc))"
[ "$nvcc_release" = "13.0" ] || { echo "expected nvcc 13.0, got '$nvcc_release'" >&2; exit 1; }

# Without nvidia-smi cudaforge cannot detect the GPU: name one (sm_90, Hopper).
# CUDAFORGE_THREADS bounds nvcc's parallel jobs (its default is every core).
CUDA_COMPUTE_CAP=90 CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}" \
    cargo check --release --features cuda --lib

# --- Metal ---
# candle's Metal back end only builds for Apple targets; a check needs no macOS SDK or linker.
rustup target add aarch64-apple-darwin
cargo check --lib --features metal --target aarch64-apple-darwin
