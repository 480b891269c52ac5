"""Turning the user's data into batches: example normalisation, dynamic padding, length-grouped order."""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["prepare_examples", "LabelNames", "Collator", "batch_order", "example_length", "loss_terms", "text_limit",
           "has_token_labels", "to_device", "without_labels", "position_limit"]


def _is_text(x: Any) -> bool:
    return isinstance(x, str)


def text_limit(model: Any, tokenizer: Any) -> Optional[int]:
    """The most tokens ``model`` reads: ``min(tokenizer.model_max_length, max_position_embeddings)``
    (either may be missing or, for the tokenizer, a huge "no limit" placeholder); None if unknown."""
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    pos = position_limit(model)
    if pos is not None:
        limits.append(pos)
    return min(limits) if limits else None


def _tokenize(texts: List[str], tokenizer: Any, max_length: Optional[int], what: str, where: str) -> Dict[str, Any]:
    """Tokenize ``texts`` (truncated to ``max_length``) and warn once with how many were cut."""
    for i, t in enumerate(texts):
        if not t.strip():
            raise ValueError(f"{where}: {what}[{i}] is an empty text; remove it (an empty text has nothing to "
                             "read or predict)")
    enc = tokenizer(texts, truncation=max_length is not None, max_length=max_length)
    for i, ids in enumerate(enc["input_ids"]):
        if len(ids) == 0:
            raise ValueError(f"{where}: {what}[{i}] ({texts[i][:40]!r}) has no tokens; remove it")
    if max_length is not None:
        full = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) == max_length]
        if full:
            lengths = tokenizer([texts[i] for i in full], truncation=False)["input_ids"]
            cut = sum(len(ids) > max_length for ids in lengths)
            if cut:
                warnings.warn(f"{where}: {cut} of {len(texts)} texts of {what} are longer than {max_length} tokens "
                              f"and were cut to their first {max_length} (max_length)", stacklevel=4)
    return enc


def prepare_examples(data: Any, tokenizer=None, max_length: Optional[int] = None, what: str = "data",
                     where: str = "fastft.Trainer", unlabelled: bool = False) -> List[Any]:
    """Normalise a data set to a list of examples the collator understands.

    Accepted: a sequence / ``torch.utils.data.Dataset`` / ``datasets.Dataset`` of
    ``(input, label)`` pairs (tensors, numbers or — with a tokenizer — strings) or of dicts
    (``input_ids``, ``attention_mask``, ``labels`` ...); with ``unlabelled=True`` (prediction) also
    plain texts or inputs. With a tokenizer, texts are tokenized once, here (truncated to
    ``max_length`` tokens; how many were cut is warned), so batches only pad. Labels are left as
    given (names are mapped by :class:`LabelNames`).

    Raises:
        TypeError: not a sized sequence, or examples of another form. ValueError: empty data, text
            without a tokenizer, an empty text (naming ``what[i]``). Errors name ``where`` (the entry
            point the user called) and ``what`` (the argument).
    """
    if unlabelled and isinstance(data, str):
        data = [data]  # one text to predict
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
    paired = isinstance(first, (tuple, list)) and len(first) == 2
    if not paired and not (unlabelled and (_is_text(first) or isinstance(first, Tensor))):
        raise TypeError(f"{where}: each example of {what} must be an (input, label) pair or a dict"
                        f"{', or a plain text / input tensor' if unlabelled else ''}, got {type(first).__name__}")
    inputs = [e[0] for e in examples] if paired else examples
    if _is_text(inputs[0]):
        if tokenizer is None:
            raise ValueError(f"{where}: {what} holds text; pass tokenizer=... to tokenize it")
        bad = next((i for i, t in enumerate(inputs) if not _is_text(t)), None)
        if bad is not None:
            raise TypeError(f"{where}: {what}[{bad}] is {type(inputs[bad]).__name__}, the others are text")
        enc = _tokenize(list(inputs), tokenizer, max_length, what, where)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        rows = [{k: enc[k][i] for k in keys} for i in range(n)]
        if paired:
            for row, e in zip(rows, examples):
                row["labels"] = e[1]
        return rows
    if paired:
        return [tuple(e) for e in examples]
    return [(x, None) for x in examples]


class LabelNames:
    """The fixed mapping between class names and ids of a classification run.

    Names are taken from ``names`` (the user's ``labels=[...]``, index = id) or, when the training
    labels are strings, are the sorted distinct training labels. Integer labels need no mapping
    (names are then optional). Once fixed, :meth:`encode` turns every example's name into its id.
    """

    def __init__(self, names: Optional[Sequence[Any]], argument: str = "labels=[...]") -> None:
        self.names = list(names) if names is not None else None
        self.argument = argument  # where the user gives the names, for messages
        self.ids = {n: i for i, n in enumerate(self.names)} if self.names is not None else None

    @classmethod
    def from_examples(cls, examples: List[Any], names: Optional[Sequence[Any]], what: str, where: str,
                      argument: str = "labels=[...]") -> "LabelNames":
        """Fix the mapping from the training ``examples`` and the user's ``names``.

        Raises:
            ValueError: ``names`` has duplicates or is empty.
        """
        if names is not None:
            names = list(names)
            if not names or len(set(names)) != len(names):
                raise ValueError(f"{where}: {argument.split('[')[0]}{names!r} must list each class name once, in "
                                 "id order")
            return cls(names, argument)
        found = {y for y in map(_scalar_label, examples) if isinstance(y, str)}
        return cls(sorted(found) if found else None, argument)

    def encode(self, examples: List[Any], what: str, where: str) -> List[Any]:
        """The examples with each string label replaced by its id (others as they are).

        Raises:
            ValueError: a label name not in the mapping (naming ``what[i]`` and the known names), or
                a string label when the run has no names.
        """
        out = []
        for i, e in enumerate(examples):
            y = _scalar_label(e)
            if isinstance(y, str):
                if self.ids is None:
                    raise ValueError(f"{where}: {what}[{i}] has the label name {y!r}, but the training labels are "
                                     f"class ids; use ids everywhere or pass {self.argument} (names in id order)")
                if y not in self.ids:
                    raise ValueError(f"{where}: {what}[{i}] has label {y!r}, which is not one of the run's labels "
                                     f"{self.names}; fix the example or pass {self.argument} listing every class")
                y = self.ids[y]
                e = {**e, "labels": y} if isinstance(e, dict) else (e[0], y)
            out.append(e)
        return out


def _scalar_label(example: Any) -> Any:
    y = example.get("labels") if isinstance(example, dict) else example[1]
    if isinstance(y, Tensor) and y.numel() == 1:
        return y.item()
    return y


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
        return _stack(list(xs)), (None if ys[0] is None else _stack(list(ys)))

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


def without_labels(examples: List[Any]) -> List[Any]:
    """The examples with their labels dropped (prediction needs none, and names are not tensors)."""
    return [{k: v for k, v in e.items() if k != "labels"} if isinstance(e, dict) else (e[0], None) for e in examples]


def position_limit(model: Any) -> Optional[int]:
    """The positions the model's embeddings have (``max_position_embeddings`` / ``n_positions``), or None."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        pos = getattr(config, name, None)
        if isinstance(pos, int) and pos > 0:
            return pos
    return None


def to_device(batch: Any, device: torch.device) -> Any:
    """A collated batch (dict or tuple) with its tensors on ``device`` (non-blocking copies)."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return tuple(v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for v in batch)


def has_token_labels(examples: List[Any]) -> bool:
    """Whether the examples' labels are per token: dict examples whose ``labels`` are a sequence of
    token ids (language modelling, tagging)."""
    for e in examples:
        if not isinstance(e, dict):
            return False
        y = e.get("labels")
        if y is not None:
            return _is_sequence(y) and not (isinstance(y, Tensor) and y.is_floating_point())
    return False


def _is_sequence(v: Any) -> bool:
    return isinstance(v, (list, tuple)) or (isinstance(v, Tensor) and v.dim() == 1)


def _stack(values: List[Any]) -> Tensor:
    if isinstance(values[0], Tensor):
        return torch.stack(values)
    return torch.as_tensor(values)
