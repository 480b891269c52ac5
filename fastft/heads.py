"""Task heads: ``ClassificationHead`` (pool + dropout + linear) and ``SequenceClassifier`` (encoder + head)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

from torch import Tensor, nn

from .atomic import atomic_write
from .param_groups import mark_new
from .pooling import POOL_MODES, Pool

__all__ = ["ClassificationHead", "SequenceClassifier", "ClassifierOutput", "last_hidden_state"]

HEAD_WEIGHTS = "fastft_head.safetensors"
HEAD_CONFIG = "fastft_head.json"
ENCODER_WEIGHTS = "encoder.safetensors"


class ClassificationHead(nn.Module):
    """Pool the token states, apply dropout, then a linear layer: [B, T, H] (+ mask) -> logits [B, num_labels].

    The linear layer is initialised as BERT's heads are: weights normal with std 0.02, bias zero.

    Args:
        hidden_size: H, the encoder's hidden size.
        num_labels: number of outputs (1 for regression).
        pool: ``"cls"``, ``"mean"``, ``"max"`` or ``"last"`` (see :func:`fastft.pool`).
        dropout: dropout probability before the linear layer.
    """

    def __init__(self, hidden_size: int, num_labels: int, pool: str = "cls", dropout: float = 0.1) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"fastft.ClassificationHead: hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(num_labels, int) or num_labels <= 0:
            raise ValueError(f"fastft.ClassificationHead: num_labels must be a positive int, got {num_labels!r}")
        if pool not in POOL_MODES:
            raise ValueError(f"fastft.ClassificationHead: unknown pool {pool!r}; expected one of {POOL_MODES}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"fastft.ClassificationHead: dropout must be in [0, 1), got {dropout!r}")
        self.hidden_size, self.num_labels, self.dropout_p = hidden_size, num_labels, float(dropout)
        self.pool = Pool(pool)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if hidden.dim() == 3 and hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"fastft.ClassificationHead: hidden has {hidden.shape[-1]} features but the head was "
                             f"built for hidden_size={self.hidden_size}")
        return self.classifier(self.dropout(self.pool(hidden, attention_mask)))

    def config(self) -> Dict[str, Any]:
        """The constructor arguments, for saving."""
        return dict(hidden_size=self.hidden_size, num_labels=self.num_labels, pool=self.pool.mode,
                    dropout=self.dropout_p)


class ClassifierOutput(dict):
    """What :class:`SequenceClassifier` returns: ``.logits`` [B, num_labels] and ``.loss`` (when labels
    were given), also readable as ``out["logits"]`` / ``out["loss"]`` like a Hugging Face ModelOutput."""

    def __getattr__(self, name: str) -> Any:
        if name in ("loss", "logits", "hidden_states"):
            return self.get(name)
        raise AttributeError(name)


def last_hidden_state(output: Any) -> Tensor:
    """The ``[B, T, H]`` hidden states of an encoder's output: the tensor itself, ``.last_hidden_state``
    (a Hugging Face ModelOutput or dict) or the first item of a tuple.

    Raises:
        TypeError: no ``[B, T, H]`` tensor found.
    """
    if isinstance(output, Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, dict):
        hidden = output.get("last_hidden_state")
    if hidden is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        hidden = output[0]
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise TypeError("fastft.SequenceClassifier: the encoder must return a [B, T, H] tensor or an output with "
                        f"last_hidden_state, got {type(output).__name__}")
    return hidden


class SequenceClassifier(nn.Module):
    """A Hugging Face encoder (or any module returning ``last_hidden_state`` or a [B, T, H] tensor) plus a
    :class:`ClassificationHead`.

    ``forward(input_ids=None, attention_mask=None, labels=None, **encoder_kwargs)`` passes the
    attention mask to the encoder and to the pooling, and returns a :class:`ClassifierOutput` with
    ``logits`` and, when ``labels`` are given, ``loss`` (cross-entropy; MSE when ``num_labels == 1``),
    so it plugs into fastft's trainer and into ``transformers.Trainer``.

    Args:
        encoder: the pretrained encoder.
        num_labels: number of classes (1: regression).
        pool: pooling of the head (default ``"mean"``).
        hidden_size: the encoder's hidden size; read from ``encoder.config.hidden_size`` when None.
        dropout: dropout of the head.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, pool: str = "mean", hidden_size: Optional[int] = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if hidden_size is None:
            hidden_size = getattr(getattr(encoder, "config", None), "hidden_size", None)
            if hidden_size is None:
                raise ValueError("fastft.SequenceClassifier: cannot read the encoder's hidden size "
                                 "(no encoder.config.hidden_size); pass hidden_size=...")
        self.encoder = encoder
        self.head = ClassificationHead(hidden_size, num_labels, pool=pool, dropout=dropout)
        mark_new(self.head)  # a fresh head: never anchored by L2-to-init (see fastft.param_groups)
        self.num_labels = num_labels

    @property
    def config(self):
        """The encoder's config (Hugging Face), so tools that read ``model.config`` keep working."""
        return getattr(self.encoder, "config", None)

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, **encoder_kwargs: Any) -> ClassifierOutput:
        if input_ids is not None:
            encoder_kwargs["input_ids"] = input_ids
        if attention_mask is not None:
            encoder_kwargs["attention_mask"] = attention_mask
        hidden = last_hidden_state(self.encoder(**encoder_kwargs))
        logits = self.head(hidden, attention_mask)
        if labels is None:
            return ClassifierOutput(logits=logits)
        if self.num_labels == 1:
            loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        else:
            if labels.dtype.is_floating_point or labels.numel() and (
                    int(labels.min()) < 0 or int(labels.max()) >= self.num_labels):
                raise ValueError(f"fastft.SequenceClassifier: labels must be integers in [0, {self.num_labels}), "
                                 f"got dtype {labels.dtype} with values in "
                                 f"[{labels.min().item()}, {labels.max().item()}]")
            loss = nn.functional.cross_entropy(logits, labels)
        return ClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """Save encoder and head to the folder ``path``: the encoder as Hugging Face does
        (``encoder.save_pretrained``) or as ``encoder.safetensors``, the head as
        ``fastft_head.safetensors`` + ``fastft_head.json``. Files are written to a temporary name and
        moved into place, so an interrupted save never leaves a half-written head."""
        from safetensors.torch import save_file, save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if hasattr(self.encoder, "save_pretrained"):
            self.encoder.save_pretrained(path)
        else:
            atomic_write(path / ENCODER_WEIGHTS, lambda tmp: save_model(self.encoder, tmp))
        state = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        atomic_write(path / HEAD_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        atomic_write(path / HEAD_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(self.head.config(), indent=2)))

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], encoder: Optional[nn.Module] = None,
                        **encoder_kwargs: Any) -> "SequenceClassifier":
        """Load what :meth:`save_pretrained` wrote. The encoder is ``transformers.AutoModel.from_pretrained(path,
        **encoder_kwargs)`` unless ``encoder`` is given (then ``encoder.safetensors`` is loaded into it when present)."""
        from safetensors.torch import load_file, load_model

        path = Path(path)
        config_file = path / HEAD_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"fastft.SequenceClassifier.from_pretrained: no {HEAD_CONFIG} in {path}; "
                                    "was it saved with SequenceClassifier.save_pretrained?")
        config = json.loads(config_file.read_text())
        if encoder is None:
            from transformers import AutoModel

            encoder = AutoModel.from_pretrained(path, **encoder_kwargs)
        elif (path / ENCODER_WEIGHTS).is_file():
            load_model(encoder, str(path / ENCODER_WEIGHTS))
        model = cls(encoder, config["num_labels"], pool=config["pool"], hidden_size=config["hidden_size"],
                    dropout=config["dropout"])
        model.head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)))
        mark_new(model.head, new=False)  # trained weights now: anchored like the encoder
        return model
