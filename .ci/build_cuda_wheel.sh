#!/usr/bin/env bash
# build_cuda_wheel.sh PYTHON VENV TORCH_SPEC: a CUDA wheel of fastft for PYTHON's CPython, built against
# TORCH_SPEC (the oldest torch fastft supports) in VENV, then checked under that torch on this GPU-less
# machine: it imports from site-packages, every op has its CPU, Meta and CUDA kernels, the CPU path is
# right, and the binary holds SASS for each of CUDA_ARCHS and PTX for the newest (cuobjdump, which ships
# inside triton). Leaves the wheel in dist/. BUILD_DIR: the CMake build folder (default build/cuda-cpXY).
set -euo pipefail
PY=$1 VENV=$2 TORCH_SPEC=$3
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
CUDA_ARCHS=${CUDA_ARCHS:-80;90}
root=$(pwd)
start=$SECONDS

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
"$VENV/bin/pip" install -q "$TORCH_SPEC" "scikit-build-core>=0.10" ninja "cmake>=3.26" pybind11 numpy
versions=$("$VENV/bin/python" -c 'import sys, torch; print(f"CPython {sys.version.split()[0]}, torch {torch.__version__}")')
echo "cuda-wheel: $versions ready after $((SECONDS - start)) s"

tag=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
rm -f dist/fastft-*-"$tag"-*.whl
PATH=$CUDA_HOME/bin:$PATH CUDACXX=$CUDA_HOME/bin/nvcc FASTFT_CUDA=ON FASTFT_CUDA_ARCHS=$CUDA_ARCHS \
  "$VENV/bin/pip" wheel -q --no-build-isolation --no-deps -C build-dir="${BUILD_DIR:-build/cuda-$tag}" -w dist .
wheel=$(ls dist/fastft-*-"$tag"-*.whl)
echo "cuda-wheel: built $wheel after $((SECONDS - start)) s"

"$VENV/bin/pip" install -q --force-reinstall --no-deps "$wheel"
cuobjdump=$(ls "$VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump)
# From outside the source tree, so that the installed wheel is what is imported.
(cd /tmp && "$VENV/bin/python" "$root/.ci/check_wheel.py" --expect-cuda --cuobjdump "$cuobjdump" \
  --archs "$CUDA_ARCHS")
echo "cuda-wheel: $wheel checked under the torch it was built against ($((SECONDS - start)) s in all)"
