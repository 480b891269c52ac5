"""Forgetting: measure it (``ForgettingMonitor``), limit it (``Replay``; L2-to-init and freezing live in
fastft.AdamW and fastft.freezing), adapt to a domain first (``continue_pretraining``), and the prompting
baseline (``few_shot_prompt``, ``evaluate_prompting``)."""

from __future__ import annotations

import copy
import math
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .train.callbacks import Callback

__all__ = ["ForgettingMonitor", "Replay", "continue_pretraining", "pack_blocks", "mask_tokens", "few_shot_prompt",
           "evaluate_prompting", "lm_kind"]


def lm_kind(model: nn.Module) -> Optional[str]:
    """``"causal"`` for a causal LM (``*ForCausalLM``, ``*LMHeadModel``), ``"masked"`` for a masked LM
    (``*ForMaskedLM``, ``*ForPreTraining``), None otherwise."""
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal"
    if name.endswith("ForMaskedLM") or name.endswith("ForPreTraining"):
        return "masked"
    return None


def _texts(data: Any, what: str) -> List[str]:
    items = list(data)
    if not items:
        raise ValueError(f"fastft.{what}: the text data is empty")
    texts = [x[0] if isinstance(x, (tuple, list)) else x for x in items]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"fastft.{what}: item {bad} is {type(texts[bad]).__name__}, expected text (str, or "
                        "(text, label) pairs)")
    return texts


def _check_tokenizer(tokenizer: Any, model: Optional[nn.Module], what: str) -> None:
    if tokenizer is None or not callable(tokenizer):
        raise ValueError(f"fastft.{what}: needs a tokenizer (e.g. transformers.AutoTokenizer) to read text")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if vocab is not None and size is not None and size > vocab:
        raise ValueError(f"fastft.{what}: the tokenizer has {size} tokens but the model's vocabulary has {vocab}: "
                         "they do not belong together")


def mask_tokens(input_ids: Tensor, tokenizer: Any, probability: float = 0.15, generator: Optional[torch.Generator] = None
                ) -> Tuple[Tensor, Tensor]:
    """BERT's masking: pick ``probability`` of the non-special tokens; of those 80% become [MASK], 10% a
    random token, 10% stay. Returns (masked ids, labels with -100 where nothing is predicted)."""
    ids = input_ids.clone()
    labels = input_ids.clone()
    special = torch.tensor([tokenizer.get_special_tokens_mask(row.tolist(), already_has_special_tokens=True)
                            for row in input_ids], dtype=torch.bool)
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    to_mask = chosen & (torch.rand(ids.shape, generator=generator) < 0.8)
    ids[to_mask] = tokenizer.mask_token_id
    to_random = chosen & ~to_mask & (torch.rand(ids.shape, generator=generator) < 0.5)
    ids[to_random] = torch.randint(len(tokenizer), ids.shape, generator=generator)[to_random]
    return ids, labels


def pack_blocks(texts: Sequence[str], tokenizer: Any, block_size: int = 128) -> List[List[int]]:
    """Tokenize ``texts``, join them with the end-of-text (or separator) token and cut the stream into
    blocks of exactly ``block_size`` tokens (the rest is dropped): no padding is ever trained on."""
    if block_size < 2:
        raise ValueError(f"fastft.pack_blocks: block_size must be >= 2, got {block_size}")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream: List[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if sep is not None:
            stream.append(sep)
    return [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def _lm_examples(texts: Sequence[str], tokenizer: Any, kind: str, max_length: int, mlm_probability: float,
                 seed: int, pack: bool) -> List[Dict[str, Any]]:
    """Language-modelling examples: ``input_ids`` and ``labels`` (masked positions for a masked LM)."""
    if pack:
        rows = pack_blocks(texts, tokenizer, max_length)
    else:
        rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    if kind == "causal":
        # A one-token text has nothing to predict after the shift: its loss would be NaN.
        return [{"input_ids": r, "labels": list(r)} for r in rows if len(r) >= 2]
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in rows:
        ids, labels = mask_tokens(torch.tensor([r]), tokenizer, mlm_probability, g)
        if (labels != -100).any():  # no masked token: nothing to predict, the loss would be NaN
            out.append({"input_ids": ids[0].tolist(), "labels": labels[0].tolist()})
    return out


def _right_pad(rows: Sequence[Sequence[int]], value: int = 0) -> Tuple[Tensor, Tensor]:
    """Token rows padded on the right to the longest: (ids [N, T], attention mask [N, T])."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), value, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = torch.as_tensor(r)
        mask[j, :len(r)] = 1
    return ids, mask


def _pad(examples: List[Dict[str, Any]], pad_id: int, device: torch.device) -> Dict[str, Tensor]:
    ids, mask = _right_pad([e["input_ids"] for e in examples], pad_id)
    labels, _ = _right_pad([e["labels"] for e in examples], -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _lm_loss(lm: nn.Module, batch: Dict[str, Tensor]) -> Tensor:
    out = lm(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise TypeError(f"fastft: the language model {type(lm).__name__} returned no loss for labels=...")
    return loss


class Replay:
    """Mix pretraining-distribution text into every optimizer step of a :class:`fastft.Trainer`.

    Each step trains on ``batch_size - r`` task examples and ``r = round(ratio * batch_size)``
    replay examples with a language-modelling loss (next-token for a causal LM, masked-token for a
    masked LM), weighted by ``weight``: ``loss = ((B - r) task_loss + weight r replay_loss) / B``.
    The replay examples come in a seeded shuffled order, each once per pass.

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
        self.texts = _texts(data, "Replay")
        self.ratio, self.weight, self.tokenizer, self.lm = float(ratio), float(weight), tokenizer, lm
        self.max_length, self.mlm_probability, self.seed = max_length, mlm_probability, seed
        self.examples: Optional[List[Dict[str, Any]]] = None
        self._order: List[int] = []
        self._pass = 0
        self._pos = 0
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
        _check_tokenizer(self.tokenizer, self.lm, "Replay")
        self.kind = kind
        self.examples = _lm_examples(self.texts, self.tokenizer, kind, self.max_length, self.mlm_probability,
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
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return _lm_loss(self.lm, _pad(examples, pad, device)).float()

    def targets(self, example: Dict[str, Any]) -> int:
        """Target tokens of a replay example (the terms of its token-mean LM loss)."""
        from .train.data import loss_terms

        return loss_terms(example, causal=self.kind == "causal")

    def loss_share(self, examples: List[Dict[str, Any]], device: torch.device, total_targets: Optional[int] = None,
                   rank: int = 0, world_size: int = 1) -> Tensor:
        """This rank's share of the token-mean LM loss over ``examples`` (every rank's rows): the
        loss of its rows (every ``world_size``-th from ``rank``) times their target tokens over
        ``total_targets`` (default: the tokens of all ``examples``). Summed over the ranks (and over
        the micro-batches whose tokens ``total_targets`` counts) it is the token-mean loss of all rows."""
        from .distributed import shard

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


class ForgettingMonitor(Callback):
    """How much a model forgets of its pretraining while it is fine-tuned.

    Before training and after every evaluation it measures, on held-out pretraining-distribution
    text: for a language model (the trained model, or ``lm=`` sharing its encoder) the LM loss and
    perplexity (next-token for causal, masked-token with fixed seeded masks for masked LMs) —
    record keys ``pretrain_loss``, ``pretrain_ppl``, ``pretrain_loss_rise``; for an encoder without
    an LM head, the drift of its mean-pooled representations from a frozen pretrained copy — linear
    CKA (1 = unchanged) and mean cosine: ``repr_cka``, ``repr_cosine``. The values go into each
    evaluation record (``result.history``, metrics.jsonl); with an ``output_dir`` the trainer's run
    folder gets ``forgetting.png`` (task metric and pretraining loss per epoch).
    """

    def __init__(self, data: Any, tokenizer: Any, lm: Optional[nn.Module] = None, max_length: int = 64,
                 batch_size: int = 16, max_examples: Optional[int] = 256, mlm_probability: float = 0.15,
                 seed: int = 0) -> None:
        texts = _texts(data, "ForgettingMonitor")
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
            _check_tokenizer(self.tokenizer, target, "ForgettingMonitor")
            self.examples = _lm_examples(self.texts, self.tokenizer, self.kind, self.max_length,
                                         self.mlm_probability, self.seed, pack=False)
            if not self.examples:
                raise ValueError("fastft.ForgettingMonitor: no held-out text has a token to predict (all too short)")
            return
        encoder = getattr(model, "encoder", model)
        if not any(True for _ in encoder.parameters()):
            raise ValueError("fastft.ForgettingMonitor: the model has neither an LM head nor an encoder to compare")
        _check_tokenizer(self.tokenizer, encoder, "ForgettingMonitor")
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
                pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
                total, count = 0.0, 0
                for i in range(0, len(self.examples), self.batch_size):
                    chunk = self.examples[i:i + self.batch_size]
                    batch = _pad(chunk, pad, device)
                    n = int((batch["labels"][:, 1:] != -100).sum()) if self.kind == "causal" else int(
                        (batch["labels"] != -100).sum())
                    if n:
                        total += float(_lm_loss(target, batch)) * n
                        count += n
                loss = total / max(count, 1)
                return {"pretrain_loss": loss, "pretrain_ppl": math.exp(min(loss, 700.0))}
            now, ref = self._pooled(target, device), self._pooled(self.reference.to(device), device)
            return {"repr_cka": _linear_cka(now, ref),
                    "repr_cosine": float(nn.functional.cosine_similarity(now, ref, dim=-1).mean())}
        finally:
            target.train(was)

    def _pooled(self, encoder: nn.Module, device: torch.device) -> Tensor:
        from .heads import _last_hidden_state
        from .pooling import masked_mean_pool

        out = []
        for i in range(0, len(self.encoded), self.batch_size):
            ids, mask = _right_pad(self.encoded[i:i + self.batch_size])
            hidden = _last_hidden_state(encoder(input_ids=ids.to(device), attention_mask=mask.to(device)))
            out.append(masked_mean_pool(hidden.float(), mask.to(device)).cpu())
        return torch.cat(out).double()

    def on_fit_start(self, trainer) -> None:
        if self.baseline is None:
            self.setup(trainer.model)
            self.baseline = self.measure(trainer.model)

    def on_evaluate(self, trainer, record: Dict[str, float]) -> None:
        values = self.measure(trainer.model)
        if "pretrain_loss" in values:
            values["pretrain_loss_rise"] = values["pretrain_loss"] - self.baseline["pretrain_loss"]
        record.update(values)
        self.records.append(dict(record))

    def on_fit_end(self, trainer) -> None:
        from .distributed import is_main_process

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
        epochs = [0] + [r["epoch"] for r in self.records]
        base = self.baseline.get(key, 1.0 if key == "repr_cka" else float("nan"))
        ax.plot(epochs, [base] + [r[key] for r in self.records], "o-", color="tab:red", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key, color="tab:red")
        if task_key:
            ax2 = ax.twinx()
            ax2.plot(epochs[1:], [r[task_key] for r in self.records], "s-", color="tab:blue", label=task_key)
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
    from .train import Trainer

    kind = lm_kind(model) if objective == "auto" else objective
    if kind not in ("causal", "masked"):
        raise ValueError(f"fastft.continue_pretraining: objective must be 'causal' or 'masked' ('auto' needs a "
                         f"*ForCausalLM / *ForMaskedLM model, got {type(model).__name__})")
    _check_tokenizer(tokenizer, model, "continue_pretraining")
    texts = _texts(domain_text, "continue_pretraining")
    examples = _lm_examples(texts, tokenizer, kind, block_size, mlm_probability, seed, pack=True)
    if not examples:
        raise ValueError(f"fastft.continue_pretraining: the domain text has fewer than block_size={block_size} tokens")
    trainer_kwargs.setdefault("metrics", ())
    trainer_kwargs.setdefault("progress", False)
    trainer = Trainer(model, examples, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                      group_by_length=False, **trainer_kwargs)
    return trainer.fit()


# --- the prompting baseline -----------------------------------------------------------------------


@torch.no_grad()
def _label_scores(lm: nn.Module, prompts: List[List[int]], label_ids: List[List[int]], device: torch.device,
                  max_length: int, batch_size: int) -> Tensor:
    """[N, C] log-likelihood of each label's tokens after each prompt. Single-token labels take one
    forward per prompt (batched, right-padded); longer ones one forward per (prompt, label)."""
    n_classes = len(label_ids)
    out = torch.empty(len(prompts), n_classes)
    if all(len(ids) == 1 for ids in label_ids):
        first = torch.tensor([ids[0] for ids in label_ids])
        for i in range(0, len(prompts), batch_size):
            rows = [p[-max_length:] for p in prompts[i:i + batch_size]]
            ids, mask = _right_pad(rows)
            logits = lm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            last = logits[torch.arange(len(rows)), mask.sum(1) - 1]
            out[i:i + len(rows)] = torch.log_softmax(last, -1)[:, first]
        return out
    for i, prompt in enumerate(prompts):
        for c, ids in enumerate(label_ids):
            full = (prompt + ids)[-max_length:]
            logits = lm(input_ids=torch.tensor([full], device=device)).logits[0].float()
            logp = torch.log_softmax(logits[:-1], -1)
            target = torch.tensor(full[-len(ids):], device=device)
            out[i, c] = float(logp[-len(ids):].gather(1, target[:, None]).sum())
    return out

DEFAULT_TEMPLATE = "Text: {text}\nLabel:"


def few_shot_prompt(examples: Sequence[Tuple[str, str]], query: str, template: str = DEFAULT_TEMPLATE,
                    separator: str = "\n\n") -> str:
    """An in-context classification prompt: each ``(text, label word)`` example as ``template`` followed
    by its label word, then the query's template with the label left open."""
    parts = [template.format(text=t) + " " + str(label) for t, label in examples]
    parts.append(template.format(text=query))
    return separator.join(parts)


@torch.no_grad()
def evaluate_prompting(lm: nn.Module, tokenizer: Any, examples: Sequence[Tuple[str, int]],
                       test_data: Sequence[Tuple[str, int]], labels: Sequence[str], shots: Sequence[int] = (0, 4),
                       template: str = DEFAULT_TEMPLATE, seed: int = 0, max_length: int = 512,
                       batch_size: int = 16) -> Dict[str, float]:
    """Zero- and k-shot in-context classification accuracy of a causal LM.

    For every test text and every class, the log-likelihood of the class's label word (``labels[c]``,
    e.g. ``["negative", "positive"]``) after the prompt decides: the most likely label wins. The
    k demonstrations come from ``examples`` (``(text, class index)`` pairs), drawn with ``seed``,
    balanced over classes where possible, the same for every test text.

    Returns ``{"0-shot": accuracy, "4-shot": accuracy, ...}``.
    """
    if lm_kind(lm) != "causal":
        raise ValueError(f"fastft.evaluate_prompting: needs a causal LM, got {type(lm).__name__}")
    _check_tokenizer(tokenizer, lm, "evaluate_prompting")
    if not test_data:
        raise ValueError("fastft.evaluate_prompting: test_data is empty")
    device = next(lm.parameters()).device
    was = lm.training
    lm.eval()
    label_ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in labels]
    rng = random.Random(seed)
    by_class: Dict[int, List[str]] = {}
    for t, y in examples:
        by_class.setdefault(int(y), []).append(t)
    results = {}
    for k in shots:
        demos: List[Tuple[str, str]] = []
        pools = {c: rng.sample(v, len(v)) for c, v in sorted(by_class.items())}
        while len(demos) < k and any(pools.values()):
            for c in sorted(pools):
                if pools[c] and len(demos) < k:
                    demos.append((pools[c].pop(), labels[c]))
        rng.shuffle(demos)
        prompts = [tokenizer(few_shot_prompt(demos, text, template), add_special_tokens=False)["input_ids"]
                   for text, _ in test_data]
        scores = _label_scores(lm, prompts, label_ids, device, max_length, batch_size)
        predictions = scores.argmax(-1).tolist()
        results[f"{k}-shot"] = sum(int(p == int(y)) for p, (_, y) in zip(predictions, test_data)) / len(test_data)
    lm.train(was)
    return results
