"""fastft.param_groups: the one rule for weight decay, L2-to-init anchoring and layer-wise LR."""

import pytest
import torch

import fastft
from fastft.param_groups import mark_new, new_parameters, no_decay_parameters, param_groups

transformers = pytest.importorskip("transformers")


def tiny_bert(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **kw)
    return cfg


def data(n=16):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 40, (6,), generator=g).tolist(), "labels": i % 2} for i in range(n)]


def step_with_fixed_grads(opt, params, steps=4):
    g = torch.Generator().manual_seed(7)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(steps)]
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_the_fresh_head_is_not_anchored_its_update_equals_plain_adamw():
    model = fastft.SequenceClassifier(transformers.BertModel(tiny_bert()), num_labels=2)
    trainer = fastft.Trainer(model, data(), l2_init=0.5, lr=1e-2, weight_decay=0.01, max_grad_norm=None,
                             progress=False)
    head = list(model.head.parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    # Plain torch AdamW on copies of the same parameters, with the same groups' lr / weight decay.
    copies = {p: torch.nn.Parameter(p.detach().clone()) for p in model.parameters()}
    plain = torch.optim.AdamW([{"params": [copies[p] for p in g["params"]], "weight_decay": g["weight_decay"]}
                               for g in trainer.optimizer.param_groups], lr=1e-2)
    everything = list(model.parameters())
    for p in everything:  # the anchors are the weights at the first step
        p.grad = torch.zeros_like(p)
    step_with_fixed_grads(trainer.optimizer, everything)
    step_with_fixed_grads(plain, [copies[p] for p in everything])
    for p in head:
        torch.testing.assert_close(p, copies[p], rtol=1e-6, atol=1e-7)
    moved = [(p - copies[p]).abs().max() for p in body if p.dim() > 1]
    assert max(moved) > 1e-4  # the encoder is pulled toward its pretrained weights: it differs
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["all.new"]["l2_init"] == 0.0 and groups["all.new.no_decay"]["l2_init"] == 0.0
    assert groups["all"]["l2_init"] == 0.5


def test_hugging_face_head_named_in_new_modules():
    model = transformers.BertForSequenceClassification(tiny_bert(num_labels=2))
    trainer = fastft.Trainer(model, data(), l2_init=0.1, new_modules=["classifier"], progress=False)
    l2 = {id(p): g["l2_init"] for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert l2[id(p)] == (0.0 if name.startswith("classifier.") else 0.1), name
    with pytest.raises(ValueError, match="new_modules names 'clasifier'.*top-level modules"):
        fastft.Trainer(model, data(), new_modules=["clasifier"], progress=False)


def test_one_rule_for_decay_and_anchoring_in_every_grouping():
    model = fastft.SequenceClassifier(transformers.BertModel(tiny_bert()), num_labels=2)
    no_decay, new = no_decay_parameters(model), new_parameters(model)
    assert new == set(model.head.parameters())
    names = {p: n for n, p in model.named_parameters()}
    assert {names[p] for p in no_decay} == {n for n in names.values()
                                           if n.endswith("bias") or "LayerNorm" in n}
    for groups in (param_groups(model, 0.01), fastft.layerwise_lr_groups(model, lr=1e-3, decay=0.8, weight_decay=0.01)):
        seen = [p for g in groups for p in g["params"]]
        assert len(seen) == len(set(seen)) == len(list(model.parameters()))
        for g in groups:
            for p in g["params"]:
                assert g["weight_decay"] == (0.0 if p in no_decay else 0.01)
                assert g.get("l2_init", None) == (0.0 if p in new else None)


def test_a_loaded_head_is_anchored_and_marks_can_be_cleared(tmp_path):
    model = fastft.SequenceClassifier(transformers.BertModel(tiny_bert()), num_labels=2)
    model.save_pretrained(tmp_path)
    again = fastft.SequenceClassifier.from_pretrained(tmp_path)
    assert new_parameters(again) == set()
    extra = torch.nn.Linear(2, 2)
    mark_new(extra)
    assert new_parameters(extra) == set(extra.parameters())
    mark_new(extra, new=False)
    assert new_parameters(extra) == set()
    with pytest.raises(TypeError, match="nn.Module"):
        mark_new("classifier")
