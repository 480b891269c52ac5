"""Task heads: ``ClassificationHead`` (pool + dropout + linear) and ``SequenceClassifier`` (encoder + head),
and the folder a fastft model is saved in.

A saved fastft model folder (:meth:`SequenceClassifier.save_pretrained`; ``MultiTaskModel`` likewise)::

    <folder>/
      config.json              marks the folder as fastft's: transformers' Auto model classes refuse it with
                               an error naming the call that loads it (never a silently re-initialised head)
      encoder/                 the encoder as transformers saves it (config.json, model.safetensors)
                               — or encoder.safetensors beside it for a plain PyTorch encoder
      fastft_head.json         the head's arguments and the label names (id2label / label2id)
      fastft_head.safetensors  the head's weights
      tokenizer.json, tokenizer_config.json, ...   the tokenizer, when there is one:
                               ``transformers.AutoTokenizer.from_pretrained(folder)`` loads it

Folders written before ``encoder/`` existed (the encoder's files at the top) still load.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .atomic import atomic_dir, atomic_write
from .param_groups import mark_new
from .pooling import POOL_MODES, Pool

__all__ = ["ClassificationHead", "SequenceClassifier", "ClassifierOutput", "last_hidden_state",
           "save_transformers_model"]

HEAD_WEIGHTS = "fastft_head.safetensors"
HEAD_CONFIG = "fastft_head.json"
ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_DIR = "encoder"
MODEL_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


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
        if name in ("loss", "logits"):
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

    Save with :meth:`save_pretrained`; load back — encoder, head, label names and tokenizer — with the
    one call :meth:`from_pretrained` (see the module docstring for the folder).

    Args:
        encoder: the pretrained encoder.
        num_labels: number of classes (1: regression).
        pool: pooling of the head (default ``"mean"``).
        hidden_size: the encoder's hidden size; read from ``encoder.config.hidden_size`` when None.
        dropout: dropout of the head.
        id2label: the class names: a list (index = class id) or a mapping class id -> name; saved with
            the model. None: no names.
        tokenizer: the tokenizer of the encoder (a Hugging Face tokenizer), saved with the model.

    Attributes:
        id2label: dict class id -> name, or None. label2id: the inverse, or None.
        tokenizer: the tokenizer, or None.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, pool: str = "mean", hidden_size: Optional[int] = None,
                 dropout: float = 0.1, id2label: Union[Sequence[Any], Mapping[Any, Any], None] = None,
                 tokenizer: Any = None) -> None:
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
        self.id2label = label_mapping(id2label, num_labels, "fastft.SequenceClassifier")
        self.tokenizer = tokenizer

    @property
    def label2id(self) -> Optional[Dict[Any, int]]:
        """Class name -> id (the inverse of ``id2label``), or None."""
        return None if self.id2label is None else {name: i for i, name in self.id2label.items()}

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

    def save_pretrained(self, path: Union[str, os.PathLike], tokenizer: Any = None,
                        id2label: Union[Sequence[Any], Mapping[Any, Any], None] = None) -> None:
        """Save the model to the folder ``path`` (the layout is in the module docstring): the encoder
        in ``encoder/`` as transformers saves it (a model transformers loaded from GGUF, dequantised,
        is saved as the dense model it is) or as ``encoder.safetensors``, the head as
        ``fastft_head.safetensors`` + ``fastft_head.json`` (with the label names), the tokenizer, and a
        ``config.json`` that makes transformers' Auto model classes refuse the folder with an error
        naming :meth:`from_pretrained`. Each file or folder is written under a temporary name and
        moved into place, so an interrupted save never leaves a half-written one.

        Args:
            path: the folder (created when missing).
            tokenizer: saved instead of ``self.tokenizer``.
            id2label: class names saved instead of ``self.id2label`` (a list, index = class id, or a
                mapping id -> name).
        """
        from safetensors.torch import save_file, save_model

        where = "fastft.SequenceClassifier.save_pretrained"
        names = label_mapping(id2label, self.num_labels, where) if id2label is not None else self.id2label
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if hasattr(self.encoder, "save_pretrained"):
            with atomic_dir(path / ENCODER_DIR) as tmp:
                save_transformers_model(self.encoder, tmp)
        else:
            atomic_write(path / ENCODER_WEIGHTS, lambda tmp: save_model(self.encoder, tmp))
        state = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        atomic_write(path / HEAD_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        config = {**self.head.config(), **labels_json(names)}
        atomic_write(path / HEAD_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
        save_tokenizer(tokenizer if tokenizer is not None else self.tokenizer, path, where)
        write_model_config(path, "SequenceClassifier")

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], encoder: Optional[nn.Module] = None,
                        **encoder_kwargs: Any) -> "SequenceClassifier":
        """Load what :meth:`save_pretrained` wrote — the run folder's ``model/`` of a
        :class:`fastft.Trainer` run on a SequenceClassifier — in eval mode (as transformers loads):
        the encoder, the head, ``id2label`` / ``label2id`` and ``tokenizer`` (None when the folder has
        none)::

            model = fastft.SequenceClassifier.from_pretrained("runs/x/model")
            batch = model.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
            names = [model.id2label[i] for i in model(**batch).logits.argmax(-1).tolist()]

        The encoder is ``transformers.AutoModel.from_pretrained(<path>/encoder, **encoder_kwargs)``
        unless ``encoder`` is given (then ``encoder.safetensors`` is loaded into it when present).
        Folders of earlier fastft versions (the encoder's files at the top) load too.

        Raises:
            FileNotFoundError: no ``fastft_head.json`` in ``path``, or a plain PyTorch encoder was saved
                and no ``encoder`` is given.
        """
        from safetensors.torch import load_file

        where = "fastft.SequenceClassifier.from_pretrained"
        path = Path(path)
        config_file = path / HEAD_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"{where}: no {HEAD_CONFIG} in {path}; was it saved with "
                                    "SequenceClassifier.save_pretrained?")
        config = json.loads(config_file.read_text())
        encoder = load_encoder(path, encoder, where, **encoder_kwargs)
        model = cls(encoder, config["num_labels"], pool=config["pool"], hidden_size=config["hidden_size"],
                    dropout=config["dropout"], id2label=config.get("id2label"), tokenizer=load_tokenizer(path))
        model.head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)))
        mark_new(model.head, new=False)  # trained weights now: anchored like the encoder
        return model.eval()


# --- the saved folder -------------------------------------------------------------------------------

def label_mapping(id2label: Union[Sequence[Any], Mapping[Any, Any], None], num_labels: int,
                  where: str) -> Optional[Dict[int, Any]]:
    """``id2label`` as a dict class id -> name: from a list / tuple of names (index = class id) or a
    mapping whose keys are class ids (ints, or digit strings as JSON writes them). None stays None.

    Raises:
        TypeError: another kind of object. ValueError: not one name for each class id
            ``0 .. num_labels - 1``, or a name given twice.
    """
    if id2label is None:
        return None
    if isinstance(id2label, Mapping):
        try:
            out = {int(k): v for k, v in id2label.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{where}: id2label's keys must be class ids (0, 1, ...), got {list(id2label)}")
    elif isinstance(id2label, (list, tuple)):
        out = dict(enumerate(id2label))
    else:
        raise TypeError(f"{where}: id2label must be a list of class names (index = class id) or a dict id -> "
                        f"name, got {type(id2label).__name__}")
    if sorted(out) != list(range(num_labels)):
        raise ValueError(f"{where}: id2label must name each class id 0..{num_labels - 1} once (num_labels="
                         f"{num_labels}), got ids {sorted(out)}")
    names = list(out.values())
    if len({repr(n) for n in names}) != len(names):
        raise ValueError(f"{where}: id2label names a class twice: {names}")
    return {i: out[i] for i in range(num_labels)}


def _json_name(name: Any) -> Any:
    if name is None or isinstance(name, (str, bool, int, float)):
        return name
    return name.item() if hasattr(name, "item") else str(name)  # numpy / torch scalars


def labels_json(id2label: Optional[Mapping[int, Any]]) -> Dict[str, Any]:
    """The ``id2label`` / ``label2id`` entries of a saved config (as transformers writes them), or {}."""
    if id2label is None:
        return {}
    names = {str(i): _json_name(n) for i, n in id2label.items()}
    return {"id2label": names, "label2id": {str(n): int(i) for i, n in names.items()}}


def write_model_config(path: Path, cls_name: str) -> None:
    """``<path>/config.json`` marking the folder as fastft's ``cls_name``. Its ``model_type`` is no
    transformers architecture, so ``AutoModel`` / ``AutoModelForSequenceClassification`` /
    ``AutoConfig.from_pretrained(path)`` raise ("has model type `fastft.<cls_name> (not a transformers
    model: load it with fastft.<cls_name>.from_pretrained(path))` but Transformers does not recognize
    this architecture") instead of building a model with a fresh, random head, while
    ``AutoTokenizer.from_pretrained(path)`` reads only the tokenizer files and loads the tokenizer."""
    load = f"fastft.{cls_name}.from_pretrained(path)"
    config = {"model_type": f"fastft.{cls_name} (not a transformers model: load it with {load})",
              "fastft": {"class": cls_name, "load_with": load, "encoder": f"{ENCODER_DIR}/"}}
    atomic_write(path / MODEL_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def save_tokenizer(tokenizer: Any, path: Path, where: str) -> None:
    """``tokenizer.save_pretrained(path)``; nothing for None; a warning for a tokenizer that cannot be saved."""
    if tokenizer is None:
        return
    if not hasattr(tokenizer, "save_pretrained"):
        import warnings

        warnings.warn(f"{where}: the tokenizer ({type(tokenizer).__name__}) has no save_pretrained, so it is not "
                      f"saved in {path}; load it yourself next to the model", stacklevel=3)
        return
    tokenizer.save_pretrained(str(path))


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved in ``path`` (``transformers.AutoTokenizer``), or None when there is none."""
    if not (path / TOKENIZER_CONFIG).is_file():
        return None
    from transformers import AutoTokenizer, PretrainedConfig

    # A blank config: the tokenizer's class comes from tokenizer_config.json, and transformers does not
    # read (and warn about) the folder's fastft config.json.
    return AutoTokenizer.from_pretrained(str(path), config=PretrainedConfig())


def load_encoder(path: Path, encoder: Optional[nn.Module], where: str, **encoder_kwargs: Any) -> nn.Module:
    """The encoder saved in the fastft model folder ``path`` (``encoder/``; the top level in folders of
    earlier versions), or ``encoder`` with ``encoder.safetensors`` loaded into it when present. A
    peft adapter in ``encoder/`` (a LoRA-trained encoder) is put on ``encoder`` (its base model) or,
    without one, on the base model folder its adapter config names."""
    from safetensors.torch import load_model

    adapter = path / ENCODER_DIR / "adapter_config.json"
    if adapter.is_file():  # a peft (LoRA) encoder: the adapter, on its base model
        from peft import PeftModel

        if encoder is None:
            import json

            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
            if not base or not Path(base).is_dir():
                raise FileNotFoundError(f"{where}: {path / ENCODER_DIR} is a peft adapter whose base model "
                                        f"({base!r}) is not a folder here; pass encoder=<the base model> (loaded as "
                                        "for training) to put the adapter on")
            from transformers import AutoModel

            encoder = AutoModel.from_pretrained(base, **encoder_kwargs)
        return PeftModel.from_pretrained(encoder, str(path / ENCODER_DIR))
    if encoder is not None:
        if (path / ENCODER_WEIGHTS).is_file():
            load_model(encoder, str(path / ENCODER_WEIGHTS))
        return encoder
    folder = path / ENCODER_DIR
    if not (folder / MODEL_CONFIG).is_file():
        if (path / ENCODER_WEIGHTS).is_file():
            raise FileNotFoundError(f"{where}: {path} holds a plain PyTorch encoder ({ENCODER_WEIGHTS}); pass "
                                    "encoder=<a module of the same architecture> to load its weights into")
        folder = path  # saved before encoder/ existed: the encoder's files are at the top
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder), **encoder_kwargs)


def _dense_weights(model: nn.Module) -> bool:
    """Every parameter a plain floating-point tensor and no packed (8-bit) buffer: nothing quantized is left."""
    plain = (Tensor, nn.Parameter)
    return all(type(p) in plain and p.is_floating_point() for p in model.parameters()) and \
        all(b.dtype not in (torch.uint8, torch.int8) for b in model.buffers())


def _serializable(quantizer: Any) -> bool:
    try:
        return bool(quantizer.is_serializable())
    except TypeError:  # older transformers: is_serializable(safe_serialization)
        return bool(quantizer.is_serializable(safe_serialization=True))


@contextlib.contextmanager
def _as_dense(model: nn.Module) -> Iterator[None]:
    """Hide the quantizer of a model whose weights are dense from ``save_pretrained`` (restored after)."""
    quantizer = model.hf_quantizer
    config = model.config
    marker = config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if marker is not None:
            config.quantization_config = marker


def save_transformers_model(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """``model.save_pretrained(path)``. A model transformers loaded from a GGUF file (dequantised to
    ordinary weights, but still carrying its GGUF quantizer, whose ``save_pretrained`` raises "The
    model is quantized with gguf and is not serializable") — or any model whose quantizer cannot
    serialise but whose weights are all dense — is saved as the dense model it is: a standard folder
    without ``quantization_config`` that ``from_pretrained`` loads to the same outputs. The model is
    left as it was."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not _serializable(quantizer) and _dense_weights(model):
        with _as_dense(model):
            model.save_pretrained(str(path))
        return
    model.save_pretrained(str(path))
