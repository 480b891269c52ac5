"""fastft.Trainer: training, validation, early stopping, resume, checkpoints, bad input."""

import json
import math

import pytest
import torch

import fastft
from fastft.train.data import batch_order


def blobs(n=240, seed=0, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    if noise:
        flip = torch.rand(n, generator=g) < noise
        y = torch.where(flip, 1 - y, y)
    return list(zip(x, y))


def mlp(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(32, 2))


def test_fit_learns_and_reports(tmp_path):
    data = blobs()
    trainer = fastft.Trainer(mlp(), data[:200], data[200:], epochs=4, batch_size=16, lr=3e-2,
                             metrics=("accuracy", "f1", "f1_macro", "auc"), output_dir=str(tmp_path), progress=False)
    result = trainer.fit()
    assert len(result.history) == 4 and result.global_step == 4 * 13
    last = result.history[-1]
    assert last["val_accuracy"] >= 0.9 and {"val_loss", "val_f1", "val_f1_macro", "val_auc", "train_loss"} <= set(last)
    assert result.history[0]["val_loss"] > last["val_loss"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == result.history
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "checkpoint").is_dir()
    assert (tmp_path / "curves.png").is_file() or pytest.importorskip("matplotlib") is None
    ev = trainer.evaluate(data[200:])
    assert ev["accuracy"] == pytest.approx(last["val_accuracy"]) and ev["loss"] == pytest.approx(last["val_loss"])
    assert trainer.predict(data[200:]).shape == (40, 2)


def test_uses_fastft_adamw_without_decay_on_biases():
    trainer = fastft.Trainer(mlp(), blobs(), epochs=1, weight_decay=0.1, l2_init=0.05, progress=False)
    opt = trainer.optimizer
    assert isinstance(opt, fastft.AdamW) and opt.max_grad_norm == 1.0
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in trainer.model.named_parameters():
        assert decays[id(p)] == (0.0 if name.endswith("bias") else 0.1), name
    assert all(g["l2_init"] == 0.05 for g in opt.param_groups)


def test_early_stopping_stops_and_restores_best(tmp_path):
    data = blobs(160, noise=0.45)  # nearly random labels: val loss rises as the model overfits
    es = fastft.EarlyStopping(patience=1, monitor="val_loss")
    trainer = fastft.Trainer(mlp(dropout=0.0), data[:80], data[80:], epochs=30, batch_size=8, lr=3e-2,
                             warmup_ratio=0.0, scheduler="constant", early_stopping=es, progress=False)
    result = trainer.fit()
    assert result.stopped_early and len(result.history) < 30
    best = min(r["val_loss"] for r in result.history)
    assert result.best_metric == pytest.approx(best)
    assert result.history[result.best_epoch - 1]["val_loss"] == pytest.approx(best)
    assert trainer.evaluate()["loss"] == pytest.approx(best, rel=1e-6)  # the best weights are back


def test_early_stopping_argument_checks():
    with pytest.raises(ValueError, match="patience"):
        fastft.EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="mode"):
        fastft.EarlyStopping(mode="up")
    assert fastft.EarlyStopping(monitor="val_accuracy").mode == "max"
    es = fastft.EarlyStopping(monitor="val_nothing")
    with pytest.raises(ValueError, match="val_nothing"):  # refused before any step, not after an epoch
        fastft.Trainer(mlp(), blobs(40), blobs(20, seed=1), epochs=1, early_stopping=es, progress=False)


class Crash(Exception):
    pass


class CrashAt(fastft.Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            raise Crash()


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_is_bit_identical(tmp_path, accumulation):
    data = blobs(200)
    kwargs = dict(epochs=3, batch_size=16, lr=1e-2, checkpoint_every=2, gradient_accumulation=accumulation,
                  l2_init=0.1, progress=False, early_stopping=fastft.EarlyStopping(patience=5))
    full = fastft.Trainer(mlp(), data[:160], data[160:], output_dir=str(tmp_path / "a"), **kwargs)
    full_result = full.fit()

    crashing = fastft.Trainer(mlp(), data[:160], data[160:], output_dir=str(tmp_path / "b"),
                              callbacks=[CrashAt(15)], **kwargs)  # the last checkpoint (step 14) is mid-epoch
    with pytest.raises(Crash):
        crashing.fit()
    kwargs["early_stopping"] = fastft.EarlyStopping(patience=5)
    resumed = fastft.Trainer(mlp(seed=123), data[:160], data[160:], output_dir=str(tmp_path / "b"), **kwargs)
    result = resumed.resume()
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    assert result.history == full_result.history and result.global_step == full_result.global_step


def test_killed_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    data = blobs(100)
    trainer = fastft.Trainer(mlp(), data[:80], data[80:], epochs=2, batch_size=16, output_dir=str(tmp_path),
                             progress=False)
    trainer.fit()
    before = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    real_save = torch.save

    def dying_save(*a, **k):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer._save_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    after = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert after == before
    again = fastft.Trainer(mlp(), data[:80], data[80:], epochs=2, batch_size=16, output_dir=str(tmp_path),
                           progress=False)
    again._load_checkpoint(again._readable_checkpoint(None))
    assert again.global_step == before["global_step"]


def test_gradient_accumulation_equals_bigger_batch():
    data = blobs(64)
    kw = dict(epochs=1, lr=1e-2, group_by_length=False, progress=False, warmup_ratio=0.0, scheduler="constant")
    a = fastft.Trainer(mlp(dropout=0.0), data, batch_size=16, **kw)
    b = fastft.Trainer(mlp(dropout=0.0), data, batch_size=8, gradient_accumulation=2, **kw)
    a.fit()
    b.fit()
    assert a.global_step == b.global_step == 4
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(precision):
    data = blobs(64)
    trainer = fastft.Trainer(mlp(), data[:48], data[48:], epochs=2, batch_size=16, lr=1e-2, precision=precision,
                             progress=False)
    result = trainer.fit()
    assert math.isfinite(result.history[-1]["val_loss"])
    assert (trainer.scaler is not None) == (precision == "fp16")


def test_length_grouped_batches_cover_everything_once():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (1000,), generator=g).tolist()
    batches = batch_order(lengths, 16, torch.Generator().manual_seed(1), shuffle=True, group_by_length=True)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    random_batches = batch_order(lengths, 16, torch.Generator().manual_seed(1), shuffle=True, group_by_length=False)
    random_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in random_batches) / len(
        random_batches)
    assert spread < 0.2 * random_spread
    assert batches == batch_order(lengths, 16, torch.Generator().manual_seed(1), shuffle=True, group_by_length=True)


def test_dict_batches_with_dynamic_padding_and_hf_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(64):
        n = int(torch.randint(3, 30, (1,), generator=g))
        ids = torch.randint(5, 50, (n,), generator=g).tolist()
        data.append({"input_ids": ids, "labels": int(ids[0] > 27)})
    seen = []

    class Spy(fastft.Callback):
        pass

    trainer = fastft.Trainer(model, data[:48], data[48:], epochs=2, batch_size=8, lr=1e-3, progress=False,
                             callbacks=[Spy()])
    batch = trainer.collate(data[:3])
    assert batch["input_ids"].shape[1] == max(len(d["input_ids"]) for d in data[:3])
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([len(d["input_ids"]) for d in data[:3]]))
    result = trainer.fit()
    assert len(result.history) == 2 and math.isfinite(result.history[-1]["val_loss"])
    del seen


@pytest.mark.parametrize("make, match, exc", [
    (lambda: fastft.Trainer(mlp(), [], progress=False), "empty", ValueError),
    (lambda: fastft.Trainer(mlp(), [(torch.zeros(8), 5)], num_labels=2, progress=False), "outside", ValueError),
    (lambda: fastft.Trainer(mlp(), blobs(10), epochs=0), "epochs", ValueError),
    (lambda: fastft.Trainer(mlp(), blobs(10), precision="fp8"), "precision", ValueError),
    (lambda: fastft.Trainer(mlp(), blobs(10), metrics=("bleu-ish",)), "unknown metric", ValueError),
    (lambda: fastft.Trainer(mlp(), [("some text", 1)]), "tokenizer", ValueError),
])
def test_bad_input(make, match, exc):
    with pytest.raises(exc, match=match):
        make()


def test_model_without_loss_or_logits():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 2)

        def forward(self, x):
            return {"something": self.lin(x)}

    trainer = fastft.Trainer(Weird(), blobs(20), epochs=1, progress=False)
    with pytest.raises(TypeError, match="neither a loss nor logits"):
        trainer.fit()


def test_nonfinite_loss_stops_with_step_or_is_skipped(tmp_path):
    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.lin(x)
            return out * float("nan") if self.calls == 3 else out

    model = Exploding()
    trainer = fastft.Trainer(model, blobs(64), epochs=1, batch_size=16, output_dir=str(tmp_path), progress=False,
                             checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="optimizer step 3"):
        trainer.fit()
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.calls = 0
    skipping = fastft.Trainer(model, blobs(64), epochs=1, batch_size=16, skip_nonfinite=True, progress=False)
    result = skipping.fit()
    assert result.skipped_steps == 1 and result.global_step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters()) and weights


def test_freeze_and_gradual_unfreezing_with_the_same_optimizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(5, 50, (10,), generator=g).tolist(), "labels": i % 2} for i in range(32)]
    trainer = fastft.Trainer(model, data, epochs=3, batch_size=8, lr=1e-3, freeze=3, l2_init=0.01, progress=False,
                             new_modules=["classifier"], output_dir=str(tmp_path))
    unfreeze = fastft.GradualUnfreezing(trainer.freeze_plan, every=1)
    trainer.callbacks.append(unfreeze)
    opt = trainer.optimizer
    trainer.fit()
    assert trainer.optimizer is opt and trainer.freeze_plan.boundary == 0
    params = dict(model.named_parameters())
    low = params["bert.encoder.layer.0.attention.self.query.weight"]
    top = params["bert.encoder.layer.2.attention.self.query.weight"]
    emb = params["bert.embeddings.word_embeddings.weight"]
    # the top block unfroze after epoch 1 and trained two epochs; the lowest unfroze last, after training ended
    assert float(opt.state[top]["step"]) == 8 and low not in opt.state and emb not in opt.state
    assert torch.equal(opt.state[top]["anchor"], pretrained["bert.encoder.layer.2.attention.self.query.weight"])
    assert torch.equal(emb, pretrained["bert.embeddings.word_embeddings.weight"])


def test_text_metrics_and_callable_metrics():
    from fastft.train import metrics as M

    assert M.exact_match(["The Eiffel tower!", "Paris"], ["eiffel tower", "London"]) == 0.5
    assert M.token_f1(["the big red dog"], ["red dog"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    with pytest.raises(ValueError, match="as many"):
        M.exact_match(["a"], ["a", "b"])
    try:
        import sacrebleu  # noqa: F401
    except ImportError:
        sacrebleu = None
    if sacrebleu is not None:
        assert M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    data = blobs(64)

    def positive_rate(logits, labels):
        return {"positive_rate": float((logits.argmax(-1) == 1).float().mean())}

    trainer = fastft.Trainer(mlp(), data[:48], data[48:], epochs=1, metrics=("accuracy", positive_rate),
                             progress=False)
    record = trainer.fit().history[-1]
    assert 0.0 <= record["val_positive_rate"] <= 1.0 and "val_accuracy" in record


def regression_with_large_targets(n=256):
    """Targets of about 1e3: the fp16 gradients at GradScaler's initial scale (65536) overflow."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return list(zip(x, 1000.0 * (x[:, 0] + 0.5)))


def linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 1)


def test_fp16_steps_the_grad_scaler_skips_are_not_steps(caplog):
    trainer = fastft.Trainer(linear(), regression_with_large_targets(), epochs=1, batch_size=16, lr=1e-2,
                             precision="fp16", metrics=(), progress=False)
    with caplog.at_level("INFO", logger="fastft.train.trainer"):
        result = trainer.fit()
    assert result.amp_skipped_steps > 0 and result.global_step > 0
    # Skipped steps consume their batches: every step slot is an update or a skip.
    assert result.global_step + result.amp_skipped_steps == trainer.total_steps == 16
    # The schedule and the optimizer count real updates only.
    assert trainer.scheduler.last_epoch == result.global_step
    assert all(float(s["step"]) == result.global_step for s in trainer.optimizer.state.values())
    assert result.history[-1]["amp_skipped_steps"] == result.amp_skipped_steps
    assert result.history[-1]["step"] == result.global_step
    assert caplog.text.count("GradScaler skipped") == result.amp_skipped_steps


def test_fp16_skips_survive_a_resume(tmp_path):
    kwargs = dict(epochs=2, batch_size=16, lr=1e-2, precision="fp16", metrics=(), progress=False, checkpoint_every=2)
    data = regression_with_large_targets(128)
    full_trainer = fastft.Trainer(linear(), data, output_dir=str(tmp_path / "a"), **kwargs)
    full = full_trainer.fit()
    assert full.amp_skipped_steps > 2
    with pytest.raises(Crash):  # after the checkpoint of step 2, which holds most of the skips
        fastft.Trainer(linear(), data, output_dir=str(tmp_path / "b"), callbacks=[CrashAt(3)], **kwargs).fit()
    resumed_trainer = fastft.Trainer(linear(seed=1), data, output_dir=str(tmp_path / "b"), **kwargs)
    resumed = resumed_trainer.resume()
    assert resumed.amp_skipped_steps == full.amp_skipped_steps and resumed.global_step == full.global_step
    assert resumed.history == full.history
    assert resumed_trainer.scheduler.last_epoch == full_trainer.scheduler.last_epoch == full.global_step
    for a, b in zip(full_trainer.model.parameters(), resumed_trainer.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, recwarn, native):
    import fastft.train.trainer as T

    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda: native)
    fastft.Trainer(mlp(), blobs(32), epochs=1, precision="bf16", device="cpu", progress=False)
    ours = [w for w in recwarn if "bf16" in str(w.message)]
    if native:
        assert not ours
    else:
        assert len(ours) == 1 and issubclass(ours[0].category, UserWarning)
        assert "native bf16" in str(ours[0].message) and "precision='fp32'" in str(ours[0].message)
    fastft.Trainer(mlp(), blobs(32), epochs=1, precision="fp32", device="cpu", progress=False)
    assert len([w for w in recwarn if "bf16" in str(w.message)]) == len(ours)


def test_cpu_has_native_bf16_reads_the_cpu_flags(monkeypatch):
    import builtins
    import io

    import fastft.train.trainer as T

    real_open = builtins.open

    def cpuinfo(flags):
        def fake_open(path, *a, **k):
            if str(path) == "/proc/cpuinfo":
                return io.StringIO(f"processor\t: 0\nflags\t\t: {flags}\n")
            return real_open(path, *a, **k)
        return fake_open

    monkeypatch.setattr(builtins, "open", cpuinfo("fpu sse avx2 avx512f avx512bw"))
    assert T.cpu_has_native_bf16() is False
    monkeypatch.setattr(builtins, "open", cpuinfo("fpu sse avx2 avx512f avx512_bf16"))
    assert T.cpu_has_native_bf16() is True
    monkeypatch.setattr(builtins, "open", cpuinfo("fpu amx_tile amx_bf16"))
    assert T.cpu_has_native_bf16() is True
