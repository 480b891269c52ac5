"""The prompting baseline to beat: zero- and few-shot in-context classification with a causal LM
(Brown et al., 2020, "Language Models are Few-Shot Learners"), scored by label-word likelihood."""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .lm import check_tokenizer, fused_lm_parts, lm_kind, right_pad

__all__ = ["few_shot_prompt", "evaluate_prompting", "label_scores", "DEFAULT_TEMPLATE", "few_shot_generation_prompt",
           "evaluate_generation_prompting"]


@torch.no_grad()
def label_scores(lm: nn.Module, prompts: List[List[int]], label_ids: List[List[int]], device: torch.device,
                  max_length: int, batch_size: int) -> Tensor:
    """Log-likelihood (nats) of each label's tokens after each prompt: float32 ``[N, C]`` for N token-id
    prompts and C labels (token-id lists), each prompt cut to its last ``max_length`` tokens.
    Single-token labels take one forward per prompt (batched, right-padded); longer ones one forward
    per (prompt, label)."""
    n_classes = len(label_ids)
    out = torch.empty(len(prompts), n_classes)
    if all(len(ids) == 1 for ids in label_ids):
        first = torch.tensor([ids[0] for ids in label_ids])
        # Only each prompt's last position is scored: where the model is backbone + linear head, the head
        # runs on those rows alone, not on every position ([B, T, V] logits are most of a small LM's cost).
        parts = fused_lm_parts(lm)
        for i in range(0, len(prompts), batch_size):
            rows = [p[-max_length:] for p in prompts[i:i + batch_size]]
            ids, mask = right_pad(rows)
            ids, mask = ids.to(device), mask.to(device)
            at = (torch.arange(len(rows), device=device), mask.sum(1) - 1)
            if parts is not None:
                backbone, head = parts
                hidden = backbone(input_ids=ids, attention_mask=mask)
                hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden.last_hidden_state
                last = head(hidden[at]).float().cpu()
            else:
                last = lm(input_ids=ids, attention_mask=mask).logits[at].float().cpu()
            out[i:i + len(rows)] = torch.log_softmax(last, -1)[:, first]
        return out
    for i, prompt in enumerate(prompts):
        for c, ids in enumerate(label_ids):
            full = (prompt + ids)[-max_length:]
            logits = lm(input_ids=torch.tensor([full], device=device)).logits[0].float()
            logp = torch.log_softmax(logits[:-1], -1)
            target = torch.tensor(full[-len(ids):], device=device)
            out[i, c] = float(logp[-len(ids):].gather(1, target[:, None]).sum())
    return out


DEFAULT_TEMPLATE = "Text: {text}\nLabel:"


def few_shot_prompt(examples: Sequence[Tuple[str, str]], query: str, template: str = DEFAULT_TEMPLATE,
                    separator: str = "\n\n") -> str:
    """An in-context classification prompt: each ``(text, label word)`` example as ``template`` followed
    by its label word, then the query's template with the label left open."""
    parts = [template.format(text=t) + " " + str(label) for t, label in examples]
    parts.append(template.format(text=query))
    return separator.join(parts)


@torch.no_grad()
def evaluate_prompting(lm: nn.Module, tokenizer: Any, examples: Sequence[Tuple[str, int]],
                       test_data: Sequence[Tuple[str, int]], labels: Sequence[str], shots: Sequence[int] = (0, 4),
                       template: str = DEFAULT_TEMPLATE, seed: int = 0, max_length: int = 512,
                       batch_size: int = 16) -> Dict[str, float]:
    """Zero- and k-shot in-context classification accuracy of a causal LM.

    For every test text and every class, the log-likelihood of the class's label word (``labels[c]``,
    e.g. ``["negative", "positive"]``) after the prompt decides: the most likely label wins. The
    k demonstrations come from ``examples`` (``(text, class index)`` pairs), drawn with ``seed``,
    balanced over classes where possible, the same for every test text.

    Returns ``{"0-shot": accuracy, "4-shot": accuracy, ...}``.
    """
    if lm_kind(lm) != "causal":
        raise ValueError(f"fastft.evaluate_prompting: needs a causal LM, got {type(lm).__name__}")
    check_tokenizer(tokenizer, lm, "evaluate_prompting")
    if not test_data:
        raise ValueError("fastft.evaluate_prompting: test_data is empty")
    device = next(lm.parameters()).device
    was = lm.training
    lm.eval()
    label_ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in labels]
    rng = random.Random(seed)
    by_class: Dict[int, List[str]] = {}
    for t, y in examples:
        by_class.setdefault(int(y), []).append(t)
    results = {}
    for k in shots:
        demos: List[Tuple[str, str]] = []
        pools = {c: rng.sample(v, len(v)) for c, v in sorted(by_class.items())}
        while len(demos) < k and any(pools.values()):
            for c in sorted(pools):
                if pools[c] and len(demos) < k:
                    demos.append((pools[c].pop(), labels[c]))
        rng.shuffle(demos)
        prompts = [tokenizer(few_shot_prompt(demos, text, template), add_special_tokens=False)["input_ids"]
                   for text, _ in test_data]
        scores = label_scores(lm, prompts, label_ids, device, max_length, batch_size)
        predictions = scores.argmax(-1).tolist()
        results[f"{k}-shot"] = sum(int(p == int(y)) for p, (_, y) in zip(predictions, test_data)) / len(test_data)
    lm.train(was)
    return results


def few_shot_generation_prompt(demonstrations: Sequence[Dict[str, Any]], query: Dict[str, Any],
                               separator: str = "\n\n") -> Any:
    """An in-context generation prompt for ``query`` with ``demonstrations`` (examples of the same form):

    - ``{"prompt", "completion"}`` examples: the text ``prompt + completion`` of each demonstration,
      joined by ``separator``, then the query's prompt (the model continues it);
    - ``{"messages"}`` examples: one conversation — the query's leading system turn, each
      demonstration's turns up to and including its last assistant turn (without its own system
      turn), then the query's turns before its last assistant turn — to be rendered with the chat
      template and its generation prompt.

    Returns a str (prompt/completion) or a list of messages (chat)."""
    if "messages" in query:
        turns = list(query["messages"])
        last = max(i for i, m in enumerate(turns) if m["role"] == "assistant")
        system = [m for m in turns[:1] if m["role"] == "system"]
        shots: List[Dict[str, str]] = []
        for d in demonstrations:
            msgs = [m for m in d["messages"] if m["role"] != "system"]
            end = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            shots.extend(msgs[:end + 1])
        return system + shots + turns[len(system):last]
    parts = [d["prompt"] + d["completion"] for d in demonstrations]
    return separator.join(parts + [query["prompt"]])


@torch.no_grad()
def evaluate_generation_prompting(lm: nn.Module, tokenizer: Any, demonstrations: Sequence[Dict[str, Any]],
                                  test_data: Sequence[Dict[str, Any]], shots: Sequence[int] = (0, 3),
                                  metrics: Sequence[str] = ("rouge_l", "bleu", "exact_match", "token_f1"),
                                  seed: int = 0, max_length: Optional[int] = None,
                                  generation_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Dict[str, float]]:
    """Zero- and k-shot in-context generation, scored like fine-tuned generation: the baseline a
    generative fine-tune has to beat (Brown et al., 2020).

    ``demonstrations`` and ``test_data`` are ``{"prompt", "completion"}`` or ``{"messages"}`` examples
    (the forms :class:`fastft.Trainer` trains on). For each k in ``shots`` the same k demonstrations,
    drawn with ``seed``, precede every test prompt (:func:`few_shot_generation_prompt`); the model's
    completions (:func:`fastft.generate` with ``generation_kwargs``: greedy by default) are scored
    against the test references (the completion; the last assistant turn) with ``metrics`` (of
    :data:`fastft.train.metrics.GENERATION_METRICS`). ``max_length`` keeps each prompt's last tokens.

    Returns ``{"0-shot": {metric: value}, "3-shot": {...}}``.

    Raises:
        ValueError: a model that is not a causal LM, empty ``test_data``, fewer demonstrations than
            the largest k, an unknown metric, or examples that are not of the generative forms.
    """
    from .generation import generate
    from .train.generative import generative_examples, generative_format, render_chat_prompt
    from .train.metrics import check_generation_metric_names, generation_scores

    where = "fastft.evaluate_generation_prompting"
    if lm_kind(lm) != "causal":
        raise ValueError(f"{where}: needs a causal LM, got {type(lm).__name__}")
    check_tokenizer(tokenizer, lm, "evaluate_generation_prompting")
    check_generation_metric_names(metrics, where)
    if not test_data:
        raise ValueError(f"{where}: test_data is empty")
    if shots and max(shots) > len(demonstrations):
        raise ValueError(f"{where}: {max(shots)}-shot prompts need {max(shots)} demonstrations, got "
                         f"{len(demonstrations)}")
    references = generative_examples(list(test_data), tokenizer, None, "test_data", where).references
    if demonstrations:
        kind = generative_format(test_data[0])
        bad = next((i for i, d in enumerate(demonstrations) if generative_format(d) != kind), None)
        if bad is not None:
            raise ValueError(f"{where}: demonstrations[{bad}] is not of the form of test_data[0]")
    rng = random.Random(seed)
    results = {}
    for k in shots:
        demos = rng.sample(list(demonstrations), k) if k else []
        prompts = []
        for query in test_data:
            built = few_shot_generation_prompt(demos, query)
            if isinstance(built, list):
                built = tokenizer(render_chat_prompt(tokenizer, built), add_special_tokens=False)["input_ids"]
            else:
                built = tokenizer(built)["input_ids"]
            prompts.append(built[-max_length:] if max_length else built)
        predictions = generate(lm, tokenizer, prompts, seed=seed, **(generation_kwargs or {}))
        results[f"{k}-shot"] = generation_scores(tuple(metrics), predictions, references)
    return results
