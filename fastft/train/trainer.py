"""``fastft.Trainer``: full fine-tuning with validation, early stopping, metrics and resumable
checkpoints — fastft's one training loop (:class:`fastft.MultiTaskTrainer` specialises it)."""

from __future__ import annotations

import inspect
import logging
import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .. import distributed as D
from ..lm import fused_causal_lm_loss, fused_lm_parts, is_peft_model, lm_kind, pad_id_of
from ..optim import AdamW
from ..param_groups import param_groups
from .callbacks import EarlyStopping
from .data import (Collator, LabelNames, batch_order, example_length, has_token_labels, loss_terms, prepare_examples,
                   position_limit, text_limit, to_device, without_labels)
from .generative import GenerativeData, generative_examples, generative_format, render_chat_prompt
from .metrics import (check_generation_metric_names, check_metric_names, compute_metrics, generation_scores)
from .replay import step_scales
from .run_dir import RunDir, StopSignals

__all__ = ["Trainer", "FitResult", "seed_everything", "warmup_then_decay", "autocast", "model_output_field",
           "ranked_labels"]

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        history: one dict per evaluation (epoch, step, train_loss, val_loss, val_<metric>, lr; with
            replay also train_task_loss + train_replay_loss = train_loss; under fp16 amp_skipped_steps),
            after a step-0 record (epoch 0) of the pretraining measures when a ForgettingMonitor is used.
        best_epoch: the epoch (1-based) of the best monitored value (EarlyStopping's monitor, else val_loss).
        best_metric: that value.
        stopped_early: True when EarlyStopping ended training before ``epochs``.
        global_step: optimizer steps taken (parameter updates; skipped steps are not counted).
        output_dir: the run folder (None without ``output_dir``).
        skipped_steps: micro-batches skipped for a non-finite loss (``skip_nonfinite=True``).
        amp_skipped_steps: steps whose update fp16's GradScaler skipped (inf/NaN gradients).
    """

    history: List[Dict[str, float]] = field(default_factory=list)
    best_epoch: Optional[int] = None
    best_metric: Optional[float] = None
    stopped_early: bool = False
    global_step: int = 0
    output_dir: Optional[str] = None
    skipped_steps: int = 0
    amp_skipped_steps: int = 0


def model_output_field(out: Any, name: str) -> Optional[Tensor]:
    """``out.<name>`` or ``out[name]`` of a model output (a ModelOutput, dataclass or dict); for a bare
    tensor output, the tensor itself as ``"logits"``; None if absent."""
    if isinstance(out, Tensor):
        return out if name == "logits" else None
    value = getattr(out, name, None)
    if value is None and isinstance(out, dict):
        value = out.get(name)
    return value


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device's) random generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(rng: Dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _settle_metrics(metrics: Optional[Tuple[Any, ...]], token_labels: bool, where: str) -> Tuple[Any, ...]:
    """The metrics of a run: the user's, or accuracy for classification and perplexity for token-level
    labels (language modelling), whose logits are per token: classification metrics and callables
    (which take [N, C] logits) cannot be computed there, so they are refused at set-up."""
    if metrics is None:
        return ("perplexity",) if token_labels else ("accuracy",)
    if token_labels:
        bad = [m if isinstance(m, str) else getattr(m, "__name__", repr(m)) for m in metrics if m != "perplexity"]
        if bad:
            raise ValueError(f"{where}: metrics {bad} need one label per example, but this run's labels are per "
                             "token (language modelling): their logits are [B, T, V]. Use metrics=('perplexity',) "
                             "(or leave metrics out), and score generated text yourself")
    return metrics


def ranked_labels(logits: Tensor, names: Optional[Sequence[Any]], top_k: Optional[int], where: str) -> List[Any]:
    """Per row of ``logits`` ``[N, C]``: ``{"label", "score"}`` (``top_k=1``) or the ``top_k`` most
    likely such dicts (None: all), most likely first; scores are softmax (sigmoid for C = 1).

    Raises:
        ValueError: ``top_k`` is not None or an int >= 1.
    """
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{where}: top_k must be None (every class) or an int >= 1, got {top_k!r}")
    probs = torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, -1)
    out = []
    for row in probs:
        order = row.argsort(descending=True).tolist()[:top_k]
        ranked = [{"label": names[c] if names else c, "score": float(row[c])} for c in order]
        out.append(ranked[0] if top_k == 1 else ranked)
    return out


def _num_labels_of(model: nn.Module) -> Optional[int]:
    n = getattr(model, "num_labels", None)
    if n is None:
        n = getattr(getattr(model, "config", None), "num_labels", None)
    return n if isinstance(n, int) else None


def _peft_new_modules(model: nn.Module) -> List[nn.Module]:
    """The modules a peft adapter added (LoRA's ``lora_A`` / ``lora_B`` / ``lora_embedding_*``, and
    the like): fresh parameters, never anchored by L2-to-init."""
    return [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1].startswith(("lora_", "ia3_", "vera_"))]


def _check_generation_kwargs(kwargs: Dict[str, Any], where: str) -> Dict[str, Any]:
    """``generation_kwargs`` checked against :func:`fastft.generate`'s signature: an unknown key is an
    error (with a "did you mean"), unless it is one of ``model.generate``'s own (passed through)."""
    from ..generation import generate

    own = set(inspect.signature(generate).parameters) - {"model", "tokenizer", "prompts", "generate_kwargs"}
    for key in kwargs:
        if key in ("model", "tokenizer", "prompts"):
            raise ValueError(f"{where}: generation_kwargs may not set {key!r}; the trainer passes its own")
    if kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError(f"{where}: generation_kwargs num_return_sequences must be 1 for validation (one "
                         "completion per prompt is scored)")
    unknown = [k for k in kwargs if k not in own]
    if unknown:
        from transformers import GenerationConfig

        known_hf = set(GenerationConfig().to_dict())
        bad = [k for k in unknown if k not in known_hf]
        if bad:
            from difflib import get_close_matches

            hint = get_close_matches(bad[0], sorted(own), n=1)
            raise ValueError(f"{where}: generation_kwargs has the unknown key {bad[0]!r}; fastft.generate takes "
                             f"{sorted(own)} and transformers' GenerationConfig fields"
                             + (f". Did you mean {hint[0]!r}?" if hint else ""))
    return dict(kwargs)


def _forward_takes_labels(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return "labels" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


class Trainer:
    """Fine-tune ``model`` on ``train_data``, validating on ``val_data``.

    Data: a sequence / Dataset of ``(input, label)`` pairs (default loss: cross-entropy; MSE for
    float labels or one output), of ``(text, label)`` pairs with ``tokenizer=``, or of dicts (a
    tokenized ``datasets.Dataset``, lists of dicts) for Hugging Face models whose output carries
    ``.loss`` / ``.logits``. Batches are padded to their longest example (dynamic padding) and, by
    default, grouped by length. Micro-batches (and ranks) are weighted by their loss terms (rows;
    target tokens for token-level labels, as in language modelling), so an accumulated or
    data-parallel step equals one on the whole batch.

    Optimisation: one :class:`fastft.AdamW` over all parameters, grouped by the one rule of
    :mod:`fastft.param_groups`: no weight decay on biases and norm weights; L2-to-init only on
    pretrained parameters — a head fastft created (:class:`fastft.SequenceClassifier`'s), modules
    marked with :func:`fastft.param_groups.mark_new`, and ``new_modules`` are never anchored. Linear
    warm-up, then ``scheduler`` decay; autocast precision; fused clipping.

    Validation every epoch (or every ``eval_every`` optimizer steps); ``early_stopping`` stops and
    restores the best weights. With ``output_dir`` the run folder (:mod:`fastft.train.run_dir`) gets
    ``metrics.jsonl``, an atomic resumable ``checkpoint/``, the final ``model/`` and ``curves.png``.

    Under ``torchrun`` (see :mod:`fastft.distributed`) the same call trains data-parallel: nccl on
    GPUs, gloo on CPU; DDP, or FSDP2 with ``distributed="fsdp2"``; ``batch_size`` is the global batch
    (N ranks each take every N-th example; N must divide it); accumulation communicates only on the
    last micro-batch (``no_sync`` / ``set_requires_gradient_sync``); validation is sharded and its
    metrics computed from the gathered predictions on every rank (so every rank logs, early-stops and
    restores the same); only rank 0 shows progress and writes files.

    Args:
        model: the ``nn.Module`` to train (moved to ``device``).
        train_data: training examples (see above); not empty.
        val_data: validation examples, same forms; None: no validation (a checkpoint per epoch).
        epochs: passes over ``train_data`` (int >= 1). Default 3.
        batch_size: examples per optimizer step, the global batch under torchrun (int >= 1; replay
            rows included). Default 32.
        lr: peak learning rate (after warm-up). Default 2e-5.
        weight_decay: decoupled weight decay of the decayed groups. Default 0.01.
        l2_init: L2-to-init strength λ (0 = off): pulls pretrained weights toward their values at
            the first step. Default 0.0.
        l2_init_mode: ``"decoupled"`` (``p -= lr·λ·(p - p0)``) or ``"coupled"`` (``g += 2λ(p - p0)``).
        l2_init_importance: EWC (Kirkpatrick et al., 2017): weight the L2-to-init pull entry by entry,
            ``λ·F⊙(p - p0)`` (:meth:`fastft.AdamW.set_importance`). A dict ``{name: F}`` keyed like
            ``model.named_parameters()`` (e.g. from :func:`fastft.estimate_fisher`; entries of
            parameters that are not anchored are ignored, anchored parameters missing from it keep
            ``F = 1``), or ``"fisher"``: the empirical Fisher estimated at set-up, before any step, on
            ``importance_data`` (per example, ``max_length`` tokens, default 128), normalised to mean 1
            over the anchored parameters. Needs ``l2_init > 0``. None: plain L2-to-init.
        importance_data: with ``l2_init_importance="fisher"``: the data the Fisher is estimated on —
            texts of the pretraining distribution for a language model (its own LM loss), labelled
            examples of the earlier task for a classifier (its task loss; names mapped with this
            run's labels).
        freeze: freeze the embeddings and the lowest ``freeze`` blocks (:func:`fastft.freeze_layers`),
            ``"all"``: every block (only the head trains); None: nothing frozen. The plan is
            ``trainer.freeze_plan``.
        cache_frozen: keep the frozen prefix's output per example the first time it is computed and
            replay it in later epochs, validation and :meth:`predict`, which then run only the blocks
            above the boundary (:mod:`fastft.prefix_cache`; ``trainer.prefix_cache``). Needs ``freeze``
            >= 1 block. Dropout below the boundary is off (the frozen blocks are in eval mode anyway;
            so is e.g. GPT-2's embedding dropout while caching), so a cached run equals an uncached one
            whose prefix dropout is off too; in fp32 the two differ only by rounding where batches
            are padded to other lengths. A moving boundary (GradualUnfreezing) drops the cache;
            replay rows and batches with other inputs (``position_ids`` ...) run the whole model.
            Default False.
        cache_dtype: the dtype the cache keeps states in: ``"fp32"``, ``"bf16"``, ``"fp16"``; None: the
            blocks' output dtype.
        cache_memory_mb: megabytes of cached states kept in memory (on ``device``); beyond it states
            spill to ``prefix_cache.bin``, memory-mapped, in ``output_dir`` (a temporary folder without
            one; deleted when the trainer goes). Default 1024.
        layerwise_lr_decay: ``lr × decay^depth`` per block (:func:`fastft.layerwise_lr_groups`); None: off.
        max_grad_norm: global-norm clipping fused into the optimizer step; None: off. Default 1.0.
        warmup_ratio: share of all optimizer steps with a linear warm-up, in [0, 1). Default 0.1.
        scheduler: LR decay after warm-up: ``"linear"`` (to 0), ``"cosine"`` or ``"constant"``.
        gradient_accumulation: micro-batches per optimizer step (int >= 1); each micro-batch holds
            ``batch_size`` examples. Default 1.
        early_stopping: a :class:`fastft.EarlyStopping`, or None.
        metrics: validation metric names (``"accuracy"``, ``"f1"``, ``"f1_macro"``, ``"f1_micro"``,
            ``"auc"``, ``"perplexity"``) or callables ``f(logits, labels) -> float``. Default accuracy.
        precision: ``"fp32"``, ``"bf16"`` (autocast; warns on a CPU without native bf16, where it is
            much slower than fp32) or ``"fp16"`` (autocast + GradScaler). Under fp16 a step whose
            gradients overflow (inf/NaN) is skipped by the GradScaler, as in Hugging Face's Trainer:
            its batches are consumed (epochs stay passes over the data), its loss counts in
            ``train_loss``, but the parameters, ``global_step`` and the LR schedule do not advance; it
            is counted in ``amp_skipped_steps`` (FitResult, each record, the progress bar) and logged
            (logger ``fastft.train.trainer``). ``total_steps`` (the schedule's length) counts every step's
            batches, so a run ends with ``global_step = total_steps - amp_skipped_steps - skipped_steps``
            and, when steps were skipped, the schedule short of its end.
        output_dir: the run folder; None writes nothing.
        tokenizer: tokenizes text examples (a Hugging Face tokenizer); its pad id pads batches.
        max_length: tokens kept per text example (truncation); None: the tokenizer's own limit.
        group_by_length: batch examples of similar length (less padding). Default True.
        eval_every: validate every this many optimizer steps instead of every epoch; None: per epoch.
        eval_batch_size: batch size of evaluation and prediction; None: ``batch_size``.
        loss_fn: ``loss_fn(output, batch) -> Tensor`` replacing the default loss.
        num_labels: classes, for checking labels; None: read from ``model.num_labels`` / its config.
        callbacks: objects with any of the :class:`fastft.Callback` hooks.
        seed: seeds data order, dropout (``seed + rank``) and replay. Default 0.
        skip_nonfinite: skip an optimizer step whose loss is inf/NaN (counted in
            ``FitResult.skipped_steps``) instead of raising.
        checkpoint_every: also checkpoint every this many optimizer steps; None: at each evaluation.
        progress: show a progress bar (rank 0 only).
        device: e.g. ``"cuda:0"`` or ``"cpu"``; None: the local GPU under torchrun, else cuda if
            available, else cpu.
        replay: a :class:`fastft.Replay` mixing pretraining-distribution text into every step.
        find_unused_parameters: DDP's flag under torchrun: True (default) lets a model train whose
            forward leaves some trainable parameters without a gradient (a Hugging Face encoder's
            pooler under a fastft head); False spares DDP a graph walk per step.
        new_modules: modules (or their qualified names, e.g. ``["classifier"]``) created for the task,
            besides those fastft creates or :func:`fastft.param_groups.mark_new` marks: never
            anchored by L2-to-init. Name a Hugging Face ``AutoModelForSequenceClassification``'s fresh
            ``classifier`` (``score`` for decoder models) here.

        labels: class names in id order (``labels[i]`` is class i); None: the sorted distinct names
            when the training labels are strings, else the labels are class ids. Saved with the model.
        fused_lm_loss: for a causal LM trained on token labels, compute its loss with
            :func:`fastft.linear_cross_entropy` from the backbone's hidden states and the LM head's
            weight, without the ``[B, T, V]`` logits (replay's LM loss too); equal to the model's own
            loss to fp32 tolerance. Models whose head is not a plain linear map (soft-capping, logit
            scaling; see :func:`fastft.lm.fused_lm_parts`) take the model's own loss. Under torchrun
            the fused loss runs inside the DDP / FSDP2 module's own call. Default True.
        generation_metrics: metrics of generated text (``"rouge_l"``, ``"rouge1"``, ``"rouge2"``,
            ``"bleu"``, ``"exact_match"``, ``"token_f1"``; see
            :func:`fastft.train.metrics.generation_scores`) computed at each evaluation on the
            completions the model generates for the validation prompts (``val_data`` of
            prompt/completion or chat examples), as ``val_<metric>``; the predictions go to
            ``val_predictions.jsonl`` (prompt, reference, prediction) in the run folder. Needs
            ``tokenizer``. Default: none (no generation).
        generation_kwargs: keyword arguments of :func:`fastft.generate` for that generation (e.g.
            ``{"max_new_tokens": 32}``; greedy unless ``do_sample=True``, seeded by ``seed``) and of
            :meth:`generate`. Default ``{}``.
        save_merged: for a ``peft`` (LoRA) model, also save the base model with the adapter merged
            into it, in ``model/merged/`` (loadable with transformers alone). Default False.
        distributed: how to train under torchrun (in one process nothing changes but the checkpoint
            format): ``"ddp"`` (default) — DistributedDataParallel, every rank holds the whole model,
            gradients and optimizer state (20 bytes per fp32 parameter with L2-to-init); ``"fsdp2"`` —
            PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) on every transformer block
            (:func:`fastft.find_layers`; a model without one is sharded as one unit) and on the model:
            parameters, gradients, AdamW moments and L2-to-init anchors sharded over the N ranks
            (20 / N bytes per parameter), the forward's weights in the ``precision`` dtype (FSDP2's
            ``MixedPrecisionPolicy``, gradients reduced in fp32). With ``"fsdp2"`` checkpoints are
            sharded (``torch.distributed.checkpoint``, ``checkpoint/sharded/``) and resume under any
            world size that divides ``batch_size`` (one process included), the final ``model/`` is
            gathered into one folder by rank 0, and every rank must call ``evaluate`` / ``predict``
            (each forward is collective). Not with :class:`fastft.Replay`'s own ``lm=`` (its LM must
            be the trained model), ``cache_frozen`` or mixed multi-task batches.

    Generative data (with ``tokenizer`` and a causal LM): ``{"prompt": str, "completion": str}``
    examples train on the completion (and the tokenizer's EOS) only; ``{"messages": [{"role",
    "content"}, ...]}`` examples are rendered with the tokenizer's chat template and train on the
    assistant turns only (:mod:`fastft.train.generative`). Perplexity (the default metric) is then
    that of the completions.

    LoRA and other ``peft`` adapters: pass the ``PeftModel`` (``peft.get_peft_model(model, config)``)
    as the model. Only its trainable parameters get optimizer state; the adapter's matrices are new
    parameters, so ``l2_init`` does not anchor them (it anchors only trainable pretrained
    parameters, e.g. ``modules_to_save``; the frozen base weights never move anyway). Early
    stopping snapshots only the trainable parameters. The final ``model/`` is the adapter folder
    (``PeftModel.from_pretrained(base, folder)``), plus ``model/merged/`` with ``save_merged``.
    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or data of a form the trainer does not read.
        ValueError: an argument out of range or of the wrong kind (the message names it), empty data,
            a label outside ``[0, num_labels)`` (naming ``train_data[i]`` / ``val_data[i]``), a
            sharded (DTensor) model (pass it unsharded; ``distributed="fsdp2"`` shards it), or a
            ``batch_size`` the torchrun processes cannot split.
    """

    #: The name errors of this trainer start with.
    where = "fastft.Trainer"

    def __init__(self, model: nn.Module, train_data: Any, val_data: Any = None, *, epochs: int = 3,
                 batch_size: int = 32, lr: float = 2e-5, weight_decay: float = 0.01, l2_init: float = 0.0,
                 l2_init_mode: str = "decoupled", l2_init_importance: Union[None, str, Mapping[str, Tensor]] = None,
                 importance_data: Any = None, freeze: Optional[Union[int, str]] = None,
                 cache_frozen: bool = False, cache_dtype: Optional[str] = None, cache_memory_mb: float = 1024.0,
                 layerwise_lr_decay: Optional[float] = None, max_grad_norm: Optional[float] = 1.0,
                 warmup_ratio: float = 0.1, scheduler: str = "linear", gradient_accumulation: int = 1,
                 early_stopping: Optional[EarlyStopping] = None, metrics: Optional[Sequence[Any]] = None,
                 precision: str = "fp32", output_dir: Optional[str] = None, tokenizer: Any = None,
                 max_length: Optional[int] = None, group_by_length: bool = True, eval_every: Optional[int] = None,
                 eval_batch_size: Optional[int] = None, loss_fn: Optional[Callable[[Any, Any], Tensor]] = None,
                 num_labels: Optional[int] = None, callbacks: Sequence[Any] = (), seed: int = 0,
                 skip_nonfinite: bool = False, checkpoint_every: Optional[int] = None, progress: bool = True,
                 device: Optional[str] = None, replay: Any = None, find_unused_parameters: bool = True,
                 new_modules: Sequence[Any] = (), labels: Optional[Sequence[Any]] = None,
                 fused_lm_loss: bool = True, generation_metrics: Sequence[str] = (),
                 generation_kwargs: Optional[Dict[str, Any]] = None, save_merged: bool = False,
                 distributed: str = "ddp") -> None:
        where = self.where
        if not isinstance(model, nn.Module):
            raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
        if any(D.is_dtensor(p) for p in model.parameters()):
            raise ValueError(f"{where}: the model's parameters are DTensors (sharded with FSDP2 or tensor "
                             "parallelism); the trainers shard a whole model themselves. Pass the unsharded model "
                             "with distributed='fsdp2' under torchrun, or drive the sharded one with fastft.AdamW "
                             "in your own loop")
        if distributed not in D.STRATEGIES:
            raise ValueError(f"{where}: distributed must be one of {D.STRATEGIES} (how torchrun processes share "
                             f"the model), got {distributed!r}")
        if distributed == "fsdp2" and cache_frozen:
            raise ValueError(f"{where}: cache_frozen=True cannot train with distributed='fsdp2': a rank that reads the "
                             "frozen prefix's output from its cache skips the collective gathers of those blocks "
                             "that the other ranks make; use one of the two")
        if distributed == "fsdp2" and replay is not None and replay.lm is not None and replay.lm is not model:
            raise ValueError(f"{where}: distributed='fsdp2' shards the trained model, and Replay's own lm= would "
                             "call its shared encoder outside the sharded model; replay with the trained model as "
                             "the LM (leave lm= out) or use distributed='ddp'")
        for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1),
                                 ("gradient_accumulation", gradient_accumulation, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{where}: {name} must be an int >= {low}, got {value!r}")
        for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every),
                            ("eval_batch_size", eval_batch_size), ("max_length", max_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{where}: {name} must be None or an int >= 1, got {value!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"{where}: precision must be one of {PRECISIONS}, got {precision!r}")
        if scheduler not in SCHEDULES:
            raise ValueError(f"{where}: scheduler must be one of {SCHEDULES}, got {scheduler!r}")
        if isinstance(warmup_ratio, bool) or not isinstance(warmup_ratio, (int, float)) \
                or not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"{where}: warmup_ratio must be a number in [0, 1), got {warmup_ratio!r}")
        metrics = (metrics,) if isinstance(metrics, str) else (None if metrics is None else tuple(metrics))
        check_metric_names(metrics or (), where)
        cache_dtype = self._check_cache_args(freeze, cache_frozen, cache_dtype, cache_memory_mb)
        from ..forgetting import anchored_importance, check_importance_args  # forgetting imports this module

        check_importance_args(l2_init_importance, importance_data, l2_init, where)
        generation_metrics = (generation_metrics,) if isinstance(generation_metrics, str) else \
            tuple(generation_metrics or ())
        check_generation_metric_names(generation_metrics, where)
        if generation_metrics and tokenizer is None:
            raise ValueError(f"{where}: generation_metrics={list(generation_metrics)} score generated text, which "
                             "needs the tokenizer: pass tokenizer=...")
        if generation_kwargs is not None and not isinstance(generation_kwargs, dict):
            raise ValueError(f"{where}: generation_kwargs must be a dict of fastft.generate's keyword arguments "
                             f"(e.g. {{'max_new_tokens': 32}}), got {type(generation_kwargs).__name__}")
        #: Validation by generation: metric names and the keyword arguments of :func:`fastft.generate`.
        self.generation_metrics = generation_metrics
        self.generation_kwargs = _check_generation_kwargs(generation_kwargs or {}, where)
        self.save_merged = bool(save_merged)
        if save_merged and not is_peft_model(model):
            raise ValueError(f"{where}: save_merged=True merges a LoRA adapter into its base model, but the model "
                             f"is not a peft model ({type(model).__name__}); leave save_merged out")

        self.distributed = D.init_distributed()
        self.rank, self.world_size = D.get_rank(), D.get_world_size()
        #: ``"ddp"`` or ``"fsdp2"`` (see ``distributed``); ``sharded``: the model is FSDP2-sharded.
        self.strategy = distributed
        self.sharded = distributed == "fsdp2" and self.distributed
        if batch_size % self.world_size:
            raise ValueError(f"{where}: batch_size is the global batch and must be divisible by the "
                             f"{self.world_size} processes (each trains on batch_size / {self.world_size}); got "
                             f"{batch_size}")
        self.model = model
        self.device = torch.device(device) if device else D.default_device()
        self.epochs, self.batch_size, self.gradient_accumulation = epochs, batch_size, gradient_accumulation
        self.eval_batch_size = eval_batch_size or batch_size
        self.metrics, self.precision = metrics, precision
        self.group_by_length, self.eval_every = group_by_length, eval_every
        self.loss_fn, self.seed, self.skip_nonfinite = loss_fn, seed, skip_nonfinite
        self.checkpoint_every = checkpoint_every
        self.progress = progress and D.is_main_process()
        self.run_dir = RunDir(output_dir) if output_dir else None
        self.output_dir = self.run_dir.path if self.run_dir else None
        self.early_stopping = early_stopping
        self.callbacks: List[Any] = list(callbacks) + ([early_stopping] if early_stopping else [])
        self.tokenizer, self.max_length = tokenizer, max_length
        #: Tokens kept per text (training, evaluation and prediction alike): ``max_length``, else the
        #: model's limit ``min(tokenizer.model_max_length, max_position_embeddings)``.
        self.text_max_length = max_length if max_length is not None else text_limit(model, tokenizer)
        positions = position_limit(model)
        if max_length is not None and positions is not None and max_length > positions:
            raise ValueError(f"{where}: max_length={max_length} is more than the {positions} positions the model has "
                             f"(config.max_position_embeddings); use max_length <= {positions} or leave it out")
        self._label_names_arg = labels
        self.num_labels = num_labels if num_labels is not None else _num_labels_of(model)
        self.collate = Collator(pad_token_id=pad_id_of(tokenizer))

        self._setup_data(train_data, val_data)
        if generation_metrics and self.val_generation is None:
            raise ValueError(f"{where}: generation_metrics score the completions of the validation prompts; give "
                             "val_data of {'prompt', 'completion'} or {'messages'} examples")
        self._check_monitor()
        # Terms of the model's own mean loss per example (target tokens for token-level labels): the
        # weights that make a step's loss the same however its batch is split (see _micro_loss).
        causal = self._causal = lm_kind(model) == "causal"
        self.train_terms = [1 if loss_fn is not None else loss_terms(e, causal) for e in self.train_examples]
        self.train_lengths = [example_length(e) for e in self.train_examples]

        self.replay = replay
        self.task_batch_size = batch_size
        if replay is not None:
            r = replay.count(batch_size)
            if r >= batch_size:
                raise ValueError(f"{where}: replay ratio {replay.ratio} leaves no task example in a batch of "
                                 f"{batch_size}")
            self.task_batch_size = batch_size - r

        self._skeleton = None
        if self.sharded:  # first: the freeze plan must hold the sharded parameters
            self._shard_model()
        self.freeze_plan = None
        if freeze is not None:
            from ..freezing import freeze_layers

            self.freeze_plan = freeze_layers(self._freeze_target(), freeze)
        #: The frozen-prefix cache (``cache_frozen=True``), or None.
        self.prefix_cache = None
        if cache_frozen:
            try:
                self.prefix_cache = self.freeze_plan.enable_cache(cache_dtype, cache_memory_mb, self.output_dir)
            except ValueError as e:
                self.freeze_plan.unfreeze_all()
                raise ValueError(f"{where}: cache_frozen=True: {e}") from None
        if not self.sharded:
            self.model.to(self.device)
        if replay is not None:
            replay.bind(self.model, tokenizer)
            replay.lm.to(self.device)  # an LM sharing the encoder brings its own head
        if is_peft_model(self.model):  # LoRA's matrices are new parameters: nothing pretrained to anchor them to
            new_modules = list(new_modules) + _peft_new_modules(self.model)
        groups = param_groups(self.model, weight_decay, lr=lr, layerwise_lr_decay=layerwise_lr_decay,
                              new_modules=new_modules)
        if l2_init and not any(g.get("l2_init") == 0.0 for g in groups) and type(self.model).__name__.endswith(
                ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")):
            warnings.warn(f"{where}: l2_init={l2_init} anchors every parameter of {type(self.model).__name__}, "
                          "including its task head, which transformers initialised randomly: name it in "
                          "new_modules=[...] (e.g. ['classifier'], or ['score'] for decoder models) so that it is "
                          "not pulled back to its random start", stacklevel=2)
        self.optimizer = AdamW(groups, lr=lr, weight_decay=weight_decay, l2_init=l2_init,
                               l2_init_mode=l2_init_mode, max_grad_norm=max_grad_norm)
        if l2_init_importance is not None:
            if isinstance(l2_init_importance, str) and lm_kind(self.model) is None:
                importance_data = self.label_map.encode(self._examples(importance_data, "importance_data"),
                                                        "importance_data", where)
            importance = anchored_importance(self.model, self.optimizer, l2_init_importance, importance_data,
                                             tokenizer, max_length, where)
            self.optimizer.set_importance(importance)
            local = [f for f in importance.values() if not D.is_dtensor(f)]
            if l2_init_mode == "decoupled" and local:
                pull = max(float(g["lr"]) for g in self.optimizer.param_groups) * l2_init
                top = max(float(f.max()) for f in local)
                if pull * top > 1.0:
                    share = sum(int((f > 1.0 / pull).sum()) for f in local) / sum(f.numel() for f in local)
                    warnings.warn(f"{where}: lr * l2_init * max(importance) = {pull * top:.3g} > 1: the decoupled "
                                  f"pull p -= lr*l2_init*F*(p - p0) overshoots the anchor on {share:.2%} of the "
                                  "entries (and diverges where it exceeds 2); cap the importance, e.g. "
                                  f"{{n: f.clamp(max={1.0 / pull:.3g})}}, lower l2_init, or use "
                                  "l2_init_mode='coupled'", stacklevel=2)
        self.steps_per_epoch = math.ceil(self._batches_per_epoch() / gradient_accumulation)
        self.total_steps = self.steps_per_epoch * epochs
        warmup = int(self.total_steps * warmup_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_then_decay(self.total_steps, warmup, scheduler))
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self._takes_labels = _forward_takes_labels(self.model)
        #: Whether this run's LM loss goes through fastft.linear_cross_entropy (see ``fused_lm_loss``).
        self.fused_lm = bool(fused_lm_loss and loss_fn is None and has_token_labels(self.train_examples)
                             and fused_lm_parts(self.model) is not None)
        if replay is not None:
            replay.fused = bool(fused_lm_loss)

        self.global_step = 0
        self.history: List[Dict[str, float]] = []
        self.should_stop = False
        self.stopped_early = False
        self.skipped_steps = 0
        self._position = (0, 0)  # (epoch, next micro-batch) of the next step
        self._run_loss, self._run_count = 0.0, 0  # training loss since the last record
        #: The module training steps go through (under torchrun the DDP wrapper; the model itself
        #: under FSDP2, which shards it in place).
        self.training_module = (lambda: self.model) if self.sharded else \
            D.DDPCache(self.model, self.device, find_unused_parameters=find_unused_parameters)
        #: Seconds spent in each part of the training steps so far (host clock; on CUDA the
        #: asynchronous kernels show up where the host waits for them).
        self.timings: Dict[str, float] = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        self.amp_skipped_steps = 0  # steps whose update the fp16 GradScaler skipped (inf/NaN gradients)
        self._run_parts = [0.0, 0.0]  # task and replay parts of the training loss since the last record
        self._call("on_setup")  # callbacks check the set-up (e.g. ForgettingMonitor: held-out text)
        if precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(f"{where}: precision='bf16' on a CPU without native bf16 arithmetic (no AVX512-BF16 / "
                          "AMX-BF16 / Arm BF16): every bf16 operation is emulated through conversions, which can "
                          "make training many times slower than fp32. Use precision='fp32' on this CPU", UserWarning,
                          stacklevel=2)

    def _shard_model(self) -> None:
        """FSDP2 over the ranks (``distributed="fsdp2"`` under torchrun): ``fully_shard`` on every block
        of :func:`fastft.find_layers` (of the part ``freeze`` freezes) and on the model. Rank 0 first
        keeps a weightless copy of the model (:func:`fastft.distributed.meta_skeleton`): the structure
        the gathered weights are saved from at the end."""
        from ..forgetting import ForgettingMonitor
        from ..layers import find_layers

        for cb in self.callbacks:
            if isinstance(cb, ForgettingMonitor) and (cb.lm is not None or lm_kind(self.model) is None):
                raise ValueError(f"{self.where}: distributed='fsdp2' shards the model, and this ForgettingMonitor "
                                 "would call a part of it (the encoder, or an LM sharing it) outside the sharded "
                                 "model's own call; monitor a causal / masked LM through the trained model itself "
                                 "(no lm=) or use distributed='ddp'")
        try:
            blocks = list(find_layers(self._freeze_target()))
        except ValueError:
            blocks = []  # no block list: the model is one FSDP unit (sharded at rest, gathered per forward)
        if D.is_main_process():
            self._skeleton = D.meta_skeleton(self.model)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        D.fully_shard_model(self.model, blocks, self.device, param_dtype=dtype)
        # transformers' generate() then keeps the ranks' forwards in step (synced_gpus) until all are done.
        self.model._is_fsdp_managed_module = True

    # --- what a specialisation overrides --------------------------------------------------------------

    def _setup_data(self, train_data: Any, val_data: Any) -> None:
        """Sets ``train_examples`` (a list) and ``val_examples`` (a list or None), fixes the label names
        (``label_map``), maps names to ids, checks the labels, and settles the metrics."""
        self.train_examples = self._examples(train_data, "train_data")
        self.label_map = LabelNames.from_examples(self.train_examples, self._label_names_arg, "train_data", self.where)
        if self.label_map.names is not None:
            if self.num_labels is None:
                self.num_labels = len(self.label_map.names)
            elif self.num_labels not in (1, len(self.label_map.names)):
                raise ValueError(f"{self.where}: the run has {len(self.label_map.names)} labels "
                                 f"{self.label_map.names}, but the model has num_labels={self.num_labels}; make them "
                                 "agree (e.g. SequenceClassifier(encoder, num_labels=len(labels)))")
        self.train_examples = self.label_map.encode(self.train_examples, "train_data", self.where)
        self.val_examples = None
        #: The validation prompts and references of generative val_data (else None).
        self.val_generation: Optional[GenerativeData] = None
        if val_data is not None:
            self.val_generation = self._generative(val_data, "val_data")
            self.val_examples = self.label_map.encode(self._examples(val_data, "val_data"), "val_data", self.where)
        self._check_labels(self.train_examples, "train_data", self.num_labels)
        if self.val_examples is not None:
            self._check_labels(self.val_examples, "val_data", self.num_labels)
        self.metrics = _settle_metrics(self.metrics, has_token_labels(self.train_examples), self.where)

    def _examples(self, data: Any, what: str, where: Optional[str] = None, unlabelled: bool = False) -> List[Any]:
        """``data`` as examples, texts tokenized like the training data (see :attr:`text_max_length`);
        prompt/completion and chat examples as causal-LM token examples (:mod:`fastft.train.generative`)."""
        generative = self._generative(data, what, where)
        if generative is not None:
            return generative.examples
        return prepare_examples(data, self.tokenizer, self.text_max_length, what, where or self.where, unlabelled)

    def _generative(self, data: Any, what: str, where: Optional[str] = None) -> Optional[GenerativeData]:
        """Prompt/completion or chat examples tokenized for the causal LM (None for other data).

        Raises:
            ValueError: such examples without a tokenizer or for a model that is not a causal LM."""
        where = where or self.where
        try:
            first = data[0] if len(data) else None
        except (TypeError, KeyError, IndexError):
            return None
        kind = generative_format(first)
        if kind is None:
            return None
        form = "prompt/completion" if kind == "prompt_completion" else "chat ('messages')"
        if self.tokenizer is None:
            raise ValueError(f"{where}: {what} holds {form} examples; pass tokenizer=... (the model's) to tokenize "
                             "them")
        if lm_kind(self.model) != "causal":
            raise ValueError(f"{where}: {what} holds {form} examples, which teach a causal LM to generate, but the "
                             f"model is a {type(self.model).__name__}; load it with "
                             "transformers.AutoModelForCausalLM (or give (text, label) pairs for a classifier)")
        return generative_examples([data[i] for i in range(len(data))], self.tokenizer, self.text_max_length, what,
                                   where)

    @property
    def label_names(self) -> Optional[List[Any]]:
        """The class names, index = class id (from ``labels=`` or the training labels), or None."""
        return self.label_map.names

    @property
    def id2label(self) -> Optional[Dict[int, Any]]:
        return None if self.label_map.names is None else dict(enumerate(self.label_map.names))

    @property
    def label2id(self) -> Optional[Dict[Any, int]]:
        return None if self.label_map.names is None else dict(self.label_map.ids)

    def _record_keys(self) -> Optional[set]:
        """The keys this trainer puts in an evaluation record, or None when callable metrics make them
        unknowable before training."""
        if any(callable(m) for m in self.metrics):
            return None
        keys = {"epoch", "step", "train_loss", "lr"}
        if self._has_validation():
            keys |= {"val_loss"} | {f"val_{m}" for m in self.metrics} | {f"val_{m}" for m in self.generation_metrics}
        return keys

    def _check_monitor(self) -> None:
        """Refuse, before any step, an EarlyStopping monitor that no evaluation record will hold."""
        es = self.early_stopping
        keys = self._record_keys() if es is not None else None
        if keys is None:
            return
        own = es.monitor.startswith(("val_", "train_")) or es.monitor in keys
        undeclared = False
        for cb in self.callbacks:
            declared = getattr(cb, "record_keys", None)
            if declared is not None:
                keys |= set(declared)
            elif cb is not es:
                undeclared = True  # a callback that may add keys of its own
        if es.monitor in keys or (undeclared and not own):
            return
        from difflib import get_close_matches

        hint = get_close_matches(es.monitor, sorted(keys), n=1)
        why = "" if self._has_validation() or not es.monitor.startswith("val_") else " (there is no validation data)"
        raise ValueError(f"{self.where}: EarlyStopping monitors {es.monitor!r}, which no evaluation record holds"
                         f"{why}; records hold {sorted(keys)}" + (f". Did you mean {hint[0]!r}?" if hint else ""))

    def _check_cache_args(self, freeze: Any, cache_frozen: Any, cache_dtype: Any, cache_memory_mb: Any):
        """The checked ``cache_dtype`` (a torch dtype or None); raises for bad cache arguments."""
        from ..prefix_cache import cache_dtype_of

        where = self.where
        if not isinstance(cache_frozen, bool):
            raise ValueError(f"{where}: cache_frozen must be True or False, got {cache_frozen!r}")
        if isinstance(cache_memory_mb, bool) or not isinstance(cache_memory_mb, (int, float)) \
                or not 0 <= cache_memory_mb < float("inf"):
            raise ValueError(f"{where}: cache_memory_mb must be a number >= 0, got {cache_memory_mb!r}")
        if cache_frozen and (freeze is None or freeze == 0):
            raise ValueError(f"{where}: cache_frozen=True keeps the output of frozen blocks, but freeze={freeze!r} "
                             "freezes none; pass freeze=n (n >= 1 blocks, or 'all')")
        return cache_dtype_of(cache_dtype, where)

    def _through_cache(self, batch: Any, forward: Callable[[], Any]) -> Any:
        """``forward()``, the model's forward on the collated ``batch``, through the frozen-prefix cache
        when there is one."""
        if self.prefix_cache is None:
            return forward()
        return self.prefix_cache.run(batch, forward)

    def _freeze_target(self) -> nn.Module:
        """The module whose blocks ``freeze=n`` freezes."""
        return self.model

    def _batches_per_epoch(self) -> int:
        return math.ceil(len(self.train_examples) / self.task_batch_size)

    def _epoch_batches(self, epoch: int) -> List[List[int]]:
        """The batches of ``epoch``, as lists of indices into ``train_examples`` (a pure function of the
        seed and the epoch, so a resumed run takes the same batches)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return batch_order(self.train_lengths, self.task_batch_size, g, shuffle=True,
                           group_by_length=self.group_by_length)

    def _rows_loss(self, module: nn.Module, indices: List[int]) -> Tensor:
        """The model's mean loss (fp32 scalar) over the training examples ``indices``."""
        loss, _, _ = self._forward(self.collate([self.train_examples[i] for i in indices]), module)
        return loss

    def _has_validation(self) -> bool:
        return self.val_examples is not None

    def _validate(self) -> Dict[str, float]:
        """The validation numbers of one evaluation (keys without the ``val_`` prefix). With
        ``generation_metrics`` also those of the completions generated for the validation prompts,
        which go to ``val_predictions.jsonl`` in the run folder (the latest evaluation's)."""
        result = self.evaluate()
        if self.generation_metrics and self.val_generation is not None:
            scores, rows = self._generation_scores(self.val_generation)
            result.update(scores)
            if self.run_dir and D.is_main_process():
                self.run_dir.write_jsonl("val_predictions.jsonl",
                                         [{"step": self.global_step, **row} for row in rows])
        return result

    def _extra_state(self) -> Dict[str, Any]:
        """JSON-able state of a specialisation, saved in checkpoints."""
        return {}

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    def weights_snapshot(self) -> Dict[str, Tensor]:
        """CPU copies of the model's state that training can change (what early stopping keeps): the
        trainable parameters and the buffers — for a LoRA model only the adapter — or the whole
        state when a callback may unfreeze parameters later (:class:`fastft.GradualUnfreezing`).
        Restore it with :func:`fastft.distributed.restore_weights` (``model.load_state_dict(snapshot,
        strict=False)`` for a model that is not sharded)."""
        from ..freezing import GradualUnfreezing

        state = self.model.state_dict()
        if not any(isinstance(cb, GradualUnfreezing) for cb in self.callbacks):
            frozen = {n for n, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        return D.snapshot_weights(state)  # a sharded model: this rank's shards

    # --- set-up helpers ---------------------------------------------------------------------------

    def _check_labels(self, examples: List[Any], what: str, num_labels: Optional[int]) -> None:
        for i, e in enumerate(examples):
            y = e.get("labels") if isinstance(e, dict) else e[1]
            if y is None or isinstance(y, (list, tuple)):
                continue
            if isinstance(y, Tensor):
                if y.numel() != 1:
                    continue  # sequence labels (token classification / LM): the model's own loss checks them
                y = y.item()
            if num_labels in (None, 1):
                continue
            if isinstance(y, float):
                raise ValueError(f"{self.where}: {what}[{i}] has the float label {y}, but the model has "
                                 f"num_labels={num_labels} classes: give class ids or names (a float target "
                                 "needs num_labels=1, regression)")
            if not (0 <= int(y) < num_labels):
                raise ValueError(f"{self.where}: {what}[{i}] has label {y}, outside [0, {num_labels}) "
                                 f"(num_labels={num_labels})")

    # --- one batch --------------------------------------------------------------------------------

    def _autocast(self):
        return autocast(self.device, self.precision)

    def _forward(self, batch: Any, module: Optional[nn.Module] = None) -> Tuple[Tensor, Optional[Tensor],
                                                                                 Optional[Tensor]]:
        """(fp32 mean loss, logits, labels) of one collated batch."""
        module = self.model if module is None else module
        keys, batch = batch, to_device(batch, self.device)  # the cache reads the host copy
        if self.fused_lm and isinstance(batch, dict):
            with self._autocast():
                loss = self._through_cache(keys, lambda: fused_causal_lm_loss(self.model, batch, caller=module))
            if loss is not None:
                return loss.float(), None, batch.get("labels")
        with self._autocast():
            if isinstance(batch, dict):
                labels = batch.get("labels")
                inputs = batch if self._takes_labels else {k: v for k, v in batch.items() if k != "labels"}
                out = self._through_cache(keys, lambda: module(**inputs))
            else:
                x, labels = batch
                out = module(x)
        logits = model_output_field(out, "logits")
        if self.loss_fn is not None:
            loss = self.loss_fn(out, batch)
        else:
            loss = model_output_field(out, "loss")
            if loss is None:
                if logits is None:
                    raise TypeError(f"{self.where}: the model's output has neither a loss nor logits "
                                    f"({type(out).__name__}); return them or pass loss_fn=...")
                if labels is None:
                    raise ValueError(f"{self.where}: the batch has no labels and the model returns no loss")
                if labels.dtype.is_floating_point or logits.shape[-1] == 1:
                    loss = nn.functional.mse_loss(logits.float().squeeze(-1), labels.float())
                else:
                    loss = nn.functional.cross_entropy(logits.float(), labels)
        return loss.float(), logits, labels

    # --- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def _evaluate_examples(self, examples: List[Any], forward: Callable[[Any], Tuple[Tensor, Any, Any]],
                           metrics: Sequence) -> Dict[str, float]:
        """Loss and ``metrics`` over ``examples``, each rank taking every N-th (by length) and every rank
        returning the numbers of the gathered predictions. The loss is the mean over the loss terms
        (rows; target tokens for token-level labels), so it does not depend on how the examples are
        batched or split over the ranks."""
        was_training = self.model.training
        self.model.eval()
        total, count, all_logits, all_labels = 0.0, 0, [], []
        lengths = [example_length(e) for e in examples]
        order = sorted(range(len(examples)), key=lambda i: lengths[i])  # little padding; order does not matter
        order = order[self.rank::self.world_size]
        batches = math.ceil(len(order) / self.eval_batch_size)
        if self.sharded:  # every forward is collective under FSDP2: each rank runs as many
            batches = math.ceil(math.ceil(len(examples) / self.world_size) / self.eval_batch_size)
        try:
            for b in range(batches):
                idx = order[b * self.eval_batch_size:(b + 1) * self.eval_batch_size]
                if not idx:  # this rank's share has run out: a stand-in forward, not counted
                    forward(self.collate([examples[0]]))
                    continue
                loss, logits, labels = forward(self.collate([examples[j] for j in idx]))
                terms = len(idx) if self.loss_fn is not None else \
                    sum(loss_terms(examples[j], self._causal) for j in idx)
                if terms:
                    total += float(loss) * terms
                    count += terms
                if logits is not None and labels is not None and logits.dim() == 2:
                    all_logits.append(logits.float().cpu())
                    all_labels.append(labels.cpu())
        finally:
            self.model.train(was_training)
            self._reshard()
        logits = torch.cat(all_logits) if all_logits else None
        labels = torch.cat(all_labels) if all_labels else None
        total, count, logits, labels = D.gather_evaluation(total, count, logits, labels)
        loss = total / count if count else float("nan")
        result = {"loss": loss}
        if logits is not None:
            result.update(compute_metrics(metrics, logits, labels, loss))
        elif "perplexity" in metrics:
            result.update(compute_metrics(("perplexity",), None, None, loss))
        return result

    def evaluate(self, data: Any = None) -> Dict[str, float]:
        """Loss and metrics on ``data`` (default: the validation data): ``{"loss": ..., "accuracy": ...}``.

        Under torchrun each rank evaluates every N-th example and every rank returns the same numbers,
        computed from the gathered predictions.

        Raises:
            ValueError: no ``data`` and no ``val_data``.
        """
        if data is None:
            examples = self.val_examples
        else:
            where = f"{self.where}.evaluate"
            generative = self._generative(data, "data", where)
            examples = generative.examples if generative is not None else \
                self.label_map.encode(self._examples(data, "data", where), "data", where)
        if examples is None:
            raise ValueError(f"{self.where}.evaluate: no data given and no val_data")
        result = self._evaluate_examples(examples, self._forward, self.metrics)
        if data is not None and generative is not None and self.generation_metrics:
            result.update(self._generation_scores(generative)[0])
        return result

    def _generation_scores(self, data: GenerativeData) -> Tuple[Dict[str, float], List[Dict[str, str]]]:
        """The generation metrics of the completions generated for ``data``'s prompts, and per example
        ``{"prompt", "reference", "prediction"}``. Under torchrun each rank generates every N-th
        completion and every rank scores them all."""
        from ..generation import generate

        order = list(range(len(data.prompts)))[self.rank::self.world_size]
        kwargs = {"batch_size": self.eval_batch_size, "seed": self.seed, **self.generation_kwargs}
        prompts = [data.prompts[i] for i in order]
        if self.sharded:  # every forward is collective: as many prompts (stand-ins dropped) on every rank
            prompts += [data.prompts[0]] * (math.ceil(len(data.prompts) / self.world_size) - len(prompts))
        mine = generate(self.model, self.tokenizer, prompts, **kwargs)[:len(order)] if prompts else []
        self._reshard()
        predictions: List[Any] = [None] * len(data.prompts)
        for part_order, part in zip([list(range(len(data.prompts)))[r::self.world_size]
                                     for r in range(self.world_size)], D.gather_objects(mine)):
            for i, text in zip(part_order, part):
                predictions[i] = text
        scores = generation_scores(self.generation_metrics, predictions, data.references)
        rows = [{"prompt": pt, "reference": r, "prediction": p}
                for pt, r, p in zip(data.prompt_texts, data.references, predictions)]
        return scores, rows

    def generate(self, prompts: Sequence[Any], **kwargs: Any) -> List[Any]:
        """Completions of ``prompts`` by the model being trained, with :func:`fastft.generate` and this
        run's ``generation_kwargs`` (``kwargs`` override them).

        ``prompts``: texts, token-id lists, or conversations (lists of ``{"role", "content"}``
        messages), which the tokenizer's chat template renders with its generation prompt.

        Raises:
            ValueError: no tokenizer, or what :func:`fastft.generate` raises.
        """
        from ..generation import generate

        if self.tokenizer is None:
            raise ValueError(f"{self.where}.generate: needs the tokenizer; build the trainer with tokenizer=...")
        if isinstance(prompts, str):
            prompts = [prompts]
        rendered = []
        for p in prompts:
            if isinstance(p, (list, tuple)) and p and isinstance(p[0], dict):
                p = self.tokenizer(render_chat_prompt(self.tokenizer, p), add_special_tokens=False)["input_ids"]
            rendered.append(p)
        out = generate(self.model, self.tokenizer, rendered,
                       **{"batch_size": self.eval_batch_size, "seed": self.seed, **self.generation_kwargs, **kwargs})
        self._reshard()
        return out

    @torch.no_grad()
    def _predict_examples(self, examples: List[Any], run: Callable[[Any], Any]) -> Tensor:
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for i in range(0, len(examples), self.eval_batch_size):
                keys = self.collate(examples[i:i + self.eval_batch_size])
                batch = to_device(keys, self.device)
                with self._autocast():
                    res = self._through_cache(keys, lambda: run(batch))
                out.append(model_output_field(res, "logits").float().cpu())
        finally:
            self.model.train(was_training)
            self._reshard()
        return torch.cat(out)

    def _reshard(self) -> None:
        """Under FSDP2, free the gathered weights a forward without backward left behind: FSDP2 keeps
        the root's (embeddings, head) gathered after a forward, for the backward that follows in training."""
        if self.sharded:
            self.model.reshard()

    def predict(self, data: Any) -> Tensor:
        """Logits (float32, ``[N, num_labels]`` for a classifier) for every example of ``data``, in order.

        ``data``: examples as for training, or plain inputs without labels (texts with a tokenizer,
        tensors); texts are cut to :attr:`text_max_length` tokens as in training."""
        examples = without_labels(self._examples(data, "data", f"{self.where}.predict", unlabelled=True))

        def run(batch):
            if isinstance(batch, dict):
                return self.model(**{k: v for k, v in batch.items() if k != "labels"})
            return self.model(batch[0])

        return self._predict_examples(examples, run)

    def predict_labels(self, data: Any, top_k: Optional[int] = 1) -> List[Any]:
        """Class predictions for every example of ``data`` (as :meth:`predict` takes it), in the form
        of a transformers text-classification pipeline: per example ``{"label": name, "score": p}``
        (``top_k=1``), or a list of the ``top_k`` most likely (``top_k=None``: every class), most
        likely first. ``label`` is the class name when the run has names, else the class id; ``score``
        the softmax probability (the sigmoid for a single-logit model)."""
        return ranked_labels(self.predict(data), self.label_names, top_k, f"{self.where}.predict_labels")

    # --- training ---------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train for ``epochs`` (or until early stopping); returns a :class:`FitResult`."""
        seed_everything(self.seed + self.rank)  # under torchrun: different dropout masks per rank
        return self._train()

    def resume(self, checkpoint_dir: Optional[str] = None) -> FitResult:
        """Continue a run from its checkpoint (default: ``output_dir/checkpoint``): model, optimizer
        (anchors included), scheduler, scaler, callbacks, replay, freeze boundary, RNG states and data
        position are restored, so on CPU the run ends bit-identical to an uninterrupted one. Build this
        trainer with the same arguments as the interrupted one. Under torchrun every rank calls it; any
        world size that divides ``batch_size`` continues the same data order and updates (the same
        world size also restores each rank's RNG state; another one reseeds them, so dropout masks differ).

        Raises:
            ValueError: no ``checkpoint_dir`` and no ``output_dir``, or a checkpoint written with
                another ``batch_size``. FileNotFoundError: no complete checkpoint there.
        """
        path = self._readable_checkpoint(Path(checkpoint_dir) if checkpoint_dir else None)
        self._load_checkpoint(path)
        return self._train()

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
        ``task_scale``; replay rows likewise (``replay_scale`` over ``replay_terms``). The scales come
        from :func:`fastft.train.replay.step_scales`, so the shares of all ranks and micro-batches of a
        step sum to the loss of the step's whole batch, computed at once.

        With replay rows it also sets ``self._micro_parts``: the task and the replay share of the
        returned loss (detached, ``[2]``; they sum to it), for ``train_task_loss`` / ``train_replay_loss``."""
        t_data = time.perf_counter()
        local, real = D.shard(batch_indices, self.rank, self.world_size)
        t_fwd = time.perf_counter()
        loss = self._rows_loss(module, local)
        terms = sum(self.train_terms[i] for i in local) if real else 0
        total = loss * (terms * task_scale)
        self._micro_parts = None
        if replayed:
            with self._autocast():
                replay = replay_scale * self.replay.loss_share(replayed, self.device, replay_terms, self.rank,
                                                               self.world_size)
            self._micro_parts = torch.stack([total.detach(), replay.detach().float()])
            total = total + replay
        self.timings["data"] += t_fwd - t_data
        self.timings["forward"] += time.perf_counter() - t_fwd
        return total

    def _train(self) -> FitResult:
        """The run of :meth:`fit` and :meth:`resume`. With ``output_dir``, SIGINT (Ctrl-C) and SIGTERM (a
        preempted cluster job) stop training at the next optimizer-step boundary — the end of the epoch,
        its evaluation included, when the step ends one; after the final save when training had ended —
        once a checkpoint is written: SIGINT then raises KeyboardInterrupt, SIGTERM ends the process
        (SystemExit with status 143). :meth:`resume` continues either as if nothing had stopped it. A
        second Ctrl-C stops at once. Under torchrun every rank stops at the same step. The handlers are
        installed from the main thread only, and the previous ones come back when this returns or raises."""
        with StopSignals(self.run_dir is not None, announce=D.is_main_process()) as self._signals:
            self._train_steps()
            result = self._finish()
            stop_signal = self._signals.pending()
            if stop_signal:
                self._signals.stop(stop_signal, f"{self.where}: {stop_signal} received as training ended; the "
                                                f"final model is saved in {self.run_dir.path / 'model'}")
        return result

    def _train_steps(self) -> None:
        """Training steps (with evaluations and checkpoints) until the end, an early stop or a signal."""
        from tqdm.auto import tqdm

        self.model.train()
        if self.run_dir and D.is_main_process():
            self.run_dir.create()
        self.should_stop = self.stopped_early  # a resumed run that had stopped early trains no further
        self._call("on_fit_start")
        start_epoch, start_batch = self._position
        bar = tqdm(total=self.total_steps, initial=self.global_step, disable=not self.progress, desc="fine-tuning",
                   dynamic_ncols=True)
        t0, seen = time.perf_counter(), 0
        for epoch in range(start_epoch, self.epochs):
            batches = self._epoch_batches(epoch)
            first = start_batch if epoch == start_epoch else 0
            if first == 0 and not self.should_stop:
                self._call("on_epoch_start", epoch)
            micro = first
            while micro < len(batches) and not self.should_stop:
                group = batches[micro:micro + self.gradient_accumulation]
                micro += len(group)
                step_loss = self._step(group, epoch, micro)
                self._position = (epoch, micro) if micro < len(batches) else (epoch + 1, 0)  # skipped: consumed
                if step_loss is None:
                    continue
                seen += sum(len(b) for b in group)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                ex_s=f"{seen / (time.perf_counter() - t0):.1f}",
                                **({"amp_skipped": self.amp_skipped_steps} if self.scaler is not None else {}))
                self._call("on_step_end", self.global_step, step_loss)
                self.should_stop = D.any_rank(self.should_stop)
                # A signal stops here unless the step ends the epoch (then after its end) or the run.
                stop_signal = self._signals.pending() if micro < len(batches) and not self.should_stop else None
                if self.eval_every and self.global_step % self.eval_every == 0 and self._has_validation():
                    self._evaluate_and_record(epoch, self._train_record())
                elif self.checkpoint_every and self.global_step % self.checkpoint_every == 0 or stop_signal:
                    self._save_checkpoint()
                if stop_signal:
                    bar.close()
                    self._signals.stop(stop_signal, self._stopped_message(stop_signal))
            if self.should_stop:
                break
            self._call("on_epoch_end", epoch)
            if not self.eval_every:
                if self._has_validation():
                    self._evaluate_and_record(epoch, self._train_record())
                else:
                    self._record({"epoch": epoch + 1, "step": self.global_step, **self._train_record()})
                    self._save_checkpoint()
            stop_signal = self._signals.pending() if epoch + 1 < self.epochs and not self.should_stop else None
            if stop_signal:
                if self.eval_every:  # no checkpoint is written at an epoch's end then
                    self._save_checkpoint()
                bar.close()
                self._signals.stop(stop_signal, self._stopped_message(stop_signal))
            if self.should_stop:
                break
        if self.eval_every and self._has_validation() and not self.should_stop and self.global_step and \
                (not self.history or self.history[-1]["step"] != self.global_step):
            self._evaluate_and_record(self.epochs - 1, self._train_record())  # the steps since the last one
        bar.close()
        self._call("on_fit_end")

    def _stopped_message(self, signal_name: str) -> str:
        return (f"{self.where}: stopped by {signal_name} after optimizer step {self.global_step}; its checkpoint is in "
                f"{self.run_dir.checkpoint}: continue with trainer.resume() (fastft finetune CONFIG --resume)")

    def _step(self, group: List[List[int]], epoch: int, micro_end: int) -> Optional[float]:
        """One optimizer step over the micro-batches ``group``; returns its loss, or None when the
        parameters were not updated: skipped for a non-finite loss (``skip_nonfinite``; not counted in
        the training loss) or for inf/NaN fp16 gradients (the GradScaler's skip; counted in the
        training loss and in ``amp_skipped_steps``). Adds the step's loss to the run's training loss."""
        module = self.training_module()
        n_examples = sum(len(b) for b in group)
        # The step's loss: the model's mean loss over all its task rows (token-mean for token labels),
        # mixed by rows with the replay rows' LM loss (fastft.train.replay.step_scales).
        task_terms = sum(self.train_terms[i] for b in group for i in b)
        r = self.replay.count(self.batch_size) if self.replay is not None else 0
        replayed = [self.replay.next(r) if r else None for _ in group]
        replay_terms = sum(self.replay.targets(e) for rows in replayed if rows for e in rows)
        task_scale, replay_scale = step_scales(n_examples, task_terms, r * len(group),
                                               self.replay.weight if r else 1.0)
        step_loss, step_parts = 0.0, [0.0, 0.0]
        for k, b in enumerate(group):
            # Before the last micro-batch nothing is communicated: gradients just accumulate.
            sync = nullcontext() if not self.distributed or k == len(group) - 1 else D.gradient_sync_off(module)
            with sync:
                contribution = self._micro_loss(module, b, task_scale, replayed[k], replay_scale, replay_terms)
                if replayed[k]:  # the loss and its task / replay shares, read from the device at once
                    part, task_part, replay_part = torch.cat([contribution.detach().reshape(1),
                                                              self._micro_parts]).tolist()
                else:
                    part = float(contribution.detach())
                    task_part, replay_part = part, 0.0
                finite = math.isfinite(part)
                # Summed over the ranks (identity in one process): every rank takes the same branch.
                part, task_part, replay_part, nonfinite = D.all_reduce_sum([part, task_part, replay_part,
                                                                            0.0 if finite else 1.0])
                finite = nonfinite == 0
                t_bwd = time.perf_counter()
                if finite:
                    scaled = contribution * self.world_size  # DDP averages gradients over the ranks
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                elif self.distributed:
                    if self.sharded:  # reduce-scatter what earlier micro-batches accumulated, to drop it
                        module.set_requires_gradient_sync(True)
                    (contribution * 0.0).backward()  # DDP must finish the reduction it started
                self.timings["backward"] += time.perf_counter() - t_bwd
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                if not self.skip_nonfinite:
                    raise FloatingPointError(
                        f"{self.where}: non-finite loss at optimizer step {self.global_step + 1} (epoch "
                        f"{epoch + 1}, batch {micro_end - len(group) + k + 1}); nothing was updated or saved for "
                        "this step. Lower the lr, use fp32/bf16, or pass skip_nonfinite=True to skip such batches")
                self.skipped_steps += 1
                return None
            step_loss += part
            step_parts[0] += task_part
            step_parts[1] += replay_part
        t_opt = time.perf_counter()
        updated = optimizer_step(self.optimizer, self.scheduler, self.scaler)
        self.timings["optimizer"] += time.perf_counter() - t_opt
        self._run_loss += step_loss
        self._run_parts = [self._run_parts[0] + step_parts[0], self._run_parts[1] + step_parts[1]]
        self._run_count += 1
        if not updated:
            self.amp_skipped_steps += 1
            logging.getLogger(__name__).info(
                "%s: inf/NaN fp16 gradients in epoch %d (after optimizer step %d): the GradScaler skipped this "
                "update (%d skipped so far), loss scale now %g", self.where, epoch + 1, self.global_step,
                self.amp_skipped_steps, self.scaler.get_scale())
            return None
        self.global_step += 1
        return step_loss

    def _train_record(self) -> Dict[str, float]:
        """The training side of a record; starts a new window. ``train_loss``: the mean loss of the
        steps since the last record (fp16 steps whose update was skipped included). With replay its
        two parts, ``train_task_loss + train_replay_loss = train_loss``: the task rows' and the replay
        rows' weighted shares, as the steps weigh them (:func:`fastft.train.replay.step_scales`:
        ``(B - r) / B`` times the task loss, ``weight * r / B`` times the replay LM loss). Under fp16,
        ``amp_skipped_steps`` so far."""
        n = max(self._run_count, 1)
        record = {"train_loss": self._run_loss / n}
        if self.replay is not None:
            record["train_task_loss"], record["train_replay_loss"] = self._run_parts[0] / n, self._run_parts[1] / n
        if self.scaler is not None:
            record["amp_skipped_steps"] = self.amp_skipped_steps
        self._run_loss, self._run_count, self._run_parts = 0.0, 0, [0.0, 0.0]
        return record

    def _record(self, record: Dict[str, float]) -> None:
        self.history.append(record)
        if self.run_dir and D.is_main_process():
            self.run_dir.append_metrics(record)

    def _evaluate_and_record(self, epoch: int, train: Dict[str, float]) -> None:
        """Validate, and record the evaluation with ``train`` (:meth:`_train_record`)."""
        res = self._validate()
        train_loss = train["train_loss"]
        record = {"epoch": epoch + 1, "step": self.global_step, **train,
                  **{f"val_{k}": v for k, v in res.items()}, "lr": self.scheduler.get_last_lr()[0]}
        self._call("on_evaluate", record)  # callbacks may add to the record (e.g. ForgettingMonitor)
        self.should_stop = D.any_rank(self.should_stop)
        self._record(record)
        if self.progress:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_"))
            print(f"epoch {epoch + 1} step {self.global_step}: train_loss {train_loss:.4f}, {shown}", flush=True)
        self._save_checkpoint()

    def _tokenizer_to_save(self) -> Any:
        """The tokenizer, saved with the run's text limit as its ``model_max_length``, so that
        ``tokenizer(texts, truncation=True)`` on the loaded model cuts texts as training did."""
        tok = self.tokenizer
        if tok is None or self.text_max_length is None or getattr(tok, "model_max_length", None) == \
                self.text_max_length:
            return tok
        import copy

        tok = copy.deepcopy(tok)
        tok.model_max_length = self.text_max_length
        return tok

    def _finish(self) -> FitResult:
        best_epoch = best = None
        if self.early_stopping is not None and self.early_stopping.best is not None:
            best_epoch, best = self.early_stopping.best_epoch, self.early_stopping.best
        else:
            vals = [r for r in self.history if "val_loss" in r]
            if vals:
                top = min(vals, key=lambda r: r["val_loss"])
                best_epoch, best = top["epoch"], top["val_loss"]
        error = None
        full = D.full_state_dict(self.model) if self.run_dir and self.sharded else None  # gathered on rank 0
        if self.run_dir and D.is_main_process():
            names = self.label_names
            if isinstance(names, dict):  # MultiTaskTrainer: names per task
                names = {task: n for task, n in names.items() if n is not None}
            try:
                model = self.model
                if full is not None:
                    D.materialize(self._skeleton, full)
                    model = self._skeleton
                self.run_dir.save_model(model, tokenizer=self._tokenizer_to_save(), label_names=names,
                                        merged=self.save_merged)
            except Exception as e:  # the run's result is still in its checkpoint: say where
                error = e
            else:
                self.run_dir.plot_curves(self.history)
            finally:
                if full is not None:
                    D.materialize(self._skeleton, None)  # the gathered weights are freed
            self.run_dir.close()
        if D.any_rank(error is not None):  # every rank raises alike (and none leaves before rank 0 is done)
            cause = f"{type(error).__name__}: {error}" if error is not None else "see rank 0"
            raise RuntimeError(f"{self.where}: training ended (optimizer step {self.global_step}) but saving the "
                               f"final model to {self.run_dir.path / 'model'} failed ({cause}). Nothing is lost: "
                               f"{self.run_dir.last_checkpoint()}; fix the cause and call resume() (fastft finetune "
                               "CONFIG --resume), which writes the model from it") from error
        return FitResult(history=list(self.history), best_epoch=best_epoch, best_metric=best,
                         stopped_early=self.stopped_early, global_step=self.global_step,
                         output_dir=str(self.output_dir) if self.output_dir else None,
                         skipped_steps=self.skipped_steps, amp_skipped_steps=self.amp_skipped_steps)

    # --- checkpoints ------------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        """Write ``output_dir/checkpoint`` atomically (see :mod:`fastft.train.run_dir`). Under torchrun
        every rank's RNG states are gathered and rank 0 writes."""
        if not self.run_dir:
            return
        rngs = D.gather_objects(_rng_state())
        if self.strategy == "fsdp2":
            self._save_sharded_checkpoint(rngs)
            return
        if D.is_main_process():
            blobs = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler else None,
                     "callbacks": [{"type": type(cb).__qualname__, "state": cb.state_dict()}
                                   for cb in self.callbacks if hasattr(cb, "state_dict")],
                     "replay": self.replay.state_dict() if self.replay is not None else None,
                     "rng": rngs[0], "rng_per_rank": rngs}
            self.run_dir.write_checkpoint(self.model, blobs, self._state())
        D.barrier()  # no rank goes on (or dies) before the checkpoint is complete

    def _state(self) -> Dict[str, Any]:
        """The JSON part of a checkpoint (``trainer_state.json``)."""
        return {"global_step": self.global_step, "position": list(self._position), "history": self.history,
                "skipped_steps": self.skipped_steps, "stopped_early": self.stopped_early,
                "run_loss": self._run_loss, "run_count": self._run_count, "run_parts": self._run_parts,
                "amp_skipped_steps": self.amp_skipped_steps,
                "freeze_plan": self.freeze_plan.state_dict() if self.freeze_plan is not None else None,
                "world_size": self.world_size, "batch_size": self.batch_size, "extra": self._extra_state()}

    def _save_sharded_checkpoint(self, rngs: List[Any]) -> None:
        """``distributed="fsdp2"``: every rank writes its shards of the weights, the optimizer state
        (moments, anchors) and the callbacks' tensors (e.g. early stopping's best weights) through
        ``torch.distributed.checkpoint``; rank 0 the rest (see :meth:`RunDir.write_sharded_checkpoint`)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        from .run_dir import extract_tensors

        tensors: Dict[str, Any] = {"model": get_model_state_dict(self.model)}
        stepped = bool(self.optimizer.state)  # before any step, a state_dict would invent the state
        if stepped:
            tensors["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        callbacks = [{"type": type(cb).__qualname__,
                      "state": extract_tensors(cb.state_dict(), f"callbacks/{i}", tensors)}
                     for i, cb in enumerate(self.callbacks) if hasattr(cb, "state_dict")]
        blobs = {"optimizer": None, "optimizer_state": sorted(tensors["optimizer"]["state"]) if stepped else None,
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                 "callbacks": callbacks, "replay": self.replay.state_dict() if self.replay is not None else None,
                 "rng": rngs[0], "rng_per_rank": rngs}
        self.run_dir.write_sharded_checkpoint(tensors, blobs, self._state())

    def _load_sharded_checkpoint(self, path: Path, blobs: Dict[str, Any]) -> None:
        """Weights, optimizer state and the callbacks' tensors of a sharded checkpoint, resharded to this
        run (sharded or one process); the callbacks' tensors are put back into ``blobs``."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        from .run_dir import insert_tensors, tensor_refs

        tensors: Dict[str, Any] = {"model": get_model_state_dict(self.model)}
        if blobs["optimizer_state"] is not None:
            self.optimizer.state.clear()
            optim = get_optimizer_state_dict(self.model, self.optimizer)  # creates the state to load into
            keep = set(blobs["optimizer_state"])  # parameters never stepped then have no state now either
            optim["state"] = {k: v for k, v in optim["state"].items() if k in keep}
            tensors["optimizer"] = optim
        mesh = next((p.device_mesh for p in self.model.parameters() if D.is_dtensor(p)), None)
        for ref in tensor_refs(blobs["callbacks"]):
            dtype = getattr(torch, ref["dtype"])
            if ref["sharded"] and mesh is not None:
                from torch.distributed.tensor import Replicate, Shard
                from torch.distributed.tensor import empty as dtensor_empty

                placement = Shard(0) if ref["shape"] else Replicate()
                tensors[ref["__fastft_tensor__"]] = dtensor_empty(ref["shape"], dtype=dtype, device_mesh=mesh,
                                                                  placements=[placement])
            else:
                tensors[ref["__fastft_tensor__"]] = torch.empty(ref["shape"], dtype=dtype)
        RunDir.load_sharded(path, tensors)
        set_model_state_dict(self.model, tensors["model"])
        if "optimizer" in tensors:
            # strict=False: parameters that require gradients but were never stepped (a pooler the loss
            # does not use) have no state, in the checkpoint and after loading alike.
            set_optimizer_state_dict(self.model, self.optimizer, tensors["optimizer"],
                                     options=StateDictOptions(strict=False))
        else:
            self.optimizer.state.clear()
        blobs["callbacks"] = insert_tensors(blobs["callbacks"], tensors)

    def _readable_checkpoint(self, path: Optional[Path]) -> Path:
        if path is None and not self.run_dir:
            raise ValueError(f"{self.where}.resume: pass the checkpoint folder or build the trainer with output_dir")
        run_dir = self.run_dir or RunDir(path.parent)
        return run_dir.find_checkpoint(path, f"{self.where}.resume")

    def _load_checkpoint(self, path: Path) -> None:
        state, blobs = RunDir.read_checkpoint(path)
        saved = state.get("batch_size")
        if saved is not None and saved != self.batch_size:
            raise ValueError(f"{self.where}.resume: {path} was written with batch_size={saved} (the global batch), "
                             f"this trainer has batch_size={self.batch_size}; build it with the same arguments")
        if self.freeze_plan is not None and state.get("freeze_plan") is not None:
            self.freeze_plan.load_state_dict(state["freeze_plan"])
        if RunDir.is_sharded(path):
            self._load_sharded_checkpoint(path, blobs)
        elif self.sharded:
            raise ValueError(f"{self.where}.resume: {path} was written by a distributed='ddp' run (one "
                             "model.safetensors); resume it with distributed='ddp'")
        else:
            RunDir.load_weights(path, self.model, self.device)
            self.optimizer.load_state_dict(blobs["optimizer"])
        self.scheduler.load_state_dict(blobs["scheduler"])
        if self.scaler is not None and blobs["scaler"] is not None:
            self.scaler.load_state_dict(blobs["scaler"])
        saved_cbs = list(blobs["callbacks"])  # matched by type, in order: callbacks may be added or dropped
        for cb in self.callbacks:
            match = next((s for s in saved_cbs if s["type"] == type(cb).__qualname__), None)
            if match is not None and hasattr(cb, "load_state_dict"):
                saved_cbs.remove(match)
                cb.load_state_dict(match["state"])
        if self.replay is not None and blobs.get("replay") is not None:
            self.replay.load_state_dict(blobs["replay"])
        rngs = blobs.get("rng_per_rank") or [blobs["rng"]]
        if len(rngs) == self.world_size:
            _set_rng_state(rngs[self.rank])
        else:
            # Another world size: data order and updates continue exactly (they depend on the global
            # batch only); dropout's random stream cannot be mapped across ranks, so it starts afresh.
            seed_everything(self.seed + 1_000_003 * (state["global_step"] + 1) + self.rank)
        self.global_step = state["global_step"]
        self._position = tuple(state["position"])
        self.history = state["history"]
        self.skipped_steps = state["skipped_steps"]
        self.stopped_early = state["stopped_early"]
        self._run_loss, self._run_count = state["run_loss"], state["run_count"]
        self._run_parts = list(state.get("run_parts", [0.0, 0.0]))
        self.amp_skipped_steps = state.get("amp_skipped_steps", 0)
        self._load_extra_state(state.get("extra") or {})


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


def optimizer_step(optimizer, scheduler, scaler=None) -> bool:
    """One optimizer step (through the GradScaler under fp16), the scheduler's step, gradients cleared.

    Returns whether the parameters were updated: False when the GradScaler skipped the step for
    inf/NaN gradients, and then the scheduler does not step either (the LR schedule counts updates)."""
    updated = True
    if scaler is not None:
        # The GradScaler lowers its scale exactly when it skips a step. The copy of the scale before is
        # a device op; the comparison after is the one host sync per step (accelerate checks the same).
        before = scaler._get_scale_async() if scaler.is_enabled() else None
        before = before.clone() if before is not None else None
        scaler.step(optimizer)
        scaler.update()
        updated = before is None or bool(scaler._get_scale_async() >= before)
    else:
        optimizer.step()
    if updated:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return updated


def cpu_has_native_bf16() -> bool:
    """Whether this machine's CPU does bfloat16 arithmetic natively (x86: AVX512-BF16 or AMX-BF16; Arm:
    the BF16 extension), where bf16 autocast pays off; elsewhere bf16 is emulated and slow. Reads the
    CPU flags in /proc/cpuinfo (Linux), else asks torch's CPU probes (x86); True when it cannot tell."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(line.split(":", 1)[-1].split()))
    except OSError:
        pass
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [probe for probe in probes if probe is not None]
    return any(probe() for probe in probes) if probes else True
