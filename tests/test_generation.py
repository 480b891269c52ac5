"""fastft.generate: batched left-padded generation, seeded sampling, stop strings, and the generation
metrics on a model that copies its prompt."""

import pytest
import torch

from lm_helpers import CopyConfig, CopyForCausalLM, tiny_bpe_tokenizer, tiny_gpt2_for, tiny_llama

from fastft.generation import cut_at_stop, eos_ids, generate
from fastft.train.metrics import bleu, generation_scores, rouge

PROMPTS = ["the weather in city 3 was mild", "a dull film", "the market opened at 7 o'clock .",
           "a wonderful moving film number 12", "mild"]


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe_tokenizer()


def copy_model(tok):
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    return CopyForCausalLM(CopyConfig(vocab_size=len(tok)), sep, tok.eos_token_id), sep


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_copy_model_generates_its_prompts_in_order(tok, batch_size):
    model, sep = copy_model(tok)
    rows = [tok(p)["input_ids"] + [sep] for p in PROMPTS]  # mixed lengths: left padding inside a batch
    out = generate(model, tok, rows, max_new_tokens=40, batch_size=batch_size, use_cache=False)
    assert out == PROMPTS


def test_generation_metrics_of_a_copying_model_are_exact(tok):
    model, sep = copy_model(tok)
    out = generate(model, tok, [tok(p)["input_ids"] + [sep] for p in PROMPTS], max_new_tokens=40, use_cache=False)
    scores = generation_scores(("rouge_l", "rouge1", "rouge2", "bleu", "exact_match", "token_f1"), out, PROMPTS)
    assert scores["exact_match"] == 1.0 and scores["token_f1"] == 1.0
    assert scores["rouge_l"] == pytest.approx(1.0) and scores["rouge1"] == pytest.approx(1.0)
    assert scores["bleu"] == pytest.approx(100.0)
    # Against other references: the same numbers as the libraries give directly.
    refs = ["the weather was mild", "a dull film indeed", "the market closed", "a moving film", "cold"]
    scores = generation_scores(("rouge_l", "bleu", "exact_match", "token_f1"), out, refs)
    assert scores["rouge_l"] == pytest.approx(rouge(out, refs)["rougeL"])
    assert scores["bleu"] == pytest.approx(bleu(out, refs))
    assert scores["exact_match"] == 0.0
    assert 0.0 < scores["token_f1"] < 1.0


def test_stop_strings_cut_the_completion(tok):
    model, sep = copy_model(tok)
    out = generate(model, tok, [tok(PROMPTS[0])["input_ids"] + [sep]], max_new_tokens=40, stop=[" was"],
                   use_cache=False)
    assert out == ["the weather in city 3"]
    # One str is one stop string, not its characters ("w", "a", "s" would cut at "the w").
    assert generate(model, tok, [tok(PROMPTS[0])["input_ids"] + [sep]], max_new_tokens=40, stop=" was",
                    use_cache=False) == out
    assert cut_at_stop("abc\ndef x", ["\ndef", " x"]) == "abc" and cut_at_stop("xa\ndef", "\ndef") == "xa"
    for bad in ([""], [1], []):
        with pytest.raises(ValueError, match="stop must be"):
            generate(model, tok, PROMPTS[:1], max_new_tokens=2, stop=bad)
    with pytest.raises(ValueError, match="seed must be an int"):
        generate(model, tok, PROMPTS[:1], max_new_tokens=2, seed="a")
    assert cut_at_stop("abc", None) == "abc"


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2_for])
def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tok, make):
    model = make(len(tok))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, max_new_tokens=6, do_sample=True, seed=7, num_return_sequences=2)
    b = generate(model, tok, PROMPTS, max_new_tokens=6, do_sample=True, seed=7, num_return_sequences=2)
    c = generate(model, tok, PROMPTS, max_new_tokens=6, do_sample=True, seed=8, num_return_sequences=2)
    assert a == b and a != c
    assert all(len(x) == 2 for x in a)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2_for])
def test_left_padded_batches_equal_one_prompt_at_a_time(tok, make):
    model = make(len(tok)).eval()
    batched = generate(model, tok, PROMPTS, max_new_tokens=5, batch_size=8)
    alone = [generate(model, tok, [p], max_new_tokens=5)[0] for p in PROMPTS]
    assert batched == alone
    assert model.training is False
    model.train()
    generate(model, tok, PROMPTS[:1], max_new_tokens=2)
    assert model.training  # the caller's mode comes back


def test_max_prompt_tokens_keeps_the_end(tok):
    model, sep = copy_model(tok)
    ids = tok(PROMPTS[0])["input_ids"] + [sep]
    out = generate(model, tok, [ids], max_new_tokens=40, max_prompt_tokens=3, use_cache=False)
    assert out == [tok.decode(ids[-3:-1])]


def test_eos_ids_joins_tokenizer_and_generation_config(tok):
    model = tiny_llama(len(tok))
    model.generation_config.eos_token_id = [5, tok.eos_token_id]
    assert eos_ids(model, tok) == [5, tok.eos_token_id]


def test_errors_name_the_argument(tok):
    model = tiny_llama(len(tok))
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, tok, [])
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(model, tok, ["a", []])
    with pytest.raises(TypeError, match="wrap it"):
        generate(model, tok, "a prompt")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, ["a"], max_new_tokens=0)
    with pytest.raises(ValueError, match="do_sample=True"):
        generate(model, tok, ["a"], num_return_sequences=2)
    with pytest.raises(ValueError, match="causal LM"):
        generate(torch.nn.Linear(2, 2), tok, ["a"])
