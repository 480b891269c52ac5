"""Turning the user's data into batches: example normalisation, dynamic padding, length-grouped order."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["prepare_examples", "Collator", "batch_order", "example_length", "loss_terms"]


def _is_text(x: Any) -> bool:
    return isinstance(x, str)


def prepare_examples(data: Any, tokenizer=None, max_length: Optional[int] = None, what: str = "data",
                     where: str = "fastft.Trainer") -> List[Any]:
    """Normalise a data set to a list of examples the collator understands.

    Accepted: a sequence / ``torch.utils.data.Dataset`` / ``datasets.Dataset`` of
    ``(input, label)`` pairs (tensors, numbers or — with a tokenizer — strings) or of dicts
    (``input_ids``, ``attention_mask``, ``labels`` ...). With a tokenizer, text pairs are tokenized
    once, here (truncated to ``max_length``), so batches only pad. Errors name ``where`` (the entry
    point the user called) and ``what`` (the argument).
    """
    try:
        n = len(data)
    except TypeError:
        raise TypeError(f"{where}: {what} must be a sized sequence or Dataset (got {type(data).__name__})")
    if n == 0:
        raise ValueError(f"{where}: {what} is empty")
    examples = [data[i] for i in range(n)]
    first = examples[0]
    if isinstance(first, dict):
        return [dict(e) for e in examples]
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise TypeError(f"{where}: each example of {what} must be an (input, label) pair or a dict, "
                        f"got {type(first).__name__}")
    if _is_text(first[0]):
        if tokenizer is None:
            raise ValueError(f"{where}: {what} holds text; pass tokenizer=... to tokenize it")
        texts = [e[0] for e in examples]
        enc = tokenizer(texts, truncation=max_length is not None, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return [{**{k: enc[k][i] for k in keys}, "labels": e[1]} for i, e in enumerate(examples)]
    return [tuple(e) for e in examples]


def example_length(example: Any) -> int:
    """Token count of an example (for length grouping); 1 for fixed-size tensor inputs."""
    if isinstance(example, dict):
        ids = example.get("input_ids")
        return len(ids) if ids is not None else 1
    x = example[0]
    return int(x.shape[0]) if isinstance(x, Tensor) and x.dim() >= 1 else 1


def loss_terms(example: Any, causal: bool = False) -> int:
    """How many terms an example adds to a model's own mean loss: its target tokens when its labels
    are a sequence (labels other than -100; after the one-token shift of a causal LM), else 1.

    The trainers weigh each micro-batch and each rank by these counts, so a token-mean loss over a
    step's whole batch comes out the same however the batch is split (accumulation, processes).
    """
    if isinstance(example, dict):
        labels = example.get("labels")
        if labels is not None and _is_sequence(labels):
            labels = torch.as_tensor(labels)
            return int((labels[1:] if causal else labels).ne(-100).sum())
    return 1


def batch_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator, shuffle: bool,
                group_by_length: bool) -> List[List[int]]:
    """The batches of one epoch, as lists of example indices.

    Length grouping (as Hugging Face's ``group_by_length``): shuffle, cut into mega-batches of 50
    batches, sort each by length so a batch holds examples of similar length (little padding),
    then shuffle the batches. The longest batch goes first so an out-of-memory shows at once.
    """
    n = len(lengths)
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    if group_by_length and shuffle:
        mega = batch_size * 50
        sorted_order = []
        for i in range(0, n, mega):
            chunk = order[i:i + mega]
            sorted_order += sorted(chunk, key=lambda j: -lengths[j])
        order = sorted_order
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length and shuffle and len(batches) > 1:
        longest = max(range(len(batches)), key=lambda b: max(lengths[j] for j in batches[b]))
        rest = [b for i, b in enumerate(batches) if i != longest]
        perm = torch.randperm(len(rest), generator=generator).tolist()
        batches = [batches[longest]] + [rest[i] for i in perm]
    return batches


class Collator:
    """Stacks examples into a batch. Dict examples are padded to the longest in the batch (dynamic
    padding) with the tokenizer's pad id; ``(input, label)`` pairs become ``(inputs, labels)``."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: List[Any]):
        if isinstance(examples[0], dict):
            return self._dicts(examples)
        xs, ys = zip(*examples)
        return _stack(list(xs)), _stack(list(ys))

    def _dicts(self, examples: List[Dict[str, Any]]) -> Dict[str, Tensor]:
        batch: Dict[str, Tensor] = {}
        # Token-level labels (language modelling, tagging) are sequences too: padded with -100 (ignored).
        seq_keys = [k for k, v in examples[0].items() if _is_sequence(v)]
        longest = max(len(e[k]) for e in examples for k in seq_keys) if seq_keys else 0
        for key in examples[0]:
            values = [e[key] for e in examples]
            if key in seq_keys:
                pad = self.pad_token_id if key == "input_ids" else (-100 if key == "labels" else 0)
                out = torch.full((len(values), longest), pad, dtype=torch.long)
                for i, v in enumerate(values):
                    v = torch.as_tensor(v)
                    out[i, : len(v)] = v
                if key == "input_ids" and "attention_mask" not in examples[0]:
                    mask = torch.zeros(len(values), longest, dtype=torch.long)
                    for i, v in enumerate(values):
                        mask[i, : len(v)] = 1
                    batch["attention_mask"] = mask
                batch[key] = out
            else:
                batch[key] = _stack(values)
        return batch


def _is_sequence(v: Any) -> bool:
    return isinstance(v, (list, tuple)) or (isinstance(v, Tensor) and v.dim() == 1)


def _stack(values: List[Any]) -> Tensor:
    if isinstance(values[0], Tensor):
        return torch.stack(values)
    return torch.as_tensor(values)
