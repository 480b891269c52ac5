"""The build and the loader: build_info, the pure-PyTorch fallback, the CLI, the isolated-build guard."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastft

ROOT = Path(__file__).resolve().parents[1]


def run_python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT,
                          timeout=300)


def test_build_info_contract():
    info = fastft.build_info()
    for key, typ in [("version", str), ("torch", str), ("extension", bool), ("cuda", bool), ("cuda_archs", str)]:
        assert isinstance(info[key], typ), key
    assert info["torch"] == torch.__version__
    assert info["version"] == fastft.__version__
    if os.environ.get("FASTFT_DISABLE_EXT", "0") in ("", "0"):
        # The test environment is built by `make test`: a silent fallback would hide a broken build.
        assert info["extension"], info["load_error"]
        assert "cpu" in info["kernel_devices"]
        assert info["built_with_torch"] == torch.__version__


STEP_AND_COMPARE = """
import torch, fastft, json
torch.manual_seed(0)
a = [torch.nn.Parameter(torch.randn(50)) for _ in range(3)]
b = [torch.nn.Parameter(p.detach().clone()) for p in a]
oa, ob = fastft.AdamW(a, lr=1e-2, l2_init=0.0, max_grad_norm=1.0), torch.optim.AdamW(b, lr=1e-2)
for _ in range(5):
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p); q.grad = p.grad.clone()
    oa.step(); torch.nn.utils.clip_grad_norm_(b, 1.0); ob.step()
err = max(float((p - q).abs().max().detach()) for p, q in zip(a, b))
print(json.dumps(dict(info=fastft.build_info(), err=err)))
"""


def test_disable_ext_uses_reference_without_warning():
    res = run_python("import warnings; warnings.simplefilter('error')\n" + STEP_AND_COMPARE, FASTFT_DISABLE_EXT="1")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["info"]["extension"] is False and out["info"]["load_error"] == "disabled by FASTFT_DISABLE_EXT"
    assert out["err"] < 1e-5


def test_broken_extension_warns_once_and_falls_back():
    code = "import sys; sys.modules['fastft._C'] = None\nimport fastft._ext, fastft\n" + STEP_AND_COMPARE
    res = run_python(code, FASTFT_DISABLE_EXT="0", PYTHONWARNINGS="always")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("compiled kernels could not be loaded") == 1, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["info"]["extension"] is False and "import of fastft._C halted" in out["info"]["load_error"]
    assert out["err"] < 1e-5


def test_cli_info():
    res = subprocess.run([sys.executable, "-m", "fastft", "info"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["version"] == fastft.__version__


def test_build_without_torch_stops_with_a_clear_message(tmp_path):
    """An isolated build (no torch in the build environment) must stop, not fetch another torch."""
    cmake = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    if cmake is None:
        pytest.skip("cmake not found")
    res = subprocess.run([cmake, "-S", str(ROOT), "-B", str(tmp_path / "build"), "-G", "Ninja" if shutil.which(
        "ninja", path=str(Path(sys.executable).parent)) else "Unix Makefiles", f"-DPython_EXECUTABLE={bare}/bin/python"],
        capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "--no-build-isolation" in res.stdout + res.stderr
