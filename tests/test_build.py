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
    for key, typ in [("version", str), ("torch", str), ("extension", bool), ("cuda", bool), ("cuda_archs", str),
                     ("cuda_version", str), ("min_torch", str)]:
        assert isinstance(info[key], typ), key
    assert info["torch"] == torch.__version__
    assert info["version"] == fastft.__version__
    assert info["cuda_error"] is None  # this machine's torch is a CPU build: no CUDA mismatch is possible
    if os.environ.get("FASTFT_DISABLE_EXT", "0") in ("", "0"):
        # The test environment is built by `make test`: a silent fallback would hide a broken build.
        assert info["extension"], info["load_error"]
        assert "cpu" in info["kernel_devices"]
        assert info["built_with_torch"] == torch.__version__


def test_min_torch_is_the_stable_abi_target_of_the_build():
    """fastft/_ext.py refuses a torch older than MIN_TORCH before loading _C: it must be the build's target."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert f'set(FASTFT_TORCH_MIN "{fastft._ext.MIN_TORCH[0]}.{fastft._ext.MIN_TORCH[1]}"' in cmake
    if fastft._ext._C is not None:
        assert fastft._ext._C.torch_min_version == fastft.build_info()["min_torch"]


@pytest.mark.skipif(fastft._ext._C is None or shutil.which("nm") is None or shutil.which("readelf") is None,
                    reason="needs the compiled extension and binutils")
def test_extension_uses_only_the_stable_abi():
    """_C links nothing of torch but libtorch_cpu.so and calls only its C shims: no C++ symbol of c10 / ATen /
    torch (those change between torch versions), no libc10 / libtorch_python, no shared CUDA runtime."""
    so = fastft._ext._C.__file__
    needed = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
    libs = [line.split("[")[1].rstrip("]") for line in needed.splitlines() if "(NEEDED)" in line]
    torch_libs = [lib for lib in libs if lib.startswith(("libtorch", "libc10", "libcudart", "libcuda"))]
    assert torch_libs == ["libtorch_cpu.so"], libs
    undefined = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True,
                               check=True).stdout.split()
    mangled_torch = [sym for sym in undefined if sym.startswith("_Z") and any(
        ns in sym for ns in ("3c10", "2at", "5torch", "6caffe2"))]
    assert not mangled_torch, mangled_torch
    shims = [sym for sym in undefined if sym.startswith(("aoti_torch_", "torch_"))]
    assert "torch_library_impl" in shims and "aoti_torch_library_def" in shims
    # CUDA-only shims (libtorch_cuda.so) are looked up at run time, never linked (csrc/cuda/runtime.cuh).
    assert not [sym for sym in shims if "cuda" in sym and not sym.startswith("aoti_torch_device_type_")], shims


def test_old_torch_falls_back_and_says_what_to_do():
    code = ("import warnings, json, torch\ntorch.__version__ = '2.10.1'\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n    import fastft\n"
            "print(json.dumps(dict(info=fastft.build_info(), warnings=[str(x.message) for x in w])))")
    res = run_python(code, FASTFT_DISABLE_EXT="0")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["info"]["extension"] is False and "older than 2.11" in out["info"]["load_error"]
    assert [m for m in out["warnings"] if "pip install 'torch>=2.11'" in m], out["warnings"]


def test_cuda_major_mismatch_names_both_versions_and_the_fix():
    from fastft._ext import cuda_mismatch

    assert cuda_mismatch("", "12.8") is None  # no CUDA kernels built in
    assert cuda_mismatch("13.0", None) is None  # a CPU torch: no CUDA tensor can reach them
    assert cuda_mismatch("13.0", "13.2") is None
    message = cuda_mismatch("13.0", "12.8")
    assert "CUDA 13.0" in message and "CUDA 12.8" in message and "wheel built for CUDA 12" in message
    assert "--no-build-isolation" in message


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
