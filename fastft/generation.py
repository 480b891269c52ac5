"""Batched text generation with a causal LM: left padding, greedy or seeded sampling, stop strings —
what validation on generated text, the generative prompting baseline and code evaluation share."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn

from .lm import check_tokenizer, lm_kind

__all__ = ["generate", "eos_ids", "cut_at_stop"]

Prompt = Union[str, Sequence[int]]


def eos_ids(model: nn.Module, tokenizer: Any) -> List[int]:
    """The token ids that end a generation: the tokenizer's EOS and those of the model's
    ``generation_config`` (chat models end a turn with their own token, e.g. ``<|im_end|>``)."""
    ids: List[int] = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        for i in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def cut_at_stop(text: str, stop: Optional[Sequence[str]]) -> str:
    """``text`` up to (without) the first occurrence of any of the ``stop`` strings (one str: that one)."""
    if isinstance(stop, str):
        stop = [stop]
    if stop:
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut]
    return text


def _generating_model(model: nn.Module) -> nn.Module:
    """The model that has ``.generate``: the model itself, or the module DDP / FSDP wrap."""
    while not hasattr(model, "generate") and hasattr(model, "module"):
        model = model.module
    return model


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], *, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: Optional[int] = None,
             num_return_sequences: int = 1, seed: int = 0, batch_size: int = 8,
             max_prompt_tokens: Optional[int] = None, stop: Optional[Sequence[str]] = None,
             **generate_kwargs: Any) -> Union[List[str], List[List[str]]]:
    """Complete each prompt with a causal LM (Hugging Face ``generate``; a ``peft`` model too).

    Prompts are batched by length (``batch_size`` prompts a batch) and padded on the left, so every
    row's new tokens start at the same position. Greedy decoding by default; with ``do_sample=True``
    sampling with ``temperature`` / ``top_p`` / ``top_k``, seeded by ``seed`` — in a forked RNG, so
    generating never changes the caller's random streams (a training run that validates by
    generation stays resumable bit-identically). Generation of a row ends at an EOS token of
    :func:`eos_ids`, at ``max_new_tokens``, or at one of the ``stop`` strings.

    Args:
        model: a causal LM (``*ForCausalLM``, or a ``peft`` / DDP wrapper of one).
        tokenizer: its Hugging Face tokenizer. A tokenizer without a pad token pads with EOS (the
            padding is masked out).
        prompts: texts (tokenized with the tokenizer's special tokens, as training tokenizes text) or
            token-id lists (used as they are, e.g. a rendered chat template).
        max_new_tokens: most tokens generated per completion (int >= 1). Default 64.
        num_return_sequences: completions per prompt (> 1 needs ``do_sample=True``).
        max_prompt_tokens: keep only each prompt's last this many tokens (left truncation); None: all.
        stop: strings that end a completion (the completion is cut before the first of them); one
            str is one stop string.
        **generate_kwargs: passed to ``model.generate`` (e.g. ``repetition_penalty``, ``num_beams``).

    Returns:
        The decoded new text of each prompt (special tokens skipped, not stripped: leading
        whitespace, such as a code completion's indentation, is kept), in the order of ``prompts``;
        for ``num_return_sequences > 1`` a list of that many texts per prompt.

    Raises:
        ValueError: a model that is not a causal LM, no tokenizer, empty ``prompts`` or an empty
            prompt (naming ``prompts[i]``), an argument out of range (naming it).
    """
    from transformers import GenerationConfig

    where = "fastft.generate"
    gen_model = _generating_model(model)
    base = gen_model.get_base_model() if hasattr(gen_model, "get_base_model") else gen_model
    if lm_kind(gen_model) != "causal" and lm_kind(base) != "causal":
        raise ValueError(f"{where}: needs a causal LM (*ForCausalLM), got {type(gen_model).__name__}")
    check_tokenizer(tokenizer, None, "generate")
    for name, value in (("max_new_tokens", max_new_tokens), ("num_return_sequences", num_return_sequences),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {name} must be an int >= 1, got {value!r}")
    if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
        raise ValueError(f"{where}: max_prompt_tokens must be None or an int >= 1, got {max_prompt_tokens!r}")
    if num_return_sequences > 1 and not do_sample and generate_kwargs.get("num_beams", 1) < num_return_sequences:
        raise ValueError(f"{where}: num_return_sequences={num_return_sequences} needs do_sample=True (greedy "
                         "decoding gives one completion)")
    if do_sample and not temperature > 0:
        raise ValueError(f"{where}: temperature must be > 0 when sampling, got {temperature!r}")
    if isinstance(stop, str):
        stop = [stop]  # one stop string, not its characters
    if stop is not None:
        stop = list(stop)
        bad = next((s for s in stop if not isinstance(s, str) or not s), None)
        if bad is not None or not stop:
            raise ValueError(f"{where}: stop must be None, a non-empty str or a list of them, got {stop!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{where}: seed must be an int, got {seed!r}")
    if isinstance(prompts, str):
        raise TypeError(f"{where}: prompts must be a list of prompts, got one str; wrap it: [prompt]")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{where}: prompts is empty")
    rows: List[List[int]] = []
    for i, p in enumerate(prompts):
        ids = tokenizer(p)["input_ids"] if isinstance(p, str) else [int(t) for t in p]
        if not ids:
            raise ValueError(f"{where}: prompts[{i}] is empty (no tokens); a prompt needs at least one token")
        rows.append(ids[-max_prompt_tokens:] if max_prompt_tokens else ids)

    stops = eos_ids(gen_model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample,
                              num_return_sequences=num_return_sequences, pad_token_id=pad,
                              eos_token_id=stops or None,
                              **({"temperature": temperature, "top_p": top_p, "top_k": top_k or 0}
                                 if do_sample else {}), **generate_kwargs)
    extra = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    device = next(gen_model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: List[Any] = [None] * len(rows)
    was_training = gen_model.training
    gen_model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(rows[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for j, i in enumerate(idx):
                    ids[j, width - len(rows[i]):] = torch.tensor(rows[i])
                    mask[j, width - len(rows[i]):] = 1
                generated = gen_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                               generation_config=config, **extra)
                texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
                texts = [cut_at_stop(t, stop) for t in texts]
                for j, i in enumerate(idx):
                    chunk = texts[j * num_return_sequences:(j + 1) * num_return_sequences]
                    out[i] = chunk if num_return_sequences > 1 else chunk[0]
    finally:
        gen_model.train(was_training)
    return out
