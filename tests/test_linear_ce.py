"""fastft.linear_cross_entropy and its row kernel (torch.ops.fastft.cross_entropy_rows_): against the
pure-PyTorch reference and against F.cross_entropy(hidden @ W.T + b), on CPU and (when present) CUDA."""

import pytest
import torch
import torch.nn.functional as F

import fastft
from fastft import _reference, ops
from conftest import DEVICES

# dtype -> (rtol, atol) of the loss and the gradients against torch in the same dtype
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3),
       torch.float64: (1e-10, 1e-10)}


def kernel_available(device):
    if not ops.use_kernel(torch.device(device)):
        pytest.skip("compiled kernels not loaded for this device")


def torch_form(hidden, weight, labels, bias, reduction, ignore_index=-100):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), labels.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)


def inputs(shape, vocab, dtype, device, bias=False, ignored=0.2, seed=0, H=24):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, H, generator=g) * 0.3).to(device, dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).to(device, dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignored] = -100
    return hidden, weight, labels.to(device), b


# --- the row kernel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows, vocab", [(1, 1), (5, 7), (9, 33), (64, 1001), (3, 4099), (0, 10)])
@pytest.mark.parametrize("row_scale", [False, True])
def test_row_kernel_matches_the_reference(device, rows, vocab, row_scale):
    kernel_available(device)
    g = torch.Generator().manual_seed(rows * 7 + vocab)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)
    if rows > 2:
        labels[1] = -100
    scale = torch.rand(rows, generator=g).to(device) if row_scale else None
    a, b = logits.clone(), logits.clone()
    loss = torch.ops.fastft.cross_entropy_rows_(a, labels, scale, 0.25, -100, True)
    want = _reference.cross_entropy_rows_(b, labels, scale, 0.25, -100, True)
    # CPU: a polynomial exp (rel. error < 1e-8); CUDA: __expf (rel. error ~ 1e-6)
    rtol, atol = (2e-6, 1e-8) if device == "cpu" else (2e-5, 1e-7)
    torch.testing.assert_close(loss, want, rtol=rtol, atol=2e-6)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    c = logits.clone()
    torch.testing.assert_close(torch.ops.fastft.cross_entropy_rows_(c, labels, scale, 1.0, -100, False), want)
    assert torch.equal(c, logits)  # without write_grad the logits are left as they were


def test_row_kernel_extreme_logits():
    kernel_available("cpu")
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [-1e30, 5.0, -1e30], [float("nan"), 0.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    loss = torch.ops.fastft.cross_entropy_rows_(logits.clone(), labels, None, 1.0, -100, False)
    want = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(loss[:2], want[:2])
    assert torch.isnan(loss[2])  # a NaN logit makes a NaN loss, as in torch


def test_row_kernel_opcheck():
    kernel_available("cpu")
    logits = torch.randn(6, 37)
    labels = torch.tensor([0, 5, -100, 36, 2, 2])
    torch.library.opcheck(torch.ops.fastft.cross_entropy_rows_.default, (logits, labels, None, 0.5, -100, True))
    torch.library.opcheck(torch.ops.fastft.cross_entropy_rows_.default,
                          (logits, labels, torch.rand(6), 1.0, -100, False))


# --- linear_cross_entropy ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape, vocab, chunk", [((4, 9), 50, None), ((37,), 1001, 8), ((2, 3), 3, 1)])
def test_equals_torch_in_value_and_gradients(device, dtype, reduction, bias, shape, vocab, chunk):
    hidden, weight, labels, b = inputs(shape, vocab, dtype, device, bias)
    got = fastft.linear_cross_entropy(hidden, weight, labels, b, reduction=reduction, chunk_size=chunk)
    want = torch_form(hidden, weight, labels, b, reduction)
    if reduction == "none":
        want = want.reshape(shape)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol)
    seed = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(device, got.dtype)
    wrt = [hidden, weight] + ([b] if bias else [])
    for a, w in zip(torch.autograd.grad(got, wrt, seed), torch.autograd.grad(want, wrt, seed.to(want.dtype))):
        torch.testing.assert_close(a, w, rtol=rtol, atol=atol)


def test_gradcheck_float64():
    hidden, weight, labels, b = inputs((2, 3), 7, torch.float64, "cpu", bias=True, H=5)
    for reduction in ("mean", "sum", "none"):
        torch.autograd.gradcheck(
            lambda h, w, bb: fastft.linear_cross_entropy(h, w, labels, bb, reduction=reduction, chunk_size=5),
            (hidden, weight, b))


def test_every_target_ignored_gives_zero_not_nan():
    hidden, weight, labels, _ = inputs((5,), 20, torch.float32, "cpu", ignored=1.0)
    loss = fastft.linear_cross_entropy(hidden, weight, labels)
    assert loss.item() == 0.0 and torch.isnan(torch_form(hidden, weight, labels, None, "mean"))
    loss.backward()
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_frozen_weight_costs_no_weight_gradient(monkeypatch):
    hidden, weight, labels, _ = inputs((6,), 30, torch.float32, "cpu")
    weight.requires_grad_(False)
    calls = []
    real = ops.linear_cross_entropy

    def spy(*args):
        calls.append(args[7:10])  # (grad_hidden, grad_weight, grad_bias)
        return real(*args)

    monkeypatch.setattr(ops, "linear_cross_entropy", spy)
    fastft.linear_cross_entropy(hidden, weight, labels).backward()
    assert calls == [(True, False, False)] and weight.grad is None
    with torch.no_grad():
        loss = fastft.linear_cross_entropy(hidden, weight, labels)
    assert calls[-1] == (False, False, False) and loss.grad_fn is None  # evaluation keeps nothing


def test_op_opcheck_and_torch_compile_fullgraph():
    hidden, weight, labels, b = inputs((8,), 40, torch.float32, "cpu", bias=True)
    for reduction in (0, 1, 2):
        torch.library.opcheck(ops.linear_cross_entropy,
                              (hidden, weight, b, labels, -100, reduction, None, reduction != 0, reduction != 0,
                               reduction != 0, 3))
    torch._dynamo.reset()
    f = torch.compile(lambda h, w, y: fastft.linear_cross_entropy(h, w, y, chunk_size=3), fullgraph=True,
                      backend="aot_eager")
    got = f(hidden, weight, labels)
    got.backward()
    torch.testing.assert_close(got, torch_form(hidden, weight, labels, None, "mean"))


@pytest.mark.parametrize("bad, match", [
    (dict(reduction="avg"), "reduction"),
    (dict(labels=torch.tensor([0, 99, 1, 2])), r"labels\[1\] \(flattened\) is 99"),
    (dict(labels=torch.tensor([0, 1, 2])), "labels must be int64 of shape"),
    (dict(weight=torch.randn(50, 5)), "do not fit"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_input_is_named(bad, match):
    kw = dict(hidden=torch.randn(4, 8), weight=torch.randn(50, 8), labels=torch.tensor([0, 1, 2, 3]))
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        fastft.linear_cross_entropy(**kw)


# --- the trainers' LM loss ---------------------------------------------------------------------------


def _tiny_lm(kind, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=120, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=kind == "llama-tied")
    return transformers.LlamaForCausalLM(cfg)


def _lm_rows(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, 120, (5 + i % 7,), generator=g).tolist()
        labels = list(ids)
        labels[0] = -100  # a prompt token: no loss
        rows.append({"input_ids": ids, "labels": labels})
    return rows


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-tied"])
@pytest.mark.parametrize("freeze", [None, 1])
def test_trainer_fused_lm_loss_equals_the_models_own(kind, freeze, monkeypatch):
    import fastft.losses

    calls = []
    real = fastft.losses.linear_cross_entropy
    monkeypatch.setattr(fastft.losses, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(epochs=1, batch_size=8, lr=1e-2, group_by_length=False, freeze=freeze, progress=False)
    fused = fastft.Trainer(_tiny_lm(kind), _lm_rows(), _lm_rows(8, seed=1), **kw)
    plain = fastft.Trainer(_tiny_lm(kind), _lm_rows(), _lm_rows(8, seed=1), fused_lm_loss=False, **kw)
    assert fused.fused_lm and not plain.fused_lm
    a, b = fused.fit(), plain.fit()
    assert calls  # the fused path ran
    for (n, p), q in zip(fused.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    assert a.history[-1]["val_loss"] == pytest.approx(b.history[-1]["val_loss"], rel=1e-5)
    assert a.history[-1]["val_perplexity"] == pytest.approx(b.history[-1]["val_perplexity"], rel=1e-5)


def test_heads_that_are_not_a_plain_linear_map_take_the_models_loss():
    from fastft.lm import fused_lm_parts

    model = _tiny_lm("llama")
    assert fused_lm_parts(model) is not None
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: the loss must see the capped logits
    assert fused_lm_parts(model) is None
    transformers = pytest.importorskip("transformers")
    mlm = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                               num_attention_heads=2, intermediate_size=32))
    assert fused_lm_parts(mlm) is None  # its head transforms before the decoder


def test_backward_twice_and_with_a_gradient_other_than_one():
    hidden, weight, labels, _ = inputs((6,), 30, torch.float32, "cpu")
    loss = fastft.linear_cross_entropy(hidden, weight, labels)
    first = torch.autograd.grad(loss, [hidden, weight], retain_graph=True)
    again = torch.autograd.grad(loss * 3, [hidden, weight])
    for a, b in zip(first, again):
        torch.testing.assert_close(a * 3, b)
