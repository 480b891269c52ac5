"""fastft.prompting: the zero/few-shot baseline."""

import types

import pytest
import torch

import fastft
from lm_helpers import (GENERAL, TASK, lm_task, minilm_tokenizer, tiny_bert_mlm, tiny_gpt2, tiny_llama,  # noqa: F401
                        transformers)


@pytest.fixture(scope="module")
def tok():
    return minilm_tokenizer()


def test_few_shot_prompt():
    p = fastft.few_shot_prompt([("great", "positive"), ("awful", "negative")], "fine")
    assert p == "Text: great\nLabel: positive\n\nText: awful\nLabel: negative\n\nText: fine\nLabel:"

def test_evaluate_prompting_scores_label_words(tok):
    positive = tok(" positive", add_special_tokens=False)["input_ids"]

    class BiasedForCausalLM(torch.nn.Module):
        """Always prefers the word ' positive'."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.config = types.SimpleNamespace(vocab_size=30522)

        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, 30522)
            logits[..., positive] = 5.0
            return types.SimpleNamespace(logits=logits)

    test = TASK[:10]
    res = fastft.evaluate_prompting(BiasedForCausalLM(), tok, TASK[10:], test, ["negative", "positive"], shots=(0, 2))
    share_positive = sum(y for _, y in test) / len(test)
    assert res == {"0-shot": share_positive, "2-shot": share_positive}
    real = fastft.evaluate_prompting(tiny_gpt2(), tok, TASK[10:], test, ["negative", "positive"], shots=(0, 4))
    assert set(real) == {"0-shot", "4-shot"} and all(0 <= v <= 1 for v in real.values())
    with pytest.raises(ValueError, match="causal LM"):
        fastft.evaluate_prompting(tiny_bert_mlm(), tok, TASK, test, ["negative", "positive"])

@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama+lora"])
def test_batched_label_scores_equal_one_by_one(tok, arch):
    """label_scores runs the head on the last positions only (backbone + lm_head); the model's own
    full forward, one prompt at a time, must give the same scores."""
    from fastft.prompting import label_scores

    if arch == "gpt2":
        lm = tiny_gpt2()
    else:
        lm = tiny_llama(tok.vocab_size)
        if arch == "llama+lora":
            import peft

            lm = peft.get_peft_model(lm, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         task_type="CAUSAL_LM"))
            for n, p in lm.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.5)  # LoRA's B starts at 0: make the adapter count
    lm = lm.eval()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t, _ in TASK[:7]]
    single = [[2204], [3893]]
    batched = label_scores(lm, prompts, single, torch.device("cpu"), 512, batch_size=3)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=torch.tensor([p])).logits[0, -1], -1)
        torch.testing.assert_close(batched[i], logp[[2204, 3893]], rtol=1e-5, atol=1e-5)
    two_token = label_scores(lm, prompts[:2], [[2204, 2204], [3893]], torch.device("cpu"), 512, batch_size=3)
    torch.testing.assert_close(two_token[:, 1], batched[:2, 1], rtol=1e-5, atol=1e-5)
