"""Multi-task fine-tuning: one shared encoder, one head per task, task sampling."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import random
import zlib
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..atomic import atomic_write
from ..heads import ClassificationHead, ClassifierOutput, last_hidden_state
from ..param_groups import mark_new
from .data import LabelNames, batch_order, example_length, to_device, without_labels
from .metrics import check_metric_names
from .trainer import Trainer, ranked_labels

__all__ = ["Task", "MultiTaskModel", "MultiTaskTrainer", "SAMPLING", "task_probabilities"]

SAMPLING = ("proportional", "temperature", "uniform", "round_robin")


@dataclass
class Task:
    """One task of a multi-task run.

    Args:
        train: training data (as for :class:`fastft.Trainer`: text pairs with a tokenizer, dicts, ...).
        val: validation data (optional).
        num_labels: classes of this task's head.
        pool: pooling of its head (``"mean"``, ``"cls"``, ``"max"``, ``"last"``).
        metrics: metric names (or callables) for its validation.
        loss_weight: factor on this task's loss.
        dropout: dropout of its head.
        head: a ready head (e.g. a :class:`ClassificationHead`) instead of a new one.
        labels: class names in id order; None: the sorted distinct names when the training labels
            are strings (``num_labels`` then follows them), else the labels are ids.
    """

    train: Any
    val: Any = None
    num_labels: int = 2
    pool: str = "mean"
    metrics: Sequence = ("accuracy",)
    loss_weight: float = 1.0
    dropout: float = 0.1
    head: Optional[nn.Module] = None
    labels: Optional[Sequence[Any]] = None


def task_probabilities(sizes: Dict[str, int], sampling: str, temperature: float = 2.0) -> Dict[str, float]:
    """How often each task is drawn: proportional to its size, to size^(1/T) (T5 / mT5), or uniform.
    (``round_robin`` cycles the tasks in order: each gets 1/K of the batches.)"""
    if sampling not in SAMPLING:
        raise ValueError(f"fastft.MultiTaskTrainer: sampling must be one of {SAMPLING}, got {sampling!r}")
    if sampling == "temperature" and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"fastft.MultiTaskTrainer: temperature must be > 0, got {temperature!r}")
    if sampling in ("uniform", "round_robin"):
        w = {k: 1.0 for k in sizes}
    elif sampling == "proportional":
        w = {k: float(n) for k, n in sizes.items()}
    else:
        w = {k: float(n) ** (1.0 / temperature) for k, n in sizes.items()}
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


class MultiTaskModel(nn.Module):
    """A shared encoder and a :class:`ClassificationHead` per task: ``model(task, input_ids=...,
    attention_mask=..., labels=...)`` returns ``.logits`` (and ``.loss`` with labels)."""

    def __init__(self, encoder: nn.Module, tasks: Dict[str, Task], hidden_size: Optional[int] = None) -> None:
        super().__init__()
        if hidden_size is None:
            hidden_size = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if hidden_size is None:
            raise ValueError("fastft.MultiTaskModel: cannot read the encoder's hidden size; pass hidden_size=...")
        self.encoder = encoder
        self.hidden_size = hidden_size
        heads = {}
        for name, t in tasks.items():
            head = t.head if t.head is not None else ClassificationHead(hidden_size, t.num_labels, pool=t.pool,
                                                                        dropout=t.dropout)
            head_size = getattr(head, "hidden_size", None)
            if head_size is not None and head_size != hidden_size:
                raise ValueError(f"fastft.MultiTaskModel: the head of task {name!r} takes hidden size {head_size}, "
                                 f"but the encoder's is {hidden_size}")
            if t.head is None:
                mark_new(head)  # a fresh head: never anchored by L2-to-init (see fastft.param_groups)
            heads[name] = head
        self.heads = nn.ModuleDict(heads)

    @property
    def config(self):
        return getattr(self.encoder, "config", None)

    def forward(self, task: Union[str, Sequence[str]], input_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                loss_weights: Optional[Dict[str, float]] = None, **encoder_kwargs: Any) -> ClassifierOutput:
        """``task``: one name for the whole batch, or one name per row (a mixed batch: the encoder runs
        once, each head on its rows; logits are then a dict task -> logits of its rows in row order,
        and the loss is the mean over rows of each row's cross-entropy times its task's
        ``loss_weights`` entry, default 1)."""
        if input_ids is not None:
            encoder_kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            encoder_kwargs["attention_mask"] = attention_mask
        hidden = last_hidden_state(self.encoder(**encoder_kwargs))
        if isinstance(task, str):
            if task not in self.heads:
                raise KeyError(f"fastft.MultiTaskModel: unknown task {task!r}; tasks: {sorted(self.heads)}")
            logits = self.heads[task](hidden, attention_mask)
            if labels is None:
                return ClassifierOutput(logits=logits)
            return ClassifierOutput(loss=nn.functional.cross_entropy(logits.float(), labels), logits=logits)
        rows = list(task)
        if len(rows) != hidden.shape[0]:
            raise ValueError(f"fastft.MultiTaskModel: {len(rows)} task names for a batch of {hidden.shape[0]} rows; "
                             "pass one name per row")
        unknown = sorted(set(rows) - set(self.heads))
        if unknown:
            raise KeyError(f"fastft.MultiTaskModel: unknown task(s) {unknown}; tasks: {sorted(self.heads)}")
        out_logits: Dict[str, Tensor] = {}
        total = hidden.new_zeros((), dtype=torch.float32)
        for name in dict.fromkeys(rows):
            idx = torch.tensor([i for i, t in enumerate(rows) if t == name], device=hidden.device)
            out_logits[name] = self.heads[name](hidden[idx], None if attention_mask is None else attention_mask[idx])
            if labels is not None:
                weight = 1.0 if loss_weights is None else float(loss_weights.get(name, 1.0))
                loss = nn.functional.cross_entropy(out_logits[name].float(), labels[idx], reduction="sum")
                total = total + loss * weight
        return ClassifierOutput(loss=total / len(rows) if labels is not None else None, logits=out_logits)

    def save_pretrained(self, path: Union[str, Path], tokenizer: Any = None,
                        id2label: Optional[Dict[str, Any]] = None) -> None:
        """Save to the folder ``path``, laid out as :class:`fastft.SequenceClassifier`'s (see
        :mod:`fastft.heads`): the encoder in ``encoder/`` (or ``encoder.safetensors``), every head
        (``heads.safetensors`` + ``tasks.json``, with each task's label names), the tokenizer, and a
        ``config.json`` that makes transformers' Auto model classes refuse the folder with an error
        naming :meth:`from_pretrained`. Each file or folder is written atomically.

        Args:
            tokenizer: saved instead of ``self.tokenizer`` (set by :meth:`from_pretrained`).
            id2label: per task, its class names (a list, index = class id, or a dict id -> name),
                instead of ``self.id2label``; tasks left out have none.
        """
        from safetensors.torch import save_file, save_model

        from ..atomic import atomic_dir
        from ..heads import (ENCODER_DIR, label_mapping, labels_json, save_tokenizer, save_transformers_model,
                             write_model_config)

        where = "fastft.MultiTaskModel.save_pretrained"
        given = id2label if id2label is not None else (getattr(self, "id2label", None) or {})
        unknown = sorted(set(given) - set(self.heads))
        if unknown:
            raise KeyError(f"{where}: id2label names unknown task(s) {unknown}; tasks: {sorted(self.heads)}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if hasattr(self.encoder, "save_pretrained"):
            with atomic_dir(path / ENCODER_DIR) as tmp:
                save_transformers_model(self.encoder, tmp)
        else:
            atomic_write(path / "encoder.safetensors", lambda tmp: save_model(self.encoder, tmp))
        heads = {k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}
        atomic_write(path / "heads.safetensors", lambda tmp: save_file(heads, tmp, metadata={"format": "pt"}))
        config = {}
        for name, h in self.heads.items():
            if hasattr(h, "config"):
                names = given.get(name)
                if names is not None:
                    names = label_mapping(names, getattr(h, "num_labels", len(names)), f"{where}: task {name!r}")
                config[name] = {**h.config(), **labels_json(names)}
        meta = json.dumps({"hidden_size": self.hidden_size, "heads": config}, indent=2)
        atomic_write(path / "tasks.json", lambda tmp: Path(tmp).write_text(meta))
        save_tokenizer(tokenizer if tokenizer is not None else getattr(self, "tokenizer", None), path, where)
        write_model_config(path, "MultiTaskModel")

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], encoder: Optional[nn.Module] = None) -> "MultiTaskModel":
        """Load what :meth:`save_pretrained` wrote — the run folder's ``model/`` of a
        :class:`fastft.MultiTaskTrainer` run — in eval mode: the encoder (``transformers.AutoModel``
        from ``encoder/`` unless ``encoder`` is given; folders of earlier versions load too), the heads,
        ``id2label`` (task -> {class id: name}, for the tasks that have names) and ``tokenizer`` (None
        when the folder has none).

        Raises:
            FileNotFoundError: no ``tasks.json`` in ``path``.
        """
        from safetensors.torch import load_file

        from ..heads import label_mapping, load_encoder, load_tokenizer

        where = "fastft.MultiTaskModel.from_pretrained"
        path = Path(path)
        if not (path / "tasks.json").is_file():
            raise FileNotFoundError(f"{where}: no tasks.json in {path}")
        meta = json.loads((path / "tasks.json").read_text())
        encoder = load_encoder(path, encoder, where)
        tasks = {name: Task(train=None, num_labels=c["num_labels"], pool=c["pool"], dropout=c["dropout"])
                 for name, c in meta["heads"].items()}
        model = cls(encoder, tasks, hidden_size=meta["hidden_size"])
        model.heads.load_state_dict(load_file(str(path / "heads.safetensors")))
        mark_new(*model.heads.values(), new=False)  # trained weights now: anchored like the encoder
        model.id2label = {name: label_mapping(c["id2label"], c["num_labels"], where)
                          for name, c in meta["heads"].items() if c.get("id2label") is not None}
        model.tokenizer = load_tokenizer(path)
        return model.eval()


#: Trainer arguments that a multi-task run sets per task (on each :class:`Task`) instead.
PER_TASK = {"val_data": "Task.val", "num_labels": "Task.num_labels", "metrics": "Task.metrics", "labels": "Task.labels",
            "loss_fn": "Task.loss_weight (the loss is each head's cross-entropy)"}


class _TaskSampler:
    """The task draw of a multi-task run, seeded: which task (or, mixing, which rows) each batch takes.
    Each task walks its own shuffled pass (task-epoch) and reshuffles when it runs out."""

    def __init__(self, trainer: "MultiTaskTrainer") -> None:
        self.t = trainer
        self.names = list(trainer.tasks)
        self.rng = random.Random(trainer.seed)
        self.task_epochs = {k: 0 for k in self.names}
        self.queues: Dict[str, List[List[int]]] = {k: [] for k in self.names}
        self.rows: Dict[str, List[int]] = {k: [] for k in self.names}  # mixing: rows left of a task's batch
        self.rr = 0
        self.epochs_done = 0

    def next_batch(self, task: str) -> List[int]:
        """The next batch of ``task``'s own shuffled pass (indices into its examples)."""
        if not self.queues[task]:
            lengths = [example_length(e) for e in self.t.task_train[task]]
            g = torch.Generator().manual_seed(self.t.seed * 1_000_003 + zlib.crc32(task.encode()) % 100_003 * 101
                                              + self.task_epochs[task])
            self.queues[task] = batch_order(lengths, self.t.task_batch_size, g, True, self.t.group_by_length)
            self.task_epochs[task] += 1
        return self.queues[task].pop(0)

    def draw_task(self) -> str:
        if self.t.sampling == "round_robin":
            name = self.names[self.rr % len(self.names)]
            self.rr += 1
            return name
        return self.rng.choices(self.names, weights=[self.t.probabilities[n] for n in self.names])[0]

    def epoch(self) -> List[List[int]]:
        """The next epoch's batches as indices into the trainer's ``train_examples``."""
        offsets, batches = self.t.offsets, []
        for _ in range(self.t._batches_per_epoch()):
            if not self.t.mix:
                task = self.draw_task()
                batches.append([offsets[task] + i for i in self.next_batch(task)])
                continue
            batch = []
            for _ in range(self.t.task_batch_size):
                task = self.draw_task()
                if not self.rows[task]:
                    self.rows[task] = self.next_batch(task)
                batch.append(offsets[task] + self.rows[task].pop(0))
            batches.append(batch)
        self.epochs_done += 1
        return batches


class MultiTaskTrainer(Trainer):
    """Fine-tune one shared encoder on several tasks, each with its own head — :class:`fastft.Trainer`'s
    loop with three things of its own: which examples make a batch (the task draw), the loss of a
    batch (its task's head, times the task's ``loss_weight``) and validation per task.

    Every batch trains on one task's examples (``mix=False``, the default) or mixes tasks row by row
    (``mix=True``: the encoder runs once, each head on its rows). Tasks are drawn by ``sampling``:
    "proportional" (to data size), "temperature" (size^(1/T), as T5 / mT5), "uniform" or
    "round_robin". Each task walks its own shuffled data: every example once per task-epoch, then
    the task reshuffles. An epoch is as many batches as all tasks' data fills. The draw is seeded,
    and a function of the seed and the epoch, so :meth:`resume` continues it exactly.

    Validation (every epoch or ``eval_every`` steps) records per task ``val_<task>_<metric>``, the
    mean over tasks ``val_mean_<metric>``, and ``val_loss`` = the mean validation loss, so
    ``EarlyStopping`` can monitor the mean or a named task. The new heads are never anchored by
    L2-to-init; ``freeze=n`` freezes the encoder's embeddings and lowest n blocks.

    Args:
        encoder: the shared pretrained encoder (a Hugging Face encoder or any module returning
            ``last_hidden_state`` / a [B, T, H] tensor).
        tasks: task name -> :class:`Task` (training and validation data, heads, metrics, loss weight).
        sampling: "proportional", "temperature", "uniform" or "round_robin". Default "proportional".
        temperature: T of "temperature" sampling (> 0). Default 2.0.
        mix: mix tasks within a batch (not with ``replay``). Default False.
        hidden_size: the encoder's hidden size; None reads ``encoder.config.hidden_size``.
        **trainer_kwargs: every keyword argument of :class:`fastft.Trainer`, with its meaning, units
            and default (epochs, batch_size, lr, weight_decay, l2_init, l2_init_mode, freeze,
            cache_frozen, cache_dtype, cache_memory_mb (the shared encoder's frozen prefix, cached per
            example across tasks), layerwise_lr_decay, max_grad_norm, warmup_ratio, scheduler, gradient_accumulation,
            early_stopping, precision, output_dir, tokenizer, max_length, group_by_length, eval_every,
            eval_batch_size, callbacks, seed, skip_nonfinite, checkpoint_every, progress, device,
            replay, find_unused_parameters, new_modules) — except those set per task: ``val_data``
            (``Task.val``), ``num_labels``, ``metrics``, ``loss_fn``. ``find_unused_parameters`` is
            always True under torchrun (the heads of tasks absent from a batch get no gradient).
            ``distributed="fsdp2"`` shards the encoder's blocks and the model (not with ``mix=True``).

    Attributes:
        task_counts: batches (``mix=False``) or rows (``mix=True``) trained per task so far.
        probabilities: how often each task is drawn.

    Raises:
        TypeError: a task is not a :class:`Task`, or an argument :class:`fastft.Trainer` does not
            take (with the closest one) or that is set per task.
        ValueError: as :class:`fastft.Trainer`, and for empty ``tasks``, ``num_labels < 2``, a negative
            ``loss_weight``, a bad ``sampling`` / ``temperature``, ``mix`` with ``replay``, or a label
            outside its task's ``[0, num_labels)`` (naming ``task 'x' train[i]``).
    """

    where = "fastft.MultiTaskTrainer"

    def __init__(self, encoder: nn.Module, tasks: Dict[str, Task], *, sampling: str = "proportional",
                 temperature: float = 2.0, mix: bool = False, hidden_size: Optional[int] = None,
                 **trainer_kwargs: Any) -> None:
        where = self.where
        if not isinstance(tasks, dict) or not tasks:
            raise ValueError(f"{where}: tasks must be a non-empty dict of name -> fastft.Task")
        for name, t in tasks.items():
            if not isinstance(t, Task):
                raise TypeError(f"{where}: task {name!r} must be a fastft.Task, got {type(t).__name__}")
            if not isinstance(t.num_labels, int) or t.num_labels < 2:
                raise ValueError(f"{where}: task {name!r} needs num_labels >= 2, got {t.num_labels!r}")
            if not (isinstance(t.loss_weight, (int, float)) and t.loss_weight >= 0):
                raise ValueError(f"{where}: task {name!r} has loss_weight {t.loss_weight!r}; must be >= 0")
            check_metric_names(tuple(t.metrics), where)
        allowed = [n for n, p in inspect.signature(Trainer.__init__).parameters.items() if p.kind == p.KEYWORD_ONLY]
        for key in trainer_kwargs:
            if key in PER_TASK:
                raise TypeError(f"{where}: {key} is set per task, on {PER_TASK[key]}")
            if key not in allowed:
                hint = get_close_matches(key, allowed, n=1)
                raise TypeError(f"{where}: unexpected argument {key!r}" + (f"; did you mean {hint[0]!r}?" if hint
                                                                             else f"; it takes {sorted(allowed)}"))
        task_probabilities({k: 1 for k in tasks}, sampling, temperature)  # checks sampling and temperature
        self.label_maps = {}
        for name, t in tasks.items():
            raw = list(t.train) if t.train is not None else []
            names = LabelNames.from_examples(raw, t.labels, f"task {name!r} train", where, "Task(labels=[...])")
            if names.names is not None and t.num_labels != len(names.names):
                if t.num_labels != Task.num_labels and t.labels is None:
                    raise ValueError(f"{where}: task {name!r} has {len(names.names)} label names {names.names} "
                                     f"but num_labels={t.num_labels}; drop num_labels or pass labels=[...]")
                tasks = {**tasks, name: dataclasses.replace(t, num_labels=len(names.names))}
            self.label_maps[name] = names
        if mix and trainer_kwargs.get("replay") is not None:
            raise ValueError(f"{where}: replay works with one task per batch (mix=False)")
        if mix and trainer_kwargs.get("distributed") == "fsdp2":
            raise ValueError(f"{where}: mix=True cannot train with distributed='fsdp2': a rank whose rows lack a task "
                             "leaves that task's head without a gradient while another rank has one, and FSDP2 "
                             "reduce-scatters a module's gradients together; use mix=False or distributed='ddp'")
        self.tasks = tasks
        self.sampling, self.temperature, self.mix = sampling, temperature, mix
        model = MultiTaskModel(encoder, tasks, hidden_size=hidden_size)
        trainer_kwargs["find_unused_parameters"] = True
        trainer_kwargs["metrics"] = ()
        super().__init__(model, None, **trainer_kwargs)
        self.probabilities = task_probabilities({k: len(v) for k, v in self.task_train.items()}, sampling,
                                                temperature)
        self.task_counts: Dict[str, int] = {k: 0 for k in tasks}
        self._sampler = _TaskSampler(self)

    # --- Trainer's hooks --------------------------------------------------------------------------

    def _setup_data(self, train_data: Any, val_data: Any) -> None:
        """Per task, its examples (``task_train`` / ``task_val``); ``train_examples`` holds them all,
        task after task (``offsets[task]`` is where a task starts, ``task_of[i]`` whose example i is)."""
        self.task_train: Dict[str, List[Dict[str, Any]]] = {}
        self.task_val: Dict[str, List[Dict[str, Any]]] = {}
        self.train_examples, self.task_of, self.offsets = [], [], {}
        for name, t in self.tasks.items():
            prep = lambda data, split: _as_dicts(self._examples(data, f"task {name!r} {split}"))  # noqa: E731
            encode = self.label_maps[name].encode
            self.task_train[name] = encode(prep(t.train, "train"), f"task {name!r} train", self.where)
            if t.val is not None:
                self.task_val[name] = encode(prep(t.val, "val"), f"task {name!r} val", self.where)
            for split, examples in (("train", self.task_train[name]), ("val", self.task_val.get(name, []))):
                self._check_labels(examples, f"task {name!r} {split}", t.num_labels)
            self.offsets[name] = len(self.train_examples)
            self.train_examples += self.task_train[name]
            self.task_of += [name] * len(self.task_train[name])
        self.val_examples = None

    def _freeze_target(self) -> nn.Module:
        return self.model.encoder

    def _batches_per_epoch(self) -> int:
        return sum(math.ceil(len(v) / self.task_batch_size) for v in self.task_train.values())

    def _epoch_batches(self, epoch: int) -> List[List[int]]:
        if self._sampler.epochs_done > epoch:
            self._sampler = _TaskSampler(self)
        while self._sampler.epochs_done < epoch:
            self._sampler.epoch()
        return self._sampler.epoch()

    def _micro_loss(self, module: nn.Module, batch_indices: List[int], *args: Any, **kwargs: Any) -> Tensor:
        if self.mix:
            for i in batch_indices:
                self.task_counts[self.task_of[i]] += 1
        else:
            self.task_counts[self.task_of[batch_indices[0]]] += 1
        return super()._micro_loss(module, batch_indices, *args, **kwargs)

    def _rows_loss(self, module: nn.Module, indices: List[int]) -> Tensor:
        keys = self.collate([self.train_examples[i] for i in indices])
        batch = to_device(keys, self.device)
        with self._autocast():
            if self.mix:
                weights = {name: float(t.loss_weight) for name, t in self.tasks.items()}
                rows = [self.task_of[i] for i in indices]
                out = self._through_cache(keys, lambda: module(rows, **batch, loss_weights=weights))
                return out.loss.float()
            task = self.task_of[indices[0]]
            out = self._through_cache(keys, lambda: module(task, **batch))
            return out.loss.float() * float(self.tasks[task].loss_weight)

    def _has_validation(self) -> bool:
        return bool(self.task_val)

    def _record_keys(self) -> Optional[set]:
        metrics = {name: tuple(self.tasks[name].metrics) for name in self.task_val}
        if any(callable(m) for ms in metrics.values() for m in ms):
            return None
        keys = {"epoch", "step", "train_loss", "lr"}
        if metrics:
            keys |= {"val_loss", "val_mean_loss"} | {f"val_{n}_{m}" for n, ms in metrics.items() for m in ("loss",) + ms}
            keys |= {f"val_mean_{m}" for m in set.intersection(*(set(ms) for ms in metrics.values()))}
        return keys

    def _validate(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        per_task = {name: self.evaluate(name) for name in self.task_val}
        for name, res in per_task.items():
            out.update({f"{name}_{k}": v for k, v in res.items()})
        keys = set.intersection(*(set(r) for r in per_task.values()))
        for k in sorted(keys):
            out[f"mean_{k}"] = float(np.mean([r[k] for r in per_task.values()]))
        out["loss"] = out["mean_loss"]
        return out

    def _extra_state(self) -> Dict[str, Any]:
        return {"task_counts": self.task_counts}

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        self.task_counts = dict(state.get("task_counts", self.task_counts))

    # --- the task draw, for inspection ------------------------------------------------------------

    def _draw_task(self) -> str:
        return self._sampler.draw_task()

    def _next_batch(self, task: str) -> List[int]:
        return self._sampler.next_batch(task)

    @property
    def _task_epochs(self) -> Dict[str, int]:
        return self._sampler.task_epochs

    # --- evaluation -------------------------------------------------------------------------------

    def _check_task(self, task: str, what: str) -> None:
        if task not in self.tasks:
            raise KeyError(f"{self.where}.{what}: unknown task {task!r}; tasks: {sorted(self.tasks)}")

    def _task_forward(self, task: str, batch: Any) -> Tuple[Tensor, Tensor, Tensor]:
        keys, batch = batch, to_device(batch, self.device)
        with self._autocast():
            out = self._through_cache(keys, lambda: self.model(task, **batch))
        return out.loss.float(), out.logits, batch["labels"]

    def evaluate(self, task: str, data: Any = None) -> Dict[str, float]:
        """Loss and metrics of ``task`` on ``data`` (default: its validation data). Under torchrun each
        rank evaluates every N-th example and all ranks return the same numbers.

        Raises:
            KeyError: unknown task. ValueError: no ``data`` and the task has no validation data.
        """
        self._check_task(task, "evaluate")
        if data is None:
            examples = self.task_val.get(task)
        else:
            examples = self.label_maps[task].encode(_as_dicts(self._examples(data, "data", f"{self.where}.evaluate")),
                                                    f"task {task!r} data", f"{self.where}.evaluate")
        if not examples:
            raise ValueError(f"{self.where}.evaluate: task {task!r} has no validation data; pass data=")
        return self._evaluate_examples(examples, lambda batch: self._task_forward(task, batch),
                                       tuple(self.tasks[task].metrics))

    @property
    def label_names(self) -> Dict[str, Optional[List[Any]]]:
        """Per task, its class names (index = class id), or None where its labels are ids."""
        return {task: m.names for task, m in self.label_maps.items()}

    @property
    def id2label(self) -> Dict[str, Optional[Dict[int, Any]]]:
        return {task: None if n is None else dict(enumerate(n)) for task, n in self.label_names.items()}

    @property
    def label2id(self) -> Dict[str, Optional[Dict[Any, int]]]:
        return {task: None if n is None else {x: i for i, x in enumerate(n)} for task, n in self.label_names.items()}

    def predict_labels(self, task: str, data: Any, top_k: Optional[int] = 1) -> List[Any]:
        """``task``'s class predictions for ``data`` as :meth:`fastft.Trainer.predict_labels` gives them
        (``{"label": name, "score": p}`` per example, or the ``top_k`` most likely).

        Raises:
            KeyError: unknown task. ValueError: a bad ``top_k``.
        """
        return ranked_labels(self.predict(task, data), self.label_maps[task].names if task in self.label_maps
                             else None, top_k, f"{self.where}.predict_labels")

    def predict(self, task: str, data: Any) -> Tensor:
        """Logits (float32 ``[N, num_labels]``) of ``task``'s head for every example of ``data``, in order.

        Raises:
            KeyError: unknown task.
        """
        self._check_task(task, "predict")
        examples = _as_dicts(without_labels(self._examples(data, "data", f"{self.where}.predict", unlabelled=True)))
        return self._predict_examples(
            examples, lambda batch: self.model(task, **{k: v for k, v in batch.items() if k != "labels"}))


def _merged_signature() -> inspect.Signature:
    """MultiTaskTrainer's own parameters, then Trainer's keyword arguments it takes (for help() and tools)."""
    own = inspect.signature(MultiTaskTrainer.__init__)
    params = [p for p in own.parameters.values() if p.kind != p.VAR_KEYWORD]
    names = {p.name for p in params}
    params += [p for n, p in inspect.signature(Trainer.__init__).parameters.items()
               if p.kind == p.KEYWORD_ONLY and n not in names and n not in PER_TASK]
    return own.replace(parameters=params)


MultiTaskTrainer.__init__.__signature__ = _merged_signature()


def _as_dicts(examples: List[Any]) -> List[Dict[str, Any]]:
    """(token ids, label) pairs become ``{"input_ids", "labels"}`` dicts: the encoder takes keyword inputs."""
    return [e if isinstance(e, dict) else {"input_ids": e[0], **({} if e[1] is None else {"labels": e[1]})}
            for e in examples]
