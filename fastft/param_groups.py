"""The one rule for optimizer parameter groups: weight decay, L2-to-init anchoring, layer-wise LR.

* **No weight decay** on biases and on the weights of norm layers (LayerNorm, RMSNorm, GroupNorm,
  BatchNorm and modules whose class name contains "Norm"), as BERT's and Hugging Face's recipes do.
* **L2-to-init only on pretrained parameters.** L2-to-init keeps *pretrained* weights near their
  pretrained values; a parameter created for the task (a fresh classification head) has nothing to
  keep and is never anchored: its group gets ``l2_init=0.0``. fastft's own heads
  (:class:`fastft.SequenceClassifier`'s ``head``, :class:`fastft.MultiTaskModel`'s ``heads``) are
  marked new when they are created. Mark your own fresh modules with :func:`mark_new` (e.g. the
  ``classifier`` of a Hugging Face ``AutoModelForSequenceClassification``, which transformers
  initialises randomly), or name them in ``Trainer(new_modules=["classifier"])``.
* **Layer-wise LR decay** (ULMFiT, Howard & Ruder 2018): :func:`layerwise_lr_groups`.

:func:`param_groups` and :func:`layerwise_lr_groups` give every parameter of the model exactly one
group, frozen ones included, so an optimizer built from them also trains what unfreezes later.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Union

from torch import Tensor, nn

from .layers import ModelStructure, check_model

__all__ = ["mark_new", "new_parameters", "no_decay_parameters", "param_groups", "layerwise_lr_groups", "NEW_FLAG"]

#: The attribute :func:`mark_new` sets on a module created for the task.
NEW_FLAG = "fastft_new"

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, _NORM_TYPES) or "norm" in type(m).__name__.lower()


def mark_new(*modules: nn.Module, new: bool = True) -> None:
    """Mark ``modules`` as created for the task (``new=True``): their parameters get no L2-to-init
    (a fresh head has no pretrained value to keep). ``new=False`` clears the mark (a head loaded
    from a fine-tuned checkpoint is then anchored like the rest).

    Raises:
        TypeError: an argument is not an ``nn.Module``.
    """
    for m in modules:
        if not isinstance(m, nn.Module):
            raise TypeError(f"fastft.mark_new: expected nn.Module(s), got {type(m).__name__}")
        setattr(m, NEW_FLAG, bool(new))


def new_parameters(model: nn.Module, new_modules: Iterable[Union[str, nn.Module]] = ()) -> Set[Tensor]:
    """The parameters of ``model`` created for the task: those of modules marked with :func:`mark_new`
    and of ``new_modules`` (modules, or their qualified names in ``model``, e.g. ``"classifier"``).

    Raises:
        ValueError: a name in ``new_modules`` is not a submodule of ``model`` (the message lists the
            top-level ones).
    """
    named = dict(model.named_modules())
    chosen: List[nn.Module] = [m for m in named.values() if getattr(m, NEW_FLAG, False) is True]
    for item in new_modules:
        if isinstance(item, nn.Module):
            chosen.append(item)
        elif isinstance(item, str) and item in named:
            chosen.append(named[item])
        else:
            tops = sorted(n for n in named if n and "." not in n)
            raise ValueError(f"fastft: new_modules names {item!r}, which is not a submodule of "
                             f"{type(model).__name__}; its top-level modules: {tops}")
    return {p for m in chosen for p in m.parameters()}


def no_decay_parameters(model: nn.Module) -> Set[Tensor]:
    """Biases and the weights of norm layers: the parameters that get no weight decay."""
    out = set()
    for _, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            if pn.endswith("bias") or _is_norm(m):
                out.add(p)
    return out


def _split(name: str, params: Sequence[Tensor], no_decay: Set[Tensor], new: Set[Tensor], lr: Optional[float],
           weight_decay: Optional[float]) -> List[Dict[str, Any]]:
    groups = []
    for fresh in (False, True):
        for decayed in (True, False):
            members = [p for p in params if (p in new) == fresh and (p not in no_decay) == decayed]
            if not members:
                continue
            g: Dict[str, Any] = {"params": members,
                                 "name": name + (".new" if fresh else "") + ("" if decayed else ".no_decay")}
            if lr is not None:
                g["lr"] = lr
            if not decayed:
                g["weight_decay"] = 0.0
            elif weight_decay is not None:
                g["weight_decay"] = weight_decay
            if fresh:
                g["l2_init"] = 0.0
            groups.append(g)
    return groups


def param_groups(model: nn.Module, weight_decay: Optional[float] = None, *, lr: Optional[float] = None,
                 layerwise_lr_decay: Optional[float] = None, new_modules: Iterable[Union[str, nn.Module]] = (),
                 layers: Optional[Sequence[nn.Module]] = None) -> List[Dict[str, Any]]:
    """Parameter groups by the one rule (module docstring): no weight decay on biases and norm weights,
    ``l2_init=0.0`` on parameters created for the task, and with ``layerwise_lr_decay`` the learning
    rates of :func:`layerwise_lr_groups`.

    Args:
        model: the model.
        weight_decay: weight decay of the decayed groups; None leaves it to the optimizer.
        lr: the learning rate (of the head, with layer-wise decay); None leaves it to the optimizer.
        layerwise_lr_decay: factor per block (``0 < d <= 1``), or None for one learning rate.
        new_modules: modules (or qualified names) created for the task, besides those marked with
            :func:`mark_new`.
        layers: the blocks, lowest first, when :func:`fastft.find_layers` cannot find them.
    Returns:
        a list of dicts (``params``, ``name`` and, where the rule sets them, ``lr``, ``weight_decay``,
        ``l2_init``) covering every parameter once, for :class:`fastft.AdamW` (a torch optimizer
        keeps the ``l2_init`` key unused).
    Raises:
        ValueError / TypeError: bad arguments (see :func:`layerwise_lr_groups`, :func:`new_parameters`).
    """
    if layerwise_lr_decay is not None:
        if lr is None:
            raise ValueError("fastft.param_groups: layerwise_lr_decay needs lr= (the head's learning rate)")
        return layerwise_lr_groups(model, lr, layerwise_lr_decay, weight_decay, layers=layers, new_modules=new_modules)
    check_model(model, "param_groups")
    params = list(dict.fromkeys(model.parameters()))
    return _split("all", params, no_decay_parameters(model), new_parameters(model, new_modules), lr, weight_decay)


def layerwise_lr_groups(model: nn.Module, lr: float, decay: float, weight_decay: Optional[float] = None, *,
                        layers: Optional[Sequence[nn.Module]] = None,
                        new_modules: Iterable[Union[str, nn.Module]] = ()) -> List[Dict[str, Any]]:
    """Optimizer parameter groups with layer-wise learning-rate decay (ULMFiT's discriminative rates).

    With ``L`` blocks, a block at depth ``d`` from the top gets ``lr * decay**d``: the top block
    ``d = 0``, block ``i`` (0 = lowest) ``d = L - 1 - i``; the head (everything above the blocks:
    pooler, final norm, classifier) gets the full ``lr`` and the embeddings ``lr * decay**L``, the lowest. Biases and the weights of norm layers
    (LayerNorm, RMSNorm, GroupNorm, BatchNorm and modules whose class name contains "Norm") get no
    weight decay. Every parameter of the model is in exactly one group, frozen ones included, so an
    optimizer built from these groups also trains blocks that unfreeze later. A weight tied to the
    embeddings (a tied LM head) counts as embeddings. Empty groups are left out.

    Args:
        model: the model.
        lr: learning rate of the head (a number >= 0).
        decay: factor per block, ``0 < decay <= 1`` (1 gives every group ``lr``).
        weight_decay: weight decay of the decayed groups; None leaves it to the optimizer's default.
            The no-decay groups always get ``weight_decay=0.0``.
        layers: the blocks, lowest first, when :func:`find_layers` cannot find them.
        new_modules: modules (or names) created for the task besides those marked with
            :func:`mark_new`; their groups get ``l2_init=0.0`` (named ``"<part>.new..."``).
    Returns:
        a list of dicts with ``params``, ``lr``, ``weight_decay`` (except decayed groups when
        ``weight_decay`` is None), ``l2_init=0.0`` on groups of new parameters, and ``name`` (e.g.
        ``"encoder.layer.3"``, ``"head.no_decay"``, ``"head.new"``),
        embeddings first, head last; pass it to :class:`fastft.AdamW` or any torch optimizer.
    """
    where = "layerwise_lr_groups"
    check_model(model, where)
    for name, value, ok, rule in (
            ("lr", lr, lambda v: v >= 0, "a finite number >= 0"),
            ("decay", decay, lambda v: 0 < v <= 1, "a number in (0, 1]"),
            ("weight_decay", weight_decay, lambda v: v >= 0, "None or a finite number >= 0")):
        if value is None and name == "weight_decay":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"fastft.{where}: {name}={value!r} is invalid: it must be {rule}")
    s = ModelStructure(model, layers, where)
    L = s.num_layers
    no_decay, new = no_decay_parameters(model), new_parameters(model, new_modules)
    parts = [("embeddings", s.embedding_params, L)]
    parts += [(s.block_names[i], s.block_params[i], L - 1 - i) for i in range(L)]
    parts.append(("head", s.head_params, 0))
    groups = []
    for name, params, depth in parts:
        groups += _split(name, params, no_decay, new, lr * decay ** depth, weight_decay)
    return groups
