#!/usr/bin/env bash
# Checks what this CI machine (no GPU, x86-64 Linux) cannot run natively: `cargo check` of
# lugh with candle's CUDA and Metal features, and the ARM Linux kernels' tests under qemu-user.
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

# --- ARM Linux: the NEON kernels' tests (and the rest of `ops`), emulated ---
# qemu's default CPU has `dotprod` and `i8mm` (the `sdot` and `smmla` kernels); the NEON tests
# also run the baseline ones directly. A Cortex-A53 has no `dotprod`: there only the tests of NEON's own kernels
# (`neon_`: the baseline integer ones, and F16/BF16, which need no extension), as candle's NEON
# dot products, which the other tests compare with, use `sdot` unconditionally.
rustup target add aarch64-unknown-linux-gnu
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user gcc-aarch64-linux-gnu >/dev/null
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --release --lib --target aarch64-unknown-linux-gnu ops::
QEMU_CPU=cortex-a53 cargo test --release --lib --target aarch64-unknown-linux-gnu \
    ops::qmatmul::tests::neon_
