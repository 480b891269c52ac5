"""Check an installed fastft wheel (run from outside the source tree so the wheel is imported)."""

import argparse
import sys

import torch

import fastft

ap = argparse.ArgumentParser()
ap.add_argument("--expect-cuda", action="store_true", help="fail unless CUDA kernels are compiled in")
args = ap.parse_args()

info = fastft.build_info()
print(info)
assert "site-packages" in fastft.__file__, f"imported the source tree, not the wheel: {fastft.__file__}"
assert info["extension"], f"compiled kernels not loaded: {info['load_error']}"
if args.expect_cuda:
    assert info["cuda"], "the wheel was built without CUDA kernels"
    assert "cuda" in info["kernel_devices"], info

# The CPU path of this wheel still runs and agrees with torch.optim.AdamW.
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
print(f"CPU path OK (max |fastft - torch| = {err:.2e}); cuda kernels: {info['cuda']} ({info['cuda_archs']})")
sys.exit(0)
