"""Memory per rank of fastft.Trainer(distributed="ddp") against distributed="fsdp2", 2 CPU processes (gloo).

The model is a Llama with SmolLM2-135M's shapes (hidden 576, MLP 1536, 9 heads / 3 KV heads, vocab
49152, tied embeddings) but 6 blocks instead of 30 (49.5M parameters), random weights; causal-LM
fine-tuning with fastft's fused LM loss, global batch 8 x 64 tokens, fp32, AdamW with L2-to-init
(anchors) and clipping, 4 optimizer steps. Each strategy runs in fresh processes
(``torch.distributed.run --nproc_per_node=2``).

Reported per rank (rank 0): bytes of the parameters, of the gradients (at the optimizer step), of
the optimizer state (moments, anchors, steps) — each counted from the tensors this process holds
(a DTensor's local shard) — their sum per parameter of the model, the process's peak RSS (VmHWM,
which includes torch itself and activations) and the median step time. The memory counts are
exact; the times are this shared 2-core machine's, where FSDP2 adds an all-gather of each block's
weights per forward and backward and gloo is slow.

    python benchmarks/bench_fsdp.py [--steps 4]
Writes benchmarks/results/bench_fsdp_cpu.csv/.json.
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

BATCH, SEQ = 8, 64


def _nbytes(t) -> int:
    from fastft.distributed import is_dtensor

    t = t.to_local() if is_dtensor(t) else t
    return t.numel() * t.element_size()


def worker(strategy: str, steps: int) -> dict:
    import torch
    import transformers

    import fastft
    from _common import status_kb

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=6,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": ids, "labels": list(ids)}
            for ids in torch.randint(0, 49152, (BATCH * steps, SEQ), generator=g).tolist()]
    marks, grads = [], []

    class Clock(fastft.Callback):
        def on_step_end(self, trainer, step, loss):
            marks.append(time.perf_counter())

    trainer = fastft.Trainer(model, rows, epochs=1, batch_size=BATCH, lr=1e-4, l2_init=0.01, max_grad_norm=1.0,
                             warmup_ratio=0.0, metrics=("perplexity",), progress=False, callbacks=[Clock()],
                             device="cpu", distributed=strategy)
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append(sum(_nbytes(p.grad) for p in trainer.model.parameters()
                                                   if p.grad is not None)))
    trainer.fit()
    params = sum(_nbytes(p) for p in trainer.model.parameters())
    state = sum(_nbytes(v) for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    return dict(strategy=strategy, rank=trainer.rank, world_size=trainer.world_size, parameters=n_params,
                param_bytes=params, grad_bytes=max(grads), optimizer_bytes=state,
                bytes_per_parameter=(params + max(grads) + state) / n_params,
                peak_rss_mb=status_kb("VmHWM") / 1024, step_s_median=statistics.median(gaps) if gaps else None)


def run(strategy: str, steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519", __file__,
           "--worker", strategy, "--steps", str(steps)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"bench_fsdp: {' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return next(json.loads(line) for line in res.stdout.splitlines() if line.startswith("{"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per strategy")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(1)
        res = worker(args.worker, args.steps)
        if res["rank"] == 0:
            print(json.dumps(res), flush=True)
        import fastft.distributed as D

        D.shutdown()
        return 0

    import torch

    from _common import git_commit, write_results

    rows = [run(strategy, args.steps) for strategy in ("ddp", "fsdp2")]
    meta = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores", torch=torch.__version__, commit=git_commit(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"), batch=BATCH, seq_len=SEQ, processes=2)
    for r in rows:
        r.update(meta)
    print(f"# fastft.Trainer, 2 processes (gloo) - Llama {rows[0]['parameters'] / 1e6:.1f}M params, batch {BATCH} x "
          f"{SEQ} tokens, fp32, L2-to-init - {meta['machine']} - torch {meta['torch']} - commit {meta['commit']}")
    print(f"{'strategy':<8} {'params MB':>9} {'grads MB':>9} {'optim MB':>9} {'B/param':>8} {'peak RSS MB':>11} "
          f"{'s/step':>7}")
    for r in rows:
        print(f"{r['strategy']:<8} {r['param_bytes'] / 2**20:9.1f} {r['grad_bytes'] / 2**20:9.1f} "
              f"{r['optimizer_bytes'] / 2**20:9.1f} {r['bytes_per_parameter']:8.2f} {r['peak_rss_mb']:11.0f} "
              f"{r['step_s_median']:7.2f}")
    ddp, fsdp = rows
    ratio = (fsdp["param_bytes"] + fsdp["grad_bytes"] + fsdp["optimizer_bytes"]) / \
        (ddp["param_bytes"] + ddp["grad_bytes"] + ddp["optimizer_bytes"])
    print(f"fsdp2 / ddp per rank: parameters + gradients + optimizer state {ratio:.3f}x, peak RSS "
          f"{fsdp['peak_rss_mb'] / ddp['peak_rss_mb']:.3f}x, "
          f"step time {fsdp['step_s_median'] / ddp['step_s_median']:.2f}x")
    write_results(Path(args.out) / "bench_fsdp_cpu", rows, meta, state_ratio=ratio,
                  rss_ratio=fsdp["peak_rss_mb"] / ddp["peak_rss_mb"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
