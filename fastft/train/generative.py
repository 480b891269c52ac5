"""Generative fine-tuning data: ``{"prompt", "completion"}`` and ``{"messages"}`` (chat) examples turned
into causal-LM token examples whose labels cover only what the model must learn to write — the
completion (and EOS), or the assistant turns — plus the prompts and references that validation by
generation needs. The two formats are those of TRL's ``SFTTrainer`` and the Hugging Face Hub."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["GenerativeData", "generative_format", "generative_examples", "render_chat_prompt", "ROLES"]

#: The roles a ``messages`` example may use.
ROLES = ("system", "user", "assistant")


@dataclass
class GenerativeData:
    """Tokenized generative examples.

    Attributes:
        examples: ``{"input_ids": [int], "labels": [int]}`` per example, labels -100 except on the
            target tokens (the completion and its EOS; the assistant turns with their end-of-turn token).
        prompts: per example the token ids a model is given to generate its answer (the prompt; the
            conversation up to its last assistant turn, with the template's generation prompt).
        references: per example the text it should generate (the completion; the last assistant turn).
        prompt_texts: the prompts as text (for ``val_predictions.jsonl``).
        truncated: how many examples were cut to ``max_length``.
    """

    examples: List[Dict[str, Any]] = field(default_factory=list)
    prompts: List[List[int]] = field(default_factory=list)
    references: List[str] = field(default_factory=list)
    prompt_texts: List[str] = field(default_factory=list)
    truncated: int = 0


def generative_format(first: Any) -> Optional[str]:
    """``"prompt_completion"`` or ``"messages"`` for an example of those forms (a dict, judged by its
    keys), else None."""
    if not isinstance(first, dict) or "input_ids" in first:
        return None
    if "messages" in first:
        return "messages"
    if "prompt" in first or "completion" in first:
        return "prompt_completion"
    return None


def generative_examples(data: Sequence[Dict[str, Any]], tokenizer: Any, max_length: Optional[int], what: str,
                        where: str) -> GenerativeData:
    """Tokenize prompt/completion or chat examples (the form of ``data[0]`` decides; all must share it).

    Prompt/completion: the prompt is tokenized as text is (with the tokenizer's special tokens, e.g.
    a BOS), the completion without special tokens, followed by the tokenizer's EOS; only the
    completion and the EOS are targets. Chat: the conversation is rendered with the tokenizer's chat
    template (``apply_chat_template``); the target tokens are those of each assistant turn's text
    and its end-of-turn marker, found by rendering the conversation up to each assistant turn
    (with the generation prompt) and through it, and mapping those character spans onto the tokens
    (a fast tokenizer's offsets).

    Truncation to ``max_length`` tokens keeps the targets: a prompt is cut from the left (its BOS
    kept), a conversation loses its oldest tokens; a completion longer than ``max_length`` alone is
    cut at the end (losing its EOS). How many examples were cut is warned.

    Raises:
        ValueError: naming ``what[i]``: a missing key or a value that is not text, an empty
            completion or assistant turn, an unknown role, a conversation without an assistant turn,
            a tokenizer without a chat template (for ``messages``), an example whose targets would
            all be cut away, or examples of mixed forms.
    """
    kind = generative_format(data[0])
    if kind is None:
        raise ValueError(f"{where}: {what}[0] is not a generative example ({{'prompt', 'completion'}} or "
                         "{'messages'})")
    for i, e in enumerate(data):
        if generative_format(e) != kind:
            raise ValueError(f"{where}: {what}[{i}] is not of the form of {what}[0] ({_describe(kind)}); use one "
                             "form for all examples")
    out = GenerativeData()
    if kind == "prompt_completion":
        for i, e in enumerate(data):
            _prompt_completion(e, i, tokenizer, max_length, what, where, out)
    else:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{where}: {what} holds chat examples ('messages'), but the tokenizer has no chat "
                             "template: set tokenizer.chat_template to the template the model was trained with "
                             "(a Jinja string, e.g. ChatML), or give {'prompt', 'completion'} examples instead")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{where}: chat examples need a fast tokenizer (character offsets find the assistant "
                             "turns); load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        for i, e in enumerate(data):
            _chat(e, i, tokenizer, max_length, what, where, out)
    if out.truncated:
        warnings.warn(f"{where}: {out.truncated} of {len(data)} examples of {what} are longer than "
                      f"{max_length} tokens (max_length) and were cut, keeping their targets: prompts from the "
                      "left (conversations: their oldest tokens)", stacklevel=4)
    return out


def _describe(kind: str) -> str:
    return "{'prompt', 'completion'}" if kind == "prompt_completion" else "{'messages'}"


def _text(e: Dict[str, Any], key: str, i: int, what: str, where: str, allow_empty: bool = True) -> str:
    if key not in e:
        raise ValueError(f"{where}: {what}[{i}] has no {key!r} key (it has {sorted(e)}); a prompt/completion "
                         "example needs both 'prompt' and 'completion'")
    value = e[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {what}[{i}][{key!r}] must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{where}: {what}[{i}] has an empty {key}; there would be nothing to learn from it: "
                         "remove it")
    return value


def _prompt_completion(e: Dict[str, Any], i: int, tokenizer: Any, max_length: Optional[int], what: str, where: str,
                       out: GenerativeData) -> None:
    prompt = _text(e, "prompt", i, what, where)
    completion = _text(e, "completion", i, what, where, allow_empty=False)
    p = list(tokenizer(prompt)["input_ids"])
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        c.append(tokenizer.eos_token_id)
    if not p:
        raise ValueError(f"{where}: {what}[{i}] has a prompt without tokens; a causal LM needs at least one token "
                         "before the completion (give a prompt, e.g. an instruction)")
    bos = getattr(tokenizer, "bos_token_id", None)
    if max_length is not None and len(p) + len(c) > max_length:
        out.truncated += 1
        room = max_length - min(len(c), max_length - 1)
        keep_bos = bos is not None and p[0] == bos and room >= 2
        p = ([bos] + p[len(p) - room + 1:]) if keep_bos else p[len(p) - room:]
        c = c[:max_length - len(p)]
    out.examples.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    out.prompts.append(p)
    out.references.append(completion.strip())
    out.prompt_texts.append(prompt)


def _check_messages(e: Dict[str, Any], i: int, what: str, where: str) -> List[Dict[str, str]]:
    messages = e["messages"]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: {what}[{i}]['messages'] must be a non-empty list of {{'role', 'content'}} dicts")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: {what}[{i}]['messages'][{j}] must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: {what}[{i}]['messages'][{j}] has the role {m['role']!r}, which the chat "
                             f"format does not know; use one of {ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: {what}[{i}]['messages'][{j}]['content'] must be text, got "
                             f"{type(m['content']).__name__}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"{where}: {what}[{i}]['messages'][{j}] is an empty assistant turn; remove it")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: {what}[{i}] has no assistant turn, so nothing to learn; add the answer as "
                         "{'role': 'assistant', 'content': ...}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer: Any, messages: List[Dict[str, str]], generation_prompt: bool, i: int, what: str,
            where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # the template's own checks (jinja raise_exception): name the example
        raise ValueError(f"{where}: the tokenizer's chat template refuses {what}[{i}]: {err}") from err


def render_chat_prompt(tokenizer: Any, messages: Sequence[Dict[str, str]]) -> str:
    """The conversation ``messages`` rendered with the tokenizer's chat template and its generation
    prompt (the assistant's turn opened): what a chat model is given to write the next answer."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def _chat(e: Dict[str, Any], i: int, tokenizer: Any, max_length: Optional[int], what: str, where: str,
          out: GenerativeData) -> None:
    messages = _check_messages(e, i, what, where)
    full = _render(tokenizer, messages, False, i, what, where)
    spans: List[Tuple[int, int]] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], True, i, what, where)
        through = _render(tokenizer, messages[:k + 1], False, i, what, where)
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise ValueError(f"{where}: the tokenizer's chat template renders the turns of {what}[{i}] differently "
                             "in a longer conversation (e.g. it drops earlier reasoning), so the assistant turns "
                             "cannot be located; give {'prompt', 'completion'} examples instead")
        spans.append((len(before), len(through.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [-100] * len(ids)
    for t, (s, end) in enumerate(enc["offset_mapping"]):
        if end > s and any(a <= s and end <= b for a, b in spans):
            labels[t] = ids[t]
    if max_length is not None and len(ids) > max_length:
        out.truncated += 1
        ids, labels = ids[-max_length:], labels[-max_length:]
    if all(y == -100 for y in labels[1:]):
        raise ValueError(f"{where}: {what}[{i}] keeps no assistant token within max_length={max_length}; raise "
                         "max_length or shorten the conversation")
    last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    prompt_text = _render(tokenizer, messages[:last], True, i, what, where)
    prompt = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    if max_length is not None:
        prompt = prompt[-max_length:]
    out.examples.append({"input_ids": ids, "labels": labels})
    out.prompts.append(prompt)
    out.references.append(messages[last]["content"].strip())
    out.prompt_texts.append(prompt_text)
