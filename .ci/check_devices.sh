#!/usr/bin/env bash
# Compile-checks what this CI machine (no GPU, x86-64 Linux) cannot run: `cargo check` of lugh
# with candle's CUDA and Metal features, and for ARM Linux.
# Called from .ci/run with the repo root as cwd, inside an activated venv that has pip.
set -euo pipefail

# Their own target dir: other features and targets would otherwise invalidate the main build.
export CARGO_TARGET_DIR="${DEVICE_CHECK_TARGET_DIR:-target/device-check}"

# --- CUDA ---
. .ci/cuda_toolkit.sh

# Without nvidia-smi cudaforge cannot detect the GPU: name one (sm_90, Hopper).
# CUDAFORGE_THREADS bounds nvcc's parallel jobs (its default is every core).
CUDA_COMPUTE_CAP=90 CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}" \
    cargo check --release --features cuda --lib

# --- Metal ---
# candle's Metal back end only builds for Apple targets; a check needs no macOS SDK or linker.
rustup target add aarch64-apple-darwin
cargo check --lib --features metal --target aarch64-apple-darwin

# --- ARM Linux (the portable kernels; NEON through candle) ---
rustup target add aarch64-unknown-linux-gnu
cargo check --lib --target aarch64-unknown-linux-gnu
