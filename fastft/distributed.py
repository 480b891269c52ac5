"""Data-parallel training under ``torch.distributed`` (``torchrun``): the process group, ranks, and
the few collectives the trainers need.

fastft does no communication of its own: gradients are averaged by
:class:`torch.nn.parallel.DistributedDataParallel` (``distributed="ddp"``) or reduce-scattered by
PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``, ``distributed="fsdp2"``), sharded
checkpoints are written by ``torch.distributed.checkpoint``, and the trainers use ``all_reduce`` /
``all_gather_object`` / ``barrier`` for metrics and decisions that must agree on every rank.
Without a process group (a plain ``python`` run) every helper here is the one-process identity, so
the same code runs everywhere.

Conventions of the trainers under ``torchrun --nproc_per_node=N``:

* ``batch_size`` is the **global** batch: each rank trains on ``batch_size / N`` examples of it
  (``N`` must divide ``batch_size``), so a run gives the same updates for every world size and a
  checkpoint resumes under any world size that divides the batch.
* a rank's loss is weighted by its share of the step's loss terms (rows; target tokens for
  token-level labels, see ``fastft.train.data.loss_terms``), as gradient accumulation weighs
  micro-batches: the averaged gradient is the whole batch's, token-mean LM losses included.
* the data order is the one-process order (seeded per epoch), and rank r takes every N-th example
  of each global batch from r on: the role of ``DistributedSampler``, but after batching, so
  length-grouped batches stay intact and N processes make the same updates as one.
* every rank computes every metric from the gathered predictions, so all ranks log, early-stop and
  restore identically; only rank 0 writes files and shows progress. Call ``Trainer.evaluate`` on
  every rank (it is collective); ``predict`` runs whole on each rank (under FSDP2 every forward is
  collective: call it on every rank too).

The two strategies (``Trainer(distributed=...)``):

* ``"ddp"``: every rank holds the whole model, its gradients, AdamW's two moments and (with
  L2-to-init) the anchors — 4 + 4 + 8 + 4 = 20 bytes per fp32 parameter; one all-reduce of the
  gradients per step. Checkpoints are one ``model.safetensors`` + ``state.pt`` written by rank 0.
* ``"fsdp2"``: :func:`fully_shard_model` shards every transformer block (:func:`fastft.find_layers`)
  and the rest of the model over the N ranks (parameters, gradients, moments and anchors: 20 / N
  bytes per fp32 parameter, plus during a step the gathered weights of the root and of a block or
  two); each block's weights are all-gathered for its forward and backward and its gradients
  reduce-scattered. Checkpoints are sharded (``torch.distributed.checkpoint``); the final model is
  gathered into one folder by rank 0.
"""

from __future__ import annotations

import copy
import os
import sys
from contextlib import contextmanager, nullcontext
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "shutdown", "is_distributed", "get_rank", "get_world_size", "get_local_rank", "DDPCache",
           "is_main_process", "barrier", "default_device", "shard", "all_reduce_sum", "any_rank",
           "gather_objects", "gather_evaluation", "is_dtensor", "STRATEGIES", "is_fsdp", "fully_shard_model",
           "gradient_sync_off", "broadcast_object", "snapshot_weights", "restore_weights", "full_state_dict",
           "meta_skeleton", "materialize"]

#: The values of ``Trainer(distributed=...)``.
STRATEGIES = ("ddp", "fsdp2")


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    The backend is ``nccl`` when CUDA is available (each process then uses ``cuda:LOCAL_RANK``),
    else ``gloo``. Does nothing when a group exists already (the caller made one) or when the
    environment describes a single process. Returns True when a group of more than one process runs.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("fastft: WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"fastft: WORLD_SIZE={os.environ['WORLD_SIZE']} but {key} is not set; launch with "
                               "torchrun (it sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(get_local_rank())
    dist.init_process_group(backend)
    return dist.get_world_size() > 1


def shutdown() -> None:
    """Leave the process group together: a barrier, then ``destroy_process_group``. Call it at the end
    of a torchrun script (``fastft finetune`` does): a rank that tears its connections down while
    another still finishes its last collective can make that one abort. A no-op without a group."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Processes in the group (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK`` from torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0, the process that logs, shows progress and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if is_distributed():
        dist.barrier()


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (``cuda`` in one process), else ``cpu``."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", get_local_rank()) if is_distributed() else torch.device("cuda")


def is_dtensor(t: Any) -> bool:
    """True when ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter, gradient or
    state tensor), False for anything else (plain tensors, None). Never imports
    ``torch.distributed.tensor``: a DTensor can only exist once it has been imported.
    """
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def shard(indices: Sequence[int], rank: int | None = None, world_size: int | None = None) -> Tuple[List[int], bool]:
    """This rank's part of a global batch: every ``world_size``-th index from ``rank`` (a batch sorted
    by length gives each rank similar lengths; one process gets the whole batch). Returns
    ``(indices, real)``; when the batch has fewer indices than ranks, a rank left without one gets
    ``([indices[0]], False)``: it must still run forward and backward (DDP expects every rank to),
    with its loss weighted by 0.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    mine = list(indices[rank::world_size])
    if mine:
        return mine, True
    if not indices:
        raise ValueError("fastft: cannot shard an empty batch")
    return [indices[0]], False


def _collective_device() -> torch.device:
    """Where small tensors for collectives live: the current GPU under nccl, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> List[float]:
    """Sum of ``values`` over all ranks, element-wise, in float64 (identity in one process)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one."""
    if not is_distributed():
        return bool(flag)
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def gather_objects(obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_evaluation(loss_sum: float, count: int, logits: torch.Tensor | None,
                      labels: torch.Tensor | None) -> Tuple[float, int, torch.Tensor | None, torch.Tensor | None]:
    """Combine the evaluation of a sharded data set: the loss sums and example counts of all ranks
    added, their (CPU) logits and labels concatenated in rank order. Every rank gets the same values,
    so metrics computed from them agree everywhere. The identity in one process."""
    if not is_distributed():
        return loss_sum, count, logits, labels
    parts = gather_objects((loss_sum, count, logits, labels))
    loss_sum, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    logits_parts = [p[2] for p in parts if p[2] is not None]
    labels_parts = [p[3] for p in parts if p[3] is not None]
    if not logits_parts:
        return loss_sum, count, None, None
    return loss_sum, count, torch.cat(logits_parts), torch.cat(labels_parts)


class DDPCache:
    """The module training steps go through: ``model`` itself in one process; under torchrun its
    :class:`~torch.nn.parallel.DistributedDataParallel` wrapper, rebuilt when the set of trainable
    parameters changes (DDP fixes it at construction; gradual unfreezing changes it).

    Args:
        model: the module to train.
        device: its device (a CUDA device gives DDP ``device_ids``).
        find_unused_parameters: DDP's flag; True when some trainable parameters sit out some steps
            (e.g. the heads of the tasks not in a multi-task batch).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, find_unused_parameters: bool = False) -> None:
        self.model, self.device, self.find_unused_parameters = model, device, find_unused_parameters
        self._ddp: torch.nn.Module | None = None
        self._trainable: Tuple[bool, ...] | None = None

    def __call__(self) -> torch.nn.Module:
        if not is_distributed():
            return self.model
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if self._ddp is None or trainable != self._trainable:
            from torch.nn.parallel import DistributedDataParallel

            ids = None
            if self.device.type == "cuda":
                ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
            self._ddp = DistributedDataParallel(self.model, device_ids=ids,
                                                find_unused_parameters=self.find_unused_parameters)
            self._trainable = trainable
        return self._ddp


# --- FSDP2 ----------------------------------------------------------------------------------------


def is_fsdp(module: Any) -> bool:
    """True when ``module`` has been sharded with ``torch.distributed.fsdp.fully_shard`` (an FSDPModule)."""
    mod = sys.modules.get("torch.distributed.fsdp")
    return mod is not None and isinstance(module, getattr(mod, "FSDPModule", ()))


def fully_shard_model(model: torch.nn.Module, blocks: Sequence[torch.nn.Module], device: torch.device,
                      param_dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Shard ``model`` over all ranks with PyTorch's FSDP2: ``fully_shard`` on each of ``blocks`` (the
    transformer blocks, :func:`fastft.find_layers`), then on ``model`` itself (the root: embeddings,
    final norm, heads). Parameters become DTensors sharded on dim 0 over a 1-D mesh of
    ``device.type``; the module is changed in place (and returned).

    Each block's weights are all-gathered just before its forward (and again for its backward) and
    freed after; gradients are reduce-scattered (averaged) in ``reduce_dtype`` float32.

    Args:
        blocks: modules sharded as units of their own (empty: the model is one unit, gathered whole
            for every forward).
        device: where the shards live (``cuda:LOCAL_RANK`` or ``cpu``); parameters move there as
            they are sharded, so a GPU never holds the whole model.
        param_dtype: the dtype of the gathered weights the forward computes with (FSDP2's
            ``MixedPrecisionPolicy``, e.g. bfloat16 for ``precision="bf16"``); None: the parameters'
            own (fp32). The sharded weights and optimizer state stay in the parameters' dtype.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextmanager
def gradient_sync_off(module: torch.nn.Module) -> Iterator[None]:
    """Inside, backward passes accumulate gradients without communicating (all micro-batches of an
    accumulated step but the last): DDP's ``no_sync()``, FSDP2's ``set_requires_gradient_sync(False)``
    (gradients then accumulate unsharded until the synchronised backward reduce-scatters them).
    Nothing for a plain module."""
    if is_fsdp(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        with (module.no_sync() if hasattr(module, "no_sync") else nullcontext()):
            yield


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _local_copy_to_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``t``; for a DTensor a DTensor of the same placements whose shard is on the CPU."""
    t = t.detach()
    if not is_dtensor(t):
        return t.to("cpu", copy=True)
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t.to_local().to("cpu", copy=True), t.device_mesh, t.placements, run_check=False,
                              shape=t.shape, stride=t.stride())


def snapshot_weights(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU copies of ``state`` (entries of a ``model.state_dict()``, e.g. the best weights of early
    stopping). Sharded (FSDP2) entries stay sharded: each rank copies only its shard (DTensors whose
    local tensor is on the CPU)."""
    return {k: _local_copy_to_cpu(v) for k, v in state.items()}


@torch.no_grad()
def restore_weights(model: torch.nn.Module, weights: Dict[str, torch.Tensor]) -> None:
    """Load a :func:`snapshot_weights` copy (of all or some of ``model``'s state entries) back into
    ``model``: plain into plain, shard into shard, and across the two (a snapshot taken in one
    process restored into a sharded model: each rank takes its part; a sharded one into a plain
    model: gathered).

    Raises:
        KeyError: an entry ``model`` does not have (nothing is changed then).
    """
    targets = model.state_dict()
    unknown = sorted(set(weights) - set(targets))
    if unknown:
        raise KeyError(f"fastft: the snapshot has entries the model does not: {unknown[:5]}")
    if not any(is_dtensor(t) for t in list(targets.values()) + list(weights.values())):
        model.load_state_dict(weights, strict=False)  # the model's own loading (and its hooks)
        return
    for name, value in weights.items():
        target = targets[name]
        if is_dtensor(target):
            if not is_dtensor(value):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(target.to_local().device), target.device_mesh, target.placements,
                                          src_data_rank=None)
            target.to_local().copy_(value.to_local())
        else:
            target.copy_(value.full_tensor() if is_dtensor(value) else value)


def full_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The whole ``model``'s state on rank 0, on the CPU (every rank must call it: under FSDP2 the
    shards are gathered; other ranks get an empty dict). A plain model's own ``state_dict()``."""
    if not any(is_dtensor(p) for p in model.parameters()):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory) and whose buffers are
    ``model``'s own: the structure :func:`materialize` fills with gathered weights to save a sharded
    model with its usual ``save_pretrained``. Tied parameters stay tied. Call it before sharding."""
    memo: Dict[int, Any] = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b
    return copy.deepcopy(model, memo)


def materialize(skeleton: torch.nn.Module, state: Optional[Dict[str, torch.Tensor]]) -> None:
    """Put ``state``'s tensors (a :func:`full_state_dict`) into the parameters of ``skeleton`` (a
    :func:`meta_skeleton`), or back onto the meta device when ``state`` is None (freeing them)."""
    names: Dict[int, List[str]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    new: Dict[int, torch.nn.Parameter] = {}
    for module in skeleton.modules():
        for key, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                if state is None:
                    value = torch.empty_like(p, device="meta")
                else:
                    found = [state[n] for n in names.get(id(p), ()) if n in state]
                    if not found:
                        raise KeyError(f"fastft: the gathered state has no entry for {names.get(id(p))}")
                    value = found[0]
                new[id(p)] = torch.nn.Parameter(value, requires_grad=p.requires_grad)
            module._parameters[key] = new[id(p)]
