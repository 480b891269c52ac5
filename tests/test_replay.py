"""fastft.train.replay: replay mixing, its weighting rule, its checks."""

import pytest
import torch

import fastft
from lm_helpers import GENERAL, TASK, lm_task, minilm_tokenizer, tiny_bert_mlm, tiny_gpt2, transformers  # noqa: F401


@pytest.fixture(scope="module")
def tok():
    return minilm_tokenizer()


def test_replay_mixes_exactly_and_reproducibly(tok):
    def run():
        replay = fastft.Replay(GENERAL, ratio=0.25, tokenizer=tok, max_length=20)
        trainer = fastft.Trainer(tiny_gpt2(), lm_task(tok), epochs=2, batch_size=8, lr=1e-3, metrics=(),
                                 replay=replay, progress=False)
        sizes = []
        real_next = replay.next
        replay.next = lambda n: sizes.append(n) or real_next(n)
        trainer.fit()
        return trainer, replay, sizes

    trainer, replay, sizes = run()
    assert trainer.task_batch_size == 6
    assert sizes == [2] * trainer.global_step and replay.seen == 2 * trainer.global_step
    assert all(len(b) <= 6 for b in trainer._epoch_batches(0))
    again, _, _ = run()
    for p, q in zip(trainer.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)

def test_replay_through_an_lm_sharing_the_encoder(tok):
    lm = tiny_bert_mlm()
    clf = fastft.SequenceClassifier(lm.bert, num_labels=2, pool="cls")
    head_before = lm.cls.predictions.transform.dense.weight.detach().clone()
    replay = fastft.Replay(GENERAL, ratio=0.5, tokenizer=tok, lm=lm)
    trainer = fastft.Trainer(clf, TASK, epochs=1, batch_size=8, lr=1e-3, tokenizer=tok, replay=replay,
                             progress=False)
    trainer.fit()
    assert replay.seen == 4 * trainer.global_step
    assert torch.equal(lm.cls.predictions.transform.dense.weight, head_before)  # the LM head only reads

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(data=GENERAL, ratio=1.0), ValueError, "ratio"),
    (dict(data=GENERAL, ratio=-0.1), ValueError, "ratio"),
    (dict(data=[1, 2, 3], ratio=0.2), TypeError, "expected text"),
    (dict(data=[], ratio=0.2), ValueError, "empty"),
])
def test_replay_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastft.Replay(**kwargs)

def test_replay_needs_a_language_model_and_a_matching_tokenizer(tok):
    with pytest.raises(ValueError, match="not a language model"):
        fastft.Trainer(torch.nn.Linear(4, 2), [(torch.zeros(4), 0)] * 4, replay=fastft.Replay(GENERAL, 0.25, tokenizer=tok),
                       progress=False)
    small = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="do not belong together"):
        fastft.Trainer(small, [{"input_ids": [1, 2], "labels": [1, 2]}] * 4,
                       replay=fastft.Replay(GENERAL, 0.25, tokenizer=tok), progress=False)

def test_accumulation_equals_the_whole_batch_for_token_losses_with_replay(tok):
    # Texts of different token counts: micro-batches are weighted by target tokens, not rows.
    def run(batch_size, accumulation):
        replay = fastft.Replay(GENERAL, ratio=0.25, tokenizer=tok, max_length=20)
        trainer = fastft.Trainer(tiny_gpt2(), lm_task(tok), epochs=1, batch_size=batch_size,
                                 gradient_accumulation=accumulation, lr=1e-3, metrics=(), replay=replay,
                                 group_by_length=False, warmup_ratio=0.0, scheduler="constant", progress=False)
        trainer.fit()
        return trainer

    whole, split = run(8, 1), run(4, 2)
    assert whole.global_step == split.global_step == 8 and whole.replay.seen == split.replay.seen == 16
    for p, q in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def test_step_scales_weigh_rows_then_terms():
    from fastft.train.replay import step_scales

    # 6 task rows holding 30 target tokens, 2 replay rows of weight 0.5: loss = (6 task + 0.5 * 2 replay) / 8
    task, replay = step_scales(6, 30, 2, 0.5)
    assert task * 30 == pytest.approx(6 / 8) and replay == pytest.approx(0.5 * 2 / 8)
    assert step_scales(4, 4) == (0.25, 0.0)  # no replay: the mean over the step's terms
