"""fastft.pass_at_k against the binomial formula, and fastft.evaluate_code / evaluate_completions on
HumanEval problems and on problems a prompt-copying model solves (every program runs in fastft.sandbox)."""

import json
import math

import pytest

from lm_helpers import CopyConfig, CopyForCausalLM, tiny_bpe_tokenizer, tiny_llama

import fastft
from fastft import sandbox
from fastft.code_eval import check_program, humaneval_problems

isolated = pytest.mark.skipif(not sandbox.isolation()["isolated"], reason="the sandbox is not isolated here")


def binomial_pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_equals_the_binomial_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert fastft.pass_at_k(n, c, k) == pytest.approx(binomial_pass_at_k(n, c, k), abs=1e-12)
    assert fastft.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    # Stable where the binomials are huge: n = 1000 samples (C(1000, 500) has ~300 digits).
    assert fastft.pass_at_k(1000, 7, 500) == pytest.approx(binomial_pass_at_k(1000, 7, 500), rel=1e-12)
    assert fastft.pass_at_k(200, 0, 100) == 0.0 and fastft.pass_at_k(200, 150, 100) == 1.0


def test_pass_at_k_refuses_impossible_counts():
    for args, match in (((5, 6, 1), "c <= n"), ((5, -1, 1), "c <= n"), ((5, 2, 6), "k <= n"), ((5, 2, 0), "k <= n"),
                        ((5.0, 2, 1), "n must be an int"), ((5, True, 1), "c must be an int")):
        with pytest.raises(ValueError, match=match):
            fastft.pass_at_k(*args)


def test_humaneval_is_read_from_the_wheel():
    problems = humaneval_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    assert {"task_id", "prompt", "test", "entry_point", "canonical_solution"} <= set(problems[0])


@isolated
def test_canonical_solutions_pass_and_wrong_ones_fail(tmp_path):
    problems = humaneval_problems()[:8]
    right = [p["canonical_solution"] for p in problems]
    wrong = ["    return None\n"] * len(problems)
    hostile = "    while True:\n        pass\n"
    completions = [[r, w, hostile] for r, w in zip(right, wrong)]
    out = fastft.evaluate_completions(problems, completions, k=(1, 2, 3), timeout=2, output_dir=tmp_path)
    assert out["problems"] == 8 and out["samples"] == 3
    assert fastft.evaluate_completions(problems, completions, k=range(1, 4), timeout=2)["pass@3"] == 1.0
    assert out["pass@1"] == pytest.approx(1 / 3) and out["pass@2"] == pytest.approx(2 / 3) and out["pass@3"] == 1.0
    lines = [json.loads(line) for line in (tmp_path / "code_results.jsonl").read_text().splitlines()]
    assert lines == out["records"] and [r["task_id"] for r in lines] == [p["task_id"] for p in problems]
    for r in lines:
        assert r["correct"] == 1 and [c["status"] for c in r["completions"]] == ["passed", "failed", "timeout"]
        assert r["completions"][1]["reason"].startswith(("AssertionError", "TypeError"))


def test_bad_problems_and_arguments_are_refused_before_any_work(tmp_path):
    problems = humaneval_problems()[:2]
    with pytest.raises(ValueError, match=r"problems\[1\] lacks \['test'\]"):
        fastft.evaluate_completions([problems[0], {k: v for k, v in problems[1].items() if k != "test"}], ["", ""])
    with pytest.raises(ValueError, match="one per problem"):
        fastft.evaluate_completions(problems, [""])
    with pytest.raises(ValueError, match="pass@2 needs at least 2 samples"):
        fastft.evaluate_completions(problems, ["", ""], k=2)
    with pytest.raises(ValueError, match="same number"):
        fastft.evaluate_completions(problems, [["", ""], [""]])
    with pytest.raises(TypeError, match="one dict"):
        fastft.evaluate_completions(problems[0], [""])
    tok = tiny_bpe_tokenizer()
    model = tiny_llama(len(tok))
    with pytest.raises(ValueError, match="greedy decoding"):
        fastft.evaluate_code(model, tok, problems, k=(1, 2))
    with pytest.raises(ValueError, match="timeout"):
        fastft.evaluate_code(model, tok, problems, timeout=0)
    with pytest.raises(ValueError, match="pass@5 needs"):
        fastft.evaluate_code(model, tok, problems, k=5, samples=2, temperature=0.8)
    assert not (tmp_path / "code_results.jsonl").exists()


# A model that answers with its prompt: a problem whose prompt is `A + "#" + <sep>` gets the completion A
# (cut at the "\n#" stop), so the program runs A twice. A counts its own runs: the tests can tell whether
# the completion was generated, cut and placed where HumanEval puts it.
COUNTER = "\ncount = globals().get('count', 0) + 1\n#<|endoftext|>"


def _copy_problems():
    return [
        {"task_id": "copy/twice", "prompt": COUNTER, "entry_point": "count",
         "test": "def check(candidate):\n    assert candidate == 2\n"},
        {"task_id": "copy/thrice", "prompt": COUNTER, "entry_point": "count",
         "test": "def check(candidate):\n    assert candidate == 3, 'ran twice'\n"},
        {"task_id": "copy/hangs", "prompt": "\nwhile True:\n    pass\n#<|endoftext|>", "entry_point": "None",
         "test": "def check(candidate):\n    pass\n"},
    ]


@isolated
@pytest.mark.parametrize("temperature, samples", [(0.0, 1), (0.8, 3)])
def test_evaluate_code_end_to_end_with_a_copying_model(tmp_path, temperature, samples):
    tok = tiny_bpe_tokenizer()
    model = CopyForCausalLM(CopyConfig(vocab_size=len(tok)), tok.convert_tokens_to_ids("<|endoftext|>"),
                            tok.eos_token_id)
    k = (1,) if samples == 1 else (1, 3)
    out = fastft.evaluate_code(model, tok, _copy_problems(), k=k, samples=samples, temperature=temperature,
                               max_new_tokens=40, timeout=2, output_dir=tmp_path,
                               generate_kwargs={"use_cache": False})
    assert out["pass@1"] == pytest.approx(1 / 3)
    records = {r["task_id"]: r for r in out["records"]}
    assert records["copy/twice"]["completions"][0]["completion"] == "\ncount = globals().get('count', 0) + 1"
    assert [c["status"] for c in records["copy/twice"]["completions"]] == ["passed"] * samples
    assert records["copy/thrice"]["completions"][0]["reason"] == "AssertionError: ran twice"
    assert records["copy/hangs"]["completions"][0]["status"] == "timeout"
    assert len((tmp_path / "code_results.jsonl").read_text().splitlines()) == 3
    if samples > 1:
        assert out["pass@3"] == pytest.approx(1 / 3) and records["copy/twice"]["correct"] == 3


def test_check_program_is_humanevals():
    p = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    assert check_program(p, "    return 1\n") == "def f():\n    return 1\n\n\ndef check(c):\n    assert c() == 1\n\n\ncheck(f)\n"


def test_check_program_on_the_stripped_prompt():
    p = {"prompt": 'def f():\n    """One."""\n\n', "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    stripped = check_program(p, "\n    return 1", strip_prompt=True)
    assert stripped.startswith('def f():\n    """One."""\n    return 1\n\n')
    assert check_program(p, "    return 1").startswith('def f():\n    """One."""\n\n    return 1\n\n')


@isolated
def test_evaluate_code_generates_from_the_stripped_prompt_by_default(monkeypatch):
    # HumanEval's prompts end in "\n"; a BPE tokenizer's "\n    " token makes that bare newline mean
    # "the body is over". By default the model sees, and the program is built on, prompt.rstrip().
    import fastft.generation

    seen = []

    def generate(model, tokenizer, prompts, **kwargs):
        seen.append(list(prompts))
        return [completion] * len(prompts)

    monkeypatch.setattr(fastft.generation, "generate", generate)
    problem = {"task_id": "f", "prompt": 'def f():\n    """One."""\n', "entry_point": "f",
               "test": "def check(c):\n    assert c() == 1\n"}
    completion = "\n    return 1"  # what a model writes after the stripped prompt
    assert fastft.evaluate_code(None, None, [problem], timeout=5)["pass@1"] == 1.0
    assert seen[-1] == ['def f():\n    """One."""']
    completion = "    return 1"  # the same body, written after the prompt as given
    assert fastft.evaluate_code(None, None, [problem], timeout=5, strip_prompt=False)["pass@1"] == 1.0
    assert seen[-1] == [problem["prompt"]]
    out = fastft.evaluate_code(None, None, [problem], timeout=5)  # glued to the docstring's line: invalid
    assert out["pass@1"] == 0.0 and out["records"][0]["completions"][0]["reason"].startswith("SyntaxError")
    assert fastft.evaluate_completions([problem], ["\n    return 1"], strip_prompt=True)["pass@1"] == 1.0
    with pytest.raises(TypeError, match="strip_prompt"):
        fastft.evaluate_code(None, None, [problem], strip_prompt="yes")


def test_arguments_are_checked_before_anything_is_generated_or_run(tmp_path, monkeypatch):
    import fastft.generation
    import fastft.sandbox

    def never(*args, **kwargs):
        raise AssertionError("generation or a program ran before the arguments were checked")

    monkeypatch.setattr(fastft.generation, "generate", never)
    monkeypatch.setattr(fastft.code_eval, "run_programs", never)
    problems = humaneval_problems()[:2]
    a_file = tmp_path / "results.jsonl"
    a_file.write_text("keep me")
    for kwargs, error, match in (
            (dict(k=0), ValueError, "k must be"), (dict(k="1"), ValueError, "k must be"),
            (dict(k=None), ValueError, "k must be"),
            (dict(workers=0), ValueError, "workers"), (dict(workers="2"), ValueError, "workers"),
            (dict(limits="x"), TypeError, "limits"), (dict(limits={"timeout": 1}), TypeError, "limits"),
            (dict(output_dir=123), TypeError, "output_dir"), (dict(output_dir=a_file), ValueError, "is a file"),
            (dict(temperature=float("nan")), ValueError, "temperature"),
            (dict(temperature=0.8, top_p=2.0), ValueError, "top_p"),
            (dict(generate_kwargs=[1]), TypeError, "generate_kwargs")):
        with pytest.raises(error, match=match):
            fastft.evaluate_code(None, None, problems, **kwargs)
    right = [p["canonical_solution"] for p in problems]
    for completions, kwargs, error, match in (
            ({p["task_id"]: c for p, c in zip(problems, right)}, {}, TypeError, "in problems' order"),
            ([right[0], None], {}, TypeError, r"completions\[1\]"),
            ([right[0], b"    return 1\n"], {}, TypeError, r"completions\[1\]"),
            (right, dict(k=1.0), ValueError, "k must be"), (right, dict(workers=0), ValueError, "workers"),
            (right, dict(limits="x"), TypeError, "limits"), (right, dict(output_dir=a_file), ValueError, "is a file"),
            (right, dict(timeout=0), ValueError, "timeout")):
        with pytest.raises(error, match=match):
            fastft.evaluate_completions(problems, completions, **kwargs)
    with pytest.raises(TypeError, match="strip_prompt"):
        check_program(problems[0], "", strip_prompt="no")
    assert a_file.read_text() == "keep me"


@isolated
def test_records_say_which_prompt_the_completions_continue(tmp_path):
    problems = humaneval_problems()[:2]
    out = fastft.evaluate_completions(problems, [p["canonical_solution"] for p in problems], output_dir=tmp_path)
    assert out["pass@1"] == 1.0 and all(r["strip_prompt"] is False for r in out["records"])
    lines = [json.loads(line) for line in (tmp_path / "code_results.jsonl").read_text().splitlines()]
    assert [r["strip_prompt"] for r in lines] == [False, False]


def test_code_from_a_chat_reply():
    from fastft.code_eval import code_from_reply

    assert code_from_reply("Here:\n```python\ndef f():\n    return 1\n```\nIt returns 1.") == "def f():\n    return 1\n"
    assert code_from_reply("```\nx = 1\n") == "x = 1\n"  # an unclosed block runs to the end
    assert code_from_reply("    return 1\n") == "    return 1\n"  # no block: the whole reply


def test_chat_format_needs_a_chat_template():
    tok = tiny_bpe_tokenizer(chat_template=None)
    model = tiny_llama(len(tok))
    problems = humaneval_problems()[:1]
    with pytest.raises(ValueError, match="chat_template"):
        fastft.evaluate_code(model, tok, problems, prompt_format="chat")
    with pytest.raises(ValueError, match="prompt_format"):
        fastft.evaluate_code(model, tok, problems, prompt_format="instruct")
