"""Mechanics of fastft.freezing: finding blocks, freeze plans, gradual unfreezing, layer-wise LR decay.

Real Hugging Face architectures built from tiny configs (no downloads). No timings here: the
savings are measured by benchmarks/bench_freeze.py.
"""

import copy
import math
import pickle
import types
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import fastft
from fastft.freezing import (FreezePlan, GradualUnfreezing, RequiresGradAttributeError, find_layers, freeze_layers,
                             layerwise_lr_groups)

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForSequenceClassification, BertModel,  # noqa: E402
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, RobertaConfig,
                          RobertaModel, T5Config, T5EncoderModel, T5ForConditionalGeneration, ViTConfig, ViTModel)

transformers.logging.set_verbosity_error()
V, H, B, T = 100, 32, 3, 12  # vocab, hidden, batch, tokens


# --------------------------------------------------------------------------------------------------
# Tiny models: (model, the block list find_layers must return, the embedding modules, inputs, loss)


def _bert_cfg(layers=3, dropout=0.1, **kw):
    return BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout, **kw)


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (B, T), generator=g)


def _t5_cfg():
    return T5Config(vocab_size=V, d_model=H, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                    decoder_start_token_id=0)


def make(arch):
    torch.manual_seed(0)
    ids = _ids()
    if arch == "bert":
        m = BertModel(_bert_cfg())
        return m, m.encoder.layer, [m.embeddings], lambda: m(input_ids=ids).last_hidden_state.square().mean()
    if arch == "bert_cls":
        m = BertForSequenceClassification(_bert_cfg(num_labels=2))
        y = torch.tensor([0, 1, 1])
        return m, m.bert.encoder.layer, [m.bert.embeddings], lambda: m(input_ids=ids, labels=y).loss
    if arch == "roberta":
        m = RobertaModel(RobertaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=3, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=70, pad_token_id=1))
        return m, m.encoder.layer, [m.embeddings], lambda: m(input_ids=ids).last_hidden_state.square().mean()
    if arch == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=H, n_layer=3, n_head=2, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
        return (m, m.transformer.h, [m.transformer.wte, m.transformer.wpe],
                lambda: m(input_ids=ids, labels=ids).loss)
    if arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         bos_token_id=0, eos_token_id=0, pad_token_id=0))
        return m, m.model.layers, [m.model.embed_tokens], lambda: m(input_ids=ids, labels=ids).loss
    if arch == "t5_encoder":
        m = T5EncoderModel(_t5_cfg())
        return (m, m.encoder.block, [m.shared, m.encoder.embed_tokens],
                lambda: m(input_ids=ids).last_hidden_state.square().mean())
    if arch == "t5":
        m = T5ForConditionalGeneration(_t5_cfg())
        blocks = nn.ModuleList([*m.encoder.block, *m.decoder.block])
        return (m, blocks, [m.shared, m.encoder.embed_tokens, m.decoder.embed_tokens],
                lambda: m(input_ids=ids, labels=ids[:, :5].contiguous()).loss)
    if arch == "vit":
        m = ViTModel(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=H, num_hidden_layers=3,
                               num_attention_heads=2, intermediate_size=64), add_pooling_layer=True)
        px = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        return m, m.layers, [m.embeddings], lambda: m(pixel_values=px).pooler_output.square().mean()
    raise AssertionError(arch)


ARCHS = ["bert", "bert_cls", "roberta", "gpt2", "llama", "t5_encoder", "t5", "vit"]


@contextmanager
def saved_tensors_by_region(modules):
    """Count tensors autograd saves for backward while any of ``modules`` runs ("prefix") and elsewhere ("rest")."""
    depth, counts = [0], {"prefix": 0, "rest": 0}
    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1)))
        handles.append(m.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1), always_call=True))

    def pack(t):
        counts["prefix" if depth[0] else "rest"] += 1
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield counts
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_input(module):
    """Record the hidden-state input of ``module`` (first positional tensor or ``hidden_states=``) at each call."""
    seen = []

    def hook(mod, args, kwargs):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        seen.append(x)

    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        h.remove()


def params_of(modules):
    return {p for m in modules for p in m.parameters()}


# --------------------------------------------------------------------------------------------------
# find_layers


@pytest.mark.parametrize("arch", ARCHS)
def test_find_layers_hugging_face(arch):
    model, blocks, _, _ = make(arch)
    found = find_layers(model)
    if arch == "t5":  # encoder blocks then decoder blocks, in data-flow order
        assert isinstance(found, nn.ModuleList)
        assert [id(b) for b in found] == [id(b) for b in blocks] and len(found) == 4
    else:
        assert found is blocks
    assert len({type(b) for b in found}) == 1


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))  # nested, longer: must not win

    def forward(self, x):
        return torch.relu(self.proj(x)) + self.experts[0](x)


class Net(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.stages = nn.ModuleList(Block() for _ in range(n))
        self.heads = nn.ModuleList([nn.Linear(8, 2), nn.Linear(8, 3)])
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 2)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.stages:
            x = b(x)
        return self.out(self.norm(x)).mean()


def test_find_layers_generic_longest_same_type_list():
    net = Net()
    assert find_layers(net) is net.stages
    seq = nn.Sequential(nn.Embedding(20, 8), nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)]))
    assert find_layers(seq) is seq[1]


def test_find_layers_ambiguous_lists_candidates():
    class Twins(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower_a = nn.ModuleList(Block() for _ in range(3))
            self.tower_b = nn.ModuleList(Block() for _ in range(3))

    twins = Twins()
    with pytest.raises(ValueError, match="cannot tell") as e:
        find_layers(twins)
    assert "tower_a" in str(e.value) and "tower_b" in str(e.value) and "layers=" in str(e.value)
    with pytest.raises(ValueError, match="found no list"):
        find_layers(nn.Linear(3, 3))
    plan = freeze_layers(twins, 2, layers=twins.tower_b)  # the escape hatch
    assert not any(p.requires_grad for b in twins.tower_b[:2] for p in b.parameters())
    assert all(p.requires_grad for p in twins.tower_a.parameters())
    assert plan.layers is twins.tower_b
    with pytest.raises(ValueError, match="not a submodule"):
        freeze_layers(twins, 1, layers=[Block()])


# --------------------------------------------------------------------------------------------------
# freeze_layers: what is frozen, eval mode, no graph below the boundary


def test_freeze_layers_requires_grad_and_partition():
    model, blocks, emb, _ = make("bert_cls")
    plan = freeze_layers(model, 2)
    assert isinstance(plan, FreezePlan) and plan.boundary == 2 and plan.embeddings_frozen
    frozen = params_of(emb) | params_of(blocks[:2])
    for p in model.parameters():
        assert p.requires_grad == (p not in frozen)
    f, t = plan.frozen_parameters(), plan.trainable_parameters()
    assert {id(p) for p in f} == {id(p) for p in frozen}
    assert len(f) + len(t) == len(list(model.parameters())) and not ({id(p) for p in f} & {id(p) for p in t})

    plan = freeze_layers(model, 1, embeddings=False)
    assert not plan.embeddings_frozen
    assert all(p.requires_grad for p in params_of(emb))
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[1].parameters())


def test_frozen_modules_stay_in_eval_mode_and_prefix_is_deterministic():
    model, blocks, emb, _ = make("bert_cls")
    model.config.hidden_dropout_prob = 0.5
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    plan = freeze_layers(model, 2)
    model.train()
    frozen_modules = {m for top in [*emb, *blocks[:2]] for m in top.modules()}
    for m in model.modules():
        assert m.training == (m not in frozen_modules), type(m).__name__
    ids = _ids()
    with capture_input(blocks[2]) as seen:
        a = model(input_ids=ids).logits
        b = model(input_ids=ids).logits
    assert torch.equal(seen[0], seen[1])  # the frozen prefix ran without dropout
    assert not torch.equal(a, b)  # dropout above the boundary is on
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    plan.unfreeze_all()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_no_graph_and_no_saved_activations_below_boundary(arch):
    model, blocks, emb, loss_fn = make(arch)
    n = len(blocks) - 1
    model.train()
    plan = freeze_layers(model, n)
    prefix = [*emb, *blocks[:n]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing upstream is trainable: no fallback warning
        with saved_tensors_by_region(prefix) as counts, capture_input(blocks[n]) as seen:
            loss = loss_fn()
    assert counts["prefix"] == 0 and counts["rest"] > 0
    assert seen[-1].grad_fn is None and not seen[-1].requires_grad  # backward stops at the boundary
    loss.backward()
    frozen = {id(p) for p in plan.frozen_parameters()}
    for name, p in model.named_parameters():
        if id(p) in frozen:
            assert p.grad is None, name
    assert all(p.grad is not None for p in blocks[n].parameters())
    plan.unfreeze_all()
    model.zero_grad(set_to_none=True)
    with saved_tensors_by_region(prefix) as counts:  # control: the same region saves activations unfrozen
        loss_fn()
    assert counts["prefix"] > 0


def test_textbook_freezing_still_traverses_prefix_but_plan_does_not():
    """With enable_input_require_grads() (PEFT, gradient checkpointing) a requires_grad_(False) prefix is still
    differentiated through; the plan's prefix is not."""
    model, blocks, emb, loss_fn = make("bert")
    model.enable_input_require_grads()
    for m in [*emb, *blocks[:2]]:
        m.requires_grad_(False)
    with saved_tensors_by_region([*emb, *blocks[:2]]) as counts, capture_input(blocks[2]) as seen:
        loss_fn()
    assert counts["prefix"] > 0 and seen[-1].grad_fn is not None

    freeze_layers(model, 2)
    with saved_tensors_by_region([*emb, *blocks[:2]]) as counts, capture_input(blocks[2]) as seen:
        loss_fn()
    assert counts["prefix"] == 0 and seen[-1].grad_fn is None


def test_inputs_embeds_requiring_grad_are_cut():
    model, blocks, emb, _ = make("bert")
    freeze_layers(model, 2)
    x = model.embeddings.word_embeddings(_ids()).detach().requires_grad_()
    with saved_tensors_by_region([*emb, *blocks[:2]]) as counts:
        out = model(inputs_embeds=x).last_hidden_state.sum()
    out.backward()
    assert counts["prefix"] == 0 and x.grad is None
    assert all(p.grad is not None for p in blocks[2].parameters())


def test_trainable_parameter_upstream_keeps_the_graph_with_a_warning():
    """A soft prompt (trainable nn.Parameter feeding inputs_embeds) still gets its gradient."""
    model, blocks, emb, _ = make("bert")
    freeze_layers(model, 3)
    prompt = nn.Parameter(torch.randn(1, 2, H))
    tokens = model.embeddings.word_embeddings(_ids())
    x = torch.cat([prompt.expand(B, -1, -1), tokens], dim=1)
    with pytest.warns(UserWarning, match="depends on trainable parameters"):
        model(inputs_embeds=x).last_hidden_state.sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def enable_checkpointing(model, reentrant):
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("input_hook", [False, True])
def test_reentrant_checkpointing_above_the_boundary_still_gets_gradients(input_hook):
    model, blocks, emb, loss_fn = make("bert")
    enable_checkpointing(model, reentrant=True)
    if input_hook:
        model.enable_input_require_grads()
    model.train()
    freeze_layers(model, 1)
    with saved_tensors_by_region([*emb, blocks[0]]) as counts, capture_input(blocks[1]) as seen:
        loss = loss_fn()
    loss.backward()
    assert counts["prefix"] == 0 and seen[-1].grad_fn is None
    assert all(p.grad is not None for b in blocks[1:] for p in b.parameters())
    assert all(p.grad is None for p in blocks[0].parameters())


def test_non_reentrant_checkpointing_needs_no_input_gradient():
    model, blocks, emb, loss_fn = make("bert")
    enable_checkpointing(model, reentrant=False)
    model.train()
    freeze_layers(model, 1)
    with capture_input(blocks[1]) as seen:
        loss_fn().backward()
    assert not seen[-1].requires_grad
    assert all(p.grad is not None for b in blocks[1:] for p in b.parameters())


def test_adamw_over_all_parameters_keeps_no_state_for_frozen():
    model, blocks, emb, loss_fn = make("bert_cls")
    model.train()
    plan = freeze_layers(model, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = fastft.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, l2_init=0.01)
    for _ in range(2):
        loss_fn().backward()
        opt.step()
        opt.zero_grad()
    frozen = {id(p) for p in plan.frozen_parameters()}
    for n, p in model.named_parameters():
        if id(p) in frozen:
            assert len(opt.state.get(p, {})) == 0, n
            assert torch.equal(p, before[n]), n  # no weight decay, no drift
        else:
            assert "anchor" in opt.state[p] and torch.equal(opt.state[p]["anchor"], before[n]), n


# --------------------------------------------------------------------------------------------------
# set_boundary / unfreeze_all / errors


def test_set_boundary_moves_both_ways_and_clears_grads():
    model, blocks, emb, loss_fn = make("bert_cls")
    plan = freeze_layers(model, 3)
    plan.set_boundary(1)
    loss_fn().backward()
    assert all(p.grad is not None for b in blocks[1:] for p in b.parameters())
    plan.set_boundary(2)
    assert plan.boundary == 2
    assert all(p.grad is None and not p.requires_grad for p in blocks[1].parameters())
    assert all(p.grad is not None and p.requires_grad for p in blocks[2].parameters())
    assert not blocks[1].training and not any(p.requires_grad for p in params_of(emb))
    with saved_tensors_by_region([*emb, *blocks[:2]]) as counts:
        loss_fn()
    assert counts["prefix"] == 0
    plan.set_boundary(0)
    assert plan.embeddings_frozen and all(p.requires_grad for p in blocks.parameters())
    plan.unfreeze_all()
    assert plan.boundary == 0 and not plan.embeddings_frozen
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_pre_hooks and "train" not in vars(m) for m in model.modules())


def test_plan_state_dict_round_trips_the_boundary():
    model, blocks, _, _ = make("bert_cls")
    plan = freeze_layers(model, 3)
    plan.set_boundary(1)
    state = plan.state_dict()
    assert state == {"boundary": 1, "embeddings_frozen": True}
    other = freeze_layers(make("bert_cls")[0], 3)
    other.load_state_dict(state)
    assert other.boundary == 1 and other.embeddings_frozen
    other.load_state_dict({"boundary": 0, "embeddings_frozen": False})
    assert all(p.requires_grad for p in other.model.parameters())
    for bad in ({"boundary": 9, "embeddings_frozen": True}, {"boundary": 1}):
        with pytest.raises(ValueError, match="FreezePlan.load_state_dict"):
            plan.load_state_dict(bad)
    assert plan.boundary == 1  # a refused state changes nothing
    no_emb = freeze_layers(make("bert_cls")[0], 2, embeddings=False)
    with pytest.raises(ValueError, match="embeddings=False"):
        no_emb.load_state_dict(state)


def test_unfreeze_all_restores_parameters_frozen_before_the_plan():
    model, blocks, _, _ = make("bert_cls")
    base = blocks[2].attention.self.query.weight
    base.requires_grad_(False)  # frozen by other means (a LoRA base weight)
    plan = freeze_layers(model, 3)
    plan.set_boundary(1)
    assert not base.requires_grad
    plan.unfreeze_all()
    assert not base.requires_grad
    assert sum(not p.requires_grad for p in model.parameters()) == 1


@pytest.mark.parametrize("bad, err", [(-1, ValueError), (4, ValueError), (1.0, TypeError), (True, TypeError),
                                      ("2", TypeError)])
def test_bad_boundaries_change_nothing(bad, err):
    model, _, _, _ = make("bert_cls")
    with pytest.raises(err, match="3 blocks|int"):
        freeze_layers(model, bad)
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_pre_hooks and "train" not in vars(m) for m in model.modules())
    plan = freeze_layers(model, 2)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(err):
        plan.set_boundary(bad)
    assert plan.boundary == 2 and flags == [p.requires_grad for p in model.parameters()]
    with pytest.raises(TypeError, match="embeddings"):
        freeze_layers(model, 1, embeddings="yes")


def test_second_plan_replaces_the_first():
    model, blocks, _, _ = make("bert_cls")
    old = freeze_layers(model, 3)
    new = freeze_layers(model, 1)
    assert all(p.requires_grad for b in blocks[1:] for p in b.parameters())
    with pytest.raises(RuntimeError, match="replaced"):
        old.set_boundary(0)
    new.unfreeze_all()
    assert all(p.requires_grad for p in model.parameters())


def test_plan_survives_deepcopy():
    model, blocks, emb, loss_fn = make("bert")
    freeze_layers(model, 2)
    twin = copy.deepcopy(model)
    twin.train()
    assert not twin.encoder.layer[1].training and twin.encoder.layer[2].training
    assert not any(p.requires_grad for p in twin.encoder.layer[1].parameters())
    with saved_tensors_by_region([twin.embeddings, *twin.encoder.layer[:2]]) as counts:
        twin(input_ids=_ids()).last_hidden_state.sum().backward()
    assert counts["prefix"] == 0
    again = pickle.loads(pickle.dumps(model))
    again.train()
    assert not again.encoder.layer[1].training and again.encoder.layer[2].training


def test_adapter_added_inside_a_frozen_block_still_trains():
    model, blocks, emb, loss_fn = make("bert")
    freeze_layers(model, 2)
    adapter = nn.Parameter(torch.zeros(H))
    blocks[1].output.dense.register_parameter("adapter", adapter)
    blocks[1].output.dense.register_forward_hook(lambda m, a, out: out + m.adapter)
    loss_fn().backward()
    assert adapter.grad is not None and adapter.grad.abs().sum() > 0


def test_requires_grad_attribute_guard():
    model, blocks, _, _ = make("bert_cls")
    blocks[0].requires_grad = False  # the textbook mistake: a no-op on an nn.Module
    for call in (lambda: freeze_layers(model, 1), lambda: layerwise_lr_groups(model, lr=1e-3, decay=0.9),
                 lambda: find_layers(model)):
        with pytest.raises(RequiresGradAttributeError, match=r"requires_grad_\(False\)") as e:
            call()
        assert isinstance(e.value, ValueError) and "bert.encoder.layer.0" in str(e.value)
    assert all(p.requires_grad for p in model.parameters())
    del blocks[0].requires_grad
    plan = freeze_layers(model, 1)
    model.classifier.requires_grad = False
    with pytest.raises(RequiresGradAttributeError, match="classifier"):
        plan.set_boundary(0)
    assert plan.boundary == 1


# --------------------------------------------------------------------------------------------------
# GradualUnfreezing


def _changed(model, before, prefix):
    return any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith(prefix))


def test_gradual_unfreezing_by_epochs_trains_new_layers_with_the_same_optimizer():
    model, blocks, _, loss_fn = make("bert_cls")
    model.train()
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = freeze_layers(model, 3)
    opt = fastft.AdamW(layerwise_lr_groups(model, lr=1e-2, decay=0.9, weight_decay=0.01), l2_init=0.01)
    schedule = GradualUnfreezing(plan, every=1)
    names = dict((p, n) for n, p in model.named_parameters())
    expected_boundary = [3, 2, 1, 0, 0]
    for epoch in range(5):
        assert plan.boundary == expected_boundary[epoch] and plan.embeddings_frozen == (epoch < 4)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(2):
            loss_fn().backward()
            opt.step()
            opt.zero_grad()
        for i in range(3):
            assert _changed(model, start, f"bert.encoder.layer.{i}.") == (i >= plan.boundary), (epoch, i)
        assert _changed(model, start, "bert.embeddings.") == (epoch == 4)
        assert _changed(model, start, "classifier.")
        schedule.on_epoch_end()
    assert schedule.done and not schedule.unfreeze_next()
    # Every block was started lazily by the same optimizer: its anchor is the pretrained weight.
    for group in opt.param_groups:
        for p in group["params"]:
            assert torch.equal(opt.state[p]["anchor"], pretrained[names[p]]), names[p]


def test_gradual_unfreezing_by_steps_and_by_hand():
    model, blocks, _, loss_fn = make("bert_cls")
    plan = freeze_layers(model, 3)
    opt = fastft.AdamW(model.parameters(), lr=1e-3)
    schedule = GradualUnfreezing(plan, every=2, unit="step")
    boundaries = []
    for _ in range(9):
        loss_fn().backward()
        opt.step()
        opt.zero_grad()
        schedule.on_step_end()
        schedule.on_epoch_end()  # ignored: counting steps
        boundaries.append((plan.boundary, plan.embeddings_frozen))
    assert boundaries == [(3, True), (2, True), (2, True), (1, True), (1, True), (0, True), (0, True),
                          (0, False), (0, False)]
    assert len(opt.state) == len(list(model.parameters()))

    plan = freeze_layers(model, 2)
    by_hand = GradualUnfreezing(plan, every=1)
    assert by_hand.step() and plan.boundary == 1
    state = by_hand.state_dict()
    assert by_hand.step() and by_hand.step() and not by_hand.step()
    by_hand.load_state_dict(state)
    assert plan.boundary == 1 and plan.embeddings_frozen and by_hand.count == 1


def test_gradual_unfreezing_as_hugging_face_callback():
    from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

    model, _, _, _ = make("bert_cls")
    plan = freeze_layers(model, 3)
    handler = CallbackHandler([GradualUnfreezing(plan)], model, None, None, None)
    args, state, control = types.SimpleNamespace(), TrainerState(), TrainerControl()
    handler.on_train_begin(args, state, control)
    handler.on_step_end(args, state, control)
    assert plan.boundary == 3
    out = handler.on_epoch_end(args, state, control)
    assert plan.boundary == 2 and out is control


def test_gradual_unfreezing_bad_arguments():
    model, _, _, _ = make("bert_cls")
    plan = freeze_layers(model, 1)
    for kwargs in ({"every": 0}, {"every": 1.5}, {"unit": "fortnight"}):
        with pytest.raises(ValueError):
            GradualUnfreezing(plan, **kwargs)
    with pytest.raises(TypeError, match="FreezePlan"):
        GradualUnfreezing(model)


# --------------------------------------------------------------------------------------------------
# layerwise_lr_groups


def _group_of(groups):
    out = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter is in two groups"
            out[id(p)] = g
    return out


def test_layerwise_lr_groups_bert():
    model, _, _, _ = make("bert_cls")
    lr, decay = 1e-3, 0.5
    groups = layerwise_lr_groups(model, lr=lr, decay=decay, weight_decay=0.01)
    where = _group_of(groups)
    assert set(where) == {id(p) for p in model.parameters()}
    for n, p in model.named_parameters():
        g = where[id(p)]
        if n.startswith("bert.embeddings."):
            depth = 3
        elif n.startswith("bert.encoder.layer."):
            depth = 2 - int(n.split(".")[3])  # the top block trains at the full lr, as the head
        else:
            depth = 0  # pooler, classifier
        assert math.isclose(g["lr"], lr * decay ** depth), n
        no_decay = n.endswith("bias") or "LayerNorm" in n
        assert g["weight_decay"] == (0.0 if no_decay else 0.01), n
    lrs = [g["lr"] for g in groups]
    assert min(lrs) == groups[0]["lr"] and groups[0]["name"].startswith("embeddings") and max(lrs) == lr
    opt = fastft.AdamW(groups, lr=123.0)  # every group carries its own lr
    assert all(g["lr"] != 123.0 for g in opt.param_groups)


def test_layerwise_lr_groups_llama_rmsnorm_and_tied_gpt2():
    model, blocks, _, _ = make("llama")
    where = _group_of(layerwise_lr_groups(model, lr=1.0, decay=0.8))
    for n, p in model.named_parameters():
        g = where[id(p)]
        if "norm" in n:
            assert g["weight_decay"] == 0.0, n
        else:
            assert "weight_decay" not in g, n  # None: left to the optimizer's default
    assert math.isclose(where[id(model.model.embed_tokens.weight)]["lr"], 0.8 ** 3)
    assert where[id(model.lm_head.weight)]["lr"] == 1.0 and where[id(model.model.norm.weight)]["lr"] == 1.0

    gpt2, _, _, _ = make("gpt2")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    groups = layerwise_lr_groups(gpt2, lr=1.0, decay=0.5)
    where = _group_of(groups)
    assert sum(len(g["params"]) for g in groups) == len(list(gpt2.parameters()))
    assert math.isclose(where[id(gpt2.lm_head.weight)]["lr"], 0.5 ** 3)


def test_layerwise_lr_groups_t5_depths_follow_data_flow():
    model, _, _, _ = make("t5")
    where = _group_of(layerwise_lr_groups(model, lr=1.0, decay=0.5))
    lr = lambda p: where[id(p)]["lr"]  # noqa: E731
    enc, dec = model.encoder.block, model.decoder.block
    q = [b.layer[0].SelfAttention.q.weight for b in [*enc, *dec]]
    assert lr(model.shared.weight) < lr(q[0]) < lr(q[1]) < lr(q[2]) < lr(q[3]) == 1.0
    assert lr(model.encoder.final_layer_norm.weight) == lr(q[1])
    assert lr(model.decoder.final_layer_norm.weight) == 1.0


@pytest.mark.parametrize("kwargs, what", [(dict(lr=-1.0, decay=0.9), "lr=-1.0"),
                                          (dict(lr=1e-3, decay=0.0), "decay=0.0"),
                                          (dict(lr=1e-3, decay=1.5), "decay=1.5"),
                                          (dict(lr=1e-3, decay=0.9, weight_decay=-0.1), "weight_decay=-0.1"),
                                          (dict(lr=float("nan"), decay=0.9), "lr=nan")])
def test_layerwise_lr_groups_bad_arguments(kwargs, what):
    model, _, _, _ = make("bert")
    with pytest.raises(ValueError, match=what):
        layerwise_lr_groups(model, **kwargs)


def test_generic_model_freezes_and_groups():
    net = Net()
    plan = freeze_layers(net, 4)
    assert not net.embed.weight.requires_grad and net.out.weight.requires_grad and net.norm.weight.requires_grad
    with saved_tensors_by_region([net.embed, *net.stages]) as counts:
        net(torch.randint(0, 20, (2, 5))).backward()
    assert counts["prefix"] == 0 and net.out.weight.grad is not None
    where = _group_of(layerwise_lr_groups(net, lr=1.0, decay=0.5))
    assert math.isclose(where[id(net.embed.weight)]["lr"], 0.5 ** 4)
    assert where[id(net.heads[0].weight)]["lr"] == 1.0
    plan.unfreeze_all()
