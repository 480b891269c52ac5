"""fastft.forgetting: the ForgettingMonitor and continued pretraining."""

import copy
import json
import warnings

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


# --- estimate_fisher --------------------------------------------------------------------------------


def _squared_grads(model, losses):
    """float64 reference: mean over the losses of each parameter's squared gradient, normalised to mean 1."""
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for loss in losses:
        for acc, g in zip(sums, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc += g.double() ** 2
    mean = sum(s.sum() for s in sums) / sum(s.numel() for s in sums)
    return [s / mean for s in sums]


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(x)


def _pairs(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, generator=g), int(torch.randint(3, (1,), generator=g))) for _ in range(n)]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_fisher_of_a_classifier_is_the_mean_squared_gradient(batch_size):
    model, data = _Linear().double(), [(x.double(), y) for x, y in _pairs()]
    model.train()
    fisher = fastft.estimate_fisher(model, data, batch_size=batch_size)
    losses = [torch.nn.functional.cross_entropy(model(torch.stack([x for x, _ in data[i:i + batch_size]])),
                                                torch.tensor([y for _, y in data[i:i + batch_size]]))
              for i in range(0, len(data), batch_size)]
    expected = _squared_grads(model, losses)
    assert list(fisher) == ["fc.weight", "fc.bias"]
    for f, e in zip(fisher.values(), expected):
        assert f.dtype == torch.float64
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-12)
    total = sum(f.sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    assert float(total) == pytest.approx(1.0)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_fisher_of_a_causal_lm_per_text_and_batches_limit(tok):
    model = tiny_gpt2()
    texts = GENERAL[:6]
    fisher = fastft.estimate_fisher(model, texts, tok, max_length=16, batches=4)
    losses = []
    for t in texts[:4]:  # batches=4 at batch_size 1: the first four texts
        ids = tok(t, truncation=True, max_length=16, return_tensors="pt")["input_ids"]
        losses.append(model(input_ids=ids, labels=ids).loss)  # the model's own (unfused) loss
    expected = _squared_grads(model, losses)
    names = [n for n, _ in model.named_parameters()]
    assert list(fisher) == names
    for f, e in zip(fisher.values(), expected):
        assert f.dtype == torch.float32 and f.shape == e.shape
        torch.testing.assert_close(f.double(), e, rtol=2e-4, atol=1e-6)


def test_fisher_skips_frozen_parameters_and_changes_nothing(tok):
    model = tiny_bert_mlm()
    model.bert.embeddings.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = fastft.estimate_fisher(model, GENERAL[:5], tok, max_length=20)
    assert fisher and not any(n.startswith("bert.embeddings") for n in fisher)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(bool((f >= 0).all()) for f in fisher.values())


def test_true_fisher_matches_its_expectation_for_a_softmax_classifier():
    """fisher='true' samples targets from the model: on one input repeated, the estimate approaches
    E_y~p[(grad log p(y|x))^2] = sum_y p(y|x) (grad log p(y|x))^2, computed exactly here."""
    model = _Linear().double()
    x = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    estimate = fastft.estimate_fisher(model, [(x, 0)] * 3000, fisher="true", seed=1)
    probs = torch.softmax(model(x[None]), -1)[0].detach()
    losses = []
    for y in range(3):
        nll = torch.nn.functional.cross_entropy(model(x[None]), torch.tensor([y]))
        losses.append((nll, probs[y]))
    params = list(model.parameters())
    exact = [torch.zeros_like(p) for p in params]
    for nll, py in losses:
        for acc, g in zip(exact, torch.autograd.grad(nll, params)):
            acc += py * g ** 2
    mean = sum(e.sum() for e in exact) / sum(e.numel() for e in exact)
    for f, e in zip(estimate.values(), exact):
        torch.testing.assert_close(f, e / mean, rtol=0.1, atol=0.02)
    empirical = fastft.estimate_fisher(model, [(x, 0)] * 10)
    assert not torch.allclose(empirical["fc.bias"], estimate["fc.bias"], rtol=0.1)
    again = fastft.estimate_fisher(model, [(x, 0)] * 50, fisher="true", seed=1)
    assert torch.equal(again["fc.weight"], fastft.estimate_fisher(model, [(x, 0)] * 50, fisher="true", seed=1)["fc.weight"])


def test_true_fisher_of_a_causal_lm_runs_and_is_seeded(tok):
    model = tiny_gpt2()
    a = fastft.estimate_fisher(model, GENERAL[:3], tok, max_length=12, fisher="true", seed=5)
    b = fastft.estimate_fisher(model, GENERAL[:3], tok, max_length=12, fisher="true", seed=5)
    c = fastft.estimate_fisher(model, GENERAL[:3], tok, max_length=12, fisher="empirical")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.allclose(a["transformer.h.0.mlp.c_fc.weight"], c["transformer.h.0.mlp.c_fc.weight"])


def test_fisher_bad_input(tok):
    model = _Linear()
    with pytest.raises(ValueError, match="batch_size"):
        fastft.estimate_fisher(model, _pairs(), batch_size=0)
    with pytest.raises(ValueError, match="batches"):
        fastft.estimate_fisher(model, _pairs(), batches=0)
    with pytest.raises(ValueError, match="fisher"):
        fastft.estimate_fisher(model, _pairs(), fisher="diagonal")
    with pytest.raises(ValueError, match="empty"):
        fastft.estimate_fisher(model, [])
    with pytest.raises(ValueError, match="class ids"):
        fastft.estimate_fisher(model, [(x, "pos") for x, _ in _pairs()])
    with pytest.raises(ValueError, match="tokenizer"):
        fastft.estimate_fisher(tiny_gpt2(), GENERAL[:2])
    with pytest.raises(ValueError, match="regression"):
        fastft.estimate_fisher(model, [(x, 0.5) for x, _ in _pairs()], fisher="true")
    frozen = _Linear().requires_grad_(False)
    with pytest.raises(ValueError, match="requires a gradient"):
        fastft.estimate_fisher(frozen, _pairs())


# --- WiSE-FT ---------------------------------------------------------------------------------------


def _trained_pair():
    """A model with a pretrained body and a fresh head, its pretrained state dict, and its trained
    weights (body moved by hand, head too)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    pretrained = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("2.")}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model, pretrained


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 1.5])
def test_interpolate_from_a_state_dict(alpha):
    model, pretrained = _trained_pair()
    finetuned = {k: v.clone() for k, v in model.state_dict().items()}
    fastft.interpolate(model, alpha, pretrained)
    for name, p in model.named_parameters():
        if name.startswith("2."):  # no anchor: left alone
            assert torch.equal(p, finetuned[name])
        else:
            torch.testing.assert_close(p.detach(), alpha * finetuned[name] + (1 - alpha) * pretrained[name])
    if alpha == 1.0:
        assert all(torch.equal(p, finetuned[n]) for n, p in model.named_parameters())
    if alpha == 0.0:
        assert torch.equal(model[0].weight, pretrained["0.weight"])
    assert torch.equal(model[1].running_mean, finetuned["1.running_mean"])  # buffers are not interpolated


def test_interpolate_from_the_optimizers_anchors():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = fastft.AdamW([{"params": model[0].parameters()}, {"params": model[1].parameters(), "l2_init": 0.0}],
                       lr=0.1, l2_init=0.01)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    fastft.interpolate(model, 0.25, opt)
    torch.testing.assert_close(model[0].weight.detach(), 0.25 * trained["0.weight"] + 0.75 * start["0.weight"])
    assert torch.equal(model[1].weight, trained["1.weight"])  # its group had no L2-to-init: no anchor


def test_interpolate_bad_input_changes_nothing():
    model, pretrained = _trained_pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(pretrained)
    bad["1.bias"] = torch.zeros(7)
    cases = [(dict(alpha=float("nan"), anchors=pretrained), ValueError, "alpha"),
             (dict(alpha=0.5, anchors=bad), ValueError, "1.bias"),
             (dict(alpha=0.5, anchors={"encoder.weight": torch.zeros(6, 4)}), ValueError, "named_parameters"),
             (dict(alpha=0.5, anchors=fastft.AdamW(model.parameters())), ValueError, "no anchor"),
             (dict(alpha=0.5, anchors=[1, 2]), TypeError, "anchors")]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            fastft.interpolate(model, **kwargs)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_wise_ft_sweep_evaluates_each_alpha_and_restores():
    model, pretrained = _trained_pair()
    finetuned = {k: v.clone() for k, v in model.state_dict().items()}

    def distance(m):
        return {"distance": float((m[0].weight - pretrained["0.weight"]).norm()), "training": m.training}

    full = float((finetuned["0.weight"] - pretrained["0.weight"]).norm())
    records = fastft.wise_ft_sweep(model, pretrained, [1.0, 0.5, 0.0, 0.5], distance)
    assert [r["alpha"] for r in records] == [1.0, 0.5, 0.0, 0.5]
    assert [r["distance"] for r in records] == pytest.approx([full, full / 2, 0.0, full / 2], abs=1e-6)
    assert all(torch.equal(v, finetuned[k]) for k, v in model.state_dict().items())

    def boom(m):
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed"):
        fastft.wise_ft_sweep(model, pretrained, [0.2], boom)
    assert all(torch.equal(v, finetuned[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="empty"):
        fastft.wise_ft_sweep(model, pretrained, [], distance)
    with pytest.raises(TypeError, match="dict"):
        fastft.wise_ft_sweep(model, pretrained, [0.5], lambda m: 1.0)
    assert all(torch.equal(v, finetuned[k]) for k, v in model.state_dict().items())


def test_wise_ft_sweep_with_the_forgetting_monitor_on_a_language_model(tok):
    """The sweep as it is used: an LM's loss on held-out text measured at each alpha, from the
    pretrained value (alpha 0) to the fine-tuned one (alpha 1), the fine-tuned weights kept."""
    model = tiny_gpt2()
    monitor = fastft.ForgettingMonitor(GENERAL[20:], tokenizer=tok, max_length=20)
    monitor.setup(model)
    base = monitor.measure(model)["pretrain_loss"]
    enc = tok(GENERAL[:16], truncation=True, max_length=20)["input_ids"]
    trainer = fastft.Trainer(model, [{"input_ids": ids, "labels": list(ids)} for ids in enc], epochs=2, batch_size=8,
                             lr=1e-2, metrics=(), progress=False, l2_init=1e-4)
    trainer.fit()
    tuned = monitor.measure(model)["pretrain_loss"]
    records = fastft.wise_ft_sweep(model, trainer.optimizer, [0.0, 0.5, 1.0], monitor.measure)
    losses = [r["pretrain_loss"] for r in records]
    assert losses[0] == pytest.approx(base, rel=1e-5) and losses[2] == pytest.approx(tuned, rel=1e-6)
    assert losses[0] > losses[1] > losses[2]
    assert monitor.measure(model)["pretrain_loss"] == pytest.approx(tuned, rel=1e-6)


# --- EWC in the Trainer --------------------------------------------------------------------------


def test_trainer_fisher_importance_is_estimated_before_training_and_checkpointed(tmp_path, tok):
    model = tiny_gpt2()
    expected = fastft.estimate_fisher(copy.deepcopy(model), GENERAL[:6], tok, max_length=16)
    trainer = fastft.Trainer(model, lm_task(tok), epochs=1, batch_size=8, lr=3e-3, metrics=(), progress=False, tokenizer=tok,
                             l2_init=0.05, l2_init_importance="fisher", importance_data=GENERAL[:6], max_length=16,
                             output_dir=str(tmp_path / "run"))
    opt = trainer.optimizer
    for name, p in model.named_parameters():
        torch.testing.assert_close(opt.state[p]["importance"], expected[name])
    trainer.fit()
    # The same run from the dict itself ends with the same weights, and a resumed trainer has the importances.
    twin = tiny_gpt2()
    fastft.Trainer(twin, lm_task(tok), epochs=1, batch_size=8, lr=3e-3, metrics=(), progress=False, tokenizer=tok, l2_init=0.05,
                   l2_init_importance=expected, max_length=16).fit()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fresh = tiny_gpt2()
    again = fastft.Trainer(fresh, lm_task(tok), epochs=1, batch_size=8, lr=3e-3, metrics=(), progress=False, tokenizer=tok,
                           l2_init=0.05, max_length=16, output_dir=str(tmp_path / "run"))
    again.resume()
    for (name, p) in fresh.named_parameters():
        torch.testing.assert_close(again.optimizer.state[p]["importance"], expected[name])


def test_trainer_fisher_of_a_classifier_weighs_the_encoder_not_the_new_head(tok):
    encoder = tiny_bert_mlm().bert
    clf = fastft.SequenceClassifier(encoder, num_labels=2)
    earlier = [(t, "pos" if y else "neg") for t, y in TASK[:10]]
    trainer = fastft.Trainer(clf, TASK, epochs=1, batch_size=8, tokenizer=tok, progress=False, l2_init=0.1,
                             l2_init_importance="fisher", importance_data=earlier, labels=["neg", "pos"])
    state = trainer.optimizer.state
    head = {id(p) for p in clf.head.parameters()}
    weighted = [p for p in clf.parameters() if p in state and "importance" in state[p]]
    assert weighted and not any(id(p) in head for p in weighted)
    total = sum(float(state[p]["importance"].sum()) for p in weighted)
    assert total / sum(p.numel() for p in weighted) == pytest.approx(1.0, rel=1e-5)
    trainer.fit()


@pytest.mark.parametrize("kwargs, match", [
    (dict(l2_init=0.1, importance_data=GENERAL), "only read with"),
    (dict(l2_init=0.1, l2_init_importance="fisher"), "importance_data"),
    (dict(l2_init=0.0, l2_init_importance="fisher", importance_data=GENERAL), "l2_init > 0"),
    (dict(l2_init=0.1, l2_init_importance="ewc", importance_data=GENERAL), "'fisher'"),
    (dict(l2_init=0.1, l2_init_importance={"no.such.weight": torch.ones(2)}), "no.such.weight"),
    (dict(l2_init=0.1, l2_init_importance={"transformer.wte.weight": torch.ones(2)}), "shape"),
])
def test_trainer_importance_bad_input(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastft.Trainer(tiny_gpt2(), lm_task(tok), epochs=1, batch_size=8, metrics=(), progress=False, **kwargs)


def test_trainer_warns_when_the_decoupled_ewc_pull_overshoots(tok):
    model = tiny_gpt2()
    names = [n for n, _ in model.named_parameters()]
    ones = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    spiky = dict(ones, **{names[1]: torch.full_like(ones[names[1]], 500.0)})  # lr * l2 * 500 = 2.5
    with pytest.warns(UserWarning, match=r"overshoots the anchor on .*clamp\(max=200\)"):
        fastft.Trainer(model, lm_task(tok), epochs=1, batch_size=8, lr=1e-3, metrics=(), progress=False,
                       tokenizer=tok, l2_init=5.0, l2_init_importance=spiky, max_length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # F = 1: lr * l2 = 0.005, no warning; coupled mode never overshoots
        fastft.Trainer(tiny_gpt2(), lm_task(tok), epochs=1, batch_size=8, lr=1e-3, metrics=(), progress=False,
                       tokenizer=tok, l2_init=5.0, l2_init_importance=ones, max_length=16)
        fastft.Trainer(tiny_gpt2(), lm_task(tok), epochs=1, batch_size=8, lr=1e-3, metrics=(), progress=False,
                       tokenizer=tok, l2_init=5.0, l2_init_mode="coupled", l2_init_importance=spiky, max_length=16)
