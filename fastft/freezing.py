"""Freeze plans that cost nothing below the boundary, and gradual unfreezing.

* :func:`freeze_layers` freezes the embeddings and the lowest ``n`` blocks and returns a
  :class:`FreezePlan`: the frozen prefix keeps no gradients, no optimizer state, runs in eval mode
  and without an autograd graph, so it saves no activations and backward stops at the boundary.
* :class:`GradualUnfreezing` moves the boundary down one block every epoch or every N steps
  (ULMFiT), by hand or as a trainer callback.
* :meth:`FreezePlan.enable_cache` keeps the frozen prefix's output per example and replays it (the
  trainers' ``cache_frozen=True``); the cache itself lives in :mod:`fastft.prefix_cache`.

Where the blocks are comes from :mod:`fastft.layers` (:func:`~fastft.layers.find_layers`);
layer-wise LR decay from :mod:`fastft.param_groups`. Both names are re-exported here.

Build the optimizer over *all* parameters (e.g. from :func:`layerwise_lr_groups`):
:class:`fastft.AdamW` skips parameters whose ``.grad`` is None, so frozen ones cost no state, and
starts them lazily when they unfreeze, their L2-to-init anchor then still the pretrained weight.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .layers import ModelStructure, RequiresGradAttributeError, check_bool, check_int, check_model, find_layers
from .param_groups import layerwise_lr_groups

__all__ = [
    "find_layers",
    "freeze_layers",
    "FreezePlan",
    "GradualUnfreezing",
    "layerwise_lr_groups",
    "RequiresGradAttributeError",
]

# --------------------------------------------------------------------------------------------------
# The hooks a plan installs


class _StayInEval:
    """Stands in for ``module.train`` on a frozen module: ``model.train()`` leaves it in eval mode."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        return type(self.module).train(self.module, False)


def _tensors(obj: Any, depth: int = 0) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, depth + 1)


def _trainable_parameters_behind(tensors: Sequence[Tensor]) -> List[Tensor]:
    """The trainable ``nn.Parameter`` leaves of the autograd graph that produced ``tensors``."""
    found: Dict[int, Tensor] = {}
    seen, stack = set(), []
    for t in tensors:
        if t.grad_fn is not None:
            stack.append(t.grad_fn)
        elif isinstance(t, nn.Parameter) and t.requires_grad:
            found[id(t)] = t
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            if isinstance(var, nn.Parameter) and var.requires_grad:
                found[id(var)] = var
            continue
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return list(found.values())


class _PrefixState:
    """Shared by the hooks of one plan: the model, parameter names for messages, and warn-once."""

    def __init__(self, model: nn.Module, param_names: Dict[Tensor, str]) -> None:
        self.model = model
        self.param_names = param_names
        self.warned = False

    def reentrant_checkpointing(self) -> bool:
        """True when a training module of the model uses (possibly) reentrant gradient checkpointing."""
        for m in self.model.modules():
            if getattr(m, "gradient_checkpointing", False) is True and m.training:
                func = getattr(m, "_gradient_checkpointing_func", None)
                if getattr(func, "keywords", {}).get("use_reentrant", True):
                    return True
        return False


class _GraphFreeForward:
    """Forward pre-hook + always-called forward hook that run one module of the frozen prefix under no_grad.

    It steps aside (runs with autograd) when the module is no longer entirely frozen, or when its input
    depends on trainable parameters (e.g. a soft prompt fed as ``inputs_embeds``): those need the
    backward through the prefix. Plain tensors that require grad (``enable_input_require_grads()``,
    ``inputs_embeds``) are cut. On the top module of the prefix (``last``), when reentrant gradient
    checkpointing is on, the output is returned as a leaf that requires grad: a reentrant-checkpointed
    block whose inputs need no gradient would give its parameters none either.
    """

    def __init__(self, name: str, state: _PrefixState, last: bool) -> None:
        self.name = name
        self.state = state
        self.last = last
        self.stacks: Dict[int, List[bool]] = {}  # per thread: did pre() turn grad off for this call?

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        stack = self.stacks.setdefault(threading.get_ident(), [])
        # Parameters are looked up live: something trainable added to a frozen block (an adapter) needs its graph.
        if not torch.is_grad_enabled() or any(p.requires_grad for p in module.parameters()):
            stack.append(False)
            return None
        wanting = [t for t in _tensors((args, kwargs)) if t.requires_grad]
        behind = _trainable_parameters_behind(wanting) if wanting else []
        if behind:
            self._warn(behind)
            stack.append(False)
            return None
        stack.append(True)
        torch.set_grad_enabled(False)
        return None

    def post(self, module: nn.Module, args: tuple, output: Any) -> None:
        stack = self.stacks.get(threading.get_ident())
        if not (stack and stack.pop()):
            return None
        torch.set_grad_enabled(True)
        if self.last and self.state.reentrant_checkpointing():
            first = next((t for t in _tensors(output) if t.is_floating_point()), None)
            if first is not None and first.grad_fn is None:
                first.requires_grad_(True)
        return None

    def _warn(self, behind: List[Tensor]) -> None:
        if self.state.warned:
            return
        self.state.warned = True
        names = [self.state.param_names.get(p, f"<a parameter of shape {tuple(p.shape)} outside the model>")
                 for p in behind]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warnings.warn(
            f"fastft.FreezePlan: {self.name} is in the frozen prefix, but its input depends on trainable "
            f"parameters ({shown}). It runs with autograd so that they get their gradients, which keeps the "
            "activations below the boundary. Freeze them too (requires_grad_(False)) to save that memory and "
            "time.", stacklevel=3)


# --------------------------------------------------------------------------------------------------
# FreezePlan

_PLANS: "weakref.WeakKeyDictionary[nn.Module, FreezePlan]" = weakref.WeakKeyDictionary()


class FreezePlan:
    """The frozen prefix of a model: its embeddings (optionally) and its lowest ``boundary`` blocks.

    Create it with :func:`freeze_layers`. While a module is frozen by the plan:

    * its parameters have ``requires_grad=False`` and ``.grad`` None, so they get no gradients and
      :class:`fastft.AdamW` keeps no state for them;
    * it stays in eval mode (``model.train()`` does not reach it), so its dropout is off and the
      frozen prefix is deterministic;
    * when the embeddings are frozen, the prefix (embeddings and frozen blocks) runs under
      ``torch.no_grad()``: it builds no autograd graph, saves no activations, and backward stops at
      the boundary, even when something upstream requires grad (``enable_input_require_grads()``,
      ``inputs_embeds`` that require grad). Only trainable ``nn.Parameter`` upstream (a soft prompt)
      keeps the graph, with a warning. With ``embeddings=False`` the frozen blocks must carry the
      embeddings' gradient, so they keep their activations.

    Unfreezing restores each parameter's ``requires_grad`` as it was before the plan froze it (so
    parameters frozen by other means, e.g. a LoRA base, stay frozen) and lets the module follow the
    model's train/eval mode again. Tied weights are one parameter: freezing the embeddings of GPT-2
    or T5 also freezes their tied output layer.

    Attributes:
        model: the model.
        layers: its blocks, lowest first (see :func:`find_layers`).
        num_layers: ``len(layers)``.
    """

    def __init__(self, model: nn.Module, structure: ModelStructure, embeddings: bool) -> None:
        self.model = model
        self._s = structure
        self.layers = structure.layers
        self.num_layers = structure.num_layers
        self._freeze_embeddings = embeddings
        self._boundary = 0
        self._embeddings_frozen = False
        self._original: Dict[Tensor, bool] = {}
        self._modules: List[nn.Module] = []
        self._handles: list = []
        self._replaced = False
        self._cache = None

    # -- queries ----------------------------------------------------------------------------------
    @property
    def boundary(self) -> int:
        """Number of frozen blocks: blocks ``[0, boundary)`` are frozen, ``layers[boundary]`` is the lowest trained."""
        return self._boundary

    @property
    def embeddings_frozen(self) -> bool:
        """Whether the plan holds the embeddings frozen now."""
        return self._embeddings_frozen

    def frozen_parameters(self) -> List[Tensor]:
        """The model's parameters that are frozen now (``requires_grad=False``), each once, in model order."""
        self._check_live("frozen_parameters")
        return [p for p in self.model.parameters() if not p.requires_grad]

    def trainable_parameters(self) -> List[Tensor]:
        """The model's parameters that train now (``requires_grad=True``), each once, in model order."""
        self._check_live("trainable_parameters")
        return [p for p in self.model.parameters() if p.requires_grad]

    def __repr__(self) -> str:
        if self._replaced:
            return "FreezePlan(replaced by a later freeze_layers call)"
        frozen = sum(p.numel() for p in self._original)
        total = sum(p.numel() for p in self.model.parameters())
        emb = "frozen" if self._embeddings_frozen else "trainable"
        return (f"FreezePlan(boundary={self._boundary} of {self.num_layers} blocks, embeddings {emb}, "
                f"{frozen:,} of {total:,} parameters frozen by the plan)")

    # -- changes ----------------------------------------------------------------------------------
    def set_boundary(self, k: int) -> None:
        """Freeze blocks ``[0, k)`` and unfreeze the others; the embeddings stay frozen if the plan froze them.

        Args:
            k: number of blocks to keep frozen, ``0 <= k <= num_layers``.
        Raises:
            TypeError/ValueError: ``k`` is not an int in range; nothing changes then.
            RequiresGradAttributeError: some module had ``requires_grad`` assigned as an attribute.
        """
        self._check_live("set_boundary")
        check_model(self.model, "FreezePlan.set_boundary")
        k = check_int(k, "k", 0, self.num_layers, "FreezePlan.set_boundary")
        self._apply(k, self._freeze_embeddings)

    def unfreeze_all(self) -> None:
        """Unfreeze every block and the embeddings, restoring the model as it was before the plan.

        ``set_boundary`` can freeze again afterwards.
        """
        self._check_live("unfreeze_all")
        check_model(self.model, "FreezePlan.unfreeze_all")
        self._apply(0, False)

    @property
    def prefix_cache(self):
        """The plan's :class:`fastft.prefix_cache.PrefixCache` (from :meth:`enable_cache`), or None."""
        return self._cache

    def enable_cache(self, dtype: Any = None, memory_mb: float = 1024.0, folder: Any = None):
        """Keep the frozen prefix's output per example and replay it (see :mod:`fastft.prefix_cache`).

        The plan owns one cache; a second call closes the first. The cache follows the boundary: when
        it moves (:meth:`set_boundary`, :class:`GradualUnfreezing`) the kept states are dropped and
        refill lazily. Replacing the plan (a later :func:`freeze_layers` on the model) closes it.

        Args:
            dtype: the dtype states are kept in (``"fp32"``, ``"bf16"``, ``"fp16"`` or a torch dtype);
                None: the dtype of the blocks' output.
            memory_mb: megabytes kept in memory before states spill to a memory-mapped file (>= 0).
            folder: the spill file's folder (a run folder); None: a temporary folder.
        Returns:
            the :class:`~fastft.prefix_cache.PrefixCache`; feed it batches with its ``run`` method.
        Raises:
            ValueError: bad ``dtype`` / ``memory_mb``, embeddings left trainable (``embeddings=False``),
                or an encoder-decoder model; nothing changes then.
        """
        self._check_live("enable_cache")
        from .prefix_cache import PrefixCache

        cache = PrefixCache(self, dtype=dtype, memory_mb=memory_mb, folder=folder)
        if self._cache is not None:
            self._cache.close()
        self._cache = cache
        return cache

    def state_dict(self) -> Dict[str, Any]:
        """Where the boundary is now, for checkpoints: ``{"boundary": int, "embeddings_frozen": bool}``."""
        return {"boundary": self._boundary, "embeddings_frozen": self._embeddings_frozen}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Put the boundary back where :meth:`state_dict` saw it (a plan thawed to nothing unfreezes all).

        Raises:
            ValueError: the state does not fit this plan (too many blocks, or frozen embeddings for a
                plan made with ``embeddings=False``); nothing changes then.
        """
        self._check_live("load_state_dict")
        try:
            boundary, emb = int(state["boundary"]), bool(state["embeddings_frozen"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("fastft.FreezePlan.load_state_dict: expected a dict with 'boundary' and "
                             "'embeddings_frozen' (from state_dict())") from None
        if not 0 <= boundary <= self.num_layers:
            raise ValueError(f"fastft.FreezePlan.load_state_dict: boundary={boundary} does not fit a plan of "
                             f"{self.num_layers} blocks")
        if emb and not self._freeze_embeddings:
            raise ValueError("fastft.FreezePlan.load_state_dict: the state has frozen embeddings but this plan was "
                             "made with embeddings=False")
        check_model(self.model, "FreezePlan.load_state_dict")
        if emb or boundary > 0:
            self._apply(boundary, emb)
        else:
            self.unfreeze_all()

    # -- internals --------------------------------------------------------------------------------
    def _check_live(self, what: str) -> None:
        if self._replaced:
            raise RuntimeError(f"fastft.FreezePlan.{what}: this plan was replaced by a later freeze_layers() call "
                               "on the same model; use the plan that call returned")

    def _release(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self._modules:
            if isinstance(m.__dict__.get("train"), _StayInEval):
                del m.__dict__["train"]
        for m in self._modules:
            m.train(self.model.training)
        self._modules = []
        for p, rg in self._original.items():
            p.requires_grad_(rg)
        self._original = {}

    def _apply(self, k: int, embeddings: bool) -> None:
        self._release()
        s = self._s
        units: List[Tuple[List[nn.Module], List[Tensor]]] = []
        if embeddings:
            units.append((list(s.embedding_modules), s.embedding_params))
        for i in range(k):
            units.append(([self.layers[i]] + s.attached_modules.get(i, []), s.block_params[i]))
        names = {m: n for n, m in self.model.named_modules()}
        state = _PrefixState(self.model, s.param_names)
        for u, (mods, params) in enumerate(units):
            for p in params:
                if p not in self._original:
                    self._original[p] = p.requires_grad
                p.requires_grad_(False)
                p.grad = None
            for m in mods:
                self._modules.append(m)
                m.__dict__["train"] = _StayInEval(m)
                m.train(False)
                if embeddings:
                    hook = _GraphFreeForward(names.get(m, type(m).__name__), state, last=u == len(units) - 1)
                    self._handles.append(m.register_forward_pre_hook(hook.pre, with_kwargs=True, prepend=True))
                    self._handles.append(m.register_forward_hook(hook.post, always_call=True))
        self._boundary = k
        self._embeddings_frozen = embeddings


def freeze_layers(model: nn.Module, n: Union[int, str], embeddings: bool = True, *,
                  layers: Optional[Sequence[nn.Module]] = None) -> FreezePlan:
    """Freeze the embeddings and the lowest ``n`` transformer blocks of ``model``.

    Calls ``requires_grad_(False)`` on them, drops their ``.grad``, keeps them in eval mode while
    the rest trains and, when the embeddings are frozen, runs the frozen prefix without an autograd
    graph (see :class:`FreezePlan`). A model holds one plan at a time: a second call first undoes the
    previous plan (which then refuses further use).

    Args:
        model: the model.
        n: number of blocks to freeze, ``0 <= n <= len(find_layers(model))``, or ``"all"`` (every
            block); all blocks with ``embeddings=True`` trains only what lies above them (the head).
        embeddings: also freeze the embeddings (token/position/patch embeddings and what their
            modules hold, e.g. BERT's embedding LayerNorm).
        layers: the blocks, lowest first, when :func:`find_layers` cannot find them.
    Returns:
        the :class:`FreezePlan`.
    Raises:
        TypeError/ValueError: bad arguments or no block list found; the model is left untouched.
        RequiresGradAttributeError: some module had ``requires_grad`` assigned as an attribute.
    """
    check_model(model, "freeze_layers")
    check_bool(embeddings, "embeddings", "freeze_layers")
    structure = ModelStructure(model, layers, "freeze_layers")
    if isinstance(n, str):
        if n != "all":
            raise TypeError(f"fastft.freeze_layers: n must be an int in [0, {structure.num_layers}] or 'all', got {n!r}")
        n = structure.num_layers
    n = check_int(n, "n", 0, structure.num_layers, "freeze_layers")
    old = _PLANS.get(model)
    if old is not None and not old._replaced:
        old._release()
        old._replaced = True
        if old._cache is not None:
            old._cache.close()
    plan = FreezePlan(model, structure, embeddings)
    plan._apply(n, embeddings)
    _PLANS[model] = plan
    return plan


# --------------------------------------------------------------------------------------------------
# GradualUnfreezing

_UNITS = {"epoch": "epoch", "epochs": "epoch", "step": "step", "steps": "step"}


def _noop_callback(*args: Any, **kwargs: Any) -> None:
    return None


class GradualUnfreezing:
    """ULMFiT's gradual unfreezing: the top frozen block first, one more every ``every`` epochs or steps.

    Each unfreezing moves ``plan.boundary`` down by one; once no block is frozen, the next one
    unfreezes the embeddings (if the plan froze them), after which :attr:`done` is True. Build the
    optimizer over all parameters (e.g. ``fastft.AdamW(fastft.layerwise_lr_groups(model, ...))``):
    the same optimizer then trains each block from the step after it unfreezes.

    By hand: call :meth:`step` once per epoch (``unit="epoch"``) or after each optimizer step
    (``unit="step"``). As a trainer callback (the Hugging Face ``TrainerCallback`` protocol and
    fastft's trainer): ``on_epoch_end`` counts epochs, ``on_step_end`` counts steps; every other
    ``on_*`` event is a no-op.

    Args:
        plan: the :class:`FreezePlan` to thaw.
        every: unfreeze one more block every ``every`` units (an int >= 1).
        unit: ``"epoch"`` or ``"step"``.
    """

    def __init__(self, plan: FreezePlan, every: int = 1, *, unit: str = "epoch") -> None:
        if not isinstance(plan, FreezePlan):
            raise TypeError(f"fastft.GradualUnfreezing: plan must be a FreezePlan (from fastft.freeze_layers), "
                            f"got {type(plan).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"fastft.GradualUnfreezing: every must be an int >= 1 (units between unfreezings), "
                             f"got {every!r}")
        if unit not in _UNITS:
            raise ValueError(f"fastft.GradualUnfreezing: unit must be 'epoch' or 'step', got {unit!r}")
        self.plan = plan
        self.every = every
        self.unit = _UNITS[unit]
        self.count = 0

    @property
    def done(self) -> bool:
        """True when nothing is left to unfreeze."""
        return self.plan.boundary == 0 and not self.plan.embeddings_frozen

    def unfreeze_next(self) -> bool:
        """Unfreeze the next block now (the top frozen one; the embeddings last). Returns False when done."""
        if self.plan.boundary > 0:
            self.plan.set_boundary(self.plan.boundary - 1)
            return True
        if self.plan.embeddings_frozen:
            self.plan.unfreeze_all()
            return True
        return False

    def step(self) -> bool:
        """Count one unit (an epoch or an optimizer step); unfreeze the next block every ``every`` units.

        Returns:
            True if this call unfroze something.
        """
        self.count += 1
        if self.count % self.every == 0:
            return self.unfreeze_next()
        return False

    def on_epoch_end(self, *args: Any, **kwargs: Any) -> None:
        """Trainer callback: the end of an epoch (counted when ``unit="epoch"``)."""
        if self.unit == "epoch":
            self.step()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        """Trainer callback: the end of an optimizer step (counted when ``unit="step"``)."""
        if self.unit == "step":
            self.step()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return _noop_callback
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def state_dict(self) -> Dict[str, Any]:
        """The schedule's progress, for checkpoints: ``count``, ``boundary``, ``embeddings_frozen``."""
        return {"count": self.count, "boundary": self.plan.boundary, "embeddings_frozen": self.plan.embeddings_frozen}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: restores the count and puts the plan's boundary back."""
        try:
            count, boundary, emb = int(state["count"]), int(state["boundary"]), bool(state["embeddings_frozen"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("fastft.GradualUnfreezing.load_state_dict: expected a dict with 'count', 'boundary' "
                             "and 'embeddings_frozen' (from state_dict())") from None
        if count < 0 or not 0 <= boundary <= self.plan.num_layers:
            raise ValueError(f"fastft.GradualUnfreezing.load_state_dict: count={count}, boundary={boundary} do not "
                             f"fit a plan of {self.plan.num_layers} blocks")
        self.plan.load_state_dict({"boundary": boundary, "embeddings_frozen": emb})
        self.count = count

    def __repr__(self) -> str:
        return (f"GradualUnfreezing(every={self.every} {self.unit}s, count={self.count}, "
                f"boundary={self.plan.boundary}, embeddings_frozen={self.plan.embeddings_frozen})")


