"""``fastft.Trainer``: full fine-tuning with validation, early stopping, metrics and resumable checkpoints."""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import distributed as D
from ..optim import AdamW, _is_dtensor
from .callbacks import EarlyStopping
from .data import Collator, batch_order, example_length, loss_terms, prepare_examples
from .metrics import check_metric_names, compute_metrics

__all__ = ["Trainer", "FitResult"]

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
CHECKPOINT = "checkpoint"


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        history: one dict per evaluation (epoch, step, train_loss, val_loss, val_<metric>, lr, seconds).
        best_epoch: the epoch (1-based) of the best monitored value (EarlyStopping's monitor, else val_loss).
        best_metric: that value.
        stopped_early: True when EarlyStopping ended training before ``epochs``.
        global_step: optimizer steps taken.
        output_dir: the run folder (None without ``output_dir``).
        skipped_steps: micro-batches skipped for a non-finite loss (``skip_nonfinite=True``).
    """

    history: List[Dict[str, float]] = field(default_factory=list)
    best_epoch: Optional[int] = None
    best_metric: Optional[float] = None
    stopped_early: bool = False
    global_step: int = 0
    output_dir: Optional[str] = None
    skipped_steps: int = 0


def _field(out: Any, name: str) -> Optional[Tensor]:
    """``out.<name>`` or ``out[name]`` of a model output (a ModelOutput, dataclass or dict); None if absent."""
    value = getattr(out, name, None)
    if value is None and isinstance(out, dict):
        value = out.get(name)
    return value


def _logits_of(out: Any) -> Optional[Tensor]:
    return out if isinstance(out, Tensor) else _field(out, "logits")


def _loss_of(out: Any) -> Optional[Tensor]:
    return None if isinstance(out, Tensor) else _field(out, "loss")


def _num_labels_of(model: nn.Module) -> Optional[int]:
    n = getattr(model, "num_labels", None)
    if n is None:
        n = getattr(getattr(model, "config", None), "num_labels", None)
    return n if isinstance(n, int) else None


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return tuple(v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for v in batch)


class Trainer:
    """Fine-tune ``model`` on ``train_data``, validating on ``val_data``.

    Data: a sequence / Dataset of ``(input, label)`` pairs (default loss: cross-entropy, MSE for
    float labels or one output), of text pairs with ``tokenizer=``, or of dicts (a tokenized
    ``datasets.Dataset``, lists of dicts) for Hugging Face models whose output carries ``.loss`` /
    ``.logits``. ``loss_fn(output, batch)`` overrides the loss. Batches are padded to their longest
    example (dynamic padding) and, by default, grouped by length.

    Optimisation: :class:`fastft.AdamW` (no weight decay on biases and norm weights; L2-to-init from
    ``l2_init``; fused clipping from ``max_grad_norm``), linear warm-up over ``warmup_ratio`` of the
    steps then ``scheduler`` decay ("linear", "cosine", "constant"), ``gradient_accumulation``,
    ``precision`` "fp32" / "bf16" / "fp16" (autocast; GradScaler for fp16), ``freeze=n`` (the lowest
    n blocks and the embeddings, see :func:`fastft.freeze_layers`), ``layerwise_lr_decay``. Micro-batches
    are weighted by their loss terms (rows; target tokens for token-level labels, as in language
    modelling), so an accumulated step equals one on the whole batch.

    Validation every epoch (or every ``eval_every`` optimizer steps) with ``metrics`` from
    scikit-learn; ``early_stopping`` stops and restores the best weights. With ``output_dir`` the run
    folder gets ``metrics.jsonl``, an atomic resumable ``checkpoint/`` (every ``checkpoint_every``
    steps and at each evaluation), the final ``model/`` and ``curves.png``.

    Under ``torchrun`` (see :mod:`fastft.distributed`) the same call trains data-parallel: the
    process group comes from the environment (nccl on GPUs, gloo on CPU), the model is wrapped in
    DistributedDataParallel, ``batch_size`` is the global batch (each of N ranks takes every N-th
    example of each batch; N must divide it), gradient accumulation all-reduces only on the last
    micro-batch (``no_sync``), validation is sharded and its metrics computed from the gathered
    predictions on every rank (so every rank logs, early-stops and restores the same), and only
    rank 0 shows progress and writes files. A checkpoint resumes under any world size that divides
    ``batch_size``. ``find_unused_parameters`` is DDP's flag: True (the default) lets a model train
    whose forward leaves some trainable parameters without a gradient (a Hugging Face encoder's
    pooler under a fastft head, say); False spares DDP a walk over the autograd graph per step when
    every trainable parameter gets one.
    """

    def __init__(self, model: nn.Module, train_data: Any, val_data: Any = None, *, epochs: int = 3,
                 batch_size: int = 32, lr: float = 2e-5, weight_decay: float = 0.01, l2_init: float = 0.0,
                 l2_init_mode: str = "decoupled", freeze: Optional[int] = None,
                 layerwise_lr_decay: Optional[float] = None, max_grad_norm: Optional[float] = 1.0,
                 warmup_ratio: float = 0.1, scheduler: str = "linear", gradient_accumulation: int = 1,
                 early_stopping: Optional[EarlyStopping] = None, metrics: Sequence[str] = ("accuracy",),
                 precision: str = "fp32", output_dir: Optional[str] = None, tokenizer: Any = None,
                 max_length: Optional[int] = None, group_by_length: bool = True, eval_every: Optional[int] = None,
                 eval_batch_size: Optional[int] = None, loss_fn: Optional[Callable[[Any, Any], Tensor]] = None,
                 num_labels: Optional[int] = None, callbacks: Sequence[Any] = (), seed: int = 0,
                 skip_nonfinite: bool = False, checkpoint_every: Optional[int] = None, progress: bool = True,
                 device: Optional[str] = None, replay: Any = None, find_unused_parameters: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"fastft.Trainer: model must be an nn.Module, got {type(model).__name__}")
        if any(_is_dtensor(p) for p in model.parameters()):
            raise ValueError("fastft.Trainer: the model's parameters are DTensors (sharded with FSDP2 or tensor "
                             "parallelism); the Trainer trains data-parallel with DDP on a whole model. Pass the "
                             "unsharded model under torchrun, or drive the sharded one with fastft.AdamW in your "
                             "own loop")
        for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1),
                                 ("gradient_accumulation", gradient_accumulation, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"fastft.Trainer: {name} must be an int >= {low}, got {value!r}")
        for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"fastft.Trainer: {name} must be None or an int >= 1, got {value!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"fastft.Trainer: precision must be one of {PRECISIONS}, got {precision!r}")
        if scheduler not in SCHEDULES:
            raise ValueError(f"fastft.Trainer: scheduler must be one of {SCHEDULES}, got {scheduler!r}")
        if not (0.0 <= warmup_ratio < 1.0):
            raise ValueError(f"fastft.Trainer: warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
        metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        check_metric_names(metrics)

        self.distributed = D.init_distributed()
        self.rank, self.world_size = D.get_rank(), D.get_world_size()
        if batch_size % self.world_size:
            raise ValueError(f"fastft.Trainer: batch_size is the global batch and must be divisible by the "
                             f"{self.world_size} processes (each trains on batch_size / {self.world_size}); got "
                             f"{batch_size}")
        self.model = model
        self.device = torch.device(device) if device else D.default_device()
        self.epochs, self.batch_size, self.gradient_accumulation = epochs, batch_size, gradient_accumulation
        self.eval_batch_size = eval_batch_size or batch_size
        self.metrics, self.precision, self.scheduler_name = metrics, precision, scheduler
        self.warmup_ratio, self.group_by_length, self.eval_every = warmup_ratio, group_by_length, eval_every
        self.loss_fn, self.seed, self.skip_nonfinite = loss_fn, seed, skip_nonfinite
        self.checkpoint_every = checkpoint_every
        self.progress = progress and D.is_main_process()
        self.output_dir = Path(output_dir) if output_dir else None
        self.early_stopping = early_stopping
        self.callbacks: List[Any] = list(callbacks) + ([early_stopping] if early_stopping else [])
        self.tokenizer = tokenizer

        self.train_examples = prepare_examples(train_data, tokenizer, max_length, "train_data")
        self.val_examples = prepare_examples(val_data, tokenizer, max_length, "val_data") if val_data is not None \
            else None
        self.num_labels = num_labels if num_labels is not None else _num_labels_of(model)
        self._check_labels(self.train_examples, "train_data")
        if self.val_examples is not None:
            self._check_labels(self.val_examples, "val_data")
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.collate = Collator(pad_token_id=pad_id)
        self.train_lengths = [example_length(e) for e in self.train_examples]
        from ..forgetting import lm_kind

        # Terms of the model's own mean loss per example (target tokens for token-level labels): the
        # weights that make a step's loss the same however its batch is split (see _micro_loss).
        causal = lm_kind(model) == "causal"
        self.train_terms = [1 if loss_fn is not None else loss_terms(e, causal) for e in self.train_examples]

        self.replay = replay
        self.task_batch_size = batch_size
        if replay is not None:
            r = replay.count(batch_size)
            if r >= batch_size:
                raise ValueError(f"fastft.Trainer: replay ratio {replay.ratio} leaves no task example in a batch of "
                                 f"{batch_size}")
            self.task_batch_size = batch_size - r

        self.freeze_plan = None
        if freeze is not None:
            from ..freezing import freeze_layers

            self.freeze_plan = freeze_layers(model, freeze)
        model.to(self.device)
        if replay is not None:
            replay.bind(model, tokenizer)
            replay.lm.to(self.device)  # an LM sharing the encoder brings its own head
        if layerwise_lr_decay is not None:
            from ..freezing import layerwise_lr_groups

            groups = layerwise_lr_groups(model, lr=lr, decay=layerwise_lr_decay, weight_decay=weight_decay)
        else:
            decay, no_decay = [], []
            for p in model.parameters():
                (no_decay if p.dim() <= 1 else decay).append(p)
            groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.optimizer = AdamW(groups, lr=lr, weight_decay=weight_decay, l2_init=l2_init,
                               l2_init_mode=l2_init_mode, max_grad_norm=max_grad_norm)
        self.steps_per_epoch = math.ceil(math.ceil(len(self.train_examples) / self.task_batch_size)
                                         / gradient_accumulation)
        self.total_steps = self.steps_per_epoch * epochs
        warmup = int(self.total_steps * warmup_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_then_decay(self.total_steps, warmup, scheduler))
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self._takes_labels = self._forward_takes_labels(model)

        self.global_step = 0
        self.history: List[Dict[str, float]] = []
        self.should_stop = False
        self.stopped_early = False
        self.skipped_steps = 0
        self._position = (0, 0)  # (epoch, next micro-batch) of the next step
        self._run_loss, self._run_count = 0.0, 0  # training loss since the last record
        #: The module training steps go through (under torchrun the DDP wrapper).
        self.training_module = D.DDPCache(model, self.device, find_unused_parameters=find_unused_parameters)
        #: Seconds spent in each part of the training steps so far (host clock; on CUDA the
        #: asynchronous kernels show up where the host waits for them).
        self.timings: Dict[str, float] = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    # --- set-up helpers ---------------------------------------------------------------------------

    @staticmethod
    def _forward_takes_labels(model: nn.Module) -> bool:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            return True
        return "labels" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())

    def _check_labels(self, examples: List[Any], what: str) -> None:
        for i, e in enumerate(examples):
            y = e.get("labels") if isinstance(e, dict) else e[1]
            if y is None or isinstance(y, (list, tuple)):
                continue
            if isinstance(y, Tensor):
                if y.numel() != 1:
                    continue  # sequence labels (token classification / LM): the model's own loss checks them
                y = y.item()
            if isinstance(y, float) or self.num_labels in (None, 1):
                continue
            if not (0 <= int(y) < self.num_labels):
                raise ValueError(f"fastft.Trainer: {what}[{i}] has label {y}, outside [0, {self.num_labels}) "
                                 f"(num_labels={self.num_labels})")

    # --- one batch --------------------------------------------------------------------------------

    def _autocast(self):
        return autocast(self.device, self.precision)

    def _forward(self, batch: Any, module: Optional[nn.Module] = None) -> Tuple[Tensor, Optional[Tensor],
                                                                                 Optional[Tensor]]:
        module = self.model if module is None else module
        batch = _to(batch, self.device)
        with self._autocast():
            if isinstance(batch, dict):
                labels = batch.get("labels")
                inputs = batch if self._takes_labels else {k: v for k, v in batch.items() if k != "labels"}
                out = module(**inputs)
            else:
                x, labels = batch
                out = module(x)
        logits = _logits_of(out)
        if self.loss_fn is not None:
            loss = self.loss_fn(out, batch)
        else:
            loss = _loss_of(out)
            if loss is None:
                if logits is None:
                    raise TypeError("fastft.Trainer: the model's output has neither a loss nor logits "
                                    f"({type(out).__name__}); return them or pass loss_fn=...")
                if labels is None:
                    raise ValueError("fastft.Trainer: the batch has no labels and the model returns no loss")
                if labels.dtype.is_floating_point or logits.shape[-1] == 1:
                    loss = nn.functional.mse_loss(logits.float().squeeze(-1), labels.float())
                else:
                    loss = nn.functional.cross_entropy(logits.float(), labels)
        return loss.float(), logits, labels

    # --- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, data: Any = None) -> Dict[str, float]:
        """Loss and metrics on ``data`` (default: the validation data): ``{"loss": ..., "accuracy": ...}``.

        Under torchrun each rank evaluates every N-th example and every rank returns the same numbers,
        computed from the gathered predictions."""
        examples = self.val_examples if data is None else prepare_examples(data, self.tokenizer, None, "data")
        if examples is None:
            raise ValueError("fastft.Trainer.evaluate: no data given and no val_data")
        was_training = self.model.training
        self.model.eval()
        total, count, all_logits, all_labels = 0.0, 0, [], []
        lengths = [example_length(e) for e in examples]
        order = sorted(range(len(examples)), key=lambda i: lengths[i])  # little padding; order does not matter
        order = order[self.rank::self.world_size]
        for i in range(0, len(order), self.eval_batch_size):
            idx = order[i:i + self.eval_batch_size]
            loss, logits, labels = self._forward(self.collate([examples[j] for j in idx]))
            total += float(loss) * len(idx)
            count += len(idx)
            if logits is not None and labels is not None and logits.dim() == 2:
                all_logits.append(logits.float().cpu())
                all_labels.append(labels.cpu())
        self.model.train(was_training)
        logits = torch.cat(all_logits) if all_logits else None
        labels = torch.cat(all_labels) if all_labels else None
        total, count, logits, labels = D.gather_evaluation(total, count, logits, labels)
        loss = total / count
        result = {"loss": loss}
        if logits is not None:
            result.update(compute_metrics(self.metrics, logits, labels, loss))
        elif "perplexity" in self.metrics:
            result.update(compute_metrics(("perplexity",), None, None, loss))
        return result

    def predict(self, data: Any) -> Tensor:
        """Logits for every example of ``data``, in order."""
        examples = prepare_examples(data, self.tokenizer, None, "data")
        was_training = self.model.training
        self.model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(examples), self.eval_batch_size):
                batch = _to(self.collate(examples[i:i + self.eval_batch_size]), self.device)
                with self._autocast():
                    if isinstance(batch, dict):
                        res = self.model(**{k: v for k, v in batch.items() if k != "labels"})
                    else:
                        res = self.model(batch[0])
                out.append(_logits_of(res).float().cpu())
        self.model.train(was_training)
        return torch.cat(out)

    # --- training ---------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train for ``epochs`` (or until early stopping); returns a :class:`FitResult`."""
        seed = self.seed + self.rank  # under torchrun: different dropout masks per rank
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        return self._train()

    def resume(self, checkpoint_dir: Optional[str] = None) -> FitResult:
        """Continue a run from its checkpoint (default: ``output_dir/checkpoint``): model, optimizer
        (anchors included), scheduler, scaler, callbacks, RNG states and data position are restored,
        so on CPU the run ends bit-identical to an uninterrupted one. Build this Trainer with the
        same arguments as the interrupted one. Under torchrun every rank calls it; any world size
        that divides ``batch_size`` continues the same data order and updates (the same world size
        also restores each rank's RNG state; another one reseeds them, so dropout masks differ)."""
        path = self._readable_checkpoint(Path(checkpoint_dir) if checkpoint_dir else None)
        self._load_checkpoint(path)
        return self._train()

    def _check_resumable(self, state: Dict[str, Any], path: Path) -> None:
        saved = state.get("batch_size")
        if saved is not None and saved != self.batch_size:
            raise ValueError(f"fastft.Trainer.resume: {path} was written with batch_size={saved} (the global batch), "
                             f"this Trainer has batch_size={self.batch_size}; build it with the same arguments")

    def _epoch_batches(self, epoch: int) -> List[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return batch_order(self.train_lengths, self.task_batch_size, g, shuffle=True,
                           group_by_length=self.group_by_length)

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    def _micro_loss(self, module: nn.Module, batch_indices: List[int], task_scale: float,
                    replayed: Optional[List[Any]] = None, replay_scale: float = 0.0,
                    replay_terms: int = 1) -> Tensor:
        """This rank's share of one micro-batch's loss. The model's mean loss over this rank's rows is
        weighted by their loss terms (rows, or target tokens for token-level labels) times
        ``task_scale``; replay rows likewise (``replay_scale`` over ``replay_terms``). The caller picks
        the scales so that the shares of all ranks and micro-batches of a step sum to the loss of the
        step's whole batch, computed at once."""
        t_data = time.perf_counter()
        local, real = D.shard(batch_indices, self.rank, self.world_size)
        batch = self.collate([self.train_examples[i] for i in local])
        t_fwd = time.perf_counter()
        loss, _, _ = self._forward(batch, module)
        terms = sum(self.train_terms[i] for i in local) if real else 0
        total = loss * (terms * task_scale)
        if replayed:
            with self._autocast():
                total = total + replay_scale * self.replay.loss_share(replayed, self.device, replay_terms, self.rank,
                                                                      self.world_size)
        self.timings["data"] += t_fwd - t_data
        self.timings["forward"] += time.perf_counter() - t_fwd
        return total

    def _train(self) -> FitResult:
        from tqdm.auto import tqdm

        self.model.train()
        if self.output_dir and D.is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.should_stop = False
        self._call("on_fit_start")
        start_epoch, start_batch = self._position
        bar = tqdm(total=self.total_steps, initial=self.global_step, disable=not self.progress, desc="fine-tuning",
                   dynamic_ncols=True)
        t0, seen = time.perf_counter(), 0
        for epoch in range(start_epoch, self.epochs):
            batches = self._epoch_batches(epoch)
            first = start_batch if epoch == start_epoch else 0
            if first == 0:
                self._call("on_epoch_start", epoch)
            micro = first
            while micro < len(batches) and not self.should_stop:
                group = batches[micro:micro + self.gradient_accumulation]
                n_examples = sum(len(b) for b in group)
                module = self.training_module()
                # The step's loss: the model's mean loss over all its task rows (token-mean for token
                # labels), mixed by rows with the replay rows' LM loss (see fastft.Replay).
                task_terms = max(sum(self.train_terms[i] for b in group for i in b), 1)
                r = self.replay.count(self.batch_size) if self.replay is not None else 0
                replayed = [self.replay.next(r) if r else None for _ in group]
                replay_rows = r * len(group)
                replay_terms = sum(self.replay.targets(e) for rows in replayed if rows for e in rows)
                task_scale = n_examples / (n_examples + replay_rows) / task_terms
                replay_scale = self.replay.weight * replay_rows / (n_examples + replay_rows) if r else 0.0
                step_loss, ok = 0.0, True
                for k, b in enumerate(group):
                    # Without the last micro-batch, DDP need not all-reduce: gradients just accumulate.
                    sync = nullcontext() if not self.distributed or k == len(group) - 1 else module.no_sync()
                    with sync:
                        contribution = self._micro_loss(module, b, task_scale, replayed[k], replay_scale,
                                                        replay_terms)
                        part, finite = float(contribution.detach()), bool(torch.isfinite(contribution.detach()))
                        # Summed over the ranks (identity in one process): every rank takes the same branch.
                        part, nonfinite = D.all_reduce_sum([part, 0.0 if finite else 1.0])
                        finite = nonfinite == 0
                        t_bwd = time.perf_counter()
                        if finite:
                            scaled = contribution * self.world_size  # DDP averages gradients over the ranks
                            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                        elif self.distributed:
                            (contribution * 0.0).backward()  # DDP must finish the reduction it started
                        self.timings["backward"] += time.perf_counter() - t_bwd
                    if not finite:
                        if not self.skip_nonfinite:
                            self.optimizer.zero_grad(set_to_none=True)
                            raise FloatingPointError(
                                f"fastft.Trainer: non-finite loss at optimizer step "
                                f"{self.global_step + 1} (epoch {epoch + 1}, batch {micro + k + 1}); nothing was "
                                "updated or saved for this step. Lower the lr, use fp32/bf16, or pass "
                                "skip_nonfinite=True to skip such batches")
                        self.skipped_steps += 1
                        ok = False
                        break
                    step_loss += part
                micro += len(group)
                if not ok:
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                t_opt = time.perf_counter()
                optimizer_step(self.optimizer, self.scheduler, self.scaler)
                self.timings["optimizer"] += time.perf_counter() - t_opt
                self.global_step += 1
                self._position = (epoch, micro) if micro < len(batches) else (epoch + 1, 0)
                self._run_loss += step_loss
                self._run_count += 1
                seen += n_examples
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                ex_s=f"{seen / (time.perf_counter() - t0):.1f}")
                self._call("on_step_end", self.global_step, step_loss)
                self.should_stop = D.any_rank(self.should_stop)
                if self.eval_every and self.global_step % self.eval_every == 0 and self.val_examples is not None:
                    self._evaluate_and_record(epoch, self._mean_train_loss())
                elif self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
                    self._save_checkpoint()
            if self.should_stop:
                break
            self._call("on_epoch_end", epoch)
            if not self.eval_every:
                if self.val_examples is not None:
                    self._evaluate_and_record(epoch, self._mean_train_loss())
                else:
                    self._record({"epoch": epoch + 1, "step": self.global_step,
                                  "train_loss": self._mean_train_loss()})
                    self._save_checkpoint()
            if self.should_stop:
                break
        bar.close()
        self._call("on_fit_end")
        return self._finish()

    def _mean_train_loss(self) -> float:
        """Mean training loss of the steps since the last record; starts a new window."""
        mean = self._run_loss / max(self._run_count, 1)
        self._run_loss, self._run_count = 0.0, 0
        return mean

    def _record(self, record: Dict[str, float]) -> None:
        self.history.append(record)
        if self.output_dir and D.is_main_process():
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            writer = self._tensorboard()
            if writer is not None:
                for k, v in record.items():
                    if k not in ("epoch", "step") and isinstance(v, (int, float)):
                        writer.add_scalar(k, v, record["step"])
                writer.flush()

    def _tensorboard(self):
        """A SummaryWriter into output_dir/tensorboard when TensorBoard is installed, else None."""
        if not hasattr(self, "_tb_writer"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb_writer = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:
                self._tb_writer = None
        return self._tb_writer

    def _evaluate_and_record(self, epoch: int, train_loss: float) -> None:
        res = self.evaluate()
        record = {"epoch": epoch + 1, "step": self.global_step, "train_loss": train_loss,
                  **{f"val_{k}": v for k, v in res.items()}, "lr": self.scheduler.get_last_lr()[0]}
        self._call("on_evaluate", record)  # callbacks may add to the record (e.g. ForgettingMonitor)
        self.should_stop = D.any_rank(self.should_stop)
        self._record(record)
        if self.progress:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_"))
            print(f"epoch {epoch + 1} step {self.global_step}: train_loss {train_loss:.4f}, {shown}", flush=True)
        self._save_checkpoint()

    def _finish(self) -> FitResult:
        best_epoch = best = None
        if self.early_stopping is not None and self.early_stopping.best is not None:
            best_epoch, best = self.early_stopping.best_epoch, self.early_stopping.best
        else:
            vals = [r for r in self.history if "val_loss" in r]
            if vals:
                top = min(vals, key=lambda r: r["val_loss"])
                best_epoch, best = top["epoch"], top["val_loss"]
        if self.output_dir and D.is_main_process():
            self._save_model(self.output_dir / "model")
            self._plot()
            if getattr(self, "_tb_writer", None) is not None:
                self._tb_writer.close()
                del self._tb_writer
        D.barrier()
        return FitResult(history=list(self.history), best_epoch=best_epoch, best_metric=best,
                         stopped_early=self.stopped_early, global_step=self.global_step,
                         output_dir=str(self.output_dir) if self.output_dir else None,
                         skipped_steps=self.skipped_steps)

    # --- files ------------------------------------------------------------------------------------

    def _save_model(self, path: Path) -> None:
        from safetensors.torch import save_model

        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(tmp)
        else:
            save_model(self.model, str(tmp / "model.safetensors"))
        _swap_in(tmp, path)

    def _save_checkpoint(self) -> None:
        """Write ``output_dir/checkpoint`` atomically: a temporary folder, then renames, so a run
        killed while saving leaves the previous checkpoint readable (``checkpoint`` or ``checkpoint.old``).
        Under torchrun every rank's RNG states are gathered and rank 0 writes."""
        if not self.output_dir:
            return
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        rngs = D.gather_objects(rng)
        if D.is_main_process():
            self._write_checkpoint(rngs)
        D.barrier()  # no rank goes on (or dies) before the checkpoint is complete

    def _write_checkpoint(self, rngs: List[Dict[str, Any]]) -> None:
        from safetensors.torch import save_model

        tmp = self.output_dir / f".{CHECKPOINT}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(self.model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None,
                    "callbacks": [{"type": type(cb).__qualname__, "state": cb.state_dict()}
                                  for cb in self.callbacks if hasattr(cb, "state_dict")],
                    "replay": self.replay.state_dict() if self.replay is not None else None,
                    "rng": rngs[0], "rng_per_rank": rngs},
                   tmp / "state.pt")
        state = {"global_step": self.global_step, "position": list(self._position), "history": self.history,
                 "skipped_steps": self.skipped_steps, "stopped_early": self.stopped_early,
                 "run_loss": self._run_loss, "run_count": self._run_count,
                 "freeze_boundary": getattr(self.freeze_plan, "boundary", None),
                 "embeddings_frozen": getattr(self.freeze_plan, "embeddings_frozen", None),
                 "world_size": self.world_size, "batch_size": self.batch_size}
        (tmp / "trainer_state.json").write_text(json.dumps(state))  # written last: marks a complete checkpoint
        _swap_in(tmp, self.output_dir / CHECKPOINT)

    def _readable_checkpoint(self, path: Optional[Path]) -> Path:
        if path is None:
            if not self.output_dir:
                raise ValueError("fastft.Trainer.resume: pass the checkpoint folder or build the Trainer with output_dir")
            path = self.output_dir / CHECKPOINT
        for candidate in (path, path.with_name(path.name + ".old")):
            if (candidate / "trainer_state.json").is_file():
                return candidate
        raise FileNotFoundError(f"fastft.Trainer.resume: no complete checkpoint in {path}")

    def _load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_model

        state = json.loads((path / "trainer_state.json").read_text())
        self._check_resumable(state, path)
        blobs = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        if self.freeze_plan is not None and state.get("freeze_boundary") is not None:
            if state["freeze_boundary"] == 0 and not state.get("embeddings_frozen", True):
                self.freeze_plan.unfreeze_all()  # gradual unfreezing had thawed everything
            else:
                self.freeze_plan.set_boundary(state["freeze_boundary"])
        load_model(self.model, str(path / "model.safetensors"), device=str(self.device))
        self.optimizer.load_state_dict(blobs["optimizer"])
        self.scheduler.load_state_dict(blobs["scheduler"])
        if self.scaler is not None and blobs["scaler"] is not None:
            self.scaler.load_state_dict(blobs["scaler"])
        saved = list(blobs["callbacks"])  # matched by type, in order: callbacks may be added or dropped
        for cb in self.callbacks:
            match = next((s for s in saved if s["type"] == type(cb).__qualname__), None)
            if match is not None and hasattr(cb, "load_state_dict"):
                saved.remove(match)
                cb.load_state_dict(match["state"])
        if self.replay is not None and blobs.get("replay") is not None:
            self.replay.load_state_dict(blobs["replay"])
        rngs = blobs.get("rng_per_rank") or [blobs["rng"]]
        if len(rngs) == self.world_size:
            rng = rngs[self.rank]
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            # Another world size: data order and updates continue exactly (they depend on the global
            # batch only); dropout's random stream cannot be mapped across ranks, so it starts afresh.
            seed = self.seed + 1_000_003 * (state["global_step"] + 1) + self.rank
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        self.global_step = state["global_step"]
        self._position = tuple(state["position"])
        self.history = state["history"]
        self.skipped_steps = state["skipped_steps"]
        self.stopped_early = state["stopped_early"]
        self._run_loss, self._run_count = state["run_loss"], state["run_count"]

    def _plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        rows = [r for r in self.history if "val_loss" in r or "train_loss" in r]
        if not rows:
            return
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        x = [r["step"] for r in rows]
        ax1.plot(x, [r.get("train_loss") for r in rows], marker="o", label="train loss")
        if any("val_loss" in r for r in rows):
            ax1.plot(x, [r.get("val_loss") for r in rows], marker="o", label="val loss")
        ax1.set_xlabel("optimizer step")
        ax1.set_ylabel("loss")
        ax1.legend()
        metric_keys = sorted({k for r in rows for k in r if k.startswith("val_") and k != "val_loss"})
        for key in metric_keys:
            ax2.plot(x, [r.get(key) for r in rows], marker="o", label=key)
        ax2.set_xlabel("optimizer step")
        if metric_keys:
            ax2.legend()
        fig.tight_layout()
        fig.savefig(self.output_dir / "curves.png", dpi=100)
        plt.close(fig)


def warmup_then_decay(total: int, warmup: int, name: str = "linear") -> Callable[[int], float]:
    """LR factor per step: linear warm-up over ``warmup`` steps, then "linear" / "cosine" decay to 0
    at ``total`` steps, or "constant"."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return factor


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` ("fp32": off, "bf16", "fp16") on ``device``."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def optimizer_step(optimizer, scheduler, scaler=None) -> None:
    """One optimizer step (through the GradScaler under fp16), the scheduler's step, gradients cleared."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _swap_in(tmp: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
