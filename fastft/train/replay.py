"""Replay: pretraining-distribution text mixed into every optimizer step, and the one rule that
weighs task rows against replay rows (used by the trainers' single loop)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..atomic import atomic_write
from ..distributed import shard
from ..lm import check_tokenizer, lm_examples, lm_kind, lm_loss, pad_id_of, pad_lm_batch, read_texts
from .data import loss_terms

__all__ = ["Replay", "step_scales"]


def _check_mix(ratio: Any, weight: Any, where: str) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"{where}: ratio must be in [0, 1), got {ratio!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"{where}: weight must be a finite number >= 0, got {weight!r}")


def _read_samples(path: Path, settings: Dict[str, Any], where: str) -> Tuple[List[str], int]:
    """The samples saved at ``path`` by :meth:`Replay.from_model`, if they were made with ``settings``."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        texts, saved, dropped = record["texts"], record["settings"], int(record.get("dropped", 0))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: {path} is not a samples file of Replay.from_model ({e}); delete it or pass "
                         "another path") from None
    differ = sorted(k for k in settings if saved.get(k) != settings[k])
    if differ:
        raise ValueError(f"{where}: {path} holds samples made with other settings ({', '.join(differ)}: "
                         f"{[saved.get(k) for k in differ]} there, {[settings[k] for k in differ]} now); delete it "
                         "to sample again, or pass another path")
    if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
        raise ValueError(f"{where}: {path} must hold a list of texts under 'texts'")
    return texts, dropped


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
        _check_mix(ratio, weight, "fastft.Replay")
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
        #: How the texts were made, for a replay from :meth:`from_model` (None otherwise).
        self.generation: Optional[Dict[str, Any]] = None

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any, n: int, *, ratio: float,
                   path: Union[str, Path, None] = None, prompts: Optional[Sequence[Any]] = None,
                   max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: Optional[int] = None, seed: int = 0, batch_size: int = 8, **replay_kwargs: Any) -> "Replay":
        """Replay of ``n`` texts sampled from the pretrained ``model`` itself, for a user without its
        pretraining corpus: replaying them pulls the model toward what it generated before
        fine-tuning (its own distribution) instead of toward a corpus's style.

        Call it before training (on the pretrained weights). The texts are sampled with
        :func:`fastft.generate` (``do_sample=True``, ``temperature`` / ``top_p`` / ``top_k``, seeded by
        ``seed``; the caller's random streams are untouched), ``max_new_tokens`` each. Each sample
        starts from a document-start token and nothing else: the tokenizer's BOS token, else its EOS
        token (GPT-2's end-of-text also opens a document), else CLS; no chat template and no
        instruction, so an instruction-tuned model (SmolLM2-Instruct) writes free text of its own
        choosing, closest to its pretraining data, rather than answers. ``prompts`` replaces that:
        one sample per prompt, cycled to ``n`` (texts or token-id lists, e.g. topic openers); a
        prompt's text is not part of the replayed text. Samples that are empty after stripping are
        dropped (counted in ``replay.generation["dropped"]``).

        With ``path`` (e.g. ``<run folder>/replay_samples.json``) the samples are saved there
        (atomically, with the settings that made them), and a later call with the same path and
        settings — a resumed run, another arm of an experiment — reads them instead of generating
        again; different settings raise instead of silently mixing. Without ``path`` nothing is
        written (the Replay does not know the trainer's run folder before the trainer exists).

        Args:
            model: the pretrained causal LM (``*ForCausalLM``) that will be fine-tuned.
            tokenizer: its tokenizer.
            n: texts to sample (int >= 1).
            ratio: share of every batch that is replay (see :class:`Replay`).
            path: a JSON file to save the samples to / read them from; None: keep them in memory.
            prompts: what each sample starts from (see above); None: the document-start token.
            max_new_tokens, temperature, top_p, top_k, batch_size: :func:`fastft.generate`'s.
            seed: seeds the sampling, and the replay order.
            **replay_kwargs: the other arguments of :class:`Replay` (``weight``, ``max_length``, ...).

        Returns:
            a :class:`Replay` whose ``texts`` are the samples and ``generation`` their settings.

        Raises:
            ValueError: ``n`` not an int >= 1, a model that is not a causal LM, no tokenizer, a bad
                ``ratio`` / ``weight`` (before any generation), no document-start token and no
                ``prompts``, a file at ``path`` made with other settings, or every sample empty.
        """
        from ..generation import generate

        where = "fastft.Replay.from_model"
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{where}: n must be an int >= 1 (texts to sample), got {n!r}")
        _check_mix(ratio, replay_kwargs.get("weight", 1.0), where)
        if lm_kind(model) != "causal":
            raise ValueError(f"{where}: samples text from a causal LM (*ForCausalLM), got {type(model).__name__}")
        check_tokenizer(tokenizer, model, "Replay.from_model")
        if prompts is None:
            start = next((i for i in (getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id",
                                                                                 "cls_token_id"))
                          if isinstance(i, int)), None)
            if start is None:
                raise ValueError(f"{where}: the tokenizer has no BOS, EOS or CLS token to start a sample from; pass "
                                 "prompts=[...] (texts or token-id lists)")
            prompts = [[start]]
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        if not prompts:
            raise ValueError(f"{where}: prompts is empty")
        settings = {"n": n, "prompts": prompts, "max_new_tokens": max_new_tokens, "temperature": temperature,
                    "top_p": top_p, "top_k": top_k, "seed": seed, "model": type(model).__name__,
                    "name_or_path": str(getattr(getattr(model, "config", None), "_name_or_path", ""))}
        saved = _read_samples(Path(path), settings, where) if path is not None and Path(path).exists() else None
        if saved is not None:
            texts, dropped = saved
        else:
            cycled = [prompts[i % len(prompts)] for i in range(n)]
            samples = generate(model, tokenizer, cycled, max_new_tokens=max_new_tokens, do_sample=True,
                               temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size)
            texts = [t.strip() for t in samples if t.strip()]
            dropped = n - len(texts)
            if path is not None and texts:
                record = {"settings": settings, "dropped": dropped, "texts": texts}
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, ensure_ascii=False, indent=1),
                                                                      encoding="utf-8"))
        if not texts:
            raise ValueError(f"{where}: all {n} samples were empty (the model ended each at once); try other "
                             "prompts or a higher temperature")
        replay_kwargs.setdefault("seed", seed)
        replay = cls(texts, ratio, tokenizer=tokenizer, **replay_kwargs)
        replay.generation = {**settings, "dropped": dropped, "path": None if path is None else str(path)}
        return replay

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
