"""fastft.forgetting: the ForgettingMonitor and continued pretraining."""

import copy

import pytest
import torch

import fastft
from lm_helpers import GENERAL, TASK, lm_task, minilm_tokenizer, tiny_bert_mlm, tiny_gpt2, transformers  # noqa: F401


@pytest.fixture(scope="module")
def tok():
    return minilm_tokenizer()


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
