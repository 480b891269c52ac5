"""The ``fastft`` command line: ``fastft info``, ``fastft demo`` (``finetune`` arrives with the trainer)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``fastft`` command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="fastft", description="Fast, forgetting-aware fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print build information (version, torch, kernels, CUDA) as JSON")
    demo = sub.add_parser("demo", help="forgetting with and without L2-to-init, on a small synthetic two-task problem")
    demo.add_argument("--l2-init", type=float, default=1.0, help="L2-to-init strength of the protected run")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args.l2_init, args.seed)
    if args.command == "info":
        import fastft

        json.dump(fastft.build_info(), sys.stdout, indent=2)
        print()
    return 0


def _demo(l2_init: float, seed: int) -> int:
    """Pretrain a small MLP on task A, fine-tune it on task B with torch.optim.AdamW, fastft.AdamW and
    fastft.AdamW with L2-to-init, and print task-B accuracy (learning) next to task-A accuracy (what
    was kept). Synthetic data, seconds on a CPU; the real-model demo comes with the trainer."""
    import copy

    import torch

    import fastft

    torch.manual_seed(seed)
    dim, classes, n = 32, 8, 4096

    def task(centers_seed):
        g = torch.Generator().manual_seed(centers_seed)
        centers = torch.randn(classes, dim, generator=g) * 2.0
        y = torch.randint(0, classes, (n,), generator=g)
        x = centers[y] + torch.randn(n, dim, generator=g) * 1.5
        return x[: n // 2], y[: n // 2], x[n // 2:], y[n // 2:]

    def accuracy(model, x, y):
        with torch.no_grad():
            return float((model(x).argmax(-1) == y).float().mean())

    def train(model, opt, x, y, steps):
        loss_fn = torch.nn.CrossEntropyLoss()
        g = torch.Generator().manual_seed(seed + 1)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (128,), generator=g)
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()

    a_tr, a_ya, a_te, a_yte = task(1)
    b_tr, b_ya, b_te, b_yte = task(2)
    pretrained = torch.nn.Sequential(torch.nn.Linear(dim, 512), torch.nn.GELU(), torch.nn.Linear(512, 512),
                                     torch.nn.GELU(), torch.nn.Linear(512, classes))
    train(pretrained, torch.optim.AdamW(pretrained.parameters(), lr=1e-3), a_tr, a_ya, 300)
    print(f"fastft {fastft.__version__} demo - kernels: {fastft.build_info()['kernel_devices'] or 'reference only'}")
    print(f"pretrained on task A: task-A accuracy {accuracy(pretrained, a_te, a_yte):.3f}, "
          f"task-B accuracy {accuracy(pretrained, b_te, b_yte):.3f}")
    print(f"{'fine-tuning on task B with':<36} {'task B':>7} {'task A kept':>11}")
    runs = [("torch.optim.AdamW", lambda p: torch.optim.AdamW(p, lr=1e-3)),
            ("fastft.AdamW", lambda p: fastft.AdamW(p, lr=1e-3)),
            (f"fastft.AdamW(l2_init={l2_init:g})", lambda p: fastft.AdamW(p, lr=1e-3, l2_init=l2_init))]
    for name, make in runs:
        model = copy.deepcopy(pretrained)
        train(model, make(model.parameters()), b_tr, b_ya, 200)
        print(f"{name:<36} {accuracy(model, b_te, b_yte):7.3f} {accuracy(model, a_te, a_yte):11.3f}")
    print("'task A kept' is what fine-tuning did not forget. Speed: `make bench` (benchmarks/bench_adamw.py).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
