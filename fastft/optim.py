"""``fastft.AdamW``: a drop-in ``torch.optim.AdamW`` with L2-to-init (EWC with importances) and fused
gradient clipping."""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .distributed import is_dtensor

__all__ = ["AdamW"]

_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ANCHOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MODES = ("decoupled", "coupled")


def _scalar(x: Union[float, Tensor]) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _check_number(name: str, value: Any, where: str, tensor_ok: bool = True) -> float:
    """``value`` as a float; TypeError naming ``name`` unless it is a real number (not a bool) or, where
    ``tensor_ok``, a one-element tensor, as torch.optim.AdamW accepts."""
    if tensor_ok and isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"fastft.AdamW: {name} in {where} is a tensor of shape {tuple(value.shape)}; "
                             f"a tensor {name} must have exactly one element")
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    kinds = "a float or an int" + (" (or a one-element tensor)" if tensor_ok else "")
    fix = f"pass {name} as {kinds}"
    if isinstance(value, str):
        try:
            fix = (f"pass {name}={float(value)!r}, not the string {value!r} "
                   "(YAML 1.1 reads 5e-5 as a string: write 5.0e-5)")
        except ValueError:
            pass
    raise TypeError(f"fastft.AdamW: {name}={value!r} in {where} is a {type(value).__name__}, not a number; {fix}")


def _check_hyperparameters(group: Dict[str, Any], where: str) -> None:
    """Raise TypeError naming the first hyper-parameter of ``group`` of the wrong type, or ValueError
    naming the first one out of range."""

    def bad(name: str, value: Any, rule: str) -> ValueError:
        return ValueError(f"fastft.AdamW: invalid {name}={value!r} in {where}: {rule}")

    lr = _check_number("lr", group["lr"], where)
    if not (math.isfinite(lr) and lr >= 0.0):
        raise bad("lr", group["lr"], "must be a finite number >= 0")
    eps = _check_number("eps", group["eps"], where)
    if not (math.isfinite(eps) and eps >= 0.0):
        raise bad("eps", group["eps"], "must be a finite number >= 0")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise bad("betas", betas, "must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        b = _check_number(f"betas[{i}]", b, where)
        if not (0.0 <= b < 1.0):
            raise bad(f"betas[{i}]", betas[i], "must be in [0, 1)")
    wd = _check_number("weight_decay", group["weight_decay"], where)
    if not (math.isfinite(wd) and wd >= 0.0):
        raise bad("weight_decay", group["weight_decay"], "must be a finite number >= 0")
    l2 = _check_number("l2_init", group["l2_init"], where, tensor_ok=False)
    if not (math.isfinite(l2) and l2 >= 0.0):
        raise bad("l2_init", group["l2_init"], "must be a finite number >= 0 (0 disables L2-to-init)")
    if group["l2_init_mode"] not in _MODES:
        raise bad("l2_init_mode", group["l2_init_mode"], f"must be one of {_MODES}")
    ad = group["anchor_dtype"]
    if ad is not None and ad not in _ANCHOR_DTYPES:
        raise bad("anchor_dtype", ad, "must be None (the parameter's dtype), torch.float32, torch.bfloat16 or torch.float16")
    if not isinstance(group["amsgrad"], bool) or not isinstance(group["maximize"], bool):
        raise ValueError(f"fastft.AdamW: amsgrad and maximize must be bools in {where}")


def _check_param(p: Tensor, where: str) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"fastft.AdamW: {where} holds a {type(p).__name__}, expected tensors (parameters)")
    if p.is_complex():
        raise ValueError(
            f"fastft.AdamW: complex parameter of shape {tuple(p.shape)} in {where} is not supported; "
            "optimise torch.view_as_real(p) instead")
    if p.dtype not in _PARAM_DTYPES:
        raise ValueError(
            f"fastft.AdamW: parameter of shape {tuple(p.shape)} in {where} has dtype {p.dtype}; "
            "supported: float32, float16, bfloat16, float64")


def _local(t: Optional[Tensor]) -> Optional[Tensor]:
    """This process's shard of a DTensor (sharing its memory: in-place updates land in it); others as they are."""
    return t.to_local() if is_dtensor(t) else t


def _norm_reduce_dims(g: Tensor) -> Tuple[Any, Tuple[int, ...]]:
    """For a DTensor gradient: its mesh and the mesh dims whose shards must be summed to get the
    squared norm of the whole tensor (the Shard dims; Replicate dims hold copies)."""
    dims = []
    for d, placement in enumerate(g.placements):
        if placement.is_partial():
            raise RuntimeError("fastft.AdamW: a gradient is a DTensor with a Partial placement (not yet reduced); "
                               "fused clipping needs Shard or Replicate gradients, as FSDP2 and DDP give")
        if placement.is_shard():
            dims.append(d)
    return g.device_mesh, tuple(dims)


def _anchor_dtype_for(group: Dict[str, Any], p: Tensor) -> torch.dtype:
    return p.dtype if group["anchor_dtype"] is None else group["anchor_dtype"]


class AdamW(torch.optim.Optimizer):
    r"""AdamW whose fused multi-tensor step also pulls every weight toward its pretrained value.

    A drop-in replacement for :class:`torch.optim.AdamW` (same arguments, same results with
    ``l2_init=0``, state_dicts load both ways) with three additions:

    * **L2-to-init** (``l2_init`` = :math:`\lambda`, per group): the anchor :math:`p_0` is the value a
      parameter had at its first step (for a pretrained model: the pretrained weight), snapshot lazily
      into ``state["anchor"]``, so parameters never stepped cost no anchor memory.

      - ``l2_init_mode="decoupled"`` (default): :math:`p \leftarrow p - \text{lr}(\text{wd}\,p + \lambda(p - p_0)) - \text{lr}\,\hat m/(\sqrt{\hat v} + \epsilon)`;
      - ``l2_init_mode="coupled"``: :math:`g \leftarrow g + 2\lambda(p - p_0)` before the moments, i.e.
        exactly ``torch.optim.AdamW`` on ``loss + λ Σ‖p − p0‖²``.

      ``anchor_dtype=torch.bfloat16`` stores anchors in half the memory; ``reset_anchors()``
      re-snapshots them (e.g. after domain-adaptive pretraining).
    * **EWC** (Kirkpatrick et al., 2017): :meth:`set_importance` gives parameters a per-entry
      importance :math:`F \ge 0` (a diagonal Fisher, e.g. from :func:`fastft.estimate_fisher`)
      that weights their pull inside the same fused step: decoupled
      :math:`p \leftarrow p - \text{lr}\,\lambda\,F \odot (p - p_0) - \dots`, coupled
      :math:`g \leftarrow g + 2\lambda\,F \odot (p - p_0)` (``torch.optim.AdamW`` on
      ``loss + λ Σ F (p − p0)²``). ``F`` lives in ``state["importance"]`` beside the anchor, in the
      anchor's dtype (``anchor_dtype=torch.bfloat16`` stores both in bf16), and is saved in
      ``state_dict()``; a parameter without one is pulled with ``F = 1`` (plain L2-to-init) and costs
      nothing extra.
    * **Fused clipping** (``max_grad_norm``): the global L2 norm of all gradients of the optimizer in
      one fused reduction, applied as a scale inside the update, without rewriting ``p.grad``; the
      same as ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` then ``step()``. The norm
      (before clipping, a 0-dim float32 tensor) is kept in :attr:`last_grad_norm`. In coupled mode the
      L2-to-init term is added after clipping (it is not part of the gradients being clipped).
    * **AMP**: ``step(grad_scale=..., found_inf=...)`` as torch's fused AdamW: gradients are
      unscaled inside the kernel (and written back unscaled), the step is skipped without a host
      sync when ``found_inf`` is set; ``torch.amp.GradScaler`` uses this automatically.

    * **Distributed**: on a DDP model it needs nothing (every rank holds the averaged gradients).
      On an FSDP2 model (``torch.distributed.fsdp.fully_shard``, parameters are DTensors) the kernel
      steps each process's local shard, moments and anchors are DTensors sharded like their
      parameter (so ``torch.distributed.checkpoint`` saves them), and fused clipping all-reduces the
      squared norm over the shards: the clip equals the unsharded one.

    Parameters without a gradient (frozen) are skipped entirely: no state, no anchor, no memory
    traffic. Parameters may be float32, float16, bfloat16 or float64; the math runs in float32
    (float64 for float64) and the moments keep the parameter's dtype, as in torch. ``foreach`` and
    ``fused`` are accepted for compatibility and ignored (the step is always fused).

    Args:
        params: parameters or parameter groups (dicts that may override any hyper-parameter below,
            ``l2_init``, ``l2_init_mode`` and ``anchor_dtype`` included).
        lr, betas, eps, weight_decay, amsgrad, maximize: as in :class:`torch.optim.AdamW`.
        l2_init: strength :math:`\lambda \ge 0` of the pull toward the anchor; 0 disables it.
        l2_init_mode: ``"decoupled"`` or ``"coupled"`` (see above).
        anchor_dtype: dtype the anchors are stored in (None: the parameter's dtype).
        max_grad_norm: clip the global gradient norm to this value (None: no clipping).

    Raises:
        TypeError: a hyper-parameter of the wrong type, e.g. ``lr="5e-5"``: ``lr``, ``betas``, ``eps``
            and ``weight_decay`` take floats, ints or one-element tensors, ``l2_init`` a float or an
            int; or a parameter that is not a tensor.
        ValueError: a hyper-parameter out of range, or a complex or integer parameter.

    Hyper-parameters are checked at construction, in ``add_param_group`` (param groups),
    ``load_state_dict`` and every ``step``, before anything changes.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Union[Tensor, Dict[str, Any]]],
        lr: Union[float, Tensor] = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        l2_init: float = 0.0,
        l2_init_mode: str = "decoupled",
        anchor_dtype: Optional[torch.dtype] = None,
        max_grad_norm: Optional[float] = None,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, l2_init=l2_init,
                        l2_init_mode=l2_init_mode, anchor_dtype=anchor_dtype)
        _check_hyperparameters(defaults, "the defaults")
        if max_grad_norm is not None and not (
                isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"fastft.AdamW: invalid max_grad_norm={max_grad_norm!r}: must be a finite number > 0 or None")
        self.max_grad_norm: Optional[float] = None if max_grad_norm is None else float(max_grad_norm)
        self.last_grad_norm: Optional[Tensor] = None
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a parameter group (see :meth:`torch.optim.Optimizer.add_param_group`), checking its values."""
        probe = dict(self.defaults)
        probe.update({k: v for k, v in param_group.items() if k != "params"})
        where = f"param group {len(self.param_groups)}"
        _check_hyperparameters(probe, where)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)  # a generator is read once
        for p in params:
            _check_param(p, where)
        super().add_param_group({**param_group, "params": params})

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # A torch.optim.AdamW state_dict has none of fastft's keys: take them from the defaults.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("last_grad_norm", None)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state_dict of ``fastft.AdamW`` or of ``torch.optim.AdamW``.

        The hyper-parameters and tensors of every group are checked first; on any error nothing
        changes. Steps are kept as float32 tensors on their parameter's device and anchors in the
        group's ``anchor_dtype``. Parameters whose state has no anchor (a torch AdamW checkpoint)
        take theirs lazily, at their next step with ``l2_init > 0``.
        """
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if groups is None or "state" not in state_dict:
            raise ValueError("fastft.AdamW.load_state_dict: expected a dict with 'state' and 'param_groups'")
        for i, g in enumerate(groups):
            probe = dict(self.defaults)
            probe.update({k: v for k, v in g.items() if k != "params"})
            _check_hyperparameters(probe, f"param group {i} of the state_dict")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                step = state.get("step")
                if step is not None:
                    state["step"] = (step if isinstance(step, Tensor) else torch.tensor(float(step))).to(
                        dtype=torch.float32, device=p.device).reshape(())
                for key in ("anchor", "importance"):
                    if key in state:
                        state[key] = state[key].to(dtype=_anchor_dtype_for(group, p), device=p.device)

    @torch.no_grad()
    def reset_anchors(self) -> None:
        """Re-snapshot every anchor to the parameter's current value (e.g. after domain-adaptive pretraining).

        Parameters that have no anchor yet keep taking theirs lazily at their first step with ``l2_init > 0``.
        """
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "anchor" in state:
                    state["anchor"].copy_(p)

    @torch.no_grad()
    def set_importance(self, importance: Mapping[Tensor, Tensor]) -> None:
        """Weight the L2-to-init pull of parameters entry by entry (EWC).

        Args:
            importance: parameter -> importance ``F`` (a tensor of the parameter's shape, finite and
                ``>= 0``, any float dtype and device; for a DTensor parameter a DTensor placed like
                it). ``F`` is copied into ``state["importance"]`` in the group's anchor dtype on the
                parameter's device, replacing an earlier one. Parameters not in the mapping keep what
                they had (none: ``F = 1``). ``F`` acts only where the group's ``l2_init > 0``; the
                anchor is still the parameter's value at its first step. Scale: λ multiplies ``F``, so
                ``F`` with mean 1 (as :func:`fastft.estimate_fisher` returns) keeps λ's meaning.

        Raises:
            TypeError: ``importance`` is not a mapping of tensors to tensors.
            ValueError: a key that is not a parameter of this optimizer, or an importance of another
                shape, a non-float dtype, or with negative / non-finite entries. Nothing is stored then.
        """
        if not isinstance(importance, Mapping):
            raise TypeError(f"fastft.AdamW.set_importance: importance must be a mapping parameter -> tensor, got "
                            f"{type(importance).__name__} (from a dict keyed by name: "
                            "{p: F[n] for n, p in model.named_parameters() if n in F})")
        owner = {id(p): group for group in self.param_groups for p in group["params"]}
        staged = []
        for p, f in importance.items():
            if not isinstance(p, Tensor) or not isinstance(f, Tensor):
                raise TypeError("fastft.AdamW.set_importance: keys must be parameters and values tensors, got "
                                f"{type(p).__name__} -> {type(f).__name__}")
            shape = tuple(p.shape)
            if id(p) not in owner:
                raise ValueError(f"fastft.AdamW.set_importance: a parameter of shape {shape} is not optimised by "
                                 "this optimizer; key the mapping by the parameters you passed to it")
            if tuple(f.shape) != shape or not f.is_floating_point():
                raise ValueError(f"fastft.AdamW.set_importance: the importance of a parameter of shape {shape} is "
                                 f"{f.dtype} {tuple(f.shape)}; it must be a float tensor of the parameter's shape")
            if is_dtensor(p) != is_dtensor(f) or (is_dtensor(p) and f.placements != p.placements):
                raise ValueError(f"fastft.AdamW.set_importance: the parameter of shape {shape} is "
                                 f"{'a DTensor placed ' + str(p.placements) if is_dtensor(p) else 'a plain tensor'}"
                                 f", its importance {'a DTensor placed ' + str(f.placements) if is_dtensor(f) else 'a plain tensor'}; "
                                 "shard the importance like its parameter "
                                 "(torch.distributed.tensor.distribute_tensor(F, p.device_mesh, p.placements))")
            local = _local(f)
            if local.numel() and not bool(torch.isfinite(local).all() and (local >= 0).all()):
                raise ValueError(f"fastft.AdamW.set_importance: the importance of a parameter of shape {shape} has "
                                 "negative, NaN or infinite entries; an importance must be finite and >= 0")
            staged.append((p, f, owner[id(p)]))
        for p, f, group in staged:
            self.state[p]["importance"] = f.detach().to(device=p.device, dtype=_anchor_dtype_for(group, p),
                                                        copy=True)

    def _collect(self) -> List[Tuple[Dict[str, Any], List[Tensor]]]:
        """Check every group and gradient; return the parameters to step, per group. Changes nothing."""
        plan = []
        for gi, group in enumerate(self.param_groups):
            where = f"param group {gi}"
            _check_hyperparameters(group, where)
            stepped = []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                _check_param(p, where)
                if g.is_sparse or g.layout != torch.strided:
                    raise RuntimeError(
                        f"fastft.AdamW does not support sparse gradients (parameter of shape {tuple(p.shape)} in "
                        f"{where}); use torch.optim.SparseAdam or a dense embedding (sparse=False)")
                if is_dtensor(p) and (not is_dtensor(g) or g.placements != p.placements
                                      or g.device_mesh != p.device_mesh):
                    raise RuntimeError(
                        f"fastft.AdamW: a DTensor parameter of shape {tuple(p.shape)} in {where} is placed "
                        f"{p.placements}, but its gradient is "
                        f"{g.placements if is_dtensor(g) else 'a plain tensor'}; they must be sharded alike")
                if g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
                    raise RuntimeError(
                        f"fastft.AdamW: the gradient of a parameter in {where} is {g.dtype} {tuple(g.shape)} on "
                        f"{g.device}, but the parameter is {p.dtype} {tuple(p.shape)} on {p.device}; they must match")
                stepped.append(p)
            plan.append((group, stepped))
        return plan

    def _clip_coefficients(self, plan, grad_scale: Optional[Tensor]) -> Dict[torch.device, Tensor]:
        """One fused sum of squares per (device, dtype, sharding); returns the clip coefficient per device.

        DTensor gradients (FSDP2) contribute the squares of this process's shard, all-reduced over
        the mesh dims they are sharded on, so every rank clips by the norm of the whole model.
        """
        by_key: Dict[Tuple[torch.device, torch.dtype, Any], List[Tensor]] = defaultdict(list)
        for _, params in plan:
            for p in params:
                sharding = _norm_reduce_dims(p.grad) if is_dtensor(p.grad) else None
                by_key[(p.device, p.dtype, sharding)].append(_local(p.grad))
        if not by_key:
            self.last_grad_norm = None
            return {}
        first_device = next(iter(by_key))[0]
        partial = []
        for (_, _, sharding), grads in by_key.items():
            squares = ops.sum_of_squares(grads).to(dtype=torch.float32)
            if sharding is not None:
                import torch.distributed as dist

                mesh, dims = sharding
                for d in dims:
                    dist.all_reduce(squares, group=mesh.get_group(d))
            partial.append(squares.to(device=first_device))
        norm = torch.stack(partial).sum().sqrt() if len(partial) > 1 else partial[0].sqrt()
        if grad_scale is not None:
            norm = norm / grad_scale.to(device=first_device, dtype=torch.float32)
        self.last_grad_norm = norm
        coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        return {dev: coef.to(dev) for dev in {k[0] for k in by_key}}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *, grad_scale: Optional[Tensor] = None,
             found_inf: Optional[Tensor] = None):
        """Perform one optimisation step over all parameters that have a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
            grad_scale: the AMP loss scale the gradients carry (``GradScaler`` passes it).
            found_inf: nonzero when the scaled gradients hold an inf/NaN; the step is then skipped.
        Returns:
            the closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)

        plan = self._collect()
        clip = self._clip_coefficients(plan, grad_scale) if self.max_grad_norm is not None else {}
        per_device: Dict[Tuple[str, torch.device], Tensor] = {}

        def on(t: Optional[Tensor], name: str, device: torch.device) -> Optional[Tensor]:
            if t is None:
                return None
            key = (name, device)
            if key not in per_device:
                per_device[key] = t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
            return per_device[key]

        for group, params in plan:
            if not params:
                continue
            l2 = float(group["l2_init"])
            amsgrad = group["amsgrad"]
            buckets: Dict[tuple, List[List[Tensor]]] = defaultdict(lambda: [[] for _ in range(8)])
            for p in params:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                anchor = importance = None
                if l2 != 0.0:
                    if "anchor" not in state:
                        state["anchor"] = p.detach().to(dtype=_anchor_dtype_for(group, p), copy=True)
                    anchor = state["anchor"]
                    importance = state.get("importance")
                # DTensors (FSDP2): the kernel steps this process's shards; the state is sharded alike.
                # Parameters without an importance go to a call of their own: they read no F.
                key = (p.device, p.dtype, None if anchor is None else anchor.dtype, importance is not None)
                lists = buckets[key]
                for i, t in enumerate((p, p.grad, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
                                       state["step"], anchor, importance)):
                    if t is not None:
                        lists[i].append(_local(t))
            beta1, beta2 = group["betas"]
            hyper = dict(lr=_scalar(group["lr"]), beta1=_scalar(beta1), beta2=_scalar(beta2),
                         weight_decay=_scalar(group["weight_decay"]), eps=_scalar(group["eps"]), l2_init=l2,
                         coupled=group["l2_init_mode"] == "coupled", amsgrad=amsgrad, maximize=group["maximize"])
            for (device, _, _, _), lists in buckets.items():
                ops.adamw_l2init_(*lists, **hyper, grad_scale=on(grad_scale, "scale", device),
                                  found_inf=on(found_inf, "inf", device), clip_coef=clip.get(device))
        return loss

