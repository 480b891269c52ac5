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

# Every op has its kernels (CUDA too when expected) and the fake implementation fastft.ops registers.
for op in ("adamw_l2init_", "sum_of_squares", "masked_pool", "masked_pool_backward", "cross_entropy_rows_"):
    for key in ["CPU", "Meta"] + (["CUDA"] if args.expect_cuda else []):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastft::{op}", key), f"fastft::{op}: no {key} kernel"

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
hidden, mask = torch.randn(3, 7, 16), (torch.arange(7)[None] < torch.tensor([[7], [2], [0]])).long()
expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
assert torch.allclose(fastft.pool(hidden, mask, "mean"), expected, atol=1e-6)
print(f"CPU path OK (max |fastft - torch| = {err:.2e}); cuda kernels: {info['cuda']} ({info['cuda_archs']})")
sys.exit(0)
