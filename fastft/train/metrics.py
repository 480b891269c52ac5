"""Task metrics, computed by scikit-learn (not by hand)."""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
import torch

__all__ = ["CLASSIFICATION_METRICS", "GENERATION_METRICS", "compute_metrics", "check_metric_names",
           "check_generation_metric_names", "generation_scores", "exact_match", "token_f1", "bleu", "rouge"]

#: Metric names the trainer knows: classification ones read logits and labels; ``perplexity`` is
#: exp(validation loss) for language modelling.
CLASSIFICATION_METRICS = ("accuracy", "f1", "f1_macro", "f1_micro", "auc")
KNOWN = CLASSIFICATION_METRICS + ("perplexity",)
#: Metrics of generated text against reference text (see :func:`generation_scores`).
GENERATION_METRICS = ("rouge_l", "rouge1", "rouge2", "bleu", "exact_match", "token_f1")


def check_metric_names(names: Sequence, where: str = "fastft.Trainer") -> None:
    """Raise ValueError (naming ``where``) for a metric name fastft does not know (callables are the
    user's own metrics)."""
    for name in names:
        if callable(name):
            continue
        if name not in KNOWN:
            raise ValueError(f"{where}: unknown metric {name!r}; known: {KNOWN}")


def compute_metrics(names: Sequence, logits: torch.Tensor, labels: torch.Tensor, loss: float) -> Dict[str, float]:
    """The requested metrics for classification logits [N, C] and integer labels [N].

    ``f1`` is binary F1 (positive class 1) for two classes and macro F1 otherwise; ``auc`` is ROC AUC
    (one-vs-rest, macro, for more than two classes). A callable in ``names`` is called as
    ``fn(logits, labels)`` and returns a dict of named values (e.g. decoding predictions and scoring
    them with :func:`exact_match`, :func:`token_f1`, :func:`bleu` or :func:`rouge`).
    """
    from sklearn import metrics as skm

    out: Dict[str, float] = {}
    for fn in (n for n in names if callable(n)):
        out.update({k: float(v) for k, v in fn(logits, labels).items()})
    names = [n for n in names if not callable(n)]
    wanted = [n for n in names if n in CLASSIFICATION_METRICS]
    if wanted and logits is not None and logits.dim() == 2 and logits.shape[1] > 1:
        y = labels.cpu().numpy()
        scores = logits.float().cpu()
        pred = scores.argmax(-1).numpy()
        n_classes = scores.shape[1]
        for name in wanted:
            if name == "accuracy":
                out[name] = float(skm.accuracy_score(y, pred))
            elif name == "f1":
                avg = "binary" if n_classes == 2 else "macro"
                out[name] = float(skm.f1_score(y, pred, average=avg, zero_division=0))
            elif name in ("f1_macro", "f1_micro"):
                out[name] = float(skm.f1_score(y, pred, average=name[3:], zero_division=0))
            elif name == "auc":
                prob = torch.softmax(scores, -1).numpy()
                try:
                    out[name] = float(skm.roc_auc_score(y, prob[:, 1]) if n_classes == 2 else
                                      skm.roc_auc_score(y, prob, multi_class="ovr", labels=np.arange(n_classes)))
                except ValueError:  # a single class in this split: AUC is undefined
                    out[name] = float("nan")
    if "perplexity" in names:
        out["perplexity"] = math.exp(loss) if loss < 700 else float("inf")
    return out


# --- text metrics (QA and generation) --------------------------------------------------------------


def _normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    import re
    import string

    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """QA exact match (SQuAD normalisation), in [0, 1]."""
    _same_length(predictions, references)
    return float(np.mean([_normalize_answer(p) == _normalize_answer(r) for p, r in zip(predictions, references)]))


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """QA token F1 (SQuAD definition: bag-of-tokens overlap after normalisation), mean over examples."""
    from collections import Counter

    _same_length(predictions, references)
    scores = []
    for p, r in zip(predictions, references):
        pt, rt = _normalize_answer(p).split(), _normalize_answer(r).split()
        common = sum((Counter(pt) & Counter(rt)).values())
        if not pt or not rt:
            scores.append(float(pt == rt))
        elif common == 0:
            scores.append(0.0)
        else:
            precision, recall = common / len(pt), common / len(rt)
            scores.append(2 * precision * recall / (precision + recall))
    return float(np.mean(scores))


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) through sacrebleu (``pip install sacrebleu``)."""
    import sacrebleu

    _same_length(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Mean ROUGE-1 / ROUGE-2 / ROUGE-L F-measures through rouge-score (``pip install rouge-score``)."""
    from rouge_score import rouge_scorer

    _same_length(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {k: float(np.mean([s[k].fmeasure for s in scores])) for k in ("rouge1", "rouge2", "rougeL")}


def check_generation_metric_names(names: Sequence, where: str = "fastft.Trainer") -> None:
    """Raise ValueError (naming ``where``) for a generation metric fastft does not know."""
    for name in names:
        if name not in GENERATION_METRICS:
            from difflib import get_close_matches

            plain = {m.replace("_", ""): m for m in GENERATION_METRICS}
            key = str(name).lower().replace("_", "").replace("-", "")
            hint = [plain[key]] if key in plain else get_close_matches(str(name), GENERATION_METRICS, n=1)
            raise ValueError(f"{where}: unknown generation metric {name!r}; known: {GENERATION_METRICS}"
                             + (f". Did you mean {hint[0]!r}?" if hint else ""))


def generation_scores(names: Sequence[str], predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """The generation metrics ``names`` (of :data:`GENERATION_METRICS`) of ``predictions`` against
    ``references``: ``rouge_l`` / ``rouge1`` / ``rouge2`` (mean F-measure in [0, 1], rouge-score with
    stemming), ``bleu`` (corpus BLEU 0-100, sacrebleu), ``exact_match`` and ``token_f1`` (SQuAD
    normalisation, in [0, 1]). Surrounding whitespace of the predictions is ignored."""
    predictions = [p.strip() for p in predictions]
    out: Dict[str, float] = {}
    if any(n.startswith("rouge") for n in names):
        r = rouge(predictions, references)
        scores = {"rouge_l": r["rougeL"], "rouge1": r["rouge1"], "rouge2": r["rouge2"]}
        out.update({n: scores[n] for n in names if n in scores})
    for name, fn in (("bleu", bleu), ("exact_match", exact_match), ("token_f1", token_f1)):
        if name in names:
            out[name] = fn(predictions, references)
    return {n: out[n] for n in names}


def _same_length(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"fastft metrics: need as many predictions as references (got {len(predictions)} and "
                         f"{len(references)}), at least one")
