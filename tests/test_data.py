"""fastft.train.data as the trainers use it: labels by name, truncation like training, plain-text
prediction, and bad input refused before any step."""

import pytest
import torch

import fastft
from lm_helpers import minilm_tokenizer, tiny_gpt2, transformers

WORDS = ["good", "great", "fine", "bad", "awful", "dull"]


@pytest.fixture(scope="module")
def tok():
    return minilm_tokenizer()


def texts(n, seed=0, names=("neg", "pos")):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = int(torch.randint(2, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(3, (4,), generator=g) + (0 if y else 3)]
        out.append((" ".join(words), names[y]))
    return out


def classifier(num_labels=2, max_positions=64):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=max_positions)
    return fastft.SequenceClassifier(transformers.BertModel(cfg), num_labels=num_labels)


def test_labels_by_name_train_evaluate_and_predict(tok):
    trainer = fastft.Trainer(classifier(), texts(48), texts(16, seed=1), tokenizer=tok, epochs=2, batch_size=8,
                             lr=5e-3, progress=False)
    assert trainer.label_names == ["neg", "pos"] and trainer.label2id == {"neg": 0, "pos": 1}
    assert trainer.id2label == {0: "neg", 1: "pos"}
    trainer.fit()
    assert trainer.evaluate(texts(8, seed=2))["accuracy"] >= 0.0
    out = trainer.predict_labels(["good great fine fine", "bad awful dull dull"])
    assert [o["label"] for o in out] == ["pos", "neg"] and all(0.5 < o["score"] <= 1 for o in out)
    ranked = trainer.predict_labels(["good"], top_k=None)[0]
    assert [r["label"] for r in ranked][0] == "pos" and sum(r["score"] for r in ranked) == pytest.approx(1.0)


def test_user_given_label_order_and_string_digits(tok):
    trainer = fastft.Trainer(classifier(), texts(8), tokenizer=tok, labels=["pos", "neg"], progress=False)
    assert trainer.label2id == {"pos": 0, "neg": 1}
    assert {e["labels"] for e in trainer.train_examples} == {0, 1}
    digits = fastft.Trainer(classifier(), texts(8, names=("0", "1")), tokenizer=tok, progress=False)
    assert digits.label_names == ["0", "1"]  # "1"/"0" no longer fail with "too many dimensions 'str'"
    ints = fastft.Trainer(classifier(), texts(8, names=(0, 1)), tokenizer=tok, progress=False)
    assert ints.label_names is None


def test_unknown_or_mismatched_labels_are_named(tok):
    val = texts(6, seed=1) + [("good story", "positive")]
    with pytest.raises(ValueError, match=r"val_data\[6\] has label 'positive'.*\['neg', 'pos'\]"):
        fastft.Trainer(classifier(), texts(8), val, tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="3 labels.*num_labels=2"):
        fastft.Trainer(classifier(), texts(9, names=("a", "b")) + [("x y", "c")], tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="each class name once"):
        fastft.Trainer(classifier(), texts(8), tokenizer=tok, labels=["neg", "neg"], progress=False)


def test_multitask_labels_by_name(tok):
    tasks = {"pol": fastft.Task(train=texts(16), val=texts(8, seed=1)),
             "topic": fastft.Task(train=texts(16, names=("sport", "tech")) + [("a b", "arts")])}
    mt = fastft.MultiTaskTrainer(transformers.BertModel(transformers.BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)),
        tasks, tokenizer=tok, epochs=1, batch_size=8, progress=False)
    assert mt.label_maps["topic"].names == ["arts", "sport", "tech"]
    assert mt.model.heads["topic"].num_labels == 3
    mt.fit()
    assert mt.predict("topic", ["a b c"]).shape == (1, 3)


def test_predict_and_evaluate_cut_texts_like_training(tok):
    trainer = fastft.Trainer(classifier(), texts(8), tokenizer=tok, max_length=8, progress=False)
    long = "good great fine good great fine good great fine good"  # 12 tokens with [CLS] and [SEP]
    cut = tok.decode(tok(long, truncation=True, max_length=8)["input_ids"][1:-1])
    with pytest.warns(UserWarning, match="1 of 1 texts of data are longer than 8 tokens"):
        a = trainer.predict([long])
    torch.testing.assert_close(a, trainer.predict([cut]))


def test_without_max_length_texts_stop_at_the_model_limit(tok):
    trainer = fastft.Trainer(classifier(max_positions=32), texts(8), tokenizer=tok, progress=False)
    assert trainer.text_max_length == 32
    long = " ".join(["good"] * 600)
    with pytest.warns(UserWarning, match="longer than 32 tokens"):
        assert trainer.predict([long]).shape == (1, 2)  # was: size of tensor a (602) must match ... (512)


def test_empty_texts_are_named_before_any_step(tok):
    data = texts(8)
    data[5] = ("   ", "pos")
    with pytest.raises(ValueError, match=r"train_data\[5\] is an empty text"):
        fastft.Trainer(classifier(), data, tokenizer=tok, progress=False)


def test_metrics_a_language_model_cannot_compute_are_refused(tok):
    lm_data = [{"input_ids": ids, "labels": list(ids)} for ids in tok(["a b c d", "e f g h"] * 4)["input_ids"]]
    with pytest.raises(ValueError, match="per token"):
        fastft.Trainer(tiny_gpt2(), lm_data, metrics=("accuracy",), progress=False)
    with pytest.raises(ValueError, match="per token"):
        fastft.Trainer(tiny_gpt2(), lm_data, metrics=(lambda logits, labels: {"x": 1.0},), progress=False)
    trainer = fastft.Trainer(tiny_gpt2(), lm_data, lm_data[:2], epochs=1, batch_size=4, progress=False)
    assert trainer.metrics == ("perplexity",)
    assert "perplexity" in trainer.evaluate()


def test_early_stopping_monitor_checked_at_set_up(tok):
    es = fastft.EarlyStopping(monitor="val_acc")
    with pytest.raises(ValueError, match="Did you mean 'val_accuracy'"):
        fastft.Trainer(classifier(), texts(8), texts(4, seed=1), tokenizer=tok, early_stopping=es, progress=False)
    with pytest.raises(ValueError, match="no validation data"):
        fastft.Trainer(classifier(), texts(8), tokenizer=tok, early_stopping=fastft.EarlyStopping(), progress=False)
    tasks = {"a": fastft.Task(train=texts(8), val=texts(4))}
    with pytest.raises(ValueError, match="val_mean_accuracy"):
        fastft.MultiTaskTrainer(classifier().encoder, tasks, tokenizer=tok, progress=False,
                                early_stopping=fastft.EarlyStopping(monitor="val_mean_acc"))
    ok = fastft.EarlyStopping(monitor="val_a_accuracy")
    fastft.MultiTaskTrainer(classifier().encoder, tasks, tokenizer=tok, progress=False, early_stopping=ok)
    monitor = fastft.ForgettingMonitor(["some text here"] * 4, tokenizer=tok)
    fastft.Trainer(classifier(), texts(8), texts(4), tokenizer=tok, callbacks=[monitor], progress=False,
                   early_stopping=fastft.EarlyStopping(monitor="repr_cka", mode="max"))
    with pytest.raises(ValueError, match="repr_cka"):
        fastft.Trainer(classifier(), texts(8), texts(4), tokenizer=tok, callbacks=[monitor], progress=False,
                       early_stopping=fastft.EarlyStopping(monitor="repr_ck"))


def test_what_a_new_user_tried(tok, tmp_path):
    train = texts(16)
    trainer = fastft.Trainer(classifier(), train, tokenizer=tok, max_length=8, epochs=1, batch_size=8,
                             output_dir=str(tmp_path), progress=False)
    # labelled pairs with names, and one plain string, predict like plain texts
    torch.testing.assert_close(trainer.predict(train[:2]), trainer.predict([t for t, _ in train[:2]]))
    assert trainer.predict("good great").shape == (1, 2)
    with pytest.raises(ValueError, match="top_k"):
        trainer.predict_labels(["good"], top_k=0)
    trainer.fit()
    saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    assert saved.model_max_length == 8  # the loaded tokenizer cuts texts as training did
    with pytest.raises(ValueError, match="max_length=4096 is more than the 64 positions"):
        fastft.Trainer(classifier(), train, tokenizer=tok, max_length=4096, progress=False)
    with pytest.raises(ValueError, match=r"train_data\[0\] has the float label 0.5"):
        fastft.Trainer(classifier(), [(t, 0.5) for t, _ in train], tokenizer=tok, progress=False)


def test_eval_every_longer_than_the_run_still_validates_at_the_end(tok):
    trainer = fastft.Trainer(classifier(), texts(24), texts(8, seed=1), tokenizer=tok, epochs=1, batch_size=4,
                             eval_every=4, progress=False)
    result = trainer.fit()
    assert [r["step"] for r in result.history] == [4, 6]  # the last 2 steps are validated too
    never = fastft.Trainer(classifier(), texts(8), texts(8, seed=1), tokenizer=tok, epochs=1, batch_size=4,
                           eval_every=100, progress=False)
    assert [r["step"] for r in never.fit().history] == [2]


def test_hugging_face_head_anchored_without_new_modules_warns(tok):
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64, num_labels=2)
    with pytest.warns(UserWarning, match="new_modules"):
        fastft.Trainer(transformers.BertForSequenceClassification(cfg), texts(8), tokenizer=tok, l2_init=0.1,
                       progress=False)


def test_multitask_label_names_and_predictions_per_task(tok):
    enc = classifier().encoder
    tasks = {"pol": fastft.Task(train=texts(16), labels=["pos", "neg"]), "ids": fastft.Task(train=texts(8, names=(0, 1)))}
    mt = fastft.MultiTaskTrainer(enc, tasks, tokenizer=tok, progress=False)
    assert mt.label_names == {"pol": ["pos", "neg"], "ids": None}
    out = mt.predict_labels("pol", ["good great", "bad awful"])
    assert all(o["label"] in ("pos", "neg") for o in out)
    with pytest.raises(TypeError, match="labels is set per task, on Task.labels"):
        fastft.MultiTaskTrainer(enc, tasks, tokenizer=tok, labels=["pos", "neg"], progress=False)
    bad = {"pol": fastft.Task(train=texts(8), val=[("good", "great")])}
    with pytest.raises(ValueError, match=r"Task\(labels=\[\.\.\.\]\)"):
        fastft.MultiTaskTrainer(enc, bad, tokenizer=tok, progress=False)
