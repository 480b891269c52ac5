"""fastft.lm: packing, masking, LM examples."""

import pytest
import torch

import fastft
from fastft.lm import lm_examples, lm_kind, mask_tokens, pack_blocks
from lm_helpers import GENERAL, TASK, lm_task, minilm_tokenizer, tiny_bert_mlm, tiny_gpt2, transformers  # noqa: F401


@pytest.fixture(scope="module")
def tok():
    return minilm_tokenizer()


def test_pack_blocks_cuts_exact_blocks(tok):
    blocks = pack_blocks(GENERAL, tok, 16)
    stream = []
    for ids in tok(GENERAL, add_special_tokens=False)["input_ids"]:
        stream += ids + [tok.sep_token_id]
    assert all(len(b) == 16 for b in blocks) and len(blocks) == len(stream) // 16
    assert [t for b in blocks for t in b] == stream[: 16 * len(blocks)]

def test_texts_with_nothing_to_predict_are_dropped(tok):
    def one_token_for_short(texts, truncation=True, max_length=None):
        return {"input_ids": [[5] if len(t) < 3 else [5, 6, 7] for t in texts]}

    rows = lm_examples([".", "a longer text", "!"], one_token_for_short, "causal", 8, 0.15, 0, pack=False)
    assert [r["input_ids"] for r in rows] == [[5, 6, 7]]  # a one-token text has no next token to predict
    with pytest.raises(ValueError, match="too short"):
        fastft.Replay(["."] * 4, ratio=0.5, tokenizer=one_token_for_short).bind(tiny_gpt2(), None)
    with pytest.raises(ValueError, match="too short"):
        fastft.ForgettingMonitor(["!"] * 4, tokenizer=one_token_for_short).setup(tiny_gpt2())


def test_lm_kind_by_class_name():
    assert lm_kind(tiny_gpt2()) == "causal" and lm_kind(tiny_bert_mlm()) == "masked"
    assert lm_kind(tiny_bert_mlm().bert) is None and lm_kind(torch.nn.Linear(2, 2)) is None


def test_mask_tokens_follows_bert_rule(tok):
    ids = torch.tensor(tok(["the market opened early and closed late " * 40], truncation=True,
                           max_length=512)["input_ids"])
    masked, labels = mask_tokens(ids, tok, 0.15, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert not chosen[0, 0] and not chosen[0, -1]  # [CLS] and [SEP] are never picked
    assert 0.10 < chosen.float().mean() < 0.20
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the original tokens
    share_masked = (masked[chosen] == tok.mask_token_id).float().mean()
    assert 0.65 < share_masked < 0.95
    assert torch.equal(masked[~chosen], ids[~chosen])
