"""fastft.AdamW and its kernels against torch.optim.AdamW, autograd, float64 math and the reference."""

import copy
import math
import random

import pytest
import torch

import fastft
from fastft import _reference, ops
from conftest import TOL

SHAPES = [(7, 13), (16385,), (0,), (1,), (3, 5, 9), (40000,), (2, 0, 3), (257, 33)]


def make_params(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in shapes]


def set_grads(params, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(device=p.device, dtype=p.dtype)


def run(opt_cls, params, steps, seed=1, **kw):
    opt = opt_cls(params, **kw)
    for s in range(steps):
        set_grads(params, seed + s)
        opt.step()
    return opt


def assert_rel(a, b, rel=1e-6):
    """max |a - b| <= rel * max |b|: relative to the tensor's scale (elementwise relative error is
    meaningless for entries that cross zero)."""
    if b.numel() == 0:
        return
    err = (a.double() - b.double()).abs().max().item()
    assert err <= rel * max(b.double().abs().max().item(), 1e-30), f"max abs error {err} > {rel} x max |b|"


def assert_close(a, b, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


HYPER = [
    dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
    dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0),
    dict(lr=5e-4, betas=(0.0, 0.5), eps=1e-3, weight_decay=0.3),
]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("hyper", HYPER)
def test_matches_torch_adamw_fp32_100_steps(device, amsgrad, maximize, hyper):
    ours = make_params(SHAPES, torch.float32, device)
    theirs = copy.deepcopy(ours)
    run(fastft.AdamW, ours, 100, amsgrad=amsgrad, maximize=maximize, **hyper)
    run(torch.optim.AdamW, theirs, 100, amsgrad=amsgrad, maximize=maximize, foreach=False, **hyper)
    for a, b in zip(ours, theirs):
        assert_rel(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_matches_torch_fused_adamw_every_dtype(device, dtype, amsgrad):
    ours = make_params(SHAPES, dtype, device, seed=3)
    theirs = copy.deepcopy(ours)
    opt = run(fastft.AdamW, ours, 10, lr=1e-2, amsgrad=amsgrad)
    ref = run(torch.optim.AdamW, theirs, 10, lr=1e-2, amsgrad=amsgrad, fused=True)
    for a, b in zip(ours, theirs):
        assert_close(a, b, dtype)
    for a, b in zip(ours, theirs):
        sa, sb = opt.state[a], ref.state[b]
        assert sa["exp_avg"].dtype == dtype and "anchor" not in sa
        assert_close(sa["exp_avg"], sb["exp_avg"], dtype)
        assert float(sa["step"]) == float(sb["step"]) == 10


def test_many_small_tensors(device):
    shapes = [(random.Random(i).randint(0, 70),) for i in range(300)]
    ours = make_params(shapes, torch.float32, device)
    theirs = copy.deepcopy(ours)
    run(fastft.AdamW, ours, 5, lr=1e-2, l2_init=0.0)
    run(torch.optim.AdamW, theirs, 5, lr=1e-2, foreach=False)
    for a, b in zip(ours, theirs):
        assert_rel(a, b)


def _float64_decoupled(p, p0, grads, lr, b1, b2, eps, wd, lam):
    p, p0 = p.double().clone(), p0.double()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1**t)
        vhat = v / (1 - b2**t)
        p = p - lr * (wd * p + lam * (p - p0)) - lr * mhat / (vhat.sqrt() + eps)
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("anchor_dtype", [None, torch.bfloat16])
def test_decoupled_matches_float64_math(device, dtype, anchor_dtype):
    lr, b1, b2, eps, wd, lam = 1e-2, 0.9, 0.99, 1e-8, 0.05, 0.5
    p = make_params([(1000,)], dtype, device)[0]
    p0 = p.detach().clone()
    opt = fastft.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, l2_init=lam, anchor_dtype=anchor_dtype)
    grads = []
    for s in range(30):
        set_grads([p], s)
        grads.append(p.grad.clone())
        opt.step()
    anchor = p0.to(anchor_dtype) if anchor_dtype is not None else p0
    expected = _float64_decoupled(p0, anchor, grads, lr, b1, b2, eps, wd, lam)
    assert opt.state[p]["anchor"].dtype == (anchor_dtype or dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(p.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_coupled_equals_torch_adamw_on_penalised_loss(device, amsgrad):
    lam = 0.3
    ours = make_params([(20, 30), (30,)], torch.float64, device)
    theirs = copy.deepcopy(ours)
    anchors = [p.detach().clone() for p in theirs]
    x = torch.randn(64, 20, dtype=torch.float64, device=device)
    opt_a = fastft.AdamW(ours, lr=1e-2, weight_decay=0.01, amsgrad=amsgrad, l2_init=lam, l2_init_mode="coupled")
    opt_b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.01, amsgrad=amsgrad)
    for _ in range(25):
        for params, opt, penalise in ((ours, opt_a, False), (theirs, opt_b, True)):
            opt.zero_grad()
            loss = torch.tanh(x @ params[0] + params[1]).square().mean()
            if penalise:
                loss = loss + lam * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
            loss.backward()
            opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_decoupled_equals_torch_fused_plus_foreach_l2(device):
    lam, lr = 0.1, 1e-2
    ours = make_params(SHAPES, torch.float32, device)
    theirs = copy.deepcopy(ours)
    anchors = [p.detach().clone() for p in theirs]
    opt_a = fastft.AdamW(ours, lr=lr, l2_init=lam)
    opt_b = torch.optim.AdamW(theirs, lr=lr, fused=True)
    for s in range(20):
        set_grads(ours, s)
        set_grads(theirs, s)
        opt_a.step()
        with torch.no_grad():
            drift = torch._foreach_sub([p.detach() for p in theirs], anchors)
            opt_b.step()
            torch._foreach_add_([p.detach() for p in theirs], drift, alpha=-lr * lam)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("l2_init", [0.0, 0.2])
def test_fused_clipping_equals_clip_grad_norm(device, max_norm, l2_init):
    ours = make_params(SHAPES, torch.float32, device) + make_params([(5, 5)], torch.float64, device)
    theirs = copy.deepcopy(ours)
    opt_a = fastft.AdamW(ours, lr=1e-2, l2_init=l2_init, max_grad_norm=max_norm)
    opt_b = fastft.AdamW(theirs, lr=1e-2, l2_init=l2_init)
    for s in range(10):
        set_grads(ours, s, scale=3.0)
        set_grads(theirs, s, scale=3.0)
        grads_before = [p.grad.clone() for p in ours]
        opt_a.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        opt_b.step()
        torch.testing.assert_close(opt_a.last_grad_norm.double(), norm.double(), rtol=1e-5, atol=0)
        for p, g in zip(ours, grads_before):
            assert torch.equal(p.grad, g), "fused clipping must not rewrite gradients"
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_clipping_with_non_dense_gradients(device):
    """A gradient that is a strided view (set by hand) is clipped and stepped like a contiguous one."""
    ours = make_params([(4, 8), (6,)], torch.float32, device)
    theirs = copy.deepcopy(ours)
    opt_a = fastft.AdamW(ours, lr=1e-2, l2_init=0.1, max_grad_norm=0.5)
    opt_b = fastft.AdamW(theirs, lr=1e-2, l2_init=0.1)
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        wide = [torch.randn(4, 16, generator=g).to(device), torch.randn(12, generator=g).to(device)]
        for p, q, w in zip(ours, theirs, wide):
            p.grad = w[..., ::2]
            q.grad = w[..., ::2].contiguous()
        opt_a.step()
        torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        opt_b.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_clipping_counts_only_real_gradients(device):
    params = make_params([(10,), (10,)], torch.float32, device)
    opt = fastft.AdamW(params, max_grad_norm=1.0)
    params[0].grad = torch.full((10,), 2.0, device=device)
    opt.step()
    assert math.isclose(float(opt.last_grad_norm), math.sqrt(40.0), rel_tol=1e-6)
    assert params[1] not in opt.state


def _amp_run(opt_factory, inf_at=None, steps=8, device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(device)
    opt = opt_factory(model.parameters())
    scaler = torch.amp.GradScaler(device=str(device), init_scale=2.0**12, growth_interval=3)
    x = torch.randn(32, 16, device=device)
    y = torch.randint(0, 4, (32,), device=device)
    scales = []
    for s in range(steps):
        opt.zero_grad()
        with torch.autocast(device_type=str(device), dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if s == inf_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, opt, scales


@pytest.mark.parametrize("inf_at", [None, 2])
def test_grad_scaler_matches_torch_fused(device, inf_at):
    ma, oa, sa = _amp_run(lambda p: fastft.AdamW(p, lr=1e-2), inf_at, device=device)
    mb, ob, sb = _amp_run(lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True), inf_at, device=device)
    assert sa == sb
    for a, b in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)  # unscaled in place by both
        assert float(oa.state[a]["step"]) == float(ob.state[b]["step"]) == (8 if inf_at is None else 7)


def test_found_inf_skips_everything(device):
    params = make_params([(100,)], torch.float32, device)
    opt = fastft.AdamW(params, l2_init=0.1, max_grad_norm=1.0)
    set_grads(params, 0)
    opt.step()
    before = params[0].detach().clone()
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    grad = params[0].grad.clone()
    opt.step(grad_scale=torch.tensor(4.0, device=device), found_inf=torch.tensor(1.0, device=device))
    assert torch.equal(params[0], before) and torch.equal(params[0].grad, grad)
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, state[k]), k


def test_state_dict_torch_to_fastft_and_back(device):
    a = make_params(SHAPES, torch.float32, device)
    b = copy.deepcopy(a)
    torch_opt = run(torch.optim.AdamW, a, 5, lr=1e-2, amsgrad=True)
    twin = torch.optim.AdamW(b, lr=1e-2, amsgrad=True)
    twin.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    ours = fastft.AdamW(a, lr=1e-2, amsgrad=True)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    assert ours.param_groups[0]["l2_init"] == 0.0 and ours.param_groups[0]["l2_init_mode"] == "decoupled"
    for s in range(5, 10):
        set_grads(a, s)
        set_grads(b, s)
        ours.step()
        twin.step()
    for p, q in zip(a, b):
        assert_rel(p, q)
    # ... and back: fastft's state_dict continues identically in torch.optim.AdamW.
    c = copy.deepcopy(a)
    back = torch.optim.AdamW(c, lr=1e-2, amsgrad=True, foreach=False)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    for s in range(10, 13):
        set_grads(a, s)
        set_grads(c, s)
        ours.step()
        back.step()
    for p, q in zip(a, c):
        assert_rel(p, q)


def test_state_dict_round_trip_keeps_anchors(device):
    a = make_params([(50,), (3, 4)], torch.float32, device)
    b = copy.deepcopy(a)
    opt = run(fastft.AdamW, a, 4, lr=1e-2, l2_init=0.3, anchor_dtype=torch.bfloat16)
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    opt2 = fastft.AdamW(b, lr=1e-2, l2_init=0.3, anchor_dtype=torch.bfloat16)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(a, b):
        assert opt2.state[q]["anchor"].dtype == torch.bfloat16
        assert torch.equal(opt.state[p]["anchor"], opt2.state[q]["anchor"])
        assert opt2.state[q]["step"].device == q.device
    for s in range(4, 8):
        set_grads(a, s)
        set_grads(b, s)
        opt.step()
        opt2.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_anchor_is_first_step_value_and_lazy(device):
    params = make_params([(10,), (10,)], torch.float32, device)
    opt = fastft.AdamW(params, lr=1e-1, l2_init=0.5)
    start = params[0].detach().clone()
    set_grads(params[:1], 0)
    opt.step()
    assert torch.equal(opt.state[params[0]]["anchor"], start)
    assert params[1] not in opt.state  # never stepped: no state, no anchor
    with torch.no_grad():
        params[1].add_(1.0)
    later = params[1].detach().clone()
    set_grads(params, 1)
    opt.step()
    assert torch.equal(opt.state[params[1]]["anchor"], later)
    opt.reset_anchors()
    assert torch.equal(opt.state[params[0]]["anchor"], params[0].detach())


def test_no_anchor_when_l2_init_zero_and_per_group_override(device):
    body, head = make_params([(8, 8), (4, 8)], torch.float32, device)
    opt = fastft.AdamW([{"params": [body]}, {"params": [head], "l2_init": 0.0}], lr=1e-2, l2_init=0.1)
    set_grads([body, head], 0)
    opt.step()
    assert "anchor" in opt.state[body] and "anchor" not in opt.state[head]


def test_param_groups_given_as_generators(device):
    """model.parameters() in a group dict is a generator: it is read once, for the checks and the group."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)).to(device)
    opt = fastft.AdamW([{"params": model[0].parameters()}, {"params": model[1].parameters(), "l2_init": 0.0}],
                       l2_init=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    opt.add_param_group({"params": (p for p in [torch.nn.Parameter(torch.zeros(3, device=device))])})
    assert len(opt.param_groups[2]["params"]) == 1


def test_l2_init_pulls_toward_anchor(device):
    p = make_params([(100,)], torch.float32, device)[0]
    start = p.detach().clone()
    opt = fastft.AdamW([p], lr=1e-2, weight_decay=0.0, l2_init=5.0)
    with torch.no_grad():
        p.add_(1.0)  # the pretrained value is start + 1: the anchor is taken at the first step
    for s in range(3):
        set_grads([p], s)
        opt.step()
    far = make_params([(100,)], torch.float32, device)[0]
    with torch.no_grad():
        far.copy_(start + 1.0)
    opt_free = fastft.AdamW([far], lr=1e-2, weight_decay=0.0)
    for i in range(200):
        g = torch.ones(100, device=device)
        p.grad, far.grad = g.clone(), g.clone()
        opt.step()
        opt_free.step()
    drift_l2 = (p - (start + 1)).abs().mean()
    drift_free = (far - (start + 1)).abs().mean()
    assert drift_l2 < 0.5 * drift_free


def test_frozen_parameters_get_no_state(device):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(device)
    model[0].requires_grad_(False)
    opt = fastft.AdamW(model.parameters(), l2_init=0.1, max_grad_norm=1.0)
    model(torch.randn(3, 4, device=device)).sum().backward()
    opt.step()
    assert all(p not in opt.state for p in model[0].parameters())
    assert all("anchor" in opt.state[p] for p in model[1].parameters())


def test_lr_scheduler_and_noncontiguous_param(device):
    base = torch.randn(30, 20, device=device)
    p = torch.nn.Parameter(base.t())  # transposed: dense but not contiguous
    q = torch.nn.Parameter(base.t().contiguous())
    opt_a = fastft.AdamW([p], lr=1e-2, l2_init=0.1)
    opt_b = fastft.AdamW([q], lr=1e-2, l2_init=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 1.0 / (1 + s))
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1.0 / (1 + s))
    for s in range(5):
        g = torch.randn(20, 30, device=device)
        p.grad = g.clone()
        q.grad = g.clone().contiguous()
        opt_a.step()
        opt_b.step()
        sched.step()
        sched_b.step()
    assert_rel(p, q)
    assert opt_a.param_groups[0]["lr"] == pytest.approx(1e-2 / 6)


def test_works_with_a_compiled_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    opt_a = fastft.AdamW(model.parameters(), lr=1e-2, l2_init=0.1, max_grad_norm=1.0)
    opt_b = fastft.AdamW(twin.parameters(), lr=1e-2, l2_init=0.1, max_grad_norm=1.0)
    x = torch.randn(16, 8)
    for _ in range(3):
        for net, opt in ((compiled, opt_a), (twin, opt_b)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


def test_inside_transformers_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = [{"input_ids": torch.randint(0, 50, (12,)), "labels": torch.tensor(i % 2)} for i in range(32)]
    opt = fastft.AdamW(model.parameters(), lr=1e-3, l2_init=0.01, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1,
                                          report_to=[], use_cpu=True, save_strategy="no", max_grad_norm=0.0,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train()
    assert trainer.state.global_step == 4
    p = dict(model.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"]
    assert torch.equal(opt.state[p]["anchor"], pretrained["bert.encoder.layer.0.attention.self.query.weight"])
    assert float(opt.state[p]["step"]) == 4 and not torch.equal(p.detach(), opt.state[p]["anchor"])


# --- EWC: importance-weighted L2-to-init ----------------------------------------------------------


def _float64_ewc(p, p0, f, grads, lr, b1, b2, eps, wd, lam):
    p, p0, f = p.double().clone(), p0.double(), f.double()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (wd * p + lam * f * (p - p0)) - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return p


def _importance(shape, device, seed=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 3).to(device)  # entries in [0, 3), some near 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("anchor_dtype", [None, torch.bfloat16])
def test_ewc_decoupled_matches_float64_math(device, dtype, anchor_dtype):
    lr, b1, b2, eps, wd, lam = 1e-2, 0.9, 0.99, 1e-8, 0.05, 0.5
    p = make_params([(1000,)], dtype, device)[0]
    p0 = p.detach().clone()
    f = _importance((1000,), device)
    opt = fastft.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, l2_init=lam, anchor_dtype=anchor_dtype)
    opt.set_importance({p: f})
    grads = []
    for s in range(30):
        set_grads([p], s)
        grads.append(p.grad.clone())
        opt.step()
    stored = opt.state[p]["importance"]
    assert stored.dtype == (anchor_dtype or dtype) and stored.device == p.device
    anchor = p0.to(anchor_dtype) if anchor_dtype is not None else p0
    expected = _float64_ewc(p0, anchor, stored, grads, lr, b1, b2, eps, wd, lam)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(p.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_ewc_coupled_equals_autograd_on_fisher_penalised_loss(device, amsgrad):
    """Coupled EWC is torch.optim.AdamW on loss + λ Σ F (p − p0)², the penalty differentiated by autograd."""
    lam = 0.3
    ours = make_params([(20, 30), (30,)], torch.float64, device)
    theirs = copy.deepcopy(ours)
    anchors = [p.detach().clone() for p in theirs]
    fisher = [_importance(p.shape, device, seed=i).double() for i, p in enumerate(ours)]
    x = torch.randn(64, 20, dtype=torch.float64, device=device)
    opt_a = fastft.AdamW(ours, lr=1e-2, weight_decay=0.01, amsgrad=amsgrad, l2_init=lam, l2_init_mode="coupled")
    opt_a.set_importance(dict(zip(ours, fisher)))
    opt_b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.01, amsgrad=amsgrad)
    for _ in range(25):
        for params, opt, penalise in ((ours, opt_a, False), (theirs, opt_b, True)):
            opt.zero_grad()
            loss = torch.tanh(x @ params[0] + params[1]).square().mean()
            if penalise:
                loss = loss + lam * sum((f * (p - a) ** 2).sum() for p, a, f in zip(params, anchors, fisher))
            loss.backward()
            opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ewc_parameters_without_importance_step_as_plain_l2(device):
    """One optimizer, one parameter weighted, one not: the unweighted one steps exactly as plain L2-to-init,
    and an importance of ones is plain L2-to-init."""
    a, b = make_params([(300,), (7, 9)], torch.float32, device)
    plain_a, plain_b = copy.deepcopy(a), copy.deepcopy(b)
    ones = copy.deepcopy(a)
    opt = fastft.AdamW([a, b], lr=1e-2, l2_init=0.7)
    opt.set_importance({a: _importance(a.shape, device)})
    opt_plain = fastft.AdamW([plain_a, plain_b], lr=1e-2, l2_init=0.7)
    opt_ones = fastft.AdamW([ones], lr=1e-2, l2_init=0.7)
    opt_ones.set_importance({ones: torch.ones_like(ones)})
    for s in range(10):
        for group in ([a, b], [plain_a, plain_b], [ones]):
            set_grads(group, s)
        opt.step()
        opt_plain.step()
        opt_ones.step()
    assert "importance" not in opt.state[b]
    assert torch.equal(b, plain_b)
    assert_rel(ones, plain_a, rel=1e-6)
    assert not torch.allclose(a, plain_a)


def test_ewc_importance_concentrates_the_pull(device):
    """Entries with a large F stay near the anchor; entries with F = 0 move as without L2-to-init."""
    p = make_params([(200,)], torch.float32, device)[0]
    free = copy.deepcopy(p)
    start = p.detach().clone()
    f = torch.zeros(200, device=device)
    f[:100] = 2.0
    opt = fastft.AdamW([p], lr=1e-2, weight_decay=0.0, l2_init=5.0)
    opt.set_importance({p: f})
    opt_free = fastft.AdamW([free], lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        p.grad = torch.ones(200, device=device)
        free.grad = torch.ones(200, device=device)
        opt.step()
        opt_free.step()
    assert (p[:100] - start[:100]).abs().max() < 0.25 * (free[:100] - start[:100]).abs().min()
    torch.testing.assert_close(p[100:], free[100:])


def test_ewc_importance_round_trips_through_state_dict(device):
    a = make_params([(50,), (3, 4)], torch.float32, device)
    b = copy.deepcopy(a)
    opt = fastft.AdamW(a, lr=1e-2, l2_init=0.3, anchor_dtype=torch.bfloat16, l2_init_mode="coupled")
    opt.set_importance({a[0]: _importance((50,), device)})
    for s in range(4):
        set_grads(a, s)
        opt.step()
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    opt2 = fastft.AdamW(b, lr=1e-2, l2_init=0.3, anchor_dtype=torch.bfloat16, l2_init_mode="coupled")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.state[b[0]]["importance"].dtype == torch.bfloat16
    assert torch.equal(opt2.state[b[0]]["importance"], opt.state[a[0]]["importance"])
    assert "importance" not in opt2.state[b[1]]
    for s in range(4, 8):
        set_grads(a, s)
        set_grads(b, s)
        opt.step()
        opt2.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_ewc_importance_set_before_the_first_step_keeps_lazy_anchor(device):
    p, q = make_params([(10,), (10,)], torch.float32, device)
    opt = fastft.AdamW([p, q], lr=1e-1, l2_init=0.5)
    opt.set_importance({p: torch.full((10,), 2.0, device=device)})
    assert set(opt.state[p]) == {"importance"} and q not in opt.state
    with torch.no_grad():
        p.add_(1.0)
    start = p.detach().clone()
    set_grads([p], 0)
    opt.step()
    assert torch.equal(opt.state[p]["anchor"], start) and float(opt.state[p]["step"]) == 1


def test_ewc_set_importance_bad_input_stores_nothing(device):
    p, q = make_params([(4, 3), (5,)], torch.float32, device)
    stranger = torch.nn.Parameter(torch.zeros(5, device=device))
    opt = fastft.AdamW([p, q], l2_init=0.1)
    good = {p: torch.ones(4, 3, device=device)}
    cases = [
        ({**good, stranger: torch.ones(5, device=device)}, ValueError, "not optimised"),
        ({**good, q: torch.ones(4, device=device)}, ValueError, "shape"),
        ({**good, q: torch.ones(5, dtype=torch.long, device=device)}, ValueError, "float"),
        ({**good, q: torch.tensor([1.0, -1.0, 0, 0, 0], device=device)}, ValueError, "negative"),
        ({**good, q: torch.tensor([1.0, float("nan"), 0, 0, 0], device=device)}, ValueError, "NaN"),
        ({**good, "q": torch.ones(5)}, TypeError, "parameters"),
        ([(p, torch.ones(4, 3))], TypeError, "mapping"),
    ]
    for importance, error, match in cases:
        with pytest.raises(error, match=match):
            opt.set_importance(importance)
        assert p not in opt.state and q not in opt.state


# --- bad input: a clear error, nothing modified -------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(eps=-1e-8), "eps"),
    (dict(betas=(1.0, 0.999)), "betas"),
    (dict(betas=(0.9, -0.1)), "betas"),
    (dict(betas=(0.9,)), "betas"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(l2_init=-0.5), "l2_init"),
    (dict(l2_init=float("inf")), "l2_init"),
    (dict(l2_init_mode="sideways"), "l2_init_mode"),
    (dict(anchor_dtype=torch.int8), "anchor_dtype"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastft.AdamW([torch.nn.Parameter(torch.zeros(3))], **kwargs)
    with pytest.raises(ValueError, match=match):
        fastft.AdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], **kwargs}] if "max_grad_norm" not in kwargs
                     else [torch.nn.Parameter(torch.zeros(3))], **({} if "max_grad_norm" not in kwargs else kwargs))


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr="5e-5"), "lr"),
    (dict(lr=None), "lr"),
    (dict(lr=True), "lr"),
    (dict(betas=("0.9", 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, None)), r"betas\[1\]"),
    (dict(eps="1e-8"), "eps"),
    (dict(weight_decay="0.01"), "weight_decay"),
    (dict(l2_init="0.1"), "l2_init"),
    (dict(l2_init=torch.tensor(0.1)), "l2_init"),
])
def test_wrong_type_hyperparameters_rejected_up_front(kwargs, name):
    """A string lr (YAML 1.1 reads 5e-5 so) is a TypeError naming the argument, at construction and
    in param groups, as in torch.optim.AdamW; not a failure later inside a scheduler or the step."""
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match=name):
        fastft.AdamW([p], **kwargs)
    with pytest.raises(TypeError, match=name):
        fastft.AdamW([{"params": [p], **kwargs}])
    opt = fastft.AdamW([p])
    with pytest.raises(TypeError, match=name):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], **kwargs})
    assert len(opt.param_groups) == 1


def test_string_lr_error_says_how_to_fix_it():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError):
        torch.optim.AdamW([p], lr="5e-5")
    with pytest.raises(TypeError, match=r"lr='5e-5' in the defaults is a str.*pass lr=5e-05.*write 5\.0e-5"):
        fastft.AdamW([p], lr="5e-5")


def test_tensor_and_numpy_hyperparameters_still_accepted(device):
    np = pytest.importorskip("numpy")
    ours = make_params([(7, 3)], torch.float32, device)
    theirs = copy.deepcopy(ours)
    betas = (np.float64(0.9), torch.tensor(0.99, dtype=torch.float64))
    run(fastft.AdamW, ours, 3, lr=torch.tensor(1e-2), betas=betas, eps=np.float32(1e-8), weight_decay=1)
    run(torch.optim.AdamW, theirs, 3, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=1.0, foreach=False)
    assert_rel(ours[0], theirs[0])
    with pytest.raises(ValueError, match="one element"):
        fastft.AdamW(ours, lr=torch.tensor([1e-3, 2e-3]))


def test_complex_and_integer_parameters_rejected():
    with pytest.raises(ValueError, match="complex"):
        fastft.AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="dtype"):
        fastft.AdamW([torch.zeros(3, dtype=torch.int64)])


def _two_param_setup(device):
    good, bad = make_params([(6,), (4, 4)], torch.float32, device)
    opt = fastft.AdamW([good, bad], lr=1e-2, l2_init=0.1, max_grad_norm=1.0)
    set_grads([good, bad], 0)
    opt.step()
    snap = ([p.detach().clone() for p in (good, bad)],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (good, bad)})
    return good, bad, opt, snap


def _assert_unchanged(good, bad, opt, snap):
    values, states = snap
    for p, v in zip((good, bad), values):
        assert torch.equal(p.detach(), v)
        for k, t in opt.state[p].items():
            assert torch.equal(t, states[id(p)][k]), k


def _retype(p):  # torch refuses a mismatched .grad assignment, so make the parameter disagree instead
    p.grad = torch.zeros(4, 4, device=p.device)
    p.data = p.data.double()


def _reshape(p):
    p.grad = torch.zeros(4, 4, device=p.device)
    p.data = torch.zeros(16, device=p.device)


def _sparse(p):
    p.grad = torch.zeros(4, 4, device=p.device).to_sparse()


@pytest.mark.parametrize("break_it, match", [(_retype, "gradient"), (_reshape, "gradient"), (_sparse, "sparse")])
def test_bad_gradient_changes_nothing(device, break_it, match):
    good, bad, opt, (values, states) = _two_param_setup(device)
    set_grads([good], 5)
    break_it(bad)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert torch.equal(good.detach(), values[0])
    for p in (good, bad):
        for k, t in opt.state[p].items():
            assert torch.equal(t, states[id(p)][k]), k


def test_bad_group_value_at_step_changes_nothing(device):
    good, bad, opt, snap = _two_param_setup(device)
    set_grads([good, bad], 5)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    _assert_unchanged(good, bad, opt, snap)


def test_wrong_type_lr_set_on_a_group_fails_the_step_and_changes_nothing(device):
    good, bad, opt, snap = _two_param_setup(device)
    set_grads([good, bad], 5)
    opt.param_groups[0]["lr"] = "1e-3"
    with pytest.raises(TypeError, match="lr"):
        opt.step()
    _assert_unchanged(good, bad, opt, snap)


def test_bad_state_dict_changes_nothing(device):
    good, bad, opt, snap = _two_param_setup(device)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["l2_init_mode"] = "nope"
    with pytest.raises(ValueError, match="l2_init_mode"):
        opt.load_state_dict(sd)
    _assert_unchanged(good, bad, opt, snap)
    assert opt.param_groups[0]["l2_init_mode"] == "decoupled"


# --- the ops themselves ---------------------------------------------------------------------------


def _op_lists(dtype, device, anchor_dtype, amsgrad, seed=0, importance=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (16387,), (0,), (33,)]
    mk = lambda s: torch.randn(s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    params = [mk(s) for s in shapes]
    grads = [mk(s) for s in shapes]
    m = [mk(s) * 0.1 for s in shapes]
    v = [mk(s).abs() * 0.1 for s in shapes]
    vmax = [t.clone() * 1.5 for t in v] if amsgrad else []
    steps = [torch.tensor(float(i), device=device) for i in range(len(shapes))]
    anchors = [(p + 0.3).to(anchor_dtype or dtype) for p in params]
    importances = [(mk(s).abs() * 2).to(anchor_dtype or dtype) for s in shapes] if importance else []
    return [params, grads, m, v, vmax, steps, anchors, importances]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("anchor_dtype", [None, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("coupled", [False, True])
@pytest.mark.parametrize("importance", [False, True])
def test_kernel_matches_reference(device, dtype, anchor_dtype, amsgrad, coupled, importance):
    if not ops.use_kernel(device):
        pytest.skip("compiled kernels not loaded for this device")
    a = _op_lists(dtype, device, anchor_dtype, amsgrad, importance=importance)
    b = [[t.clone() for t in lst] for lst in a]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, l2_init=0.4, coupled=coupled,
              amsgrad=amsgrad, maximize=True, grad_scale=torch.tensor(8.0, device=device),
              clip_coef=torch.tensor(0.7, device=device))
    for _ in range(3):
        torch.ops.fastft.adamw_l2init_(*a, **kw)
        _reference.adamw_l2init_(*b, **kw)
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            assert_close(x, y, dtype if x.dtype == dtype else torch.float32)


def test_op_wrapper_steps_odd_layouts_with_the_reference(device):
    """fastft.ops.adamw_l2init_ gives the kernel the tensors it takes and the reference the others
    (a non-dense param, a moment strided unlike its param), in one call, with the same result."""
    a = _op_lists(torch.float32, device, None, True, importance=True)
    a[0][0] = torch.randn(3, 10, device=device)[:, ::2]
    a[2][3] = torch.randn(66, device=device)[::2].mul_(0.1)
    a[7][1] = torch.rand(2 * 16387, device=device)[::2]  # an importance strided unlike its param
    b = [[t.clone() for t in lst] for lst in a]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, l2_init=0.4, coupled=False,
              amsgrad=True, maximize=False, clip_coef=torch.tensor(0.7, device=device))
    for _ in range(3):
        ops.adamw_l2init_(*a, **kw)
        _reference.adamw_l2init_(*b, **kw)
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            assert_close(x, y, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sum_of_squares_matches_torch(device, dtype):
    tensors = [torch.randn(s, device=device).to(dtype) for s in [(0,), (1,), (70001,), (3, 7), (16384,)]]
    expected = sum(t.double().square().sum() for t in tensors)
    got = ops.sum_of_squares(tensors)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.dim() == 0
    torch.testing.assert_close(got.double(), expected, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)


@pytest.mark.cuda
def test_cuda_tensor_past_2_pow_31_elements():
    """The 64-bit offset path: a bf16 tensor of 2^31 + 1000 elements (4 GiB per list)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GiB")
    n = 2**31 + 1000
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16, device="cuda"))
    p.grad = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    p.grad[-5:] = -1.0
    opt = fastft.AdamW([p], lr=1e-2, weight_decay=0.0)
    opt.step()
    # Adam's first step moves every weight by -lr * sign(g) (up to eps): check both ends.
    assert torch.allclose(p[:4].float(), torch.full((4,), -1e-2, device="cuda"), rtol=1e-2)
    assert torch.allclose(p[-5:].float(), torch.full((5,), 1e-2, device="cuda"), rtol=1e-2)
    assert torch.allclose(p[-1000:-5].float(), torch.full((995,), -1e-2, device="cuda"), rtol=1e-2)
    del opt, p
    torch.cuda.empty_cache()


def test_op_argument_errors():
    if not ops.use_kernel(torch.device("cpu")):
        pytest.skip("compiled kernels not loaded")
    lists = _op_lists(torch.float32, "cpu", None, False)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, l2_init=0.4, coupled=False,
              amsgrad=False, maximize=False)
    bad = [lst[:] for lst in lists]
    bad[1] = bad[1][:-1]
    with pytest.raises(RuntimeError, match="same length"):
        torch.ops.fastft.adamw_l2init_(*bad, **kw)
    bad = [lst[:] for lst in lists]
    bad[2][0] = torch.zeros(5, 3)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.fastft.adamw_l2init_(*bad, **kw)
    bad = [lst[:] for lst in lists]
    bad[6] = []
    with pytest.raises(RuntimeError, match="anchors"):
        torch.ops.fastft.adamw_l2init_(*bad, **kw)
    with_importance = _op_lists(torch.float32, "cpu", torch.bfloat16, False, importance=True)
    bad = [lst[:] for lst in with_importance]
    bad[7] = bad[7][:-1]
    with pytest.raises(RuntimeError, match="importances"):
        torch.ops.fastft.adamw_l2init_(*bad, **kw)
    bad = [lst[:] for lst in with_importance]
    bad[7][0] = bad[7][0].float()
    with pytest.raises(RuntimeError, match="importances.*anchor"):
        torch.ops.fastft.adamw_l2init_(*bad, **kw)
    with pytest.raises(RuntimeError, match="empty list"):
        torch.ops.fastft.sum_of_squares([])
    with pytest.raises(ValueError, match="at least one"):
        ops.sum_of_squares([])


def test_opcheck():
    if not ops.use_kernel(torch.device("cpu")):
        pytest.skip("compiled kernels not loaded")
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, l2_init=0.4, coupled=False,
              amsgrad=True, maximize=False, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0),
              clip_coef=torch.tensor(0.5))
    for importance in (False, True):
        lists = _op_lists(torch.float32, "cpu", torch.bfloat16, True, importance=importance)
        torch.library.opcheck(torch.ops.fastft.adamw_l2init_.default, tuple(lists), kw)
    torch.library.opcheck(torch.ops.fastft.sum_of_squares.default, ([torch.randn(5), torch.randn(3, 3)],))
