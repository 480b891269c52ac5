"""Headline generation on BBC News, SmolLM2-135M-Instruct: prompting (0- and 3-shot) vs LoRA vs full
fine-tuning, each scored on the same 100 held-out test articles, with the forgetting each fine-tune
causes on general English (OANC) text that no arm trains on.

Runs the two configs with the command line, exactly as a user would:

    fastft finetune examples/headlines.yaml        # prompting baseline + LoRA
    fastft finetune examples/headlines_full.yaml   # full fine-tuning

then reads their run folders' summary.json and writes experiments/results/headlines.{json,md}.
Sizes and settings: see the configs' comments. ``--collect`` only rebuilds the table from the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"LoRA (r=16, all linear layers)": ("examples/headlines.yaml", "runs/headlines"),
           "full fine-tuning": ("examples/headlines_full.yaml", "runs/headlines_full")}
METRICS = ("rouge_l", "bleu", "exact_match", "token_f1")


def run(config: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastft", "finetune", config, "--overwrite", "--no-progress"], cwd=ROOT,
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collect", action="store_true", help="only rebuild the table from existing runs")
    args = parser.parse_args()
    seconds = {}
    if not args.collect:
        for arm, (config, _) in CONFIGS.items():
            seconds[arm] = run(config)
    rows = []
    summaries = {arm: json.loads((ROOT / out / "summary.json").read_text()) for arm, (_, out) in CONFIGS.items()
                 if (ROOT / out / "summary.json").is_file()}
    missing = [arm for arm in CONFIGS if arm not in summaries]
    lora = summaries["LoRA (r=16, all linear layers)"]
    for shots, scores in lora.get("prompting", {}).items():
        rows.append({"arm": f"prompting, {shots}", **{m: scores[m] for m in METRICS}, "ppl": None,
                     "forgetting_nats": None, "train_s": None})
    for arm, s in summaries.items():
        best = next(r for r in s["history"] if r.get("step") and r["epoch"] == s["best_epoch"]) if s["best_epoch"] \
            else s["history"][-1]
        rows.append({"arm": arm, **{m: s["test"][m] for m in METRICS}, "ppl": s["test"].get("perplexity"),
                     "forgetting_nats": best.get("pretrain_loss_rise"), "train_s": s["seconds"],
                     "best_epoch": s["best_epoch"], "steps": s["global_step"]})
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(), "wall_seconds": seconds}
    import torch

    meta["torch"] = torch.__version__
    out = ROOT / "experiments" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "headlines.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| arm (SmolLM2-135M-Instruct, 56 held-out BBC articles) | ROUGE-L | BLEU | exact match | token F1 | "
             "completion ppl | forgetting (OANC nats) | fit + test s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if r["ppl"] else "–"
        forget = f"{r['forgetting_nats']:+.3f}" if r["forgetting_nats"] is not None else "0 (weights unchanged)"
        secs = f"{r['train_s']:.0f}" if r["train_s"] is not None else "–"
        lines.append(f"| {r['arm']} | {r['rouge_l']:.3f} | {r['bleu']:.1f} | {r['exact_match']:.3f} | "
                     f"{r['token_f1']:.3f} | {ppl} | {forget} | {secs} |")
    for arm in missing:
        lines.append(f"| {arm} | not run to the end (no {CONFIGS[arm][1]}/summary.json) | | | | | | |")
    table = "\n".join(lines)
    (out / "headlines.md").write_text(table + f"\n\n{meta}\n")
    print(table)


if __name__ == "__main__":
    main()
