"""Data-parallel fastft.Trainer on this CPU: 1 process against 2 processes (torchrun, gloo), in one run.

The job is the demo's (the packaged all-MiniLM-L6-v2 + a mean-pooling head on Pang & Lee sentences),
global batch 32, every batch padded to 64 tokens (equal work per step), fp32. Each configuration runs
in fresh processes:

  1 proc x 1 thread    the per-process baseline for scaling efficiency
  1 proc x 2 threads   what one process makes of the whole machine (the fair competitor here)
  2 proc x 1 thread    torchrun --nproc_per_node=2: each rank 16 examples, DDP all-reduce over gloo
  2 proc x 1 thread, gradient_accumulation=4: micro-batches of 8, all-reduce once per step (no_sync)
  the same with no_sync patched out: an all-reduce after every micro-batch (what no_sync saves)

Reported: median seconds per optimizer step after warm-up, examples/s, scaling efficiency
(2-process throughput / twice the 1-thread one), and the cost of one all-reduce of all gradients
(22.7M floats) over gloo, which no_sync saves on every micro-batch but the last.
Writes benchmarks/results/bench_ddp_cpu.csv/.json.

    python benchmarks/bench_ddp.py [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BATCH = 32


def worker(steps: int, accumulation: int, sync_every_micro_batch: bool) -> dict:
    import contextlib

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if sync_every_micro_batch:
        DistributedDataParallel.no_sync = lambda self: contextlib.nullcontext()

    import fastft
    from bench_trainer import build, demo_train

    model, tok = build()
    texts = demo_train(BATCH * accumulation * steps)
    enc = tok([t for t, _ in texts], truncation=True, max_length=64, padding="max_length")
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": y}
            for i, (_, y) in enumerate(texts)]
    step_times = []

    class Clock(fastft.Callback):
        def on_step_end(self, trainer, step, loss):
            step_times.append(time.perf_counter())

    # batch_size is the global micro-batch; with accumulation a step covers BATCH examples.
    trainer = fastft.Trainer(model, rows, epochs=1, batch_size=BATCH // accumulation,
                             gradient_accumulation=accumulation, lr=5e-5, max_grad_norm=1.0, group_by_length=False,
                             progress=False, callbacks=[Clock()], device="cpu", find_unused_parameters=True)
    start = time.perf_counter()
    trainer.fit()
    total = time.perf_counter() - start
    gaps = [b - a for a, b in zip(step_times, step_times[1:])]
    allreduce_ms = None
    if dist.is_initialized():
        flat = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad))
        times = []
        for _ in range(6):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(flat)
            times.append((time.perf_counter() - t0) * 1e3)
        allreduce_ms = statistics.median(times[1:])
    return dict(processes=trainer.world_size, threads=torch.get_num_threads(), accumulation=accumulation,
                steps=len(step_times), total_s=total, step_s_median=statistics.median(gaps[2:]),
                allreduce_ms=allreduce_ms, rank=trainer.rank, no_sync=not sync_every_micro_batch)


def run(processes: int, threads: int, steps: int, accumulation: int, no_sync: bool = True) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(Path(__file__).parent))
    args = [__file__, "--worker", "--steps", str(steps), "--accumulation", str(accumulation)]
    if not no_sync:
        args.append("--sync-every-micro-batch")
    cmd = [sys.executable] + args if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_port=29517"] + args
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"bench_ddp: {' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    out = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return next(r for r in out if r["rank"] == 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per configuration")
    ap.add_argument("--accumulation", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sync-every-micro-batch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        res = worker(args.steps, args.accumulation, args.sync_every_micro_batch)
        if res["rank"] == 0:
            print(json.dumps(res), flush=True)
        return 0

    import torch

    from _common import git_commit, write_results

    configs = [("1 proc x 1 thread", 1, 1, 1, True), ("1 proc x 2 threads", 1, 2, 1, True),
               ("2 proc x 1 thread", 2, 1, 1, True), ("2 proc x 1 thread, accumulation 4", 2, 1, 4, True),
               ("  same, all-reduce every micro-batch", 2, 1, 4, False)]
    rows = []
    for name, procs, threads, acc, no_sync in configs:
        r = run(procs, threads, args.steps, acc, no_sync)
        r.update(config=name, examples_per_s=BATCH / r["step_s_median"])
        rows.append(r)
        print(f"done: {name}", file=sys.stderr, flush=True)
    meta = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores", torch=torch.__version__, commit=git_commit(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"), batch=BATCH, seq_len=64)
    for r in rows:
        r.update(meta)
    one, both, ddp = rows[0]["examples_per_s"], rows[1]["examples_per_s"], rows[2]["examples_per_s"]
    efficiency = ddp / (2 * one)
    print(f"# fastft.Trainer data-parallel - MiniLM + mean head, global batch {BATCH} x 64 tokens - {meta['machine']} "
          f"- torch {meta['torch']} - commit {meta['commit']}")
    print(f"{'configuration':<36} {'s/step':>7} {'ex/s':>6} {'all-reduce ms':>13}")
    for r in rows:
        ar = f"{r['allreduce_ms']:.0f}" if r["allreduce_ms"] is not None else "-"
        print(f"{r['config']:<36} {r['step_s_median']:7.3f} {r['examples_per_s']:6.1f} {ar:>13}")
    no_sync_gain = rows[4]["step_s_median"] / rows[3]["step_s_median"]
    print(f"2 processes vs 1 process x 1 thread: {ddp / one:.2f}x throughput, scaling efficiency {efficiency:.0%}; "
          f"vs 1 process x 2 threads: {ddp / both:.2f}x; no_sync under accumulation 4: {no_sync_gain:.2f}x")
    write_results(Path(args.out) / "bench_ddp_cpu", rows, meta, scaling_efficiency=efficiency,
                  speedup_vs_one_thread=ddp / one, speedup_vs_two_threads=ddp / both, no_sync_speedup=no_sync_gain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
