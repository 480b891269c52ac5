"""The frozen-prefix cache (fastft.prefix_cache, the trainers' cache_frozen=True).

Tiny BERT / GPT-2 / Llama configs (no downloads). The main property: training with the cache gives
the weights of training without it, fp32, within 1e-6 (measured: 4e-9 to 6e-8 after 15 steps). Both
runs draw the same dropout masks above the boundary: the frozen prefix runs in eval mode in both (the
plan holds it there; the cache also holds GPT-2's embedding dropout, so the uncached GPT-2 run sets
its p to 0) and the cache's probe runs in a forked RNG. The kept states are the very tensors the
uncached run computed in epoch 1; what is left is rounding: an uncached later epoch recomputes them
with each example at another row of another batch, and the CPU kernels round a row differently by
its place in the batch (a permuted batch's prefix output differs by ~1e-7), so the runs are not
bit-identical.
"""

import copy
import os
import warnings

import pytest
import torch

import fastft
from fastft.prefix_cache import CACHE_FILE, PrefixCache
from test_trainer import Crash, CrashAt

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

transformers.logging.set_verbosity_error()
V, H = 60, 16


def bert_encoder(layers=3):
    return BertModel(BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=layers, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=64))


def make(arch, seed=0, length=None):
    """(model, train, val): a classifier over BERT, or a causal LM (GPT-2 / Llama) with LM labels; examples of
    3 to 12 tokens, or all of ``length``."""
    torch.manual_seed(seed)
    if arch == "bert":
        model = fastft.SequenceClassifier(bert_encoder(), num_labels=2)
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=H, n_layer=3, n_head=2, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=3,
                                             num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=0))
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(56):
        n = int(torch.randint(3, 13, (1,), generator=g))
        ids = torch.randint(3, V, (length or n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids[0] % 2 if arch == "bert" else list(ids)})
    return model, rows[:40], rows[40:]


KW = dict(epochs=3, batch_size=8, lr=1e-3, progress=False, seed=0)


def train(arch, cache, freeze=2, callbacks=(), length=None, **kw):
    model, tr, val = make(arch, length=length)
    if arch == "gpt2" and not cache:
        model.transformer.drop.p = 0.0  # the cache holds it in eval mode: compare with it off
    trainer = fastft.Trainer(model, tr, val, freeze=freeze, cache_frozen=cache, **{**KW, **kw})
    trainer.callbacks.extend(cb(trainer) for cb in callbacks)
    trainer.fit()
    return trainer


def assert_same_weights(a, b, exact=False):
    for (n, x), y in zip(a.model.named_parameters(), b.model.parameters()):
        if exact:
            assert torch.equal(x, y), n
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=n)


class CountPrefixRuns(fastft.Callback):
    """Counts how often block 0's attention (inside the prefix) really runs."""

    def __init__(self, trainer):
        block = trainer.freeze_plan.layers[0]
        inner = next(m for name, m in block.named_children())
        self.calls = 0
        inner.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_cache_gives_the_weights_of_an_uncached_run(arch):
    plain = train(arch, cache=False)
    cached = train(arch, cache=True, callbacks=[CountPrefixRuns])
    assert_same_weights(plain, cached)
    assert [r["val_loss"] for r in cached.history] == pytest.approx([r["val_loss"] for r in plain.history], abs=1e-6)
    stats = cached.prefix_cache.stats()
    # 40 train + 16 val examples kept once; epochs 2 and 3 and validations 2 and 3 served from the cache
    assert stats["examples"] == 56 and stats["misses"] == 56 and stats["hits"] == 2 * 56 and stats["bypassed"] == 0
    counter = cached.callbacks[-1]
    # the prefix ran once per batch of epoch 1 and of the first validation (+2 probe passes), never after
    assert counter.calls == 5 + 2 + 2 + (arch == "gpt2")  # GPT-2: one probe more, after its dropout was found
    _, _, val = make(arch)
    if arch == "bert":  # predict() concatenates [N, C] logits, not an LM's [N, T, V]
        torch.testing.assert_close(plain.predict(val), cached.predict(val), rtol=0, atol=1e-5)
    else:
        assert plain.evaluate(val)["loss"] == pytest.approx(cached.evaluate(val)["loss"], abs=1e-6)
    assert cached.prefix_cache.stats()["hits"] == 2 * 56 + 16  # served again


def test_gpt2_embedding_dropout_is_held_in_eval_while_caching():
    trainer = train("gpt2", cache=True, epochs=1)
    drop = trainer.model.transformer.drop
    trainer.model.train()
    assert not drop.training and trainer.model.lm_head.training
    trainer.prefix_cache.close()
    trainer.model.train()
    assert drop.training  # released with the cache


def test_head_only_encodes_once():
    plain = train("bert", cache=False, freeze="all")
    cached = train("bert", cache=True, freeze="all")
    assert cached.freeze_plan.boundary == 3
    assert_same_weights(plain, cached)
    assert cached.prefix_cache.stats()["hits"] == 2 * 56


@pytest.mark.parametrize("memory_mb", [0, 0.002])
def test_spill_to_disk(tmp_path, memory_mb):
    seen = {}

    class Look(fastft.Callback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_epoch_end(self, trainer, epoch):
            seen[epoch] = (tmp_path / CACHE_FILE).stat().st_size

    plain = train("llama", cache=False)
    cached = train("llama", cache=True, cache_memory_mb=memory_mb, output_dir=str(tmp_path), callbacks=[Look])
    assert_same_weights(plain, cached)
    stats = cached.prefix_cache.stats()
    assert stats["disk_mb"] > 0 and (stats["memory_mb"] > 0) == (memory_mb > 0)
    assert stats["memory_mb"] <= memory_mb
    assert seen[0] > 0 and seen[2] == int(stats["disk_mb"] * 2**20)  # written in epoch 1, then only read
    cached.prefix_cache.close()
    assert not (tmp_path / CACHE_FILE).exists()


def test_spill_without_output_dir_uses_a_temporary_folder():
    cached = train("bert", cache=True, cache_memory_mb=0, epochs=2)
    path = cached.prefix_cache._paths["file"]
    assert os.path.isfile(path) and cached.prefix_cache.stats()["memory_mb"] == 0
    cached.prefix_cache.close()
    assert not os.path.exists(os.path.dirname(path))


def test_cache_dtype_bf16_keeps_half_the_bytes():
    full = train("bert", cache=True, epochs=2)
    half = train("bert", cache=True, epochs=2, cache_dtype="bf16")
    assert half.prefix_cache.stats()["memory_mb"] == pytest.approx(full.prefix_cache.stats()["memory_mb"] / 2)
    assert half.prefix_cache._mem and all(t.dtype == torch.bfloat16 for t in half.prefix_cache._mem.values())
    # the states are rounded to bf16 from epoch 2 on: close to, not equal to, the fp32 run
    diff = max((a - b).abs().max().item() for a, b in zip(full.model.parameters(), half.model.parameters()))
    assert 0 < diff < 1e-2


def test_gradual_unfreezing_drops_and_refills_the_cache():
    unfreeze = lambda trainer: fastft.GradualUnfreezing(trainer.freeze_plan, every=2)  # noqa: E731
    plain = train("bert", cache=False, freeze=2, callbacks=[unfreeze])
    cached = train("bert", cache=True, freeze=2, callbacks=[unfreeze])
    assert_same_weights(plain, cached)
    stats = cached.prefix_cache.stats()
    # boundary 2: epoch 1 fills, validation 1 fills, epoch 2 is served; then boundary 1 (before validation 2):
    # the cache refills (validation 2, epoch 3) and serves validation 3
    assert stats["boundary"] == 1 and stats["examples"] == 56 and stats["hits"] == 40 + 16
    assert stats["misses"] == 2 * 56 and stats["bypassed"] == 0  # counted over both boundaries


def test_replay_rows_bypass_the_cache():
    from lm_helpers import GENERAL, lm_task, minilm_tokenizer, tiny_gpt2

    tok = minilm_tokenizer()
    data = lm_task(tok)

    def run(cache):
        replay = fastft.Replay(GENERAL, ratio=0.25, tokenizer=tok, max_length=16)
        trainer = fastft.Trainer(tiny_gpt2(), data[:32], data[32:], freeze=1, cache_frozen=cache, replay=replay,
                                 metrics=(), **KW)
        trainer.fit()
        return trainer

    plain, cached = run(False), run(True)
    assert_same_weights(plain, cached)
    # only the task's 48 examples are kept; epochs 2-3 and validations 2-3 are served
    assert len(cached.prefix_cache) == 48 and cached.prefix_cache.stats()["hits"] == 2 * 48
    assert cached.replay.seen > 0


@pytest.mark.parametrize("keep_file", [True, False])
def test_resume_with_and_without_the_cache_file(tmp_path, keep_file):
    kw = dict(cache_memory_mb=0.001, checkpoint_every=3)
    full = train("bert", cache=True, output_dir=str(tmp_path / "a"), **kw)
    model, tr, val = make("bert")
    crashing = fastft.Trainer(model, tr, val, freeze=2, cache_frozen=True, output_dir=str(tmp_path / "b"),
                              callbacks=[CrashAt(8)], **kw, **KW)  # the last checkpoint (step 6) is in epoch 2
    with pytest.raises(Crash):
        crashing.fit()
    path = tmp_path / "b" / CACHE_FILE
    assert path.stat().st_size > 0
    if keep_file:
        crashing.prefix_cache._finalizer.detach()  # as if the process had died: the file stays
        crashing.prefix_cache._file.close()
    else:
        crashing.prefix_cache.close()
        assert not path.exists()
    model, tr, val = make("bert", seed=5)
    resumed = fastft.Trainer(model, tr, val, freeze=2, cache_frozen=True, output_dir=str(tmp_path / "b"), **kw, **KW)
    result = resumed.resume()
    assert_same_weights(full, resumed)
    assert [r["val_loss"] for r in result.history] == pytest.approx([r["val_loss"] for r in full.history], abs=1e-6)
    assert resumed.prefix_cache.stats()["examples"] == 56


def test_multitask_trainer_caches_the_shared_encoder():
    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": torch.randint(3, V, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist(),
             "labels": i % 2} for i in range(48)]

    def run(cache):
        torch.manual_seed(0)
        enc = bert_encoder()
        tasks = {"a": fastft.Task(rows[:16], rows[16:24]), "b": fastft.Task(rows[24:40], rows[40:])}
        trainer = fastft.MultiTaskTrainer(enc, tasks, freeze=2, cache_frozen=cache, **KW)
        trainer.fit()
        return trainer

    plain, cached = run(False), run(True)
    assert_same_weights(plain, cached)
    assert cached.prefix_cache.stats()["hits"] == 2 * 48
    torch.testing.assert_close(plain.predict("a", rows[16:24]), cached.predict("a", rows[16:24]), rtol=0, atol=1e-5)
    assert cached.prefix_cache.stats()["hits"] == 2 * 48 + 8


def test_batches_that_change_the_prefix_inputs_bypass_it():
    torch.manual_seed(0)
    model = bert_encoder().eval()
    cache = fastft.freeze_layers(model, 2).enable_cache()
    ids = torch.randint(3, V, (2, 6))
    mask = torch.ones_like(ids)
    for batch, why in (({"input_ids": ids, "position_ids": torch.arange(6)[None].expand(2, 6)}, "position_ids"),
                       ({"input_ids": ids, "attention_mask": mask.flip(1).cumsum(1).flip(1).clamp(max=1)
                         * torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])}, "right padding"),
                       ((ids, None), "not a dict")):
        with pytest.warns(UserWarning, match=why):
            out = cache.run(batch, lambda: model(input_ids=ids).last_hidden_state)
        assert torch.equal(out, model(input_ids=ids).last_hidden_state)
    assert len(cache) == 0 and cache.stats()["bypassed"] == 3
    # a trainable parameter in the prefix (unfrozen by hand): bypassed too
    model.encoder.layer[0].output.dense.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="trainable parameters"):
        cache.run({"input_ids": ids}, lambda: model(input_ids=ids))
    assert len(cache) == 0


def test_a_random_prefix_is_refused():
    torch.manual_seed(0)
    model = bert_encoder()
    model.encoder.layer[0].register_forward_pre_hook(lambda m, a: (a[0] + torch.randn_like(a[0]),) + a[1:])
    cache = fastft.freeze_layers(model, 2).enable_cache()
    ids = torch.randint(3, V, (2, 6))
    with pytest.raises(RuntimeError, match="two different outputs"):
        cache.run({"input_ids": ids}, lambda: model(input_ids=ids))
    assert len(cache) == 0


def test_bad_arguments_change_nothing():
    model, tr, val = make("bert")
    with pytest.raises(ValueError, match="freezes none"):
        fastft.Trainer(model, tr, cache_frozen=True, **KW)
    with pytest.raises(ValueError, match="freezes none"):
        fastft.Trainer(model, tr, freeze=0, cache_frozen=True, **KW)
    with pytest.raises(ValueError, match="cache_dtype"):
        fastft.Trainer(model, tr, freeze=1, cache_frozen=True, cache_dtype="int8", **KW)
    with pytest.raises(ValueError, match="cache_memory_mb"):
        fastft.Trainer(model, tr, freeze=1, cache_frozen=True, cache_memory_mb=-1, **KW)
    assert all(p.requires_grad for p in model.parameters())
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=H, d_kv=8, d_ff=32, num_layers=2,
                                             num_decoder_layers=2, num_heads=2, decoder_start_token_id=0))
    with pytest.raises(ValueError, match="encoder-decoder"):
        fastft.freeze_layers(t5, 1).enable_cache()
    with pytest.raises(ValueError, match="embeddings"):
        fastft.freeze_layers(bert_encoder(), 1, embeddings=False).enable_cache()
    with pytest.raises(TypeError, match="'all'"):
        fastft.freeze_layers(bert_encoder(), "every")


def test_a_copied_model_runs_its_own_blocks():
    torch.manual_seed(0)
    model = bert_encoder().eval()
    plan = fastft.freeze_layers(model, 2)
    cache = plan.enable_cache()
    ids = torch.randint(3, V, (2, 6))
    cache.run({"input_ids": ids}, lambda: model(input_ids=ids))
    twin = copy.deepcopy(model)
    for block, original in zip(twin.encoder.layer, model.encoder.layer):
        assert block.forward.__self__ is block
    with torch.no_grad():
        twin.encoder.layer[0].output.dense.weight.add_(1.0)
    assert not torch.equal(twin(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    # a second freeze_layers call replaces the plan and closes its cache
    fastft.freeze_layers(model, 1)
    assert "forward" not in model.encoder.layer[0].__dict__


def test_cli_takes_the_cache_keys():
    from fastft import cli

    cli.check_config({"trainer": {"freeze": "all", "cache_frozen": True, "cache_dtype": "bf16",
                                  "cache_memory_mb": 256}})
    with pytest.raises(cli.ConfigError, match="cache_frozen"):
        cli.check_config({"trainer": {"cache_frozen": "yes"}})
    assert isinstance(PrefixCache, type)
