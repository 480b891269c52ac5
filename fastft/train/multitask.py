"""Multi-task fine-tuning: one shared encoder, one head per task, task sampling."""

from __future__ import annotations

import json
import math
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .. import distributed as D
from ..heads import ClassificationHead, ClassifierOutput, _last_hidden_state
from ..optim import AdamW
from .callbacks import EarlyStopping
from .data import Collator, batch_order, example_length, prepare_examples
from .metrics import check_metric_names, compute_metrics
from .trainer import FitResult, _swap_in, _to, autocast, optimizer_step, warmup_then_decay

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
    """

    train: Any
    val: Any = None
    num_labels: int = 2
    pool: str = "mean"
    metrics: Sequence = ("accuracy",)
    loss_weight: float = 1.0
    dropout: float = 0.1
    head: Optional[nn.Module] = None


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
        hidden = _last_hidden_state(self.encoder(**encoder_kwargs))
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

    def save_pretrained(self, path: Union[str, Path]) -> None:
        """The encoder (``save_pretrained`` or ``encoder.safetensors``) and every head
        (``heads.safetensors`` + ``tasks.json``)."""
        from safetensors.torch import save_file, save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if hasattr(self.encoder, "save_pretrained"):
            self.encoder.save_pretrained(path)
        else:
            save_model(self.encoder, str(path / "encoder.safetensors"))
        save_file({k: v.detach().contiguous() for k, v in self.heads.state_dict().items()},
                  str(path / "heads.safetensors"))
        config = {name: h.config() for name, h in self.heads.items() if hasattr(h, "config")}
        (path / "tasks.json").write_text(json.dumps({"hidden_size": self.hidden_size, "heads": config}, indent=2))

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], encoder: Optional[nn.Module] = None) -> "MultiTaskModel":
        """Load what :meth:`save_pretrained` wrote (the encoder through ``transformers.AutoModel`` unless given)."""
        from safetensors.torch import load_file, load_model

        path = Path(path)
        if not (path / "tasks.json").is_file():
            raise FileNotFoundError(f"fastft.MultiTaskModel.from_pretrained: no tasks.json in {path}")
        meta = json.loads((path / "tasks.json").read_text())
        if encoder is None:
            from transformers import AutoModel

            encoder = AutoModel.from_pretrained(path)
        elif (path / "encoder.safetensors").is_file():
            load_model(encoder, str(path / "encoder.safetensors"))
        tasks = {name: Task(train=None, num_labels=c["num_labels"], pool=c["pool"], dropout=c["dropout"])
                 for name, c in meta["heads"].items()}
        model = cls(encoder, tasks, hidden_size=meta["hidden_size"])
        model.heads.load_state_dict(load_file(str(path / "heads.safetensors")))
        return model


class MultiTaskTrainer:
    """Fine-tune one shared encoder on several tasks, each with its own head.

    Every optimizer step trains on one task's batch (``mix=False``, the default) or on a batch
    mixing tasks (``mix=True``: the encoder runs once, each head on its rows). Tasks are drawn by
    ``sampling``: "proportional" (to data size), "temperature" (size^(1/T)), "uniform" or
    "round_robin". Each task walks its own shuffled data: every example is seen once per
    task-epoch, then the task reshuffles. An epoch is as many batches as all tasks' data fills.
    The loss of a task is multiplied by its ``loss_weight``.

    Validation after each epoch records per-task ``val_<task>_<metric>`` and the mean over tasks
    ``val_mean_<metric>`` (``val_loss`` is the mean validation loss), so ``EarlyStopping`` can
    monitor the mean or a named task. One :class:`fastft.AdamW` over everything: L2-to-init
    applies to the encoder (the new heads are not anchored); ``freeze=n`` freezes the encoder's
    embeddings and lowest n blocks.

    Under torchrun it trains data-parallel as :class:`fastft.Trainer` does: every rank draws the
    same task (or the same mixed rows) from the same seeded sampler and trains on its share of the
    global ``batch_size``; DDP runs with ``find_unused_parameters`` (the heads of absent tasks get
    no gradient); validation is sharded and gathered; rank 0 writes.
    """

    def __init__(self, encoder: nn.Module, tasks: Dict[str, Task], *, sampling: str = "proportional",
                 temperature: float = 2.0, mix: bool = False, epochs: int = 3, batch_size: int = 32,
                 lr: float = 2e-5, weight_decay: float = 0.01, l2_init: float = 0.0, freeze: Optional[int] = None,
                 max_grad_norm: Optional[float] = 1.0, warmup_ratio: float = 0.1,
                 early_stopping: Optional[EarlyStopping] = None, precision: str = "fp32",
                 output_dir: Optional[str] = None, tokenizer: Any = None, max_length: Optional[int] = None,
                 group_by_length: bool = True, seed: int = 0, callbacks: Sequence[Any] = (), progress: bool = True,
                 device: Optional[str] = None, hidden_size: Optional[int] = None, replay: Any = None) -> None:
        if not isinstance(tasks, dict) or not tasks:
            raise ValueError("fastft.MultiTaskTrainer: tasks must be a non-empty dict of name -> fastft.Task")
        for name, t in tasks.items():
            if not isinstance(t, Task):
                raise TypeError(f"fastft.MultiTaskTrainer: task {name!r} must be a fastft.Task, got {type(t).__name__}")
            if not isinstance(t.num_labels, int) or t.num_labels < 2:
                raise ValueError(f"fastft.MultiTaskTrainer: task {name!r} needs num_labels >= 2, got {t.num_labels!r}")
            if not (isinstance(t.loss_weight, (int, float)) and t.loss_weight >= 0):
                raise ValueError(f"fastft.MultiTaskTrainer: task {name!r} has loss_weight {t.loss_weight!r}; must be >= 0")
            check_metric_names(tuple(t.metrics))
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"fastft.MultiTaskTrainer: precision must be fp32, bf16 or fp16, got {precision!r}")
        for label, value in (("epochs", epochs), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"fastft.MultiTaskTrainer: {label} must be an int >= 1, got {value!r}")
        self.tasks = tasks
        self.sampling, self.temperature, self.mix = sampling, temperature, mix
        self.epochs, self.batch_size, self.precision, self.seed = epochs, batch_size, precision, seed
        self.group_by_length, self.progress = group_by_length, progress
        self.tokenizer, self.early_stopping = tokenizer, early_stopping
        self.callbacks: List[Any] = list(callbacks) + ([early_stopping] if early_stopping else [])
        self.output_dir = Path(output_dir) if output_dir else None
        self.distributed = D.init_distributed()
        self.rank, self.world_size = D.get_rank(), D.get_world_size()
        if batch_size % self.world_size:
            raise ValueError(f"fastft.MultiTaskTrainer: batch_size is the global batch and must be divisible by the "
                             f"{self.world_size} processes; got {batch_size}")
        self.progress = progress and D.is_main_process()
        self.device = torch.device(device) if device else D.default_device()

        self.train_examples: Dict[str, List[Any]] = {}
        self.val_examples: Dict[str, List[Any]] = {}
        for name, t in tasks.items():
            self.train_examples[name] = _as_dicts(prepare_examples(t.train, tokenizer, max_length,
                                                                   f"task {name!r} train"))
            if t.val is not None:
                self.val_examples[name] = _as_dicts(prepare_examples(t.val, tokenizer, max_length,
                                                                     f"task {name!r} val"))
            for split, examples in (("train", self.train_examples[name]), ("val", self.val_examples.get(name, []))):
                for i, e in enumerate(examples):
                    y = e.get("labels") if isinstance(e, dict) else e[1]
                    y = int(y.item() if isinstance(y, Tensor) else y)
                    if not 0 <= y < t.num_labels:
                        raise ValueError(f"fastft.MultiTaskTrainer: task {name!r} {split}[{i}] has label {y}, outside "
                                         f"[0, {t.num_labels})")
        self.probabilities = task_probabilities({k: len(v) for k, v in self.train_examples.items()}, sampling,
                                                temperature)
        self.model = MultiTaskModel(encoder, tasks, hidden_size=hidden_size)
        self.freeze_plan = None
        if freeze is not None:
            from ..freezing import freeze_layers

            self.freeze_plan = freeze_layers(encoder, freeze)
        self.model.to(self.device)
        # Replay (fastft.Replay with lm= an LM sharing the encoder): r of every batch_size rows are replay text.
        self.replay = replay
        self.task_batch_size = batch_size
        if replay is not None:
            if mix:
                raise ValueError("fastft.MultiTaskTrainer: replay works with one task per batch (mix=False)")
            r = replay.count(batch_size)
            if r >= batch_size:
                raise ValueError(f"fastft.MultiTaskTrainer: replay ratio {replay.ratio} leaves no task example in a "
                                 f"batch of {batch_size}")
            self.task_batch_size = batch_size - r
            replay.bind(self.model, tokenizer)
            replay.lm.to(self.device)
        self.collate = Collator(pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0)

        head_ids = {id(p) for p in self.model.heads.parameters()}
        groups = []
        for anchored in (True, False):
            params = [p for p in self.model.parameters() if (id(p) not in head_ids) == anchored]
            for decay in (True, False):
                members = [p for p in params if (p.dim() > 1) == decay]
                if members:
                    groups.append({"params": members, "weight_decay": weight_decay if decay else 0.0,
                                   "l2_init": l2_init if anchored else 0.0})
        self.optimizer = AdamW(groups, lr=lr, weight_decay=weight_decay, l2_init=l2_init, max_grad_norm=max_grad_norm)
        self.steps_per_epoch = sum(math.ceil(len(v) / self.task_batch_size) for v in self.train_examples.values())
        total = self.steps_per_epoch * epochs
        warmup = int(total * warmup_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_then_decay(total, warmup))
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        #: The module training steps go through (under torchrun the DDP wrapper).
        self.training_module = D.DDPCache(self.model, self.device, find_unused_parameters=True)
        self.history: List[Dict[str, float]] = []
        self.global_step = 0
        self.should_stop = self.stopped_early = False
        #: optimizer steps (mix=False) or examples (mix=True) per task so far
        self.task_counts: Dict[str, int] = {k: 0 for k in tasks}
        self._rng = random.Random(seed)
        self._task_epochs = {k: 0 for k in tasks}
        self._queues: Dict[str, List[List[int]]] = {k: [] for k in tasks}
        self._row_queue: Dict[str, List[int]] = {k: [] for k in tasks}  # mix=True: rows left of a task's batch
        self._rr = 0

    # --- sampling ---------------------------------------------------------------------------------

    def _next_batch(self, task: str) -> List[int]:
        """The next batch of ``task``'s own shuffled pass; a new pass (task-epoch) when it runs out."""
        if not self._queues[task]:
            lengths = [example_length(e) for e in self.train_examples[task]]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(task.encode()) % 100_003 * 101
                                              + self._task_epochs[task])
            self._queues[task] = batch_order(lengths, self.task_batch_size, g, True, self.group_by_length)
            self._task_epochs[task] += 1
        return self._queues[task].pop(0)

    def _draw_task(self) -> str:
        names = list(self.tasks)
        if self.sampling == "round_robin":
            name = names[self._rr % len(names)]
            self._rr += 1
            return name
        return self._rng.choices(names, weights=[self.probabilities[n] for n in names])[0]

    # --- steps ------------------------------------------------------------------------------------

    def _autocast(self):
        return autocast(self.device, self.precision)

    def _shard(self, indices: Sequence[int]):
        return D.shard(indices, self.rank, self.world_size)

    def _task_loss(self, module: nn.Module, task: str) -> Tensor:
        """This rank's share of the mean loss of ``task``'s next global batch (replay rows included)."""
        idx = self._next_batch(task)
        local, real = self._shard(idx)
        batch = _to(self.collate([self.train_examples[task][i] for i in local]), self.device)
        with self._autocast():
            out = module(task, **batch)
        r = self.replay.count(self.batch_size) if self.replay is not None else 0
        rows = len(idx) + r
        total = out.loss.float() * float(self.tasks[task].loss_weight) * ((len(local) if real else 0.0) / rows)
        if r:
            replayed = self.replay.next(r)  # every rank draws the same rows and keeps its share
            with self._autocast():
                total = total + self.replay.weight * r / rows * self.replay.loss_share(
                    replayed, self.device, rank=self.rank, world_size=self.world_size)
        self.task_counts[task] += 1
        return total

    def _mixed_loss(self, module: nn.Module) -> Tensor:
        """A batch whose rows come from tasks drawn one by one: the encoder runs once on all rows.
        Returns this rank's share of the batch's mean loss."""
        rows = []
        for _ in range(self.batch_size):
            task = self._draw_task()
            if not self._row_queue[task]:
                self._row_queue[task] = self._next_batch(task)
            rows.append((task, self._row_queue[task].pop(0)))
        for task, _ in rows:
            self.task_counts[task] += 1
        local, real = self._shard(range(len(rows)))
        mine = [rows[i] for i in local]
        batch = _to(self.collate([self.train_examples[t][i] for t, i in mine]), self.device)
        weights = {name: float(t.loss_weight) for name, t in self.tasks.items()}
        with self._autocast():
            out = module([t for t, _ in mine], **batch, loss_weights=weights)
        return out.loss * (len(mine) / len(rows) if real else 0.0)

    def fit(self) -> FitResult:
        """Train for ``epochs`` (or until early stopping); returns a :class:`fastft.FitResult`."""
        from tqdm.auto import tqdm

        torch.manual_seed(self.seed + self.rank)  # under torchrun: different dropout masks per rank
        np.random.seed(self.seed + self.rank)
        if self.output_dir and D.is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        for cb in self.callbacks:
            getattr(cb, "on_fit_start", lambda *a: None)(self)
        bar = tqdm(total=self.steps_per_epoch * self.epochs, disable=not self.progress, desc="multi-task")
        start = time.perf_counter()
        for epoch in range(self.epochs):
            run_loss = 0.0
            for _ in range(self.steps_per_epoch):
                module = self.training_module()
                loss = self._mixed_loss(module) if self.mix else self._task_loss(module, self._draw_task())
                step_loss = float(loss.detach())
                nonfinite = 0.0 if math.isfinite(step_loss) else 1.0
                # The global loss, and the same decision on every rank (identity in one process).
                step_loss, nonfinite = D.all_reduce_sum([step_loss, nonfinite])
                if nonfinite:
                    self.optimizer.zero_grad(set_to_none=True)
                    raise FloatingPointError(f"fastft.MultiTaskTrainer: non-finite loss at step {self.global_step + 1}")
                scaled = loss * self.world_size  # DDP averages gradients over the ranks
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                optimizer_step(self.optimizer, self.scheduler, self.scaler)
                self.global_step += 1
                run_loss += step_loss
                bar.update(1)
                for cb in self.callbacks:
                    getattr(cb, "on_step_end", lambda *a: None)(self, self.global_step, step_loss)
                self.should_stop = D.any_rank(self.should_stop)
                if self.should_stop:
                    break
            for cb in self.callbacks:
                getattr(cb, "on_epoch_end", lambda *a: None)(self, epoch)
            record = {"epoch": epoch + 1, "step": self.global_step, "train_loss": run_loss / self.steps_per_epoch,
                      "seconds": time.perf_counter() - start}
            if self.val_examples:
                record.update({f"val_{k}": v for k, v in self._validate().items()})
                for cb in self.callbacks:  # may add to the record (e.g. ForgettingMonitor)
                    getattr(cb, "on_evaluate", lambda *a: None)(self, record)
            self.should_stop = D.any_rank(self.should_stop)
            self.history.append(record)
            if self.output_dir and D.is_main_process():
                with open(self.output_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if self.should_stop:
                break
        bar.close()
        for cb in self.callbacks:
            getattr(cb, "on_fit_end", lambda *a: None)(self)
        if self.output_dir and D.is_main_process():
            tmp = self.output_dir / ".model.tmp"
            self.model.save_pretrained(tmp)
            _swap_in(tmp, self.output_dir / "model")
        D.barrier()
        es = self.early_stopping
        return FitResult(history=list(self.history), best_epoch=es.best_epoch if es else None,
                         best_metric=es.best if es else None, stopped_early=self.stopped_early,
                         global_step=self.global_step, output_dir=str(self.output_dir) if self.output_dir else None)

    # --- evaluation -------------------------------------------------------------------------------

    def _validate(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        per_task = {name: self.evaluate(name) for name in self.val_examples}
        for name, res in per_task.items():
            out.update({f"{name}_{k}": v for k, v in res.items()})
        keys = set.intersection(*(set(r) for r in per_task.values()))
        for k in sorted(keys):
            out[f"mean_{k}"] = float(np.mean([r[k] for r in per_task.values()]))
        out["loss"] = out["mean_loss"]
        return out

    @torch.no_grad()
    def evaluate(self, task: str, data: Any = None) -> Dict[str, float]:
        """Loss and metrics of ``task`` on ``data`` (default: its validation data). Under torchrun each
        rank evaluates every N-th example and all ranks return the same numbers."""
        if task not in self.tasks:
            raise KeyError(f"fastft.MultiTaskTrainer: unknown task {task!r}; tasks: {sorted(self.tasks)}")
        examples = self.val_examples.get(task) if data is None else _as_dicts(
            prepare_examples(data, self.tokenizer, None, f"task {task!r} data"))
        if not examples:
            raise ValueError(f"fastft.MultiTaskTrainer.evaluate: task {task!r} has no validation data; pass data=")
        was = self.model.training
        self.model.eval()
        total, logits_all, labels_all = 0.0, [], []
        mine = examples[self.rank::self.world_size]
        for i in range(0, len(mine), self.batch_size):
            batch = _to(self.collate(mine[i:i + self.batch_size]), self.device)
            with self._autocast():
                out = self.model(task, **batch)
            total += float(out.loss) * len(batch["labels"])
            logits_all.append(out.logits.float().cpu())
            labels_all.append(batch["labels"].cpu())
        self.model.train(was)
        total, count, logits, labels = D.gather_evaluation(
            total, len(mine), torch.cat(logits_all) if logits_all else None,
            torch.cat(labels_all) if labels_all else None)
        loss = total / count
        res = {"loss": loss}
        res.update(compute_metrics(tuple(self.tasks[task].metrics), logits, labels, loss))
        return res

    @torch.no_grad()
    def predict(self, task: str, data: Any) -> Tensor:
        """Logits of ``task``'s head for every example of ``data``, in order."""
        if task not in self.tasks:
            raise KeyError(f"fastft.MultiTaskTrainer: unknown task {task!r}; tasks: {sorted(self.tasks)}")
        examples = _as_dicts(prepare_examples(data, self.tokenizer, None, "data"))
        was = self.model.training
        self.model.eval()
        out = []
        for i in range(0, len(examples), self.batch_size):
            batch = _to(self.collate(examples[i:i + self.batch_size]), self.device)
            batch.pop("labels", None)
            with self._autocast():
                out.append(self.model(task, **batch).logits.float().cpu())
        self.model.train(was)
        return torch.cat(out)


def _as_dicts(examples: List[Any]) -> List[Dict[str, Any]]:
    """(token ids, label) pairs become ``{"input_ids", "labels"}`` dicts: the encoder takes keyword inputs."""
    return [e if isinstance(e, dict) else {"input_ids": e[0], "labels": e[1]} for e in examples]
