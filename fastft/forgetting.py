"""Forgetting: measure it (``ForgettingMonitor``) and adapt to a domain first (``continue_pretraining``).

What limits it lives where it acts: replay in :mod:`fastft.train.replay`, L2-to-init in
:class:`fastft.AdamW` (which parameters are anchored: :mod:`fastft.param_groups`), freezing in
:mod:`fastft.freezing`. The language-model helpers are in :mod:`fastft.lm`, the prompting baseline in
:mod:`fastft.prompting`; their public names are re-exported here."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Dict, List, Optional, Set

import torch
from torch import Tensor, nn

from .distributed import is_main_process
from .heads import last_hidden_state
from .lm import check_tokenizer, lm_examples, lm_kind, lm_loss, mask_tokens, pack_blocks, pad_id_of, pad_lm_batch, \
    read_texts, right_pad
from .pooling import masked_mean_pool
from .prompting import evaluate_prompting, few_shot_prompt
from .train import Trainer
from .train.callbacks import Callback
from .train.replay import Replay

__all__ = ["ForgettingMonitor", "Replay", "continue_pretraining", "pack_blocks", "mask_tokens", "few_shot_prompt",
           "evaluate_prompting", "lm_kind"]


class ForgettingMonitor(Callback):
    """How much a model forgets of its pretraining while it is fine-tuned.

    Before training and after every evaluation it measures, on held-out pretraining-distribution
    text: for a language model (the trained model, or ``lm=`` sharing its encoder) the LM loss and
    perplexity (next-token for causal, masked-token with fixed seeded masks for masked LMs) —
    record keys ``pretrain_loss``, ``pretrain_ppl``, ``pretrain_loss_rise``; for an encoder without
    an LM head, the drift of its mean-pooled representations from a frozen pretrained copy — linear
    CKA (1 = unchanged) and mean cosine: ``repr_cka``, ``repr_cosine``. The values go into each
    evaluation record (``result.history``, metrics.jsonl), and the measure before training into a
    first record of its own (epoch 0, step 0); with an ``output_dir`` the trainer's run folder gets
    ``forgetting.png`` (task metric and the measure per optimizer step when the trainer evaluates every
    ``eval_every`` steps, else per epoch).

    The text must be held out: when some of it is also replayed (the trainer's
    :class:`fastft.Replay`) or in the training data, the trainer warns at set-up, since the measure
    would then show how well the model fits text it trains on, not what it forgets.
    """

    #: The keys the monitor adds to evaluation records (a language model's, or an encoder's).
    record_keys = ("pretrain_loss", "pretrain_ppl", "pretrain_loss_rise", "repr_cka", "repr_cosine")

    def __init__(self, data: Any, tokenizer: Any, lm: Optional[nn.Module] = None, max_length: int = 64,
                 batch_size: int = 16, max_examples: Optional[int] = 256, mlm_probability: float = 0.15,
                 seed: int = 0) -> None:
        texts = read_texts(data, "ForgettingMonitor")
        self.texts = texts[:max_examples] if max_examples else texts
        self.tokenizer, self.lm, self.max_length, self.batch_size = tokenizer, lm, max_length, batch_size
        self.mlm_probability, self.seed = mlm_probability, seed
        self.baseline: Optional[Dict[str, float]] = None
        self.records: List[Dict[str, float]] = []

    def setup(self, model: nn.Module) -> None:
        """Check ``model`` (or ``lm``) and the tokenizer, tokenize the text, and for an encoder keep a
        frozen copy as the reference. Called by :meth:`on_fit_start`; call it yourself to measure by hand."""
        target = self.lm if self.lm is not None else model
        self.kind = lm_kind(target)
        if self.kind is not None:
            check_tokenizer(self.tokenizer, target, "ForgettingMonitor")
            self.examples = lm_examples(self.texts, self.tokenizer, self.kind, self.max_length,
                                         self.mlm_probability, self.seed, pack=False)
            if not self.examples:
                raise ValueError("fastft.ForgettingMonitor: no held-out text has a token to predict (all too short)")
            return
        encoder = getattr(model, "encoder", model)
        if not any(True for _ in encoder.parameters()):
            raise ValueError("fastft.ForgettingMonitor: the model has neither an LM head nor an encoder to compare")
        check_tokenizer(self.tokenizer, encoder, "ForgettingMonitor")
        self.kind = "representation"
        self.reference = copy.deepcopy(encoder).eval().requires_grad_(False)
        self.encoded = self.tokenizer(self.texts, truncation=True, max_length=self.max_length)["input_ids"]

    def _target(self, model: nn.Module) -> nn.Module:
        if self.kind == "representation":
            return getattr(model, "encoder", model)
        return self.lm if self.lm is not None else model

    @torch.no_grad()
    def measure(self, model: nn.Module) -> Dict[str, float]:
        """The forgetting measures of ``model`` now (the monitor must have been set up, e.g. by
        :meth:`on_fit_start` or :meth:`setup`, on this model or one of the same kind)."""
        target = self._target(model)
        device = next(target.parameters()).device
        was = target.training
        target.eval()
        try:
            if self.kind in ("causal", "masked"):
                pad = pad_id_of(self.tokenizer)
                total, count = 0.0, 0
                for i in range(0, len(self.examples), self.batch_size):
                    chunk = self.examples[i:i + self.batch_size]
                    batch = pad_lm_batch(chunk, pad, device)
                    n = int((batch["labels"][:, 1:] != -100).sum()) if self.kind == "causal" else int(
                        (batch["labels"] != -100).sum())
                    if n:
                        total += float(lm_loss(target, batch)) * n
                        count += n
                loss = total / max(count, 1)
                return {"pretrain_loss": loss, "pretrain_ppl": math.exp(min(loss, 700.0))}
            now, ref = self._pooled(target, device), self._pooled(self.reference.to(device), device)
            return {"repr_cka": _linear_cka(now, ref),
                    "repr_cosine": float(nn.functional.cosine_similarity(now, ref, dim=-1).mean())}
        finally:
            target.train(was)

    def _pooled(self, encoder: nn.Module, device: torch.device) -> Tensor:
        out = []
        for i in range(0, len(self.encoded), self.batch_size):
            ids, mask = right_pad(self.encoded[i:i + self.batch_size])
            hidden = last_hidden_state(encoder(input_ids=ids.to(device), attention_mask=mask.to(device)))
            out.append(masked_mean_pool(hidden.float(), mask.to(device)).cpu())
        return torch.cat(out).double()

    def on_setup(self, trainer) -> None:
        """Warn (once, at set-up) when the held-out text is trained on: some of it replayed by
        ``trainer.replay`` or in ``trainer.train_examples``."""
        replayed = self._replayed(trainer)
        trained = self._in_training_data(trainer)
        both = replayed | trained
        if not both:
            return
        parts = [f"{len(s)} {what}" for s, what in ((replayed, "replayed by fastft.Replay"),
                                                    (trained, "in the training data")) if s]
        warnings.warn(f"fastft.ForgettingMonitor: {len(both)} of the {len(self.texts)} held-out texts it measures "
                      f"forgetting on are trained on ({', '.join(parts)}). The model fits those texts, so "
                      "pretrain_loss / repr_cka would show how well it learns them, not how much of its pretraining "
                      "it forgets. Measure on text disjoint from the replay and training data (e.g. one half of a "
                      "corpus for Replay, the other half for ForgettingMonitor)", UserWarning, stacklevel=4)

    def _replayed(self, trainer) -> Set[int]:
        """Indices of the monitor's texts that the trainer's Replay also holds (whitespace-insensitive)."""
        replay = getattr(trainer, "replay", None)
        if replay is None or not getattr(replay, "texts", None):
            return set()
        replayed = {" ".join(t.split()) for t in replay.texts}
        return {i for i, t in enumerate(self.texts) if " ".join(t.split()) in replayed}

    def _in_training_data(self, trainer) -> Set[int]:
        """Indices of the monitor's texts that are training examples: the same token ids as an example's
        ``input_ids``, tokenized as the trainer tokenizes text."""
        seqs = set()
        for e in getattr(trainer, "train_examples", None) or ():
            ids = e.get("input_ids") if isinstance(e, dict) else None
            if ids is not None:
                seqs.add(tuple(ids.tolist() if isinstance(ids, Tensor) else ids))
        tokenizer = getattr(trainer, "tokenizer", None) or self.tokenizer
        if not seqs or tokenizer is None:
            return set()
        limit = getattr(trainer, "text_max_length", getattr(trainer, "max_length", None))
        encoded = tokenizer(self.texts, truncation=limit is not None, max_length=limit)["input_ids"]
        return {i for i, ids in enumerate(encoded) if tuple(ids) in seqs}

    def on_fit_start(self, trainer) -> None:
        if self.baseline is None:
            self.setup(trainer.model)
            self.baseline = self.measure(trainer.model)
            if "pretrain_loss" in self.baseline:
                self.baseline["pretrain_loss_rise"] = 0.0
            if getattr(trainer, "global_step", 0) == 0 and hasattr(trainer, "_record"):
                trainer._record({"epoch": 0, "step": 0, **self.baseline})  # the measure before training

    def on_evaluate(self, trainer, record: Dict[str, float]) -> None:
        values = self.measure(trainer.model)
        if "pretrain_loss" in values:
            values["pretrain_loss_rise"] = values["pretrain_loss"] - self.baseline["pretrain_loss"]
        record.update(values)
        self.records.append(dict(record))

    def on_fit_end(self, trainer) -> None:
        out_dir = getattr(trainer, "output_dir", None)
        if not out_dir or not self.records or not is_main_process():
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        key = "pretrain_loss" if self.kind in ("causal", "masked") else "repr_cka"
        task_key = next((k for k in ("val_accuracy", "val_mean_accuracy", "val_loss") if k in self.records[-1]), None)
        fig, ax = plt.subplots(figsize=(6, 4))
        # Several evaluations per epoch (eval_every) would share an epoch: then the step is the axis.
        by_step = bool(getattr(trainer, "eval_every", None))
        x_key = "step" if by_step else "epoch"
        xs = [0] + [r[x_key] for r in self.records]
        base = self.baseline.get(key, 1.0 if key == "repr_cka" else float("nan"))
        ax.plot(xs, [base] + [r[key] for r in self.records], "o-", color="tab:red", label=key)
        ax.set_xlabel("optimizer step" if by_step else "epoch")
        ax.set_ylabel(key, color="tab:red")
        if task_key:
            ax2 = ax.twinx()
            ax2.plot(xs[1:], [r[task_key] for r in self.records], "s-", color="tab:blue", label=task_key)
            ax2.set_ylabel(task_key, color="tab:blue")
        fig.tight_layout()
        fig.savefig(out_dir / "forgetting.png", dpi=100)
        plt.close(fig)

    def state_dict(self) -> Dict[str, Any]:
        return {"baseline": self.baseline, "records": self.records}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.baseline, self.records = state["baseline"], state["records"]


def _linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between representations [N, D] and [N, D'] (Kornblith et al., 2019)."""
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (x.T @ y).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp(min=1e-12))


def continue_pretraining(model: nn.Module, domain_text: Any, tokenizer: Any, epochs: int = 1, lr: float = 1e-5,
                         objective: str = "auto", block_size: int = 128, batch_size: int = 8,
                         mlm_probability: float = 0.15, seed: int = 0, **trainer_kwargs: Any):
    """Domain-adaptive pretraining: train ``model`` (a causal or masked LM) on raw ``domain_text``, packed
    into blocks of ``block_size`` tokens, with its own LM objective. Returns the
    :class:`fastft.FitResult`; ``model`` is adapted in place. Fine-tune it next with a new
    :class:`fastft.Trainer` (its L2-to-init anchors are then the domain-adapted weights) or call
    ``optimizer.reset_anchors()`` on an existing fastft.AdamW."""
    kind = lm_kind(model) if objective == "auto" else objective
    if kind not in ("causal", "masked"):
        raise ValueError(f"fastft.continue_pretraining: objective must be 'causal' or 'masked' ('auto' needs a "
                         f"*ForCausalLM / *ForMaskedLM model, got {type(model).__name__})")
    check_tokenizer(tokenizer, model, "continue_pretraining")
    texts = read_texts(domain_text, "continue_pretraining")
    examples = lm_examples(texts, tokenizer, kind, block_size, mlm_probability, seed, pack=True)
    if not examples:
        raise ValueError(f"fastft.continue_pretraining: the domain text has fewer than block_size={block_size} tokens")
    trainer_kwargs.setdefault("metrics", ())
    trainer_kwargs.setdefault("progress", False)
    trainer = Trainer(model, examples, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                      group_by_length=False, **trainer_kwargs)
    return trainer.fit()
