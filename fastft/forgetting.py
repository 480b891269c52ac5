"""Forgetting: measure it (``ForgettingMonitor``), adapt to a domain first (``continue_pretraining``),
weigh what the pretrained weights know (``estimate_fisher``, for EWC in :class:`fastft.AdamW`) and
trade task skill against it after training (``interpolate`` / ``wise_ft_sweep``: WiSE-FT).

What limits it lives where it acts: replay in :mod:`fastft.train.replay`, L2-to-init in
:class:`fastft.AdamW` (which parameters are anchored: :mod:`fastft.param_groups`), freezing in
:mod:`fastft.freezing`. The language-model helpers are in :mod:`fastft.lm`, the prompting baseline in
:mod:`fastft.prompting`; their public names are re-exported here."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

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

__all__ = ["ForgettingMonitor", "Replay", "continue_pretraining", "estimate_fisher", "interpolate", "wise_ft_sweep",
           "pack_blocks", "mask_tokens", "few_shot_prompt", "evaluate_prompting", "lm_kind", "FISHER_KINDS"]


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


# --- EWC's importance: the diagonal Fisher -------------------------------------------------------------

#: What :func:`estimate_fisher` can estimate: the empirical Fisher (observed targets) or the true
#: Fisher (targets sampled from the model).
FISHER_KINDS = ("empirical", "true")


def _check_count(name: str, value: Any, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"fastft.estimate_fisher: {name} must be {'None or ' if optional else ''}an int >= {low}, "
                         f"got {value!r}")


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 when it is float64."""
    return t if t.dtype == torch.float64 else t.float()


def _sampled_loss(logits: Tensor, keep: Tensor, generator: torch.Generator) -> Tensor:
    """Mean negative log-likelihood of targets drawn from ``softmax(logits)`` at the rows ``keep`` of
    ``logits`` ``[..., C]``: one Monte-Carlo sample of the true Fisher's targets per row."""
    rows = _wide(logits[keep])
    with torch.no_grad():
        drawn = torch.multinomial(torch.softmax(rows, dim=-1), 1, generator=generator)[:, 0]
    return nn.functional.cross_entropy(rows, drawn)


def _lm_batches(model: nn.Module, data: Any, tokenizer: Any, kind: str, max_length: int, batch_size: int,
                seed: int, device: torch.device) -> Iterator[Dict[str, Tensor]]:
    items = list(data)
    if items and isinstance(items[0], dict):
        examples = [{"input_ids": list(e["input_ids"]), "labels": list(e.get("labels", e["input_ids"]))} for e in items]
        pad = pad_id_of(tokenizer)
    else:
        texts = read_texts(items, "estimate_fisher")
        check_tokenizer(tokenizer, model, "estimate_fisher")
        examples = lm_examples(texts, tokenizer, kind, max_length, seed=seed, pack=False)
        pad = pad_id_of(tokenizer)
    if not examples:
        raise ValueError("fastft.estimate_fisher: no text has a token to predict (all too short)")
    for i in range(0, len(examples), batch_size):
        yield pad_lm_batch(examples[i:i + batch_size], pad, device)


def _lm_loss_of(model: nn.Module, kind: str, fisher: str, generator: torch.Generator) -> Callable[[Any], Tensor]:
    def loss(batch: Dict[str, Tensor]) -> Tensor:
        if fisher == "empirical":
            return _wide(lm_loss(model, batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        if kind == "causal":  # the logits at t predict token t + 1, as the model's own loss shifts them
            logits, labels = logits[:, :-1], labels[:, 1:]
        return _sampled_loss(logits, labels != -100, generator)
    return loss


def _task_batches(data: Any, tokenizer: Any, max_length: Optional[int], batch_size: int,
                  device: torch.device) -> Iterator[Any]:
    from .train.data import Collator, prepare_examples, to_device

    examples = prepare_examples(data, tokenizer, max_length, "data", "fastft.estimate_fisher")
    for i, e in enumerate(examples):
        y = e.get("labels") if isinstance(e, dict) else e[1]
        if y is None or isinstance(y, str):
            raise ValueError(f"fastft.estimate_fisher: data[{i}] has the label {y!r}; the task loss of a classifier "
                             "needs class ids (ints) or float targets, as the model was trained on")
    collate = Collator(pad_token_id=pad_id_of(tokenizer))
    for i in range(0, len(examples), batch_size):
        yield to_device(collate(examples[i:i + batch_size]), device)


def _task_loss_of(model: nn.Module, fisher: str, generator: torch.Generator) -> Callable[[Any], Tensor]:
    from .train.trainer import model_output_field

    def loss(batch: Any) -> Tensor:
        if isinstance(batch, dict):
            labels = batch["labels"]
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
        else:
            x, labels = batch
            out = model(x)
        logits = model_output_field(out, "logits")
        if logits is None:
            raise TypeError(f"fastft.estimate_fisher: {type(model).__name__}'s output has no logits "
                            f"({type(out).__name__}); a classifier must return them")
        regression = labels.dtype.is_floating_point or logits.shape[-1] == 1
        if fisher == "true":
            if regression:
                raise ValueError("fastft.estimate_fisher: fisher='true' needs a classifier's class distribution; a "
                                 "regression model (float targets, one output) has none: use fisher='empirical'")
            return _sampled_loss(logits, torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device),
                                 generator)
        if regression:
            return nn.functional.mse_loss(_wide(logits).squeeze(-1), labels.to(_wide(logits).dtype))
        return nn.functional.cross_entropy(_wide(logits), labels)
    return loss


def normalise_importance(importance: Mapping[str, Tensor], where: str = "fastft.normalise_importance"
                         ) -> Dict[str, Tensor]:
    """``importance`` divided by the mean of all its entries (over every tensor together), so that the
    mean is 1 and λ of L2-to-init means the same with and without it.

    Raises:
        ValueError: every entry is 0 (or some are not finite): there is nothing to weigh by.
    """
    total = sum(float(f.double().sum()) for f in importance.values())
    count = sum(f.numel() for f in importance.values())
    mean = total / max(count, 1)
    if not (math.isfinite(mean) and mean > 0):
        raise ValueError(f"{where}: the importances sum to {total} over {count} entries; they must be finite with "
                         "some entry > 0 (all gradients were zero: is the data's loss independent of the parameters?)")
    return {name: f / mean for name, f in importance.items()}


def estimate_fisher(model: nn.Module, data: Any, tokenizer: Any = None, *, batches: Optional[int] = None,
                    batch_size: int = 1, max_length: Optional[int] = 128, fisher: str = "empirical",
                    seed: int = 0) -> Dict[str, Tensor]:
    r"""The diagonal Fisher information of ``model``'s parameters on ``data``: EWC's importance.

    Returns, for every parameter that requires a gradient, the mean over batches of its squared
    gradient, normalised so that the mean of all entries (of all parameters together) is 1: plugged
    into :meth:`fastft.AdamW.set_importance` (or ``fastft.Trainer(l2_init_importance=...)``) the
    pull ``λ F ⊙ (p − p0)`` then has the same overall strength as plain L2-to-init with the same λ,
    redistributed toward the entries the model's predictions depend on (Kirkpatrick et al., 2017,
    "Overcoming catastrophic forgetting in neural networks", PNAS: elastic weight consolidation).

    Which Fisher (Kunstner, Balles & Hennig, 2019, "Limitations of the empirical Fisher approximation
    for natural gradient descent", NeurIPS):

    * ``fisher="empirical"`` (default, what this function is specified to compute): the gradients of
      the loss at the *observed* targets — the text's own next tokens (masked tokens for a masked
      LM) or the given labels: :math:`\hat F = rac1N \sum_n (
abla_	heta \ell(x_n, y_n))^2`.
      It is the quantity most EWC implementations compute, but it is not the Fisher: Kunstner et al.
      show it can differ from it markedly (it equals it only where the model's distribution is the
      data's), so read it as "how much the loss on this text depends on each weight".
    * ``fisher="true"``: targets *sampled from the model's own predictive distribution* at every
      target position (one seeded Monte-Carlo sample each), so that in expectation
      :math:`F = \mathbb E_x \mathbb E_{y \sim p_	heta(\cdot|x)} [(
abla_	heta \log p_	heta(y|x))^2]`,
      the Fisher information Kirkpatrick et al. define EWC with. Needs logits (the model's own forward,
      no fused loss) and a class distribution (not for regression).

    Granularity: each batch contributes the square of the gradient of its mean loss. With
    ``batch_size=1`` (default) that is one example's gradient — the definition above (per sequence for
    a language model, whose loss is its token mean). Larger batches are faster but estimate
    :math:`\mathrm{Var}/B + (	ext{mean gradient})^2` instead, a different shape, not only a scale.

    The model runs in eval mode (no dropout), its ``.grad`` fields are not touched, and its
    parameters do not change. Frozen parameters (``requires_grad=False``) get no entry.

    Args:
        model: a causal / masked LM (``*ForCausalLM``, ``*ForMaskedLM``...: its own LM loss) or a
            classifier returning logits (``[B, C]``; its task loss, cross-entropy, MSE for float
            targets or one output).
        data: for an LM, texts (or ``(text, label)`` pairs, labels ignored) or dicts with
            ``input_ids`` (and ``labels``, default the ids); for a classifier, labelled examples as
            :class:`fastft.Trainer` takes them (``(text, class_id)`` pairs with a tokenizer, dicts with
            ``input_ids`` and ``labels``, ``(tensor, label)`` pairs).
        tokenizer: tokenizes text (a Hugging Face tokenizer); its pad id pads batches.
        batches: use at most this many batches, in data order (None: all of ``data``).
        batch_size: examples per gradient (see Granularity). Default 1.
        max_length: tokens kept per text (truncation). Default 128.
        fisher: ``"empirical"`` or ``"true"`` (see above).
        seed: seeds a masked LM's masks and the true Fisher's sampled targets.

    Returns:
        ``{name: F}`` keyed like ``model.named_parameters()``; each ``F`` has its parameter's shape,
        device and float32 dtype (float64 for float64 parameters), entries ``>= 0``, mean 1 overall.

    Raises:
        ValueError: a bad ``batches`` / ``batch_size`` / ``max_length`` / ``fisher``; empty data, text
            without a tokenizer, classifier data without class ids; no trainable parameter; every
            gradient zero. TypeError: a model whose output has no loss / logits.
    """
    _check_count("batches", batches, 1, optional=True)
    _check_count("batch_size", batch_size, 1)
    _check_count("max_length", max_length, 2, optional=True)
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fastft.estimate_fisher: fisher must be one of {FISHER_KINDS}, got {fisher!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastft.estimate_fisher: model must be an nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("fastft.estimate_fisher: the model has no parameter that requires a gradient")
    device = named[0][1].device
    generator = torch.Generator(device=device).manual_seed(seed)
    kind = lm_kind(model)
    if kind is not None:
        source = _lm_batches(model, data, tokenizer, kind, max_length or 128, batch_size, seed, device)
        loss_of = _lm_loss_of(model, kind, fisher, generator)
    else:
        source = _task_batches(data, tokenizer, max_length, batch_size, device)
        loss_of = _task_loss_of(model, fisher, generator)
    first = next(source)  # the data's errors before any gradient

    def all_batches() -> Iterator[Any]:
        yield first
        yield from source

    params = [p for _, p in named]
    sums = [torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32,
                             memory_format=torch.contiguous_format) for p in params]
    was_training = model.training
    model.eval()
    count = 0
    try:
        with torch.enable_grad():
            for batch in all_batches():
                if batches is not None and count >= batches:
                    break
                loss = loss_of(batch)
                if not torch.isfinite(loss):
                    raise ValueError(f"fastft.estimate_fisher: the loss of batch {count} is {float(loss)}; the "
                                     "Fisher needs finite losses")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    for acc, g in zip(sums, grads):
                        if g is not None:
                            g = g.detach().to(acc.dtype)
                            acc.addcmul_(g, g)
                count += 1
    finally:
        model.train(was_training)
    return normalise_importance({n: acc / count for (n, _), acc in zip(named, sums)}, "fastft.estimate_fisher")


def check_importance_args(importance: Any, data: Any, l2_init: float, where: str) -> None:
    """The checks of ``fastft.Trainer(l2_init_importance=..., importance_data=...)`` made before any work."""
    if importance is None:
        if data is not None:
            raise ValueError(f"{where}: importance_data is only read with l2_init_importance='fisher'; set it, or drop "
                             "importance_data")
        return
    if isinstance(importance, str):
        if importance != "fisher":
            raise ValueError(f"{where}: l2_init_importance must be 'fisher' (estimated on importance_data), a dict "
                             f"name -> tensor (e.g. from fastft.estimate_fisher) or None, got {importance!r}")
        if data is None:
            raise ValueError(f"{where}: l2_init_importance='fisher' estimates the Fisher on importance_data: pass "
                             "importance_data=<text of the pretraining distribution> (labelled examples of the "
                             "earlier task for a classifier)")
    elif not isinstance(importance, Mapping):
        raise ValueError(f"{where}: l2_init_importance must be 'fisher', a dict name -> tensor or None, got "
                         f"{type(importance).__name__}")
    if not l2_init:
        raise ValueError(f"{where}: l2_init_importance weights the L2-to-init pull, which l2_init=0 turns off; set "
                         "l2_init > 0 (with a mean-1 importance, λ as for plain L2-to-init)")


def anchored_importance(model: nn.Module, optimizer: Any, importance: Union[str, Mapping[str, Tensor]], data: Any,
                        tokenizer: Any, max_length: Optional[int], where: str) -> Dict[Tensor, Tensor]:
    """The importance of every parameter ``optimizer`` anchors (trainable, in a group with
    ``l2_init > 0``), keyed by parameter for :meth:`fastft.AdamW.set_importance`: from a dict keyed
    like ``model.named_parameters()`` (entries of other parameters ignored), or with ``"fisher"``
    :func:`estimate_fisher` on ``data``, kept for the anchored parameters and normalised to mean 1
    over them."""
    named = dict(model.named_parameters())
    anchored = {id(p) for g in optimizer.param_groups if float(g["l2_init"]) != 0.0
                for p in g["params"] if p.requires_grad}
    if isinstance(importance, str):
        fisher = estimate_fisher(model, data, tokenizer, max_length=max_length or 128)
        chosen = {n: f for n, f in fisher.items() if id(named[n]) in anchored}
        if not chosen:
            raise ValueError(f"{where}: no parameter the Fisher was estimated for is anchored by L2-to-init")
        chosen = normalise_importance(chosen, where)
    else:
        unknown = [n for n in importance if n not in named]
        if unknown:
            raise ValueError(f"{where}: l2_init_importance names {len(unknown)} tensors that are not parameters of "
                             f"{type(model).__name__} ({', '.join(map(str, unknown[:3]))}...); key it like "
                             "model.named_parameters()")
        for n, f in importance.items():
            if not isinstance(f, Tensor) or tuple(f.shape) != tuple(named[n].shape):
                got = f"shape {tuple(f.shape)}" if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"{where}: l2_init_importance[{n!r}] has {got}, the parameter shape "
                                 f"{tuple(named[n].shape)}")
        chosen = {n: f for n, f in importance.items() if id(named[n]) in anchored}
    return {named[n]: f for n, f in chosen.items()}


# --- WiSE-FT: interpolating fine-tuned and pretrained weights ------------------------------------------


def _anchor_pairs(model: nn.Module, anchors: Any, where: str) -> List[Tuple[str, Tensor, Tensor]]:
    """(name, parameter, its pretrained value) for every parameter of ``model`` that ``anchors`` holds;
    every check before anything changes."""
    from .optim import AdamW

    named = list(model.named_parameters())
    if isinstance(anchors, AdamW):
        pairs = [(n, p, anchors.state[p]["anchor"]) for n, p in named
                 if p in anchors.state and "anchor" in anchors.state[p]]
        if not pairs:
            raise ValueError(f"{where}: the optimizer holds no anchor of this model's parameters (it takes them at a "
                             "parameter's first step, and only with l2_init > 0); pass the pretrained state dict "
                             "instead ({n: p.detach().clone() for n, p in model.named_parameters()} before training)")
    elif isinstance(anchors, Mapping):
        pairs = [(n, p, anchors[n]) for n, p in named if n in anchors]
        if not pairs:
            some = ", ".join(list(map(str, anchors))[:3])
            raise ValueError(f"{where}: none of the state dict's keys ({some}, ...) names a parameter of "
                             f"{type(model).__name__} (e.g. {named[0][0] if named else '-'}); key it like "
                             "model.named_parameters()")
    else:
        raise TypeError(f"{where}: anchors must be a fastft.AdamW holding anchors or a pretrained state dict "
                        f"(name -> tensor), got {type(anchors).__name__}")
    for n, p, a in pairs:
        if not isinstance(a, Tensor) or tuple(a.shape) != tuple(p.shape):
            got = f"shape {tuple(a.shape)}" if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(f"{where}: the anchor of {n} has {got}, the parameter shape {tuple(p.shape)}")
        if not a.is_floating_point():
            raise ValueError(f"{where}: the anchor of {n} has dtype {a.dtype}; anchors must be float tensors")
    return pairs


def _check_alpha(alpha: Any, where: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{where}: alpha must be a finite number (1 = the fine-tuned weights, 0 = the pretrained "
                         f"ones), got {alpha!r}")
    return float(alpha)


@torch.no_grad()
def _set_interpolated(pairs: Sequence[Tuple[str, Tensor, Tensor]], finetuned: Sequence[Tensor], alpha: float) -> None:
    for (_, p, a), ft in zip(pairs, finetuned):
        math_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        mixed = torch.lerp(a.to(device=p.device, dtype=math_dtype), ft.to(math_dtype), alpha)
        p.copy_(mixed)


@torch.no_grad()
def interpolate(model: nn.Module, alpha: float, anchors: Any) -> None:
    r"""WiSE-FT: set every anchored parameter to :math:`lpha\,	heta_{ft} + (1 - lpha)\,	heta_0`, in place.

    Wortsman et al., 2022, "Robust fine-tuning of zero-shot models" (CVPR): interpolating the
    fine-tuned weights toward the pretrained ones trades task skill for what the pretrained model
    knew, without retraining. :func:`wise_ft_sweep` evaluates several ``alpha`` and puts the
    fine-tuned weights back.

    Args:
        model: the fine-tuned model (its current weights are :math:`	heta_{ft}`).
        alpha: 1 keeps the fine-tuned weights, 0 restores the pretrained ones; values in between mix
            them (outside [0, 1] extrapolates). Math in float32 (float64 for float64 parameters).
        anchors: where :math:`	heta_0` comes from: a :class:`fastft.AdamW` that trained the model with
            ``l2_init > 0`` (its ``state["anchor"]``, the value each parameter had at its first step),
            or a pretrained state dict keyed like ``model.named_parameters()`` (other keys, buffers
            included, are ignored). Parameters without an anchor (a new task head, frozen
            parameters the optimizer never stepped) are left alone.

    Raises:
        ValueError: ``alpha`` not a finite number; no parameter has an anchor; an anchor of another
            shape or a non-float dtype. Nothing changes then. TypeError: ``anchors`` of another kind.
    """
    where = "fastft.interpolate"
    alpha = _check_alpha(alpha, where)
    pairs = _anchor_pairs(model, anchors, where)
    _set_interpolated(pairs, [p.detach() for _, p, _ in pairs], alpha)


def wise_ft_sweep(model: nn.Module, anchors: Any, alphas: Iterable[float],
                  evaluate: Callable[[nn.Module], Dict[str, Any]]) -> List[Dict[str, Any]]:
    r"""Evaluate ``model`` at several WiSE-FT mixing weights without retraining, then restore it.

    For each ``alpha`` the anchored parameters are set to
    :math:`lpha\,	heta_{ft} + (1 - lpha)\,	heta_0` (see :func:`interpolate`; always from the
    fine-tuned weights, never compounded) and ``evaluate(model)`` is called; its dict (e.g. the task
    metric and a forgetting measure such as :meth:`fastft.ForgettingMonitor.measure`'s
    ``pretrain_loss``) is returned with ``"alpha"`` added, one record per alpha in the given order.
    Afterwards, also when ``evaluate`` raises, the fine-tuned weights are put back bit for bit (a
    copy of the anchored parameters is held meanwhile: one model's worth of memory).

    Wortsman et al., 2022, "Robust fine-tuning of zero-shot models" (CVPR).

    Raises:
        ValueError: an empty ``alphas``, an alpha that is not a finite number, or the anchors'
            problems (see :func:`interpolate`), before anything changes. TypeError: ``evaluate`` does
            not return a dict.
    """
    where = "fastft.wise_ft_sweep"
    alphas = [_check_alpha(a, where) for a in alphas]
    if not alphas:
        raise ValueError(f"{where}: alphas is empty; give the mixing weights to evaluate, e.g. [0.0, 0.5, 1.0]")
    if not callable(evaluate):
        raise TypeError(f"{where}: evaluate must be a callable model -> dict of numbers")
    pairs = _anchor_pairs(model, anchors, where)
    finetuned = [p.detach().clone() for _, p, _ in pairs]
    records = []
    try:
        for alpha in alphas:
            _set_interpolated(pairs, finetuned, alpha)
            result = evaluate(model)
            if not isinstance(result, dict):
                raise TypeError(f"{where}: evaluate returned {type(result).__name__}; it must return a dict such as "
                                "{'accuracy': 0.9, 'pretrain_loss': 3.1}")
            records.append({"alpha": alpha, **result})
    finally:
        with torch.no_grad():
            for (_, p, _), ft in zip(pairs, finetuned):
                p.copy_(ft)
    return records
