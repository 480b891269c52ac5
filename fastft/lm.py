"""Language-model helpers shared by every LM loss in fastft (fine-tuning, replay, continued pretraining,
forgetting measures): what kind of LM a model is, BERT's masking, packing text into blocks, padding
LM rows, and the LM loss of a batch."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["lm_kind", "mask_tokens", "pack_blocks", "lm_examples", "right_pad", "pad_lm_batch", "lm_loss",
           "read_texts", "check_tokenizer", "pad_id_of", "is_peft_model",
           "fused_lm_parts", "fused_causal_lm_loss"]


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft`` model (a ``PeftModel``: LoRA and the other adapters)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def lm_kind(model: nn.Module) -> Optional[str]:
    """``"causal"`` for a causal LM (``*ForCausalLM``, ``*LMHeadModel``), ``"masked"`` for a masked LM
    (``*ForMaskedLM``, ``*ForPreTraining``), None otherwise (judged by the class name, as the
    Hugging Face Auto classes name them); a ``peft`` model is judged by its base model."""
    if is_peft_model(model):
        model = model.get_base_model()
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal"
    if name.endswith("ForMaskedLM") or name.endswith("ForPreTraining"):
        return "masked"
    return None


def read_texts(data: Any, where: str) -> List[str]:
    """The texts of ``data`` (texts, or ``(text, label)`` pairs whose labels are ignored).

    Raises:
        ValueError: ``data`` is empty. TypeError: an item is not text (the message names it).
    """
    items = list(data)
    if not items:
        raise ValueError(f"fastft.{where}: the text data is empty")
    texts = [x[0] if isinstance(x, (tuple, list)) else x for x in items]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"fastft.{where}: item {bad} is {type(texts[bad]).__name__}, expected text (str, or "
                        "(text, label) pairs)")
    return texts


def check_tokenizer(tokenizer: Any, model: Optional[nn.Module], where: str) -> None:
    """Raise ValueError (naming ``where``) when ``tokenizer`` is missing or has more tokens than
    ``model``'s vocabulary (they do not belong together)."""
    if tokenizer is None or not callable(tokenizer):
        raise ValueError(f"fastft.{where}: needs a tokenizer (e.g. transformers.AutoTokenizer) to read text")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if vocab is not None and size is not None and size > vocab:
        raise ValueError(f"fastft.{where}: the tokenizer has {size} tokens but the model's vocabulary has {vocab}: "
                         "they do not belong together")


def mask_tokens(input_ids: Tensor, tokenizer: Any, probability: float = 0.15, generator: Optional[torch.Generator] = None
                ) -> Tuple[Tensor, Tensor]:
    """BERT's masking (Devlin et al., 2019): pick ``probability`` of the non-special tokens; of those 80%
    become [MASK], 10% a random token, 10% stay.

    Args:
        input_ids: int64 ``[B, T]``.
    Returns:
        (masked ids ``[B, T]``, labels ``[B, T]`` with -100 where nothing is predicted).
    """
    ids = input_ids.clone()
    labels = input_ids.clone()
    special = torch.tensor([tokenizer.get_special_tokens_mask(row.tolist(), already_has_special_tokens=True)
                            for row in input_ids], dtype=torch.bool)
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    to_mask = chosen & (torch.rand(ids.shape, generator=generator) < 0.8)
    ids[to_mask] = tokenizer.mask_token_id
    to_random = chosen & ~to_mask & (torch.rand(ids.shape, generator=generator) < 0.5)
    ids[to_random] = torch.randint(len(tokenizer), ids.shape, generator=generator)[to_random]
    return ids, labels


def pack_blocks(texts: Sequence[str], tokenizer: Any, block_size: int = 128) -> List[List[int]]:
    """Tokenize ``texts``, join them with the end-of-text (or separator) token and cut the stream into
    blocks of exactly ``block_size`` tokens (the rest is dropped): no padding is ever trained on.

    Raises:
        ValueError: ``block_size < 2``.
    """
    if block_size < 2:
        raise ValueError(f"fastft.pack_blocks: block_size must be >= 2, got {block_size}")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream: List[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if sep is not None:
            stream.append(sep)
    return [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def lm_examples(texts: Sequence[str], tokenizer: Any, kind: str, max_length: int, mlm_probability: float = 0.15,
                seed: int = 0, pack: bool = False) -> List[Dict[str, Any]]:
    """Language-modelling examples ``{"input_ids", "labels"}`` (token lists) of ``texts``: packed into
    blocks of ``max_length`` tokens (``pack=True``) or one per text truncated to ``max_length``; for a
    masked LM with fixed seeded masks. Rows with nothing to predict (a one-token causal row, a masked
    row without a masked token) are dropped: their loss would be NaN."""
    if pack:
        rows = pack_blocks(texts, tokenizer, max_length)
    else:
        rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    if kind == "causal":
        return [{"input_ids": r, "labels": list(r)} for r in rows if len(r) >= 2]
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in rows:
        ids, labels = mask_tokens(torch.tensor([r]), tokenizer, mlm_probability, g)
        if (labels != -100).any():
            out.append({"input_ids": ids[0].tolist(), "labels": labels[0].tolist()})
    return out


def right_pad(rows: Sequence[Sequence[int]], value: int = 0) -> Tuple[Tensor, Tensor]:
    """Token rows padded on the right to the longest: (ids int64 ``[N, T]``, attention mask int64 ``[N, T]``)."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), value, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = torch.as_tensor(r)
        mask[j, :len(r)] = 1
    return ids, mask


def pad_lm_batch(examples: List[Dict[str, Any]], pad_id: int, device: torch.device) -> Dict[str, Tensor]:
    """A batch of LM examples on ``device``: ``input_ids`` (padded with ``pad_id``), ``attention_mask``,
    ``labels`` (padded with -100)."""
    ids, mask = right_pad([e["input_ids"] for e in examples], pad_id)
    labels, _ = right_pad([e["labels"] for e in examples], -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


#: Config attributes of heads that do more than a linear map (Gemma-2's soft-capping, Cohere's and
#: Granite's logit scaling): their LM loss takes the model's own path.
_NONLINEAR_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def fused_lm_parts(lm: nn.Module) -> Optional[Tuple[nn.Module, nn.Linear]]:
    """``(backbone, head)`` of a Hugging Face causal LM whose logits are exactly ``head(backbone(...)
    .last_hidden_state)`` (an ``nn.Linear``, tied or not, bias or not), so that its loss can go through
    :func:`fastft.linear_cross_entropy`; None for anything else (masked LMs, whose head transforms
    before its linear map; heads that soft-cap or scale the logits; models without the standard
    ``base_model_prefix`` / ``get_output_embeddings``)."""
    if lm_kind(lm) != "causal":
        return None
    if is_peft_model(lm):
        lm = lm.get_base_model()  # peft injects its adapters into the base model's own modules
        if lm_kind(lm) != "causal":
            return None
    config = getattr(lm, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _NONLINEAR_HEAD):
        return None
    try:
        head = lm.get_output_embeddings()
        backbone = getattr(lm, lm.base_model_prefix)
    except (AttributeError, TypeError, NotImplementedError):
        return None
    if type(head) is not nn.Linear or not isinstance(backbone, nn.Module) or backbone is lm:
        return None
    return backbone, head


def fused_causal_lm_loss(lm: nn.Module, batch: Dict[str, Tensor],
                         caller: Optional[nn.Module] = None) -> Optional[Tensor]:
    """The token-mean next-token loss of ``batch`` (``input_ids``, ``labels`` [B, T] with -100 where
    nothing is predicted, ``attention_mask``...) computed as the model's own loss is — labels shifted
    by one, the mean over the targets — through :func:`fastft.linear_cross_entropy`, without the
    ``[B, T, V]`` logits; under autocast the head's matmul runs in the autocast dtype, as ``lm_head``
    would. None when :func:`fused_lm_parts` refuses the model (use its own loss then).

    The computation runs as ``lm``'s forward, inside the call of ``caller`` (default ``lm``; e.g. the
    DistributedDataParallel wrapper of ``lm``), so that what wraps the model's call works as for its
    own forward: DDP's gradient bookkeeping, FSDP2's gathering of the sharded weights (the head's
    included) and the reduce-scatter of their gradients."""
    parts = fused_lm_parts(lm)
    labels = batch.get("labels")
    if parts is None or labels is None or labels.dim() != 2:
        return None
    from .losses import linear_cross_entropy

    backbone, head = parts

    def forward(labels: Tensor, **inputs: Any) -> Tensor:
        out = backbone(**inputs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        weight, bias = head.weight, head.bias
        if torch.is_autocast_enabled(hidden.device.type):
            dtype = torch.get_autocast_dtype(hidden.device.type)
            weight, bias = weight.to(dtype), (None if bias is None else bias.to(dtype))
        with torch.autocast(hidden.device.type, enabled=False):
            return linear_cross_entropy(hidden[:, :-1].to(weight.dtype), weight, labels[:, 1:], bias)

    own = lm.__dict__.get("forward")
    lm.forward = forward
    try:
        return (lm if caller is None else caller)(**batch)
    finally:
        if own is None:
            del lm.forward
        else:
            lm.forward = own


def lm_loss(lm: nn.Module, batch: Dict[str, Tensor], fused: bool = True) -> Tensor:
    """The model's token-mean LM loss of ``batch``: through :func:`fused_causal_lm_loss` for the causal
    LMs it takes (``fused=True``), else the model's own ``lm(**batch).loss``.

    Raises:
        TypeError: the model returned no loss for ``labels=``.
    """
    if fused:
        loss = fused_causal_lm_loss(lm, batch)
        if loss is not None:
            return loss
    out = lm(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise TypeError(f"fastft: the language model {type(lm).__name__} returned no loss for labels=...")
    return loss


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, or 0 when it has none (padding is masked out and never trained on)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else 0
