"""fastft.train.replay: replay mixing, its weighting rule, its checks."""

import json

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


@pytest.mark.parametrize("batch_size, accumulation", [(8, 1), (4, 2)])
def test_train_loss_splits_into_task_and_replay_parts(tok, batch_size, accumulation):
    # lr=0: the weights stay, so every step's losses can be recomputed afterwards.
    replay = fastft.Replay(GENERAL, ratio=0.25, weight=0.5, tokenizer=tok, max_length=20)
    trainer = fastft.Trainer(tiny_gpt2(), lm_task(tok), epochs=1, batch_size=batch_size,
                             gradient_accumulation=accumulation, lr=0.0, metrics=(), replay=replay,
                             group_by_length=False, progress=False)
    drawn = []
    real_next = replay.next
    replay.next = lambda n: drawn.append(real_next(n)) or drawn[-1]
    record = trainer.fit().history[-1]
    batches = trainer._epoch_batches(0)
    steps = [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]
    rows = [[r for rs in drawn[i * accumulation:(i + 1) * accumulation] for r in rs] for i in range(len(steps))]
    with torch.no_grad():
        # Each step: (B - r) / B times the task rows' token-mean loss, weight * r / B times the replay rows'.
        task = [6 / 8 * float(trainer._rows_loss(trainer.model, [i for b in group for i in b])) for group in steps]
        replayed = [0.5 * 2 / 8 * float(replay.loss(r, trainer.device)) for r in rows]
    assert record["train_task_loss"] == pytest.approx(sum(task) / len(task), rel=1e-5)
    assert record["train_replay_loss"] == pytest.approx(sum(replayed) / len(replayed), rel=1e-5)
    assert record["train_task_loss"] + record["train_replay_loss"] == pytest.approx(record["train_loss"], rel=1e-6)


def test_no_replay_no_loss_parts(tok):
    record = fastft.Trainer(tiny_gpt2(), lm_task(tok), epochs=1, batch_size=8, metrics=(),
                            progress=False).fit().history[-1]
    assert "train_task_loss" not in record and "train_replay_loss" not in record


def test_replay_run_resumes_with_its_loss_parts(tmp_path, tok):
    class Crash(Exception):
        pass

    class CrashAt(fastft.Callback):
        def on_step_end(self, trainer, step, loss):
            if step == 4:
                raise Crash()

    def make(out, callbacks=()):
        return fastft.Trainer(tiny_gpt2(), lm_task(tok), lm_task(tok)[:8], epochs=1, batch_size=8, lr=1e-3,
                              metrics=(), eval_every=4, checkpoint_every=3, output_dir=str(out), progress=False,
                              replay=fastft.Replay(GENERAL, ratio=0.25, tokenizer=tok, max_length=20),
                              callbacks=list(callbacks))

    full = make(tmp_path / "a").fit()
    with pytest.raises(Crash):  # at step 4, before its evaluation: the checkpoint of step 3 holds the
        # training-loss window of steps 1-3, which the record of step 4 averages
        make(tmp_path / "b", [CrashAt()]).fit()
    resumed = make(tmp_path / "b").resume()
    assert resumed.history == full.history and "train_replay_loss" in full.history[-1]


# --- Replay.from_model: the model's own samples ------------------------------------------------------


def test_replay_from_model_samples_seeded_saves_and_reuses(tmp_path, tok, monkeypatch):
    model = tiny_gpt2()
    path = tmp_path / "run" / "replay_samples.json"
    kw = dict(ratio=0.25, max_new_tokens=6, seed=3, batch_size=4, max_length=16)
    replay = fastft.Replay.from_model(model, tok, 6, path=path, **kw)
    assert len(replay.texts) + replay.generation["dropped"] == 6 and replay.texts
    assert replay.generation["prompts"] == [[tok.cls_token_id]]  # no BOS / EOS in a BERT tokenizer: CLS starts
    assert path.is_file() and json.loads(path.read_text())["texts"] == replay.texts
    assert fastft.Replay.from_model(model, tok, 6, **kw).texts == replay.texts  # seeded
    assert fastft.Replay.from_model(model, tok, 6, **{**kw, "seed": 4}).texts != replay.texts

    from fastft import generation

    def no_generation(*a, **k):
        raise AssertionError("the saved samples must be read, not generated again")

    monkeypatch.setattr(generation, "generate", no_generation)
    again = fastft.Replay.from_model(model, tok, 6, path=path, **kw)
    assert again.texts == replay.texts and again.ratio == 0.25 and again.max_length == 16
    with pytest.raises(ValueError, match="other settings.*seed"):
        fastft.Replay.from_model(model, tok, 6, path=path, **{**kw, "seed": 4})


def test_replay_from_model_trains_on_its_samples(tok):
    model = tiny_gpt2()
    before = [p.detach().clone() for p in model.parameters()]
    replay = fastft.Replay.from_model(model, tok, 4, ratio=0.25, max_new_tokens=8, prompts=["the weather", [101]],
                                      max_length=16)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and model.training
    assert replay.generation["prompts"] == ["the weather", [101]]
    trainer = fastft.Trainer(model, lm_task(tok), epochs=1, batch_size=8, lr=1e-3, metrics=(), replay=replay,
                             progress=False)
    trainer.fit()
    assert replay.seen == 2 * trainer.global_step


@pytest.mark.parametrize("args, kwargs, match", [
    ((0,), dict(ratio=0.25), "n must be"),
    ((4,), dict(ratio=1.0), "ratio"),
    ((4,), dict(ratio=0.25, weight=-1.0), "weight"),
])
def test_replay_from_model_bad_input(tok, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastft.Replay.from_model(tiny_gpt2(), tok, *args, **kwargs)
    with pytest.raises(ValueError, match="causal LM"):
        fastft.Replay.from_model(tiny_bert_mlm(), tok, 4, ratio=0.25)
