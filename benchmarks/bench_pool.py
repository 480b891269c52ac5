"""Benchmark fastft's masked pooling against the torch formulations users write, in one run.

For each mode, forward, backward and forward+backward (median ms) of:
  mean: fastft.pool vs the sentence-transformers sum form and the faster torch.bmm form
  max:  fastft.pool vs masked_fill(-inf).max(dim=1)
  cls:  fastft.pool vs hidden[:, 0]
  last: fastft.pool vs hidden.gather at lengths - 1 (right padding)
Masks are right-padded with lengths uniform in [T/4, T] (dynamic padding of a real batch).
Prints ratios against the fastest torch form of the same run and writes long-form CSV + JSON to
benchmarks/results/.

    python benchmarks/bench_pool.py                       # CPU: B=64 T=256 H=768 and B=8 T=4096 H=768
    python benchmarks/bench_pool.py --device cuda --shapes 64x512x4096
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import fastft
from _common import git_commit, timer, write_results


def torch_forms(mode):
    if mode == "mean":
        def sum_form(h, m):
            w = m[:, :, None].to(h.dtype)
            return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)

        def bmm_form(h, m):
            w = m.to(h.dtype)
            return torch.bmm(w[:, None, :], h).squeeze(1) / w.sum(1, keepdim=True).clamp(min=1e-9)

        return {"torch_sum": sum_form, "torch_bmm": bmm_form}
    if mode == "max":
        return {"torch_masked_max": lambda h, m: h.masked_fill(~m.bool()[:, :, None], float("-inf")).max(1).values}
    if mode == "cls":
        return {"torch_index": lambda h, m: h[:, 0]}
    return {"torch_gather": lambda h, m: h[torch.arange(h.shape[0], device=h.device), m.sum(1) - 1]}


def bench_case(B, T, H, dtype, device, reps, warmup):
    torch.manual_seed(0)
    hidden = torch.randn(B, T, H, device=device, dtype=dtype, requires_grad=True)
    lengths = torch.randint(T // 4, T + 1, (B,), device=device)
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).long()
    grad_out = torch.randn(B, H, device=device, dtype=dtype)
    measure = timer(device)
    rows = []

    def t(fn):
        for _ in range(warmup):
            fn()
        return statistics.median(measure(fn, reps))

    for mode in fastft.POOL_MODES:
        variants = {"fastft": lambda h, m, mode=mode: fastft.pool(h, m, mode), **torch_forms(mode)}
        for name, fn in variants.items():
            with torch.no_grad():
                fwd = t(lambda: fn(hidden, mask))
            out = fn(hidden, mask)
            bwd = t(lambda: torch.autograd.grad(out, hidden, grad_out, retain_graph=True))
            out = None  # free the memory before the next variant
            fwd_bwd = t(lambda: torch.autograd.grad(fn(hidden, mask), hidden, grad_out))
            rows.append(dict(shape=f"{B}x{T}x{H}", dtype=str(dtype).replace("torch.", ""), mode=mode, variant=name,
                             fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=fwd_bwd,
                             real_token_fraction=float(mask.float().mean())))
    # Bandwidth ceiling: a device copy of hidden (reads and writes B*T*H elements).
    src = hidden.detach().clone()
    dst = torch.empty_like(src)
    copy_ms = t(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() * src.element_size() / copy_ms / 1e6
    src = dst = None  # free the memory before the next variant
    elem = hidden.element_size()
    real = float(mask.float().mean())
    for r in rows:
        # Bytes that must move: forward reads the pooled tokens' rows (all real tokens for mean / max, one
        # row for cls / last) and writes [B, H]; backward writes [B, T, H] and reads [B, H].
        read_tokens = real * T if r["mode"] in ("mean", "max") else 1
        fwd_bytes = B * H * elem * (read_tokens + 1)
        bwd_bytes = B * H * elem * (T + 1)
        r["fwd_gbps"] = fwd_bytes / r["fwd_ms"] / 1e6
        r["bwd_gbps"] = bwd_bytes / r["bwd_ms"] / 1e6
        r["copy_gbps"] = copy_gbps
        r["fwd_of_copy_bw"] = r["fwd_gbps"] / copy_gbps
        r["bwd_of_copy_bw"] = r["bwd_gbps"] / copy_gbps
    for mode in fastft.POOL_MODES:
        mine = [r for r in rows if r["mode"] == mode]
        ours = next(r for r in mine if r["variant"] == "fastft")
        best = {k: min(r[k] for r in mine if r["variant"] != "fastft") for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms")}
        for r in mine:
            for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms"):
                r[f"speedup_{k[:-3]}"] = (best[k] / ours[k]) if r is ours else None
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", nargs="+", default=None, help="BxTxH, e.g. 64x256x768")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shapes = args.shapes or (["64x256x768", "8x4096x768"] if device.type == "cpu" else ["64x512x4096", "8x8192x4096"])
    reps = args.reps or (10 if device.type == "cpu" else 50)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    meta = dict(machine=machine, device=str(device), torch=torch.__version__, fastft=fastft.__version__,
                extension=fastft.build_info()["extension"], commit=git_commit(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    rows = []
    for shape in shapes:
        B, T, H = (int(x) for x in shape.split("x"))
        for dt in args.dtypes:
            rows += bench_case(B, T, H, getattr(torch, dt), device, reps, args.warmup)
    for r in rows:
        r.update(meta)

    print(f"# masked pooling benchmark - {machine} - torch {torch.__version__} - commit {meta['commit']}")
    header = (f"{'shape':>12} {'dtype':>8} {'mode':>4} {'variant':<17} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} "
              f"{'speedup f/b/f+b vs best torch':>30} {'fwd/bwd of copy BW':>19}")
    print(header)
    print("-" * len(header))
    for r in rows:
        sp = (f"{r['speedup_fwd']:.1f}x / {r['speedup_bwd']:.1f}x / {r['speedup_fwd_bwd']:.1f}x"
              if r["speedup_fwd"] else "")
        bw = f"{r['fwd_of_copy_bw']:.0%} / {r['bwd_of_copy_bw']:.0%}" if r["variant"] == "fastft" else ""
        print(f"{r['shape']:>12} {r['dtype']:>8} {r['mode']:>4} {r['variant']:<17} {r['fwd_ms']:8.3f} "
              f"{r['bwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} {sp:>30} {bw:>19}")
    write_results(Path(args.out) / f"bench_pool_{device.type}", rows, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
