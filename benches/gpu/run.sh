#!/usr/bin/env bash
# The one script to run on the GPU machine, in a single call of at most 10 minutes:
#
#   bash benches/gpu/run.sh
#
# That machine has Python 3.12 with PyTorch (CUDA 13 wheels), transformers, PEFT and numpy, but
# no Rust and no network; it gets this working tree and dist/ (see benches/gpu/README.md): the
# lugh CUDA wheel, wheels of pytest, gguf, safetensors and their dependencies, and maybe a
# libcurand stub. Steps, each with its own time limit, each going on after a failure:
#
#   1. a venv that sees the system's packages; lugh, pytest, gguf, safetensors from dist/ only;
#      LD_LIBRARY_PATH to the CUDA 13 libraries of PyTorch's nvidia-* wheels; nvidia-smi and
#      lugh.devices() printed                                                      (~20 s)
#   2. in the background: the 1B-class model (benches/make_model.py: F16 GGUF, hf/ copy) and,
#      from it, the Q4_K file and the adapters (bench_gpu.py --prepare-only)       (<= 4 min)
#   3. meanwhile, the reference tests on the GPU (LUGH_TEST_DEVICES)               (<= 3 min)
#   4. benches/gpu/bench_gpu.py: lugh beside PyTorch + PEFT and transformers       (<= 4 min)
#
# Everything lands in $OUT (default ./gpu-out): run.log (all of this output), nvidia-smi.txt,
# ldd.txt, tests.log, tests-junit.xml, make_model.log, bench_gpu.{log,md,json}, summary.txt.
#
# Environment (defaults for the GPU machine; the others let a CPU run check the plumbing):
#   LUGH_GPU_DEVICE   lugh device for the tests and the benchmark     (cuda; e.g. candle-cpu)
#   LUGH_GPU_LAYERS   layers of the bench model                       (22)
#   LUGH_GPU_QUICK    non-empty: bench_gpu.py --quick (small sizes)
#   LUGH_GPU_DIST     the wheels                                      (dist)
#   LUGH_GPU_PYTHON   the interpreter whose packages the venv sees    (python3)
#   LUGH_GPU_VENV     where the venv goes, made afresh                ($TMPDIR/lugh-gpu-venv)
#   LUGH_GPU_TEST_TIMEOUT, LUGH_GPU_MODEL_TIMEOUT, LUGH_GPU_BENCH_TIMEOUT: seconds (180, 240, 240)
#   LUGH_GPU_TOTAL_S  the benchmark is cut to end by then            (570, since the start)
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
DEVICE="${LUGH_GPU_DEVICE:-cuda}"
LAYERS="${LUGH_GPU_LAYERS:-22}"
QUICK="${LUGH_GPU_QUICK:+--quick}"
DIST="${LUGH_GPU_DIST:-$ROOT/dist}"
BASE_PYTHON="${LUGH_GPU_PYTHON:-python3}"
VENV="${LUGH_GPU_VENV:-${TMPDIR:-/tmp}/lugh-gpu-venv}"
TEST_TIMEOUT="${LUGH_GPU_TEST_TIMEOUT:-180}"
MODEL_TIMEOUT="${LUGH_GPU_MODEL_TIMEOUT:-240}"
BENCH_TIMEOUT="${LUGH_GPU_BENCH_TIMEOUT:-240}"
TOTAL_S="${LUGH_GPU_TOTAL_S:-570}"
# transformers and PEFT read local directories only; never wait on a network.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PIP_NO_INPUT=1

exec > >(tee -a "$OUT/run.log") 2>&1
tee_pid=$!
# At exit, let tee write out the last lines before the caller collects the log.
trap 'exec 1>&- 2>&-; wait "$tee_pid" 2>/dev/null' EXIT
status=()  # "step: result" lines for summary.txt
note() { status+=("$1"); echo "== $1"; }
section() { echo; echo "=============== $* ($(date +%T), ${SECONDS} s in)"; }

section "machine"
echo "repo: $ROOT ($(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo 'no git'))"
echo "device: $DEVICE, layers: $LAYERS ${QUICK}, out: $OUT"
uname -a
if command -v nvidia-smi >/dev/null; then
    nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
else
    echo "no nvidia-smi" | tee "$OUT/nvidia-smi.txt"
fi
"$BASE_PYTHON" -c 'import sys; print("python", sys.version)'
"$BASE_PYTHON" - <<'EOF'
from importlib import metadata
for name in ("torch", "transformers", "peft", "numpy", "safetensors", "gguf", "pytest", "lugh"):
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name}: not installed")
try:
    import torch
    print(f"  torch CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
except Exception as e:  # noqa: BLE001
    print(f"  import torch: {type(e).__name__}: {e}")
EOF

section "venv"
wheel="$(ls -t "$DIST"/lugh-*.whl 2>/dev/null | head -n 1)"
if [ -z "$wheel" ]; then
    echo "no lugh wheel in $DIST: see benches/gpu/README.md"
    note "setup: FAILED (no lugh wheel in $DIST)"
    printf '%s\n' "${status[@]}" > "$OUT/summary.txt"
    exit 1
fi
[ "$(ls "$DIST"/lugh-*.whl | wc -l)" -gt 1 ] && echo "several lugh wheels in $DIST: using the newest"
echo "lugh wheel: $wheel"
rm -rf "$VENV"
if "$BASE_PYTHON" -m venv --system-site-packages "$VENV"; then
    pip=("$VENV/bin/python" -m pip)
else  # no ensurepip (Debian without python3-venv): a bare venv, filled by the base pip
    echo "venv with pip failed; making one without pip"
    rm -rf "$VENV"
    "$BASE_PYTHON" -m venv --system-site-packages --without-pip "$VENV"
    pip=("$BASE_PYTHON" -m pip --python "$VENV/bin/python")
fi
PY="$VENV/bin/python"
# --system-site-packages shows the base *installation's* packages: if python3 is itself a venv
# (torch installed there), its site-packages would be missed. A .pth adds every site-packages
# directory the base interpreter sees, after the venv's own.
"$BASE_PYTHON" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
    > "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_lugh_gpu_base.pth"
pip_flags=(--no-index --find-links "$DIST" --disable-pip-version-check --progress-bar off)
"${pip[@]}" install "${pip_flags[@]}" "$wheel" pytest gguf safetensors
pip_rc=$?
# Into the venv even where the base already has a lugh of the same version (it would be kept).
"${pip[@]}" install "${pip_flags[@]}" --force-reinstall --no-deps "$wheel" || pip_rc=$?
[ "$pip_rc" -eq 0 ] && note "install: ok" || note "install: FAILED (pip exit $pip_rc)"

# The CUDA 13 libraries the module needs (libcudart, libnvrtc, libcublas(Lt), libcurand) come
# with PyTorch's nvidia-* wheels: every site-packages/nvidia/*/lib, cu13/lib first. libcuda.so.1
# is the driver's, found by the loader as usual.
nvidia_libs="$("$PY" - <<'EOF'
import glob, importlib.util, os
spec = importlib.util.find_spec("nvidia")
dirs = []
for base in (spec.submodule_search_locations or []) if spec else []:
    for d in sorted(glob.glob(os.path.join(base, "cu*", "lib"))) + sorted(glob.glob(os.path.join(base, "*", "lib"))):
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
print(":".join(dirs))
EOF
)"
echo "nvidia library dirs: ${nvidia_libs:-none}"
export LD_LIBRARY_PATH="${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

lugh_check() { "$PY" -c 'import lugh; print("lugh", lugh.__file__); print("lugh.devices():", lugh.devices())'; }
if ! lugh_check 2> "$OUT/import-error.txt"; then
    cat "$OUT/import-error.txt"
    # PyTorch's newer wheels leave cuRAND out; candle opens a cuRAND generator with every CUDA
    # device (it never draws from it in lugh). The stub satisfies the loader; see README.md.
    if grep -q "libcurand" "$OUT/import-error.txt" && [ -e "$DIST/curand-stub/libcurand.so.10" ]; then
        echo "no libcurand.so.10 here: using the stub in $DIST/curand-stub"
        note "libcurand: STUB (no real libcurand.so.10 on this machine)"
        export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$(cd "$DIST/curand-stub" && pwd)"
        lugh_check || note "import lugh: FAILED"
    else
        note "import lugh: FAILED"
    fi
fi
module="$(ls "$("$PY" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("lugh").origin))')"/_lugh*.so 2>/dev/null | head -n 1)"
if [ -n "$module" ] && command -v ldd >/dev/null; then
    ldd "$module" > "$OUT/ldd.txt" 2>&1
    echo "ldd $module (CUDA libraries and anything missing):"
    grep -E "cuda|cublas|nvrtc|curand|not found" "$OUT/ldd.txt" || echo "  (none: a CPU-only build?)"
fi
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

section "model (background, at most ${MODEL_TIMEOUT} s): bench-models/llama-1b-class-${LAYERS}L"
make_models() {
    set -e
    "$PY" benches/make_model.py --layers "$LAYERS" --quants "" --no-hf  # the F16 GGUF
    # From it, at once: the Q4_K file and the adapters (lugh, CPU) ...
    "$PY" benches/gpu/bench_gpu.py --layers "$LAYERS" --device cpu --prepare-only &
    local prep=$!
    # ... and the transformers copy, checked against lugh (needs transformers; else no
    # PyTorch cases: bench_gpu.py says n/a).
    "$PY" benches/make_model.py --layers "$LAYERS" --quants "" || echo "no hf/ copy (exit $?)"
    wait "$prep"
}
export -f make_models
export PY LAYERS
(
    started=$SECONDS
    timeout "$MODEL_TIMEOUT" bash -c make_models > "$OUT/make_model.log" 2>&1
    rc=$?
    echo "make_models exit $rc after $((SECONDS - started)) s" >> "$OUT/make_model.log"
    exit "$rc"
) &
model_pid=$!

section "tests on $DEVICE (at most ${TEST_TIMEOUT} s)"
LUGH_TEST_DEVICES="$DEVICE" timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -rfEs --durations=10 \
    -p no:cacheprovider --junitxml="$OUT/tests-junit.xml" \
    tests/test_inference.py tests/test_lora.py tests/test_train.py tests/test_generate.py \
    tests/test_devices.py 2>&1 | tee "$OUT/tests.log"
test_rc=${PIPESTATUS[0]}
case $test_rc in
    0) note "tests: passed ($(tail -n 1 "$OUT/tests.log"))" ;;
    124) note "tests: TIMED OUT after ${TEST_TIMEOUT} s" ;;
    *) note "tests: FAILED, exit $test_rc ($(tail -n 1 "$OUT/tests.log"))" ;;
esac

section "waiting for the model"
wait "$model_pid"
model_rc=$?
tail -n 15 "$OUT/make_model.log"
case $model_rc in
    0) note "model: ok" ;;
    124) note "model: TIMED OUT after ${MODEL_TIMEOUT} s" ;;
    *) note "model: FAILED, exit $model_rc (make_model.log)" ;;
esac

left=$((TOTAL_S - SECONDS))
bench_timeout=$((left < BENCH_TIMEOUT ? left : BENCH_TIMEOUT))
section "benchmark on $DEVICE (at most ${bench_timeout} s)"
if [ "$bench_timeout" -lt 60 ]; then
    note "bench: SKIPPED (only ${left} s left of ${TOTAL_S})"
else
    # The script stops starting cases 20 s before the hard limit, and saves its JSON after
    # every case, so a cut run still leaves its numbers.
    timeout "$bench_timeout" "$PY" benches/gpu/bench_gpu.py --layers "$LAYERS" --device "$DEVICE" \
        $QUICK --budget-s $((bench_timeout - 20)) --case-timeout 110 --json "$OUT/bench_gpu.json" \
        --markdown "$OUT/bench_gpu.md" 2>&1 | tee "$OUT/bench_gpu.log"
    bench_rc=${PIPESTATUS[0]}
    case $bench_rc in
        0) note "bench: ok" ;;
        124) note "bench: TIMED OUT after ${bench_timeout} s (partial bench_gpu.json)" ;;
        *) note "bench: exit $bench_rc (failed lugh case or check; see bench_gpu.log)" ;;
    esac
fi

section "summary"
note "wall clock: ${SECONDS} s"
printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
rm -rf "$VENV"
grep -qE "FAILED|TIMED OUT|exit [1-9]" "$OUT/summary.txt" && exit 1
exit 0
