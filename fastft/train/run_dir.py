"""The run folder of a training run: what the trainers write and how they read it back.

::

    <output_dir>/
      metrics.jsonl        one JSON record per evaluation (appended, flushed line by line)
      tensorboard/         the same scalars, when TensorBoard is installed
      checkpoint/          model.safetensors, state.pt (optimizer, scheduler, scaler, callbacks,
                           replay, RNG states), trainer_state.json (written last: marks it complete);
                           under distributed="fsdp2" sharded/ (torch.distributed.checkpoint: the
                           weights, the optimizer state and callbacks' tensors, one file per rank)
                           instead of model.safetensors
      model/               the final model with its tokenizer and label names (see :meth:`RunDir.save_model`)
      curves.png           losses and validation metrics per optimizer step

Folders are built under a temporary name and swapped in (:func:`fastft.atomic.atomic_dir`), so a run
killed while saving leaves the previous checkpoint readable. A run with a run folder stops on SIGINT /
SIGTERM only after a checkpoint (:class:`StopSignals`).
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..atomic import atomic_dir, atomic_write
from ..lm import is_peft_model

__all__ = ["RunDir", "CHECKPOINT", "SHARDED", "StopSignals", "extract_tensors", "insert_tensors", "tensor_refs"]

CHECKPOINT = "checkpoint"
#: The ``torch.distributed.checkpoint`` folder of a sharded checkpoint (inside ``checkpoint/``).
SHARDED = "sharded"
_REF = "__fastft_tensor__"


def extract_tensors(obj: Any, prefix: str, out: Dict[str, Any]) -> Any:
    """``obj`` (nested dicts / lists / tuples) with every tensor replaced by a reference, the tensors
    put into ``out`` under ``prefix/<path>``: to save them with ``torch.distributed.checkpoint`` (a
    sharded tensor is saved as its shards) and the rest with ``torch.save``. See :func:`insert_tensors`."""
    if isinstance(obj, torch.Tensor):
        from ..distributed import is_dtensor

        out[prefix] = obj
        return {_REF: prefix, "shape": list(obj.shape), "dtype": str(obj.dtype).replace("torch.", ""),
                "sharded": is_dtensor(obj)}
    if isinstance(obj, dict):
        return {k: extract_tensors(v, f"{prefix}/{k}", out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(extract_tensors(v, f"{prefix}/{i}", out) for i, v in enumerate(obj))
    return obj


def tensor_refs(obj: Any) -> List[Dict[str, Any]]:
    """The references :func:`extract_tensors` left in ``obj``."""
    if isinstance(obj, dict):
        return [obj] if _REF in obj else [r for v in obj.values() for r in tensor_refs(v)]
    if isinstance(obj, (list, tuple)):
        return [r for v in obj for r in tensor_refs(v)]
    return []


def insert_tensors(obj: Any, tensors: Dict[str, Any]) -> Any:
    """Undo :func:`extract_tensors`: the references in ``obj`` replaced by ``tensors[path]``."""
    if isinstance(obj, dict):
        if _REF in obj:
            return tensors[obj[_REF]]
        return {k: insert_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(insert_tensors(v, tensors) for v in obj)
    return obj


def _named_parameters(fn: Any) -> set:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _set_label_names(model: nn.Module, names: Any) -> None:
    """Class names into a transformers model's config (``id2label`` / ``label2id``), when they fit its classes."""
    config = getattr(model, "config", None)
    if not names or isinstance(names, dict) or config is None or getattr(config, "num_labels", None) != len(names):
        return
    config.id2label = {i: str(n) for i, n in enumerate(names)}
    config.label2id = {str(n): i for i, n in enumerate(names)}


class RunDir:
    """One run folder (see the module docstring). Only the main process should write."""

    def __init__(self, path: Any) -> None:
        self.path = Path(path)
        self._tb = None
        self._tb_tried = False

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    # --- metrics ----------------------------------------------------------------------------------

    def append_metrics(self, record: Dict[str, Any]) -> None:
        """One line of ``metrics.jsonl`` and the record's numbers as TensorBoard scalars at its ``step``."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for k, v in record.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, record["step"])
            writer.flush()

    def _tensorboard(self):
        if not self._tb_tried:
            self._tb_tried = True
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path / "tensorboard"))
            except ImportError:
                self._tb = None
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        self._tb, self._tb_tried = None, False

    # --- the final model --------------------------------------------------------------------------

    def write_jsonl(self, name: str, rows: List[Dict[str, Any]]) -> Path:
        """``<run>/<name>``: ``rows`` as JSON lines, replacing the file atomically."""
        target = self.path / name
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return target

    def save_model(self, model: nn.Module, name: str = "model", tokenizer: Any = None,
                   label_names: Any = None, merged: bool = False) -> Path:
        """``<run>/<name>/``, complete or absent (built under ``.<name>.tmp``, which an error removes):

        - a fastft model (:class:`fastft.SequenceClassifier`, :class:`fastft.MultiTaskModel`): its
          ``save_pretrained`` with the tokenizer and the label names — load it back with the one call
          ``fastft.SequenceClassifier.from_pretrained(folder)`` (``MultiTaskModel`` likewise);
          transformers' Auto model classes refuse the folder with an error naming that call;
        - a transformers model: ``save_pretrained`` (a model loaded from GGUF is saved dequantised,
          see :func:`fastft.heads.save_transformers_model`) with the label names in its config
          (``id2label`` / ``label2id``) and the tokenizer: its Auto classes load it;
        - a ``peft`` model (LoRA): the adapter folder (``PeftModel.save_pretrained``: adapter config and
          weights; ``PeftModel.from_pretrained(base_model, folder)`` loads it) with the tokenizer, and
          with ``merged=True`` also ``merged/``: the base model with the adapter merged in (built on a
          copy; the trained model is left as it was), loadable by transformers alone;
        - any other module: ``model.safetensors`` and the tokenizer.

        Args:
            tokenizer: a Hugging Face tokenizer to save with the model, or None.
            label_names: class names, index = class id (for a MultiTaskModel: a dict task -> names), or None.
        """
        from safetensors.torch import save_model

        from ..heads import save_tokenizer, save_transformers_model

        where = "fastft.RunDir.save_model"
        target = self.path / name
        with atomic_dir(target) as tmp:
            save = getattr(model, "save_pretrained", None)
            if is_peft_model(model):
                model.save_pretrained(str(tmp))
                save_tokenizer(tokenizer, tmp, where)
                if merged:
                    import copy

                    full = copy.deepcopy(model).merge_and_unload()
                    save_transformers_model(full, tmp / "merged")
                    save_tokenizer(tokenizer, tmp / "merged", where)
            elif save is not None and {"tokenizer", "id2label"} <= _named_parameters(save):  # fastft's own models
                save(tmp, tokenizer=tokenizer, id2label=label_names)
            else:
                if save is not None:
                    _set_label_names(model, label_names)
                    save_transformers_model(model, tmp)
                else:
                    save_model(model, str(tmp / "model.safetensors"))
                save_tokenizer(tokenizer, tmp, where)
        return target

    def last_checkpoint(self) -> str:
        """Where the last complete checkpoint is and its optimizer step, in words (for messages)."""
        try:
            path = self.find_checkpoint()
            step = json.loads((path / "trainer_state.json").read_text()).get("global_step")
        except (OSError, ValueError):
            return f"there is no complete checkpoint in {self.checkpoint}"
        return f"the last checkpoint (optimizer step {step}) is in {path}"

    # --- checkpoints ------------------------------------------------------------------------------

    def write_checkpoint(self, model: nn.Module, blobs: Dict[str, Any], state: Dict[str, Any]) -> None:
        """Write ``checkpoint/``: the model's weights, ``blobs`` (torch.save) and ``state`` (JSON, last)."""
        from safetensors.torch import save_model

        with atomic_dir(self.checkpoint) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(blobs, tmp / "state.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(state))

    def write_sharded_checkpoint(self, tensors: Dict[str, Any], blobs: Dict[str, Any], state: Dict[str, Any]) -> None:
        """Write ``checkpoint/`` from every rank (a collective): ``tensors`` (nested dicts of tensors and
        DTensors) through ``torch.distributed.checkpoint`` into ``sharded/`` — each rank writes its
        shards, so the folder must be on a file system every rank sees — then rank 0 writes ``blobs``
        (torch.save) and ``state`` (JSON, last) and swaps the folder in, atomically as
        :meth:`write_checkpoint`."""
        import torch.distributed.checkpoint as dcp

        from .. import distributed as D

        main = D.is_main_process()
        with atomic_dir(self.checkpoint) if main else nullcontext() as tmp:
            tmp = Path(D.broadcast_object(str(tmp) if main else None))
            dcp.save(tensors, checkpoint_id=str(tmp / SHARDED))
            if main:
                torch.save(blobs, tmp / "state.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(state))
        D.barrier()  # no rank goes on (or dies) before the checkpoint is in place

    @staticmethod
    def is_sharded(path: Path) -> bool:
        """Whether the checkpoint at ``path`` was written by :meth:`write_sharded_checkpoint`."""
        return (Path(path) / SHARDED / ".metadata").is_file()

    @staticmethod
    def load_sharded(path: Path, tensors: Dict[str, Any]) -> None:
        """Fill ``tensors`` (nested dicts of tensors or DTensors of the saved shapes, placed as this run
        wants them) in place from the sharded checkpoint at ``path``, resharding to this run's world
        size (one process included)."""
        import torch.distributed.checkpoint as dcp

        dcp.load(tensors, checkpoint_id=str(Path(path) / SHARDED))

    def find_checkpoint(self, path: Optional[Path] = None, where: str = "fastft.Trainer.resume") -> Path:
        """The complete checkpoint at ``path`` (default ``<run>/checkpoint``), or the ``.old`` one a
        run killed while swapping left behind.

        Raises:
            FileNotFoundError: neither holds a complete checkpoint.
        """
        path = self.checkpoint if path is None else Path(path)
        for candidate in (path, path.with_name(path.name + ".old")):
            if (candidate / "trainer_state.json").is_file():
                return candidate
        raise FileNotFoundError(f"{where}: no complete checkpoint in {path}")

    @staticmethod
    def read_checkpoint(path: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """``(state, blobs)`` of the checkpoint at ``path``; changes nothing."""
        state = json.loads((path / "trainer_state.json").read_text())
        blobs = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        return state, blobs

    @staticmethod
    def load_weights(path: Path, model: nn.Module, device: torch.device) -> None:
        """Load the checkpoint's ``model.safetensors`` into ``model`` (on ``device``)."""
        from safetensors.torch import load_model

        load_model(model, str(path / "model.safetensors"), device=str(device))

    # --- plots ------------------------------------------------------------------------------------

    def plot_curves(self, history: List[Dict[str, Any]]) -> None:
        """``curves.png``: train / validation loss and the validation metrics per optimizer step
        (nothing when matplotlib is missing or nothing was recorded)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        rows = [r for r in history if "val_loss" in r or "train_loss" in r]
        if not rows:
            return
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        x = [r["step"] for r in rows]
        ax1.plot(x, [r.get("train_loss") for r in rows], marker="o", label="train loss")
        if any("val_loss" in r for r in rows):
            ax1.plot(x, [r.get("val_loss") for r in rows], marker="o", label="val loss")
        ax1.set_xlabel("optimizer step")
        ax1.set_ylabel("loss")
        ax1.legend()
        metric_keys = sorted({k for r in rows for k in r if k.startswith("val_") and k != "val_loss"})
        for key in metric_keys:
            ax2.plot(x, [r.get(key) for r in rows], marker="o", label=key)
        ax2.set_xlabel("optimizer step")
        if metric_keys:
            ax2.legend()
        fig.tight_layout()
        atomic_write(self.path / "curves.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (a preempted cluster job) during training, remembered instead of
    acted on at once, so the training loop can write a checkpoint at the next optimizer-step boundary
    and then :meth:`stop`.

    A context manager. On entry it installs its handlers — only when ``enabled`` and in the main
    thread (the only thread Python lets set handlers) — and on exit it puts the previous handlers
    back. A second SIGINT raises KeyboardInterrupt at once.

    Args:
        enabled: handle the signals (the trainers: when the run has a run folder). The same on every rank.
        announce: print a line when a signal arrives (rank 0).
    """

    NAMES = ("SIGINT", "SIGTERM")

    def __init__(self, enabled: bool = True, announce: bool = True) -> None:
        self.enabled, self.announce = enabled, announce
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name, None)
                previous = signal.getsignal(sig) if sig is not None else None
                if previous is None:  # a handler not set from Python: it could not be put back
                    continue
                signal.signal(sig, self._handle)
                self._previous[sig] = previous
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._previous:
            sig, previous = self._previous.popitem()
            signal.signal(sig, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt("fastft: second Ctrl-C: stopped at once")
        if self.received is None:
            self.received = signum
            if self.announce:
                again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
                print(f"fastft: {signal.Signals(signum).name} received: training stops after a checkpoint at the "
                      f"end of this optimizer step{again}", file=sys.stderr, flush=True)

    def pending(self) -> Optional[str]:
        """``"SIGINT"`` when any rank received SIGINT, else ``"SIGTERM"`` when any received SIGTERM, else
        None (always None when not ``enabled``). Under torchrun a collective: every rank calls it at
        the same point and gets the same answer, so all ranks stop at the same step."""
        if not self.enabled:
            return None
        from .. import distributed as D

        got_int, got_term = D.all_reduce_sum([float(self.received == signal.SIGINT),
                                              float(self.received == signal.SIGTERM)])
        return "SIGINT" if got_int else "SIGTERM" if got_term else None

    def stop(self, name: str, message: str) -> None:
        """Stop for the signal ``name``: SIGINT raises KeyboardInterrupt(``message``); SIGTERM prints
        ``message`` (when announcing) and raises SystemExit with status 143 (128 + SIGTERM, what a
        process ended by SIGTERM reports, so a scheduler sees the job ended by its signal)."""
        if name == "SIGINT":
            raise KeyboardInterrupt(message)
        if self.announce:
            print(message, file=sys.stderr, flush=True)
        raise SystemExit(128 + int(signal.SIGTERM))
