"""The run folder of a training run: what the trainers write and how they read it back.

::

    <output_dir>/
      metrics.jsonl        one JSON record per evaluation (appended, flushed line by line)
      tensorboard/         the same scalars, when TensorBoard is installed
      checkpoint/          model.safetensors, state.pt (optimizer, scheduler, scaler, callbacks,
                           replay, RNG states), trainer_state.json (written last: marks it complete)
      model/               the final model (``save_pretrained`` or model.safetensors)
      curves.png           losses and validation metrics per optimizer step

Folders are built under a temporary name and swapped in (:func:`fastft.atomic.atomic_dir`), so a run
killed while saving leaves the previous checkpoint readable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..atomic import atomic_dir, atomic_write

__all__ = ["RunDir", "CHECKPOINT"]

CHECKPOINT = "checkpoint"


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

    def save_model(self, model: nn.Module, name: str = "model") -> Path:
        """``<run>/<name>/``: ``model.save_pretrained`` when it has one, else ``model.safetensors``."""
        from safetensors.torch import save_model

        target = self.path / name
        with atomic_dir(target) as tmp:
            if hasattr(model, "save_pretrained"):
                model.save_pretrained(tmp)
            else:
                save_model(model, str(tmp / "model.safetensors"))
        return target

    # --- checkpoints ------------------------------------------------------------------------------

    def write_checkpoint(self, model: nn.Module, blobs: Dict[str, Any], state: Dict[str, Any]) -> None:
        """Write ``checkpoint/``: the model's weights, ``blobs`` (torch.save) and ``state`` (JSON, last)."""
        from safetensors.torch import save_model

        with atomic_dir(self.checkpoint) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(blobs, tmp / "state.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(state))

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
