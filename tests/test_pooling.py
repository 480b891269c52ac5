"""Masked pooling kernels against the reference, against the torch formulations users write, and the heads."""

import pytest
import torch

import fastft
from fastft import _reference, ops
from conftest import TOL

MODES = fastft.POOL_MODES
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def make_mask(B, T, kind, device, dtype=torch.long, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    if B > 1:
        lengths[0] = T  # one full row
        lengths[-1] = 0  # one all-padding row
    pos = torch.arange(T)
    if kind == "right":
        m = pos[None, :] < lengths[:, None]
    elif kind == "left":
        m = pos[None, :] >= (T - lengths)[:, None]
    else:  # holes anywhere
        m = torch.rand(B, T, generator=g) < 0.6
        if B > 1:
            m[-1] = False
    return m.to(device=device, dtype=dtype)


def kernel_available(device):
    if not ops.use_kernel(torch.device(device)):
        pytest.skip("compiled kernels not loaded for this device")


SHAPES = [(4, 9, 7), (3, 1, 300), (5, 33, 257), (2, 0, 5), (0, 4, 3), (3, 6, 0), (8, 70, 1030)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["right", "left", "holes", None])
def test_kernel_matches_reference(device, mode, dtype, shape, kind):
    kernel_available(device)
    B, T, H = shape
    hidden = torch.randn(B, T, H, device=device).to(dtype)
    mask = make_mask(B, T, kind, device) if kind else None
    out, idx = torch.ops.fastft.masked_pool(hidden, mask, mode)
    ref_out, ref_idx = _reference.masked_pool(hidden, mask, mode)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    assert torch.equal(idx, ref_idx)
    grad = torch.randn(B, H, device=device).to(dtype)
    gx = torch.ops.fastft.masked_pool_backward(grad, mask, idx, mode, T)
    ref_gx = _reference.masked_pool_backward(grad, mask, ref_idx, mode, T)
    torch.testing.assert_close(gx, ref_gx, rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64, torch.float32])
def test_mask_dtypes_and_strided_hidden(device, mode, mask_dtype):
    base = torch.randn(6, 40, 23, device=device)  # [B, H, T] viewed as [B, T, H]: feature stride != 1
    hidden = base.transpose(1, 2)[:, ::2]  # and a token stride of 2
    mask = make_mask(6, hidden.shape[1], "holes", device, dtype=mask_dtype)
    got = fastft.pool(hidden, mask, mode)
    expected = _reference.pool(hidden.contiguous(), mask.to(torch.bool), mode)
    torch.testing.assert_close(got, expected)


def test_matches_torch_formulations(device):
    B, T, H = 5, 12, 16
    hidden = torch.randn(B, T, H, dtype=torch.float64, device=device)
    mask = make_mask(B, T, "right", device)[:-1]  # rows with at least... (the last, empty row is dropped)
    hidden = hidden[:-1]
    m = mask[:, :, None].to(hidden.dtype)
    # sentence-transformers' mean pooling
    st_mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    st_mean = torch.where(m.sum(1) > 0, st_mean, torch.zeros_like(st_mean))
    torch.testing.assert_close(fastft.masked_mean_pool(hidden, mask), st_mean)
    # the bmm form
    bmm = torch.bmm(mask[:, None, :].to(hidden.dtype), hidden).squeeze(1) / m.sum(1).clamp(min=1)
    torch.testing.assert_close(fastft.pool(hidden, mask, "mean"), bmm)
    # max over real tokens
    mx = hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    mx = torch.where(m.sum(1) > 0, mx, torch.zeros_like(mx))
    torch.testing.assert_close(fastft.pool(hidden, mask, "max"), mx)
    # cls is the first token under right padding; last is the token at length - 1 (not hidden[:, -1])
    torch.testing.assert_close(fastft.pool(hidden, mask, "cls")[1:-1], hidden[1:-1, 0])
    lengths = mask.sum(1)
    rows = torch.arange(len(hidden), device=device)
    last = hidden[rows, (lengths - 1).clamp(min=0)]
    ok = lengths > 0
    torch.testing.assert_close(fastft.pool(hidden, mask, "last")[ok], last[ok])
    assert not torch.equal(fastft.pool(hidden, mask, "last")[ok], hidden[ok, -1])
    # under left padding the last real token is hidden[:, -1]
    left = make_mask(B, T, "left", device)[:-1]
    torch.testing.assert_close(fastft.pool(hidden, left, "last")[left.any(1)], hidden[left.any(1), -1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_all_padding_rows_give_zeros_never_nan(device, dtype, mode):
    hidden = (torch.randn(3, 5, 8, device=device) * 100).to(dtype).requires_grad_()
    mask = torch.zeros(3, 5, dtype=torch.long, device=device)
    mask[1, 2] = 1
    out = fastft.pool(hidden, mask, mode)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    out.float().sum().backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad[0].abs().sum() == 0


def test_max_gradient_goes_to_first_argmax_on_ties(device):
    hidden = torch.zeros(1, 4, 2, device=device, requires_grad=True)
    with torch.no_grad():
        hidden[0, 1] = 3.0
        hidden[0, 3] = 3.0
    fastft.pool(hidden, None, "max").sum().backward()
    expected = torch.zeros(1, 4, 2, device=device)
    expected[0, 1] = 1.0
    assert torch.equal(hidden.grad, expected)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(device, mode):
    hidden = torch.randn(3, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    mask = make_mask(3, 6, "holes", device, seed=2)
    assert torch.autograd.gradcheck(lambda h: fastft.pool(h, mask, mode), (hidden,))


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    kernel_available("cpu")
    hidden = torch.randn(3, 7, 10, requires_grad=True)
    mask = make_mask(3, 7, "right", "cpu")
    torch.library.opcheck(torch.ops.fastft.masked_pool.default, (hidden, mask, mode))
    torch.library.opcheck(torch.ops.fastft.masked_pool.default, (hidden.detach(), None, mode))
    _, idx = torch.ops.fastft.masked_pool(hidden.detach(), mask, mode)
    torch.library.opcheck(torch.ops.fastft.masked_pool_backward.default, (torch.randn(3, 10), mask, idx, mode, 7))


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(mode):
    kernel_available("cpu")
    torch._dynamo.reset()
    head = torch.nn.Linear(10, 2)

    def f(h, m):
        return head(fastft.pool(h, m, mode)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    hidden = torch.randn(4, 9, 10, requires_grad=True)
    mask = make_mask(4, 9, "right", "cpu")
    loss = compiled(hidden, mask)
    (g_compiled,) = torch.autograd.grad(loss, hidden)
    (g_eager,) = torch.autograd.grad(f(hidden, mask), hidden)
    torch.testing.assert_close(loss, f(hidden, mask))
    torch.testing.assert_close(g_compiled, g_eager)


def test_frozen_encoder_saves_nothing_and_needs_no_backward(device):
    hidden = torch.randn(4, 9, 10, device=device)  # a frozen encoder's output: no grad
    mask = make_mask(4, 9, "right", device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fastft.pool(hidden, mask, "mean")
    assert out.grad_fn is None and not out.requires_grad and saved == []
    # trainable encoder output, mean: only the mask (and an empty index) is kept for backward
    hidden.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fastft.pool(hidden, mask, "mean")
    if ops.use_kernel(hidden.device):
        assert sum(t.numel() for t in saved) == mask.numel()


@pytest.mark.parametrize("bad, match", [
    (lambda d: (torch.randn(2, 3, device=d), None, "mean"), "batch, tokens, features"),
    (lambda d: (torch.randn(2, 3, 4, device=d), torch.ones(2, 4, device=d), "mean"), "does not match"),
    (lambda d: (torch.randn(2, 3, 4, device=d), torch.ones(3, 3, device=d), "mean"), "does not match"),
    (lambda d: (torch.randn(2, 3, 4, device=d), torch.ones(2, 3, 1, device=d), "mean"), "attention_mask must be"),
    (lambda d: (torch.randn(2, 3, 4, device=d), None, "median"), "unknown mode"),
    (lambda d: (torch.randint(0, 5, (2, 3, 4), device=d), None, "mean"), "float32"),
])
def test_bad_input(device, bad, match):
    hidden, mask, mode = bad(device)
    with pytest.raises(ValueError, match=match):
        fastft.pool(hidden, mask, mode)


@pytest.mark.cuda
def test_mask_on_other_device():
    with pytest.raises(ValueError, match="is on"):
        fastft.pool(torch.randn(2, 3, 4, device="cuda"), torch.ones(2, 3), "mean")


def test_kernel_errors_directly():
    kernel_available("cpu")
    with pytest.raises(RuntimeError, match="unknown mode"):
        torch.ops.fastft.masked_pool(torch.randn(2, 3, 4), None, "median")
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.fastft.masked_pool(torch.randn(2, 3, 4), torch.ones(2, 5), "mean")


# --- heads ----------------------------------------------------------------------------------------


def tiny_bert(num_labels=None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=40)
    return transformers.BertModel(config)


def test_classification_head_init_and_shapes():
    torch.manual_seed(0)
    head = fastft.ClassificationHead(512, 3, pool="mean", dropout=0.0)
    assert head.classifier.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(head.classifier.bias, torch.zeros(3))
    hidden = torch.randn(4, 7, 512)
    mask = make_mask(4, 7, "right", "cpu")
    expected = head.classifier(_reference.pool(hidden, mask, "mean"))
    torch.testing.assert_close(head(hidden, mask), expected)
    with pytest.raises(ValueError, match="hidden_size"):
        head(torch.randn(4, 7, 100), mask)
    for kwargs, match in [(dict(hidden_size=0, num_labels=2), "hidden_size"), (dict(hidden_size=8, num_labels=0),
                          "num_labels"), (dict(hidden_size=8, num_labels=2, pool="x"), "pool"),
                          (dict(hidden_size=8, num_labels=2, dropout=1.5), "dropout")]:
        with pytest.raises(ValueError, match=match):
            fastft.ClassificationHead(**kwargs)


def test_sequence_classifier_on_hf_encoder_save_and_load(tmp_path):
    encoder = tiny_bert()
    model = fastft.SequenceClassifier(encoder, num_labels=3, pool="mean").eval()
    ids = torch.randint(0, 60, (4, 10))
    mask = make_mask(4, 10, "right", "cpu")
    mask[-1, 0] = 1
    labels = torch.tensor([0, 2, 1, 0])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (4, 3) and out["loss"] is out.loss
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = model.head.classifier(_reference.pool(hidden, mask, "mean"))
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected, labels))
    out.loss.backward()
    assert encoder.embeddings.word_embeddings.weight.grad is not None

    model.save_pretrained(tmp_path / "clf")
    loaded = fastft.SequenceClassifier.from_pretrained(tmp_path / "clf").eval()
    assert loaded.head.pool.mode == "mean" and loaded.num_labels == 3
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, out.logits)
    with pytest.raises(ValueError, match="labels must be integers"):
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 3, 1, 0]))
    with pytest.raises(FileNotFoundError, match="fastft_head.json"):
        fastft.SequenceClassifier.from_pretrained(tmp_path / "nothing")


def test_sequence_classifier_regression_and_plain_encoder(tmp_path):
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30, 16)

        def forward(self, input_ids, attention_mask=None):
            return self.emb(input_ids)

    with pytest.raises(ValueError, match="hidden_size"):
        fastft.SequenceClassifier(Encoder(), num_labels=1)
    model = fastft.SequenceClassifier(Encoder(), num_labels=1, pool="last", hidden_size=16, dropout=0.0)
    ids = torch.randint(0, 30, (3, 5))
    y = torch.randn(3)
    out = model(input_ids=ids, labels=y)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), y))
    model.save_pretrained(tmp_path / "m")
    again = fastft.SequenceClassifier.from_pretrained(tmp_path / "m", encoder=Encoder())
    torch.testing.assert_close(again(input_ids=ids).logits, out.logits)


def test_sequence_classifier_in_transformers_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = fastft.SequenceClassifier(tiny_bert(), num_labels=2, pool="cls")
    data = [{"input_ids": torch.randint(0, 60, (8,)), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1,
                                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(fastft.AdamW(model.parameters(), lr=1e-3), None))
    result = trainer.train()
    assert trainer.state.global_step == 2 and result.training_loss > 0
