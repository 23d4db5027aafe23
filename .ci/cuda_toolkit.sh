# Sourced: installs NVIDIA's nvcc 13.0 wheels into the active venv and exports CUDA_HOME and
# PATH for them. candle-core's `cuda` feature runs nvcc at build time (candle-kernels' build
# script, through cudaforge), even under `cargo check`, and cudarc asks `nvcc --version` which
# CUDA it targets; the H200 machines' driver 580 loads PTX up to CUDA 13.0, hence the pin.
python -m pip install --quiet "cuda-toolkit[nvcc,cccl]==13.0.*"
CUDA_HOME="$(python - <<'PY'
import os, nvidia  # a namespace package: look in each of its folders
for p in nvidia.__path__:
    d = os.path.join(p, "cu13")
    if os.path.isfile(os.path.join(d, "bin", "nvcc")):
        print(d)
        break
else:
    raise SystemExit("no nvidia/cu13/bin/nvcc in site-packages")
PY
)"
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
nvcc_release="$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
echo "nvcc $nvcc_release ($(command -v nvcc))"
[ "$nvcc_release" = "13.0" ] || { echo "expected nvcc 13.0, got '$nvcc_release'" >&2; exit 1; }
