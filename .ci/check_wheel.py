"""Check an installed fastft wheel (run from outside the source tree so the wheel is imported).

    python check_wheel.py [--expect-cuda] [--cuobjdump PATH --archs "80;90"]

Checks: fastft imports from site-packages with its compiled kernels; _C links no torch library but
libtorch_cpu.so and no shared CUDA runtime (so a CUDA wheel loads under a CPU torch); every op has its
CPU and Meta kernels (and CUDA ones when expected); the CPU path agrees with torch; with --cuobjdump,
the binary holds SASS for exactly the --archs and PTX for the newest, as build_info() says; and a
torch with another CUDA major version gets the CPU kernels and a warning that says what to do.
"""

import argparse
import json
import os
import re
import subprocess
import sys

import torch

import fastft

ap = argparse.ArgumentParser()
ap.add_argument("--expect-cuda", action="store_true", help="fail unless CUDA kernels are compiled in")
ap.add_argument("--cuobjdump", help="cuobjdump binary: check the SASS / PTX architectures in the binary")
ap.add_argument("--archs", default="80;90", help="the FASTFT_CUDA_ARCHS the wheel was built with")
args = ap.parse_args()

info = fastft.build_info()
print(json.dumps(info))
assert "site-packages" in fastft.__file__, f"imported the source tree, not the wheel: {fastft.__file__}"
assert info["extension"], f"compiled kernels not loaded: {info['load_error']}"
so = fastft._ext._C.__file__
print(f"fastft {fastft.__version__} from {os.path.dirname(fastft.__file__)}: built with torch "
      f"{info['built_with_torch']} (supports >= {info['min_torch']}), running under torch {torch.__version__}")

needed = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
libs = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", needed)
foreign = [lib for lib in libs if lib.startswith(("libtorch", "libc10", "libcuda", "libcudart", "libnv"))]
assert foreign == ["libtorch_cpu.so"], f"_C needs {libs}: only libtorch_cpu.so of torch, and no CUDA library"
# Loading must not need a symbol a CPU torch lacks: no CUDA runtime symbol (linked in statically) and no
# CUDA-only shim of libtorch_cuda.so (looked up at run time); nothing of torch's C++ API either.
undefined = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True, check=True).stdout
undefined = [line.split()[-1].split("@")[0] for line in undefined.splitlines() if line.strip()]
cuda_syms = [sym for sym in undefined if "cuda" in sym.lower() and sym != "aoti_torch_device_type_cuda"]
assert not cuda_syms, f"_C leaves CUDA symbols to the loader: {cuda_syms}"
cxx_torch = [sym for sym in undefined if sym.startswith("_Z") and re.search(r"3c10|2at|5torch", sym)]
assert not cxx_torch, f"_C uses torch's C++ ABI: {cxx_torch[:5]}"

if args.expect_cuda:
    assert info["cuda"], "the wheel was built without CUDA kernels"
    if torch.version.cuda is not None:
        assert "cuda" in info["kernel_devices"], info

# Every op has its kernels (CUDA too when expected) and the fake implementation fastft.ops registers.
for op in ("adamw_l2init_", "sum_of_squares", "masked_pool", "masked_pool_backward", "cross_entropy_rows_"):
    for key in ["CPU", "Meta"] + (["CUDA"] if args.expect_cuda else []):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastft::{op}", key), f"fastft::{op}: no {key} kernel"

if args.cuobjdump:
    archs = [a for a in args.archs.replace(",", ";").split(";") if a]
    newest = max(archs, key=lambda a: int(re.match(r"\d+", a).group()))
    elf = subprocess.run([args.cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([args.cuobjdump, "--list-ptx", so], capture_output=True, text=True, check=True).stdout
    sass_archs = sorted(set(re.findall(r"\.sm_(\w+)\.cubin", elf)))
    ptx_archs = sorted(set(re.findall(r"\.sm_(\w+)\.ptx", ptx)))
    print(f"cuobjdump: SASS for sm_{', sm_'.join(sass_archs)}; PTX for compute_{', compute_'.join(ptx_archs)}")
    assert sass_archs == sorted(archs), (sass_archs, archs)
    assert ptx_archs == [newest], (ptx_archs, newest)
    expected = ",".join([f"sm_{a}" for a in archs] + [f"compute_{newest}"])
    assert info["cuda_archs"] == expected, (info["cuda_archs"], expected)

# The CPU path of this wheel runs and agrees with torch.optim.AdamW.
torch.manual_seed(0)
a = [torch.nn.Parameter(torch.randn(n)) for n in (3, 1000, 70000)]
b = [torch.nn.Parameter(p.detach().clone()) for p in a]
opt_a, opt_b = fastft.AdamW(a, lr=1e-2), torch.optim.AdamW(b, lr=1e-2, foreach=False)
for _ in range(10):
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt_a.step()
    opt_b.step()
err = max(float((p - q).abs().max().detach()) for p, q in zip(a, b))
assert err < 1e-5, err
hidden, mask = torch.randn(3, 7, 16), (torch.arange(7)[None] < torch.tensor([[7], [2], [0]])).long()
expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
assert torch.allclose(fastft.pool(hidden, mask, "mean"), expected, atol=1e-6)

if info["cuda"]:
    # A torch on another CUDA major version than the wheel's: CPU kernels only, and a warning saying so.
    built_major = int(info["cuda_version"].split(".")[0])
    other = f"{built_major - 1}.8"
    code = (f"import torch, warnings, json\ntorch.version.cuda = '{other}'\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n    import fastft\n"
            "print(json.dumps(dict(info=fastft.build_info(), warnings=[str(x.message) for x in w])))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["info"]["kernel_devices"] == ["cpu"] and out["info"]["cuda_error"], out
    said = [m for m in out["warnings"] if f"CUDA {other}" in m and f"wheel built for CUDA {built_major - 1}" in m]
    assert said, out["warnings"]
    print(f"under a torch on CUDA {other}: CPU kernels only, and the warning says: {said[0]}")
print(f"CPU path OK (max |fastft - torch| = {err:.2e}); cuda kernels: {info['cuda']} ({info['cuda_archs']})")
sys.exit(0)
