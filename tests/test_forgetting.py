"""fastft.forgetting: the ForgettingMonitor and continued pretraining."""

import copy
import json

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


def _monitor_warnings(record):
    return [w for w in record if "ForgettingMonitor" in str(w.message)]


def test_warns_once_when_the_held_out_text_is_trained_on(tok, recwarn):
    # The README's old example: the same text for measuring and for replay.
    fastft.Trainer(tiny_gpt2(), lm_task(tok), metrics=(), progress=False,
                   replay=fastft.Replay(GENERAL, ratio=0.25, tokenizer=tok),
                   callbacks=[fastft.ForgettingMonitor(GENERAL, tokenizer=tok)])
    (w,) = _monitor_warnings(recwarn)
    assert issubclass(w.category, UserWarning)
    assert "40 of the 40 held-out texts" in str(w.message) and "40 replayed" in str(w.message)
    recwarn.clear()
    # Part of it is training data (pre-tokenized: compared by token ids), part replayed.
    task_texts = [t for t, _ in TASK]
    fastft.Trainer(tiny_gpt2(), lm_task(tok), metrics=(), progress=False,
                   replay=fastft.Replay(GENERAL[20:], ratio=0.25, tokenizer=tok),
                   callbacks=[fastft.ForgettingMonitor(task_texts[:5] + GENERAL[15:25], tokenizer=tok)])
    (w,) = _monitor_warnings(recwarn)
    assert "10 of the 15 held-out texts" in str(w.message)
    assert "5 replayed" in str(w.message) and "5 in the training data" in str(w.message)
    recwarn.clear()
    # Disjoint: held out for real, no warning.
    fastft.Trainer(tiny_gpt2(), lm_task(tok), metrics=(), progress=False,
                   replay=fastft.Replay(GENERAL[20:], ratio=0.25, tokenizer=tok),
                   callbacks=[fastft.ForgettingMonitor(GENERAL[:20], tokenizer=tok)])
    assert not _monitor_warnings(recwarn)


def test_the_measure_before_training_is_a_step_0_record(tmp_path, tok):
    monitor = fastft.ForgettingMonitor(GENERAL, tokenizer=tok, max_length=20)
    trainer = fastft.Trainer(tiny_gpt2(), lm_task(tok), lm_task(tok)[:8], epochs=1, batch_size=8, lr=3e-3, metrics=(),
                             callbacks=[monitor], output_dir=str(tmp_path), progress=False)
    result = trainer.fit()
    first = result.history[0]
    assert first == {"epoch": 0, "step": 0, "pretrain_loss": monitor.baseline["pretrain_loss"],
                     "pretrain_ppl": monitor.baseline["pretrain_ppl"], "pretrain_loss_rise": 0.0}
    assert [r["step"] for r in result.history] == [0, trainer.global_step]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    # An encoder's baseline: its representations against the frozen copy of themselves.
    clf = fastft.SequenceClassifier(tiny_bert_mlm().bert, num_labels=2)
    history = fastft.Trainer(clf, TASK, TASK[:8], epochs=1, batch_size=8, tokenizer=tok, progress=False,
                             callbacks=[fastft.ForgettingMonitor(GENERAL, tokenizer=tok)]).fit().history
    assert history[0]["step"] == 0 and history[0]["repr_cka"] == pytest.approx(1.0)
    assert history[0]["repr_cosine"] == pytest.approx(1.0)


@pytest.mark.parametrize("eval_every, epochs, xlabel, xs", [(2, 1, "optimizer step", [0, 2, 4, 6]),
                                                            (None, 2, "epoch", [0, 1, 2])])
def test_forgetting_plot_axis_follows_the_evaluations(tmp_path, tok, monkeypatch, eval_every, epochs, xlabel, xs):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    drawn = {}
    real_savefig = Figure.savefig

    def spy(fig, path, *a, **k):
        if str(path).endswith("forgetting.png"):
            ax = fig.axes[0]
            drawn.update(xlabel=ax.get_xlabel(), xs=list(ax.lines[0].get_xdata()))
        return real_savefig(fig, path, *a, **k)

    monkeypatch.setattr(Figure, "savefig", spy)
    trainer = fastft.Trainer(tiny_gpt2(), lm_task(tok), lm_task(tok)[:8], epochs=epochs, batch_size=8, lr=3e-3,
                             metrics=(), eval_every=eval_every, output_dir=str(tmp_path), progress=False,
                             callbacks=[fastft.ForgettingMonitor(GENERAL, tokenizer=tok, max_length=20)])
    trainer.fit()
    assert (tmp_path / "forgetting.png").is_file()
    assert drawn == {"xlabel": xlabel, "xs": xs}
