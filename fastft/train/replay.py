"""Replay: pretraining-distribution text mixed into every optimizer step, and the one rule that
weighs task rows against replay rows (used by the trainers' single loop)."""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..distributed import shard
from ..lm import check_tokenizer, lm_examples, lm_kind, lm_loss, pad_id_of, pad_lm_batch, read_texts
from .data import loss_terms

__all__ = ["Replay", "step_scales"]


def step_scales(task_rows: int, task_terms: int, replay_rows: int = 0, weight: float = 1.0) -> Tuple[float, float]:
    """The weights that make a step's loss ``(task_rows * task_loss + weight * replay_rows * replay_loss)
    / (task_rows + replay_rows)``, where ``task_loss`` is the mean over the step's ``task_terms`` loss
    terms (rows, or target tokens for token-level labels) and ``replay_loss`` the token mean over the
    replay rows.

    Returns ``(task_scale, replay_scale)``: a micro-batch's mean task loss over ``t`` terms contributes
    ``loss * t * task_scale``; the replay rows' share (see :meth:`Replay.loss_share`) contributes
    ``share * replay_scale``. Without replay ``task_scale = 1 / task_terms``. The two weighted terms
    are what the trainers' records report as ``train_task_loss`` and ``train_replay_loss`` (their
    sum is ``train_loss``).
    """
    rows = task_rows + replay_rows
    task_scale = task_rows / rows / max(task_terms, 1)
    replay_scale = weight * replay_rows / rows if replay_rows else 0.0
    return task_scale, replay_scale


class Replay:
    """Mix pretraining-distribution text into every optimizer step of a :class:`fastft.Trainer`.

    Each step trains on ``batch_size - r`` task examples and ``r = round(ratio * batch_size)``
    replay examples with a language-modelling loss (next-token for a causal LM, masked-token for a
    masked LM), weighted by ``weight``: ``loss = ((B - r) task_loss + weight r replay_loss) / B``.
    The replay examples come in a seeded shuffled order, each once per pass. Replay text is trained
    on: measure forgetting (:class:`fastft.ForgettingMonitor`) on other, held-out text — the trainer
    warns when the two overlap.

    Args:
        data: texts (or ``(text, label)`` pairs; the labels are ignored).
        ratio: share of every batch, ``0 <= ratio < 1``.
        weight: factor on the replay loss.
        tokenizer: tokenizes the texts (the Trainer's tokenizer when None).
        lm: the module that computes the LM loss: the trained model when it is a language model,
            or an LM sharing the trained model's encoder (e.g. ``BertForMaskedLM`` whose ``.bert`` is
            the classifier's encoder).
        max_length: tokens per replay example.
    """

    def __init__(self, data: Any, ratio: float, weight: float = 1.0, tokenizer: Any = None,
                 lm: Optional[nn.Module] = None, max_length: int = 64, mlm_probability: float = 0.15,
                 seed: int = 0) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"fastft.Replay: ratio must be in [0, 1), got {ratio!r}")
        if not (isinstance(weight, (int, float)) and weight >= 0):
            raise ValueError(f"fastft.Replay: weight must be >= 0, got {weight!r}")
        self.texts = read_texts(data, "Replay")
        self.ratio, self.weight, self.tokenizer, self.lm = float(ratio), float(weight), tokenizer, lm
        self.max_length, self.mlm_probability, self.seed = max_length, mlm_probability, seed
        self.examples: Optional[List[Dict[str, Any]]] = None
        self._order: List[int] = []
        self._pass = 0
        self._pos = 0
        #: compute the LM loss with fastft.linear_cross_entropy where the LM allows (the trainer sets it)
        self.fused = True
        self.seen = 0  # replay examples trained on so far

    def count(self, batch_size: int) -> int:
        """Replay examples per step for a batch of ``batch_size``."""
        return int(round(self.ratio * batch_size))

    def bind(self, model: nn.Module, tokenizer: Any) -> None:
        """Called by the Trainer: picks the LM, checks it and the tokenizer, tokenizes the texts once."""
        self.lm = self.lm if self.lm is not None else model
        kind = lm_kind(self.lm)
        if kind is None:
            raise ValueError(f"fastft.Replay: {type(self.lm).__name__} is not a language model; pass lm= an LM that "
                             "shares the trained model's encoder (e.g. BertForMaskedLM) or train a causal LM")
        self.tokenizer = self.tokenizer if self.tokenizer is not None else tokenizer
        check_tokenizer(self.tokenizer, self.lm, "Replay")
        self.kind = kind
        self.examples = lm_examples(self.texts, self.tokenizer, kind, self.max_length, self.mlm_probability,
                                     self.seed, pack=False)
        if not self.examples:
            raise ValueError("fastft.Replay: no replay text has a token to predict (all too short)")

    def next(self, n: int) -> List[Dict[str, Any]]:
        """The next ``n`` replay examples (a new seeded shuffle after each pass)."""
        out = []
        while len(out) < n:
            if self._pos >= len(self._order):
                self._order = list(range(len(self.examples)))
                random.Random(self.seed * 7919 + self._pass).shuffle(self._order)
                self._pass += 1
                self._pos = 0
            out.append(self.examples[self._order[self._pos]])
            self._pos += 1
        self.seen += n
        return out

    def loss(self, examples: List[Dict[str, Any]], device: torch.device) -> Tensor:
        """Language-modelling loss of ``examples``."""
        return lm_loss(self.lm, pad_lm_batch(examples, pad_id_of(self.tokenizer), device), self.fused).float()

    def targets(self, example: Dict[str, Any]) -> int:
        """Target tokens of a replay example (the terms of its token-mean LM loss)."""
        return loss_terms(example, causal=self.kind == "causal")

    def loss_share(self, examples: List[Dict[str, Any]], device: torch.device, total_targets: Optional[int] = None,
                   rank: int = 0, world_size: int = 1) -> Tensor:
        """This rank's share of the token-mean LM loss over ``examples`` (every rank's rows): the
        loss of its rows (every ``world_size``-th from ``rank``) times their target tokens over
        ``total_targets`` (default: the tokens of all ``examples``). Summed over the ranks (and over
        the micro-batches whose tokens ``total_targets`` counts) it is the token-mean loss of all rows."""
        mine, real = shard(range(len(examples)), rank, world_size)
        rows = [examples[i] for i in mine]
        if total_targets is None:
            total_targets = sum(self.targets(e) for e in examples)
        local = sum(self.targets(e) for e in rows) if real else 0
        return self.loss(rows, device) * (local / max(total_targets, 1))

    def state_dict(self) -> Dict[str, Any]:
        return {"order": self._order, "pass": self._pass, "pos": self._pos, "seen": self.seen}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._order, self._pass, self._pos, self.seen = state["order"], state["pass"], state["pos"], state["seen"]
