"""The frozen-prefix cache: what a frozen prefix computes for an example, computed once.

With the embeddings and the lowest ``k`` blocks frozen (a :class:`fastft.FreezePlan`), the input of
block ``k`` depends on nothing but the example's tokens: the prefix's weights do not change and it
runs in eval mode (no dropout). So the first time an example passes the boundary, the output of
block ``k - 1`` for its real tokens is kept, ``[L, H]`` per example (unpadded); every later pass of
that example (later epochs, validation, prediction) replays it: blocks ``0 .. k-1`` are not run, the
kept states are re-padded to the batch's length and handed to block ``k``. Everything else the
model computes in its own forward (embeddings, attention masks, Llama's rotary position embeddings,
GPT-2's position ids) runs as usual, so the blocks above the boundary get exactly what they would
have got.

How it stands in for the blocks: each block's ``forward`` is wrapped; outside a cached pass the
wrapper calls the block as before. :meth:`PrefixCache.run` opens a pass for one batch: when every
example of it is kept, block 0 returns the kept states and blocks ``1 .. k-1`` return their input
unchanged (computing nothing); otherwise the prefix runs and block ``k - 1``'s output is kept.

Keys are the examples' contents: the token ids of their real tokens (and token type ids), read from
the collated batch (right-padded, ``attention_mask`` ones then zeros). Whatever else could change
the prefix's output makes a batch bypass the cache: other batch keys (``position_ids``,
``inputs_embeds``, ...), left padding, a non-dict batch, trainable parameters in the prefix (an
adapter, trainable embeddings), no frozen block. A boundary that moves (gradual unfreezing) drops
the cache; it refills lazily. Only batches run through :meth:`PrefixCache.run` are cached, so
other forwards (replay rows, a ForgettingMonitor's text) always run the whole model.

Eval mode: the plan keeps its frozen modules in eval mode. Dropout that lies below the boundary but
outside them (GPT-2's embedding dropout ``transformer.drop``, a parameterless module of the model)
is found on the first pass and held in eval mode too while the cache is on: the kept states are
those of the eval-mode prefix. A run with the cache therefore equals a run without it whose prefix
dropout is likewise off (``p=0`` or eval). Before it keeps anything at a boundary, the cache runs
the prefix twice on the batch (in a forked RNG, without gradients) and refuses, with a
RuntimeError naming the cause, if the two outputs differ.

Storage: in the dtype of the block output, or ``dtype``; in memory (on the model's device) up to
``memory_mb``, beyond it appended to ``prefix_cache.bin`` in ``folder`` (a run folder) or in a
temporary folder, read back through a memory map. The file is scratch, rebuilt by every process:
:meth:`close` (or garbage collection) deletes it, and a run resumed from a checkpoint starts an
empty cache whether or not an old file is there (it overwrites it).
"""

from __future__ import annotations

import copy
import math
import mmap
import os
import shutil
import tempfile
import types
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["PrefixCache", "CACHE_FILE", "cache_dtype_of"]

#: The spill file's name in the cache's folder.
CACHE_FILE = "prefix_cache.bin"

# Batch keys that are the prefix's inputs, and those that do not reach it.
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
_IGNORED_KEYS = ("labels",)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def cache_dtype_of(value: Union[None, str, torch.dtype], where: str) -> Optional[torch.dtype]:
    """``value`` as a floating torch dtype (``"fp32"``, ``"bf16"``, ``"fp16"``, their long names, or a
    torch dtype); None stays None. Raises ValueError for anything else."""
    if value is None or value in (torch.float32, torch.bfloat16, torch.float16):
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise ValueError(f"{where}: cache_dtype must be None (the model's compute dtype), 'fp32', 'bf16' or 'fp16' "
                     f"(or a torch dtype), got {value!r}")


class _ProbeDone(Exception):
    """Ends a probe forward once the boundary's output is captured."""


class _Pass:
    """One batch's pass through the prefix: ``mode`` is "serve", "fill" or "probe"."""

    def __init__(self, mode: str, k: int, keys: List[Any], lengths: List[int], shape: Tuple[int, int]) -> None:
        self.mode, self.k, self.keys, self.lengths, self.shape = mode, k, keys, lengths, shape
        self.next = 0
        self.captured: Optional[Tensor] = None
        self.fired: List[nn.Module] = []


def _plain_forward(block: nn.Module) -> Callable:
    return types.MethodType(type(block).forward, block)


class _BlockForward:
    """Stands in for ``block.forward``: the block as before, unless a cached pass is open."""

    def __init__(self, cache: "PrefixCache", index: int, block: nn.Module, inner: Callable) -> None:
        self.cache_ref = weakref.ref(cache)
        self.index, self.block, self.inner = index, block, inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = self.cache_ref()
        if cache is None or cache._pass is None:
            return self.inner(*args, **kwargs)
        return cache._block_call(self.index, self.inner, args, kwargs)

    # A copied or pickled model gets its blocks' own forward, never this cache's.
    def __deepcopy__(self, memo: dict) -> Callable:
        return copy.deepcopy(self.inner, memo)

    def __reduce__(self):
        return _plain_forward, (self.block,)


class PrefixCache:
    """Keeps the output of a :class:`fastft.FreezePlan`'s frozen prefix per example, and replays it.

    Made by :meth:`fastft.FreezePlan.enable_cache` (the trainers' ``cache_frozen=True``); the module
    docstring says what is kept, when it is used and why that is exact. Use it by running each
    forward of a batch through :meth:`run`::

        cache = plan.enable_cache()
        out = cache.run(batch, lambda: model(**batch))   # batch: a collated dict (input_ids, ...)

    Args:
        plan: the freeze plan; its embeddings must be frozen (``freeze_layers(..., embeddings=True)``).
        dtype: the dtype the states are kept in; None: the dtype of the block output (the model's
            compute dtype; fp32 under autocast for most models, whose residual stream stays fp32).
        memory_mb: megabytes kept in memory (on the model's device) before states spill to the file
            (a number >= 0; 0: everything to the file). Default 1024.
        folder: where the spill file ``prefix_cache.bin`` goes (created when the first state
            spills); None: a temporary folder, deleted with the cache.

    Raises:
        TypeError/ValueError: a bad argument, a plan whose embeddings are trainable, or a model
            whose blocks come from an encoder-decoder (their inputs are not one stream).
    """

    where = "fastft.PrefixCache"

    def __init__(self, plan: Any, dtype: Union[None, str, torch.dtype] = None, memory_mb: float = 1024.0,
                 folder: Optional[Union[str, os.PathLike]] = None) -> None:
        from .freezing import FreezePlan

        if not isinstance(plan, FreezePlan):
            raise TypeError(f"{self.where}: plan must be a fastft.FreezePlan (from fastft.freeze_layers), got "
                            f"{type(plan).__name__}")
        self.dtype = cache_dtype_of(dtype, self.where)
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, (int, float)) or not memory_mb >= 0 \
                or math.isinf(memory_mb):
            raise ValueError(f"{self.where}: memory_mb must be a number >= 0 (megabytes kept in memory before "
                             f"states spill to disk), got {memory_mb!r}")
        if not plan._freeze_embeddings:
            raise ValueError(f"{self.where}: the plan leaves the embeddings trainable, so the frozen blocks' input "
                             "changes with every step and their output cannot be kept; freeze them too "
                             "(freeze_layers(model, n, embeddings=True)) or do not cache")
        if plan._s.encoder is not None:
            raise ValueError(f"{self.where}: {type(plan.model).__name__} is an encoder-decoder model; the cache "
                             "handles one stack of blocks (encoder-only or decoder-only models)")
        self.plan = plan
        self.memory_bytes = int(memory_mb * 2**20)
        self.folder = Path(folder) if folder is not None else None
        self._mem: Dict[Any, Tensor] = {}
        self._disk: Dict[Any, Tuple[int, int]] = {}  # key -> (byte offset, tokens)
        self._mem_used = 0
        self._disk_used = 0
        self._file = None
        self._map: Optional[mmap.mmap] = None
        self._mapped = 0
        self._tmp: Optional[str] = None
        self._boundary = -1
        self._checked = False
        self._format: Any = None  # "tensor" or the length of a tuple output (hidden states first, then Nones)
        self._served_dtype: Optional[torch.dtype] = None
        self._hidden: Optional[int] = None
        self._stored_dtype: Optional[torch.dtype] = None
        self._pass: Optional[_Pass] = None
        self._held: List[nn.Module] = []
        self._warned: set = set()
        self.hits = self.misses = self.bypassed = 0
        self._closed = False
        self._wrapped: List[Tuple[nn.Module, Any]] = []
        for i, block in enumerate(plan.layers):
            previous = block.__dict__.get("forward")
            block.__dict__["forward"] = _BlockForward(self, i, block, block.forward)
            self._wrapped.append((block, previous))
        self._finalizer = weakref.finalize(self, _cleanup, self._wrapped, self._held, plan.model, self._files())

    # -- queries ----------------------------------------------------------------------------------
    @property
    def boundary(self) -> int:
        """The boundary the kept states belong to (-1 before the first pass)."""
        return self._boundary

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    def stats(self) -> Dict[str, float]:
        """``examples`` kept, ``memory_mb`` / ``disk_mb`` they take, ``mb_per_1000_examples``,
        ``hits`` / ``misses`` (examples served / computed and kept), ``bypassed`` (batches that ran
        the whole model), ``boundary``."""
        n = len(self)
        total = (self._mem_used + self._disk_used) / 2**20
        return {"examples": n, "memory_mb": self._mem_used / 2**20, "disk_mb": self._disk_used / 2**20,
                "mb_per_1000_examples": 1000 * total / n if n else 0.0, "hits": self.hits, "misses": self.misses,
                "bypassed": self.bypassed, "boundary": self._boundary}

    def __repr__(self) -> str:
        s = self.stats()
        return (f"PrefixCache({s['examples']} examples at boundary {s['boundary']}, {s['memory_mb']:.1f} MB in "
                f"memory, {s['disk_mb']:.1f} MB on disk)")

    # -- use --------------------------------------------------------------------------------------
    def run(self, batch: Any, forward: Callable[[], Any]) -> Any:
        """``forward()`` (the model's forward on ``batch``), through the cache when it can serve or fill.

        Args:
            batch: the collated batch ``forward`` runs on (a dict of ``[B, T]`` tensors, on any device;
                ``input_ids`` and ``attention_mask`` are read to key the examples).
            forward: runs the model on ``batch`` once (it may be called up to twice more, without
                gradients and in a forked RNG, the first time a boundary fills).
        Returns:
            what ``forward()`` returns.
        """
        if self._closed:
            return forward()
        reason = self._bypass_reason()
        keys = lengths = None
        if reason is None:
            keys, lengths, reason = _example_keys(batch)
        if reason is not None:
            if reason:  # "" : nothing frozen now, nothing to say
                self._note(reason)
            self.bypassed += 1
            return forward()
        k = self.plan.boundary
        if k != self._boundary:
            self.clear()
            self._boundary = k
        shape = (len(keys), int(batch["input_ids"].shape[1]))
        serve = self._format is not None and all(key in self._mem or key in self._disk for key in keys)
        if not serve and not self._checked:
            if not self._check(forward, keys, lengths, shape, k):
                self.bypassed += 1
                return forward()
        self._pass = _Pass("serve" if serve else "fill", k, keys, lengths, shape)
        try:
            out = forward()
        finally:
            done = self._pass is None
            self._pass = None
        if not done:
            self._note("the forward did not run the frozen blocks on this batch")
            self.bypassed += 1
        elif serve:
            self.hits += len(keys)
        return out

    def clear(self) -> None:
        """Drop every kept state (memory and file); the cache refills lazily."""
        self._mem.clear()
        self._disk.clear()
        self._mem_used = self._disk_used = 0
        self._checked = False
        self._format = None
        self._map = None
        self._mapped = 0
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()

    def close(self) -> None:
        """Give the blocks their own forward back, release the dropout held in eval mode, delete the
        spill file. The cache then runs every forward unchanged."""
        if self._closed:
            return
        self._closed = True
        self.clear()
        self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._finalizer()

    # -- internals --------------------------------------------------------------------------------
    def _files(self) -> Dict[str, Any]:
        self._paths = {"file": None, "tmp": None}
        return self._paths

    def _note(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"{self.where}: a batch ran the whole model, not the cached prefix: {reason}", stacklevel=4)

    def _bypass_reason(self) -> Optional[str]:
        plan = self.plan
        if plan._replaced:
            return "the freeze plan was replaced by a later freeze_layers() call"
        if plan.boundary == 0:
            return ""
        if not plan.embeddings_frozen:
            return "the embeddings are trainable now"
        s = plan._s
        mods = list(s.embedding_modules) + [plan.layers[i] for i in range(plan.boundary)]
        if any(p.requires_grad for m in mods for p in m.parameters()) or \
                any(p.requires_grad for p in s.embedding_params):
            return ("the frozen prefix holds trainable parameters (an adapter, or parameters unfrozen by hand), "
                    "so its output changes with training")
        return None

    def _check(self, forward: Callable[[], Any], keys, lengths, shape, k: int) -> bool:
        """Before a boundary first fills: hold in eval mode the dropout that runs below it, then run the
        prefix twice and refuse if the outputs differ. False when ``forward`` does not reach block k-1."""
        model = self.plan.model
        held = {x for m in self.plan._modules + self._held for x in m.modules()}  # in eval mode already
        candidates = [m for m in model.modules()
                      if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m not in held]
        outputs: List[Tensor] = []
        device = next(model.parameters()).device
        # One forked RNG for all probes: the caller's stream is untouched, and a prefix that draws random
        # numbers draws different ones in each probe.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            while len(outputs) < 2:
                p = _Pass("probe", k, keys, lengths, shape)
                hooks = [m.register_forward_pre_hook(lambda m, a, p=p: p.fired.append(m)) for m in candidates]
                self._pass = p
                try:
                    forward()
                except _ProbeDone:
                    pass
                finally:
                    self._pass = None
                    for h in hooks:
                        h.remove()
                if p.captured is None:
                    self._note("the forward did not run the frozen blocks on this batch")
                    return False
                outputs.append(p.captured)
                if p.fired:  # dropout ran below the boundary: hold it in eval mode and look again
                    for m in dict.fromkeys(p.fired):
                        self._hold_eval(m)
                    candidates = [m for m in candidates if m not in p.fired]
                    outputs = []
        a, b = outputs
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6):
            raise RuntimeError(
                f"{self.where}: the frozen prefix of {type(model).__name__} gives two different outputs for the same "
                "batch (in eval mode, without gradients), so its output cannot be kept: something below the "
                f"boundary (block {k}) is random (a functional dropout in the model's own forward, noise added to "
                "the embeddings, ...). Make it deterministic or train with cache_frozen=False")
        self._checked = True
        return True

    def _hold_eval(self, module: nn.Module) -> None:
        module.__dict__["train"] = _stay_in_eval()(module)
        module.train(False)
        self._held.append(module)

    def _block_call(self, j: int, inner: Callable, args: tuple, kwargs: dict) -> Any:
        p = self._pass
        if j >= p.k or j != p.next:
            return inner(*args, **kwargs)
        hidden = args[0] if args else kwargs.get("hidden_states")
        if j == 0 and not (isinstance(hidden, Tensor) and hidden.dim() == 3 and tuple(hidden.shape[:2]) == p.shape):
            self._pass = None  # not this batch's forward: run it as it is
            return inner(*args, **kwargs)
        p.next = j + 1
        last = j == p.k - 1
        if p.mode == "serve":
            if last:
                self._pass = None
            out = self._padded(p, hidden) if j == 0 else hidden
            return out if self._format == "tensor" else (out,) + (None,) * (self._format - 1)
        out = inner(*args, **kwargs)
        if last:
            self._pass = None
            h = self._hidden_of(out)
            p.captured = h.detach()
            if p.mode == "probe":
                raise _ProbeDone
            self._keep(p, p.captured)
        return out

    def _hidden_of(self, out: Any) -> Tensor:
        if isinstance(out, Tensor):
            fmt, h = "tensor", out
        elif isinstance(out, tuple) and out and isinstance(out[0], Tensor) and all(x is None for x in out[1:]):
            fmt, h = len(out), out[0]
        else:
            kind = type(out).__name__ + (f" of {[type(x).__name__ for x in out]}" if isinstance(out, tuple) else "")
            raise RuntimeError(f"{self.where}: the blocks of {type(self.plan.model).__name__} return a {kind}; the cache "
                               "can stand in for blocks that return their hidden states (a tensor, or a tuple of it "
                               "and Nones). Train with cache_frozen=False")
        if h.dim() != 3:
            raise RuntimeError(f"{self.where}: the blocks' output has shape {tuple(h.shape)}, expected [batch, tokens, "
                               "hidden]; train with cache_frozen=False")
        self._format, self._served_dtype, self._hidden = fmt, h.dtype, h.shape[-1]
        return h

    def _keep(self, p: _Pass, h: Tensor) -> None:
        dtype = self.dtype or h.dtype
        on_cpu = None
        for i, key in enumerate(p.keys):
            if key in self._mem or key in self._disk:
                continue
            row = h[i, :p.lengths[i]]
            nbytes = row.numel() * dtype.itemsize
            if self._mem_used + nbytes <= self.memory_bytes:
                self._mem[key] = row.to(dtype=dtype, copy=True)
                self._mem_used += nbytes
            else:
                if on_cpu is None:
                    on_cpu = h.to("cpu", dtype)
                self._disk[key] = self._write(on_cpu[i, :p.lengths[i]])
                self._disk_used += nbytes
            self.misses += 1
        self._stored_dtype = dtype

    def _write(self, row: Tensor) -> Tuple[int, int]:
        if self._file is None:
            folder = self.folder
            if folder is None:
                self._tmp = tempfile.mkdtemp(prefix="fastft-prefix-cache-")
                self._paths["tmp"] = self._tmp
                folder = Path(self._tmp)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / CACHE_FILE
            self._file = open(path, "w+b")
            self._paths["file"] = str(path)
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(row.contiguous().view(torch.uint8).numpy().tobytes())
        return offset, row.shape[0]

    def _read(self, offset: int, tokens: int) -> Tensor:
        n = tokens * self._hidden
        end = offset + n * self._stored_dtype.itemsize
        if end > self._mapped:
            self._file.flush()
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
            self._mapped = len(self._map)
        return torch.frombuffer(self._map, dtype=self._stored_dtype, count=n, offset=offset).view(tokens, self._hidden)

    def _padded(self, p: _Pass, like: Tensor) -> Tensor:
        b, t = p.shape
        out = torch.zeros(b, t, self._hidden, dtype=self._served_dtype, device=like.device)
        for i, key in enumerate(p.keys):
            row = self._mem.get(key)
            if row is None:
                row = self._read(*self._disk[key])
            out[i, :p.lengths[i]] = row
        return out


def _stay_in_eval():
    from .freezing import _StayInEval

    return _StayInEval


def _example_keys(batch: Any) -> Tuple[Optional[List[Any]], Optional[List[int]], Optional[str]]:
    """(keys, real lengths, None) of a collated batch's examples, or (None, None, why it cannot be keyed)."""
    if not isinstance(batch, dict):
        return None, None, "the batch is not a dict of token ids (input_ids, attention_mask, ...)"
    extra = sorted(str(k) for k in batch if k not in _INPUT_KEYS and k not in _IGNORED_KEYS)
    if extra:
        return None, None, f"the batch holds {extra}, which may change what the frozen prefix computes"
    ids = batch.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return None, None, "the batch has no [batch, tokens] integer input_ids"
    ids = ids.cpu()
    b, t = ids.shape
    mask = batch.get("attention_mask")
    if mask is None:
        lengths = [t] * b
    else:
        mask = mask.cpu()
        if mask.shape != ids.shape:
            return None, None, "attention_mask and input_ids differ in shape"
        n = mask.ne(0).sum(1)
        if not torch.equal(mask, (torch.arange(t) < n[:, None]).to(mask.dtype)):
            return None, None, "the attention_mask is not right padding (ones, then zeros)"
        lengths = n.tolist()
    tt = batch.get("token_type_ids")
    tt = tt.cpu().numpy() if isinstance(tt, Tensor) else None
    rows = ids.numpy()
    keys = [(rows[i, :n].tobytes(), None if tt is None else tt[i, :n].tobytes()) for i, n in enumerate(lengths)]
    return keys, lengths, None


def _cleanup(wrapped: List[Tuple[nn.Module, Any]], held: List[nn.Module], model: nn.Module,
             paths: Dict[str, Any]) -> None:
    for block, previous in wrapped:
        if isinstance(block.__dict__.get("forward"), _BlockForward):
            if previous is None:
                del block.__dict__["forward"]
            else:
                block.__dict__["forward"] = previous
    for m in held:
        m.__dict__.pop("train", None)
        m.train(model.training)
    held.clear()
    if paths.get("file"):
        try:
            os.remove(paths["file"])
        except OSError:
            pass
    if paths.get("tmp"):
        shutil.rmtree(paths["tmp"], ignore_errors=True)
