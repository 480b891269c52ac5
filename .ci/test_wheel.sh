#!/usr/bin/env bash
# test_wheel.sh WHEEL TEST_VENV WHEEL_VENV: install WHEEL (built against another torch) beside the
# test environment's torch and run the kernel tests against it, outside the source tree.
# WHEEL_VENV is a light venv that sees TEST_VENV's packages (torch, pytest, ...) but not its editable
# fastft: the wheel's fastft is the only one it can import.
set -euo pipefail
WHEEL=$1 TEST_VENV=$2 WHEEL_VENV=$3
root=$(pwd)
start=$SECONDS
rm -rf "$WHEEL_VENV"
python_bin=$(readlink -f "$TEST_VENV/bin/python")
"$python_bin" -m venv --without-pip "$WHEEL_VENV"
site=$(echo "$WHEEL_VENV"/lib/python3*/site-packages)
test_site=$(cd "$TEST_VENV" && echo "$(pwd)"/lib/python3*/site-packages)
# A plain path line: TEST_VENV's site-packages is searched last and its .pth files (the editable
# install's import hook among them) are not run.
echo "$test_site" > "$site/zz-test-venv.pth"
"$TEST_VENV/bin/python" -m pip install -q --no-deps --target "$site" "$WHEEL"

tests=$(mktemp -d)
cp tests/conftest.py tests/test_optim.py tests/test_pooling.py tests/test_linear_ce.py "$tests/"
cat >> "$tests/conftest.py" <<'PY'


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_sessionstart(session):
    import sys

    import fastft
    import torch

    assert "site-packages" in fastft.__file__, f"testing the source tree, not the wheel: {fastft.__file__}"
    info = fastft.build_info()
    assert info["extension"], info["load_error"]
    sys.__stdout__.write(f"\nfastft wheel at {fastft.__file__}: built with torch {info['built_with_torch']}, "
                         f"tested under torch {torch.__version__}; CUDA kernels {info['cuda_archs'] or 'none'}\n")
PY
cd "$tests"
# LD_BIND_NOW: every symbol of _C resolved when it loads (as Python's RTLD_NOW does), not at first call.
LD_BIND_NOW=1 "$root/$WHEEL_VENV/bin/python" "$root/.ci/check_wheel.py" --expect-cuda
"$root/$WHEEL_VENV/bin/python" -m pytest -q -x -p no:cacheprovider test_optim.py test_pooling.py test_linear_ce.py
cd "$root"
rm -rf "$tests"
echo "wheel-test: $(basename "$WHEEL") under the test environment's torch: $((SECONDS - start)) s"
