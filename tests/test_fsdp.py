"""Trainer(distributed="fsdp2"): a tiny Llama sharded with PyTorch's FSDP2 over 2 CPU processes (gloo)
against the same run in 1 process; sharded checkpoints resumed on 2 and on 1 process; memory per rank."""

import json
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastft
from fastft import distributed as D
from test_distributed import _free_port, launch  # noqa: F401  (the 2-process launcher)

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


def _texts(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 13, (1,), generator=g))
        start = int(torch.randint(1, 40, (1,), generator=g))
        ids = [(start + 3 * i) % 63 + 1 for i in range(length)]  # a learnable pattern
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


TRAIN, VAL = _texts(36, 1), _texts(11, 2)  # 11 validation texts: the ranks get 6 and 5


class _Kill(fastft.Callback):
    def on_step_end(self, trainer, step, loss):
        if step == 7 and D.get_rank() == 1:
            import os

            os._exit(3)  # rank 1 dies after step 7; the launcher then ends rank 0


def _trainer(out_dir=None, callbacks=()):
    # Epoch 1's validation loss is the best by min_delta: the run ends with its weights restored (from a
    # sharded snapshot, through a sharded checkpoint in the resumed runs).
    es = fastft.EarlyStopping(patience=5, monitor="val_loss", min_delta=100.0)
    return fastft.Trainer(_llama(), TRAIN, VAL, epochs=3, batch_size=4, gradient_accumulation=2, lr=2e-2,
                          l2_init=0.1, max_grad_norm=0.5, freeze=1, metrics=("perplexity",), early_stopping=es,
                          output_dir=out_dir, checkpoint_every=3, callbacks=list(callbacks), progress=False,
                          seed=3, device="cpu", distributed="fsdp2", eval_batch_size=4)


def _nbytes(t):
    t = t.to_local() if D.is_dtensor(t) else t
    return t.numel() * t.element_size()


def _memory(trainer):
    """Bytes this rank holds of the parameters and of the optimizer state (moments, anchors, steps)."""
    params = sum(_nbytes(p) for p in trainer.model.parameters())
    state = sum(_nbytes(v) for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return params, state


def _full(model):
    return {k: v.detach().clone() for k, v in D.full_state_dict(model).items()}


def _save(trainer, result, path):
    weights = _full(trainer.model)  # collective: every rank calls it
    torch.save({"weights": weights, "history": result.history, "step": result.global_step,
                "memory": _memory(trainer), "sharded": trainer.sharded, "best_epoch": result.best_epoch,
                "dtensors": all(D.is_dtensor(p) for p in trainer.model.parameters())}, f"{path}.{D.get_rank()}")


def _fit(out_dir, result_file):
    trainer = _trainer(out_dir)
    _save(trainer, trainer.fit(), result_file)


def _fit_killed(out_dir):
    _trainer(out_dir, callbacks=[_Kill()]).fit()


def _resume(out_dir, result_file):
    trainer = _trainer(out_dir)
    _save(trainer, trainer.resume(), result_file)


@pytest.fixture(scope="module")
def single():
    """The run in one process (distributed="fsdp2" changes nothing there but the checkpoint format)."""
    trainer = _trainer()
    result = trainer.fit()
    return {"weights": _full(trainer.model), "history": result.history, "memory": _memory(trainer),
            "trainer": trainer}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The run in 2 processes: its run folder and what rank 0 and rank 1 saved."""
    path = tmp_path_factory.mktemp("fsdp2")
    launch(_fit, str(path / "run"), str(path / "res"))
    return path / "run", [torch.load(path / f"res.{r}") for r in (0, 1)]


def _assert_same_run(got, want, exact=False):
    keys = set(got["weights"]) & set(want["weights"])  # a gathered state names tied weights once
    assert len(keys) == min(len(got["weights"]), len(want["weights"])) > 0
    for key in sorted(keys):
        value = want["weights"][key]
        if exact:
            assert torch.equal(got["weights"][key], value), key
        else:
            torch.testing.assert_close(got["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert [r["epoch"] for r in got["history"]] == [r["epoch"] for r in want["history"]]
    for g, w in zip(got["history"], want["history"]):
        for k in ("train_loss", "val_loss", "val_perplexity"):
            assert g[k] == (w[k] if exact else pytest.approx(w[k], rel=1e-5)), k


def test_fsdp2_trains_like_one_process_and_shards_memory(two, single):
    run, (r0, r1) = two
    assert r0["sharded"] and r0["dtensors"] and not single["trainer"].sharded
    _assert_same_run(r0, single)
    assert r0["history"] == r1["history"]
    assert r1["weights"] == {}  # the whole weights are gathered on rank 0 only
    # It learned after epoch 1, yet epoch 1 is the best by min_delta: its weights came back, on both runs.
    assert single["history"][0]["val_loss"] > single["history"][-1]["val_loss"]
    assert r0["best_epoch"] == single["trainer"].early_stopping.best_epoch == 1
    # Parameters + AdamW state (moments, anchors) per rank: about half of a whole replica (DDP's).
    full_params, full_state = single["memory"]
    for res in (r0, r1):
        params, state = res["memory"]
        assert (params + state) / (full_params + full_state) == pytest.approx(0.5, abs=0.06)
    assert r0["memory"][0] + r1["memory"][0] == full_params
    # The run folder: a sharded checkpoint, and the final model gathered into one transformers folder.
    ckpt = run / "checkpoint"
    assert (ckpt / "sharded" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    assert len(list((ckpt / "sharded").glob("*.distcp"))) == 2  # one file of shards per rank
    saved = transformers.LlamaForCausalLM.from_pretrained(run / "model")
    saved = saved.state_dict()
    for key, value in r0["weights"].items():
        assert torch.equal(saved[key], value), key
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_fsdp2_resume_after_kill_is_exact_on_two_and_continues_on_one(tmp_path, two, single):
    full = two[1][0]
    with pytest.raises(mp.ProcessExitedException):
        launch(_fit_killed, str(tmp_path / "run"))
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["world_size"] == 2
    shutil.copytree(tmp_path / "run", tmp_path / "copy")

    launch(_resume, str(tmp_path / "run"), str(tmp_path / "resumed"))
    resumed = torch.load(tmp_path / "resumed.0")
    assert resumed["step"] == full["step"] == 15
    _assert_same_run(resumed, full, exact=True)  # bit-identical to the uninterrupted run

    one = _trainer(str(tmp_path / "copy"))  # the same checkpoint, resharded into one process
    result = one.resume()
    assert result.global_step == 15
    _assert_same_run({"weights": _full(one.model), "history": result.history}, single)


def test_fsdp2_is_checked_up_front():
    with pytest.raises(ValueError, match="distributed must be one of"):
        fastft.Trainer(_llama(), TRAIN, distributed="fsdp", progress=False, device="cpu")
    with pytest.raises(ValueError, match="mix=True"):
        fastft.MultiTaskTrainer(torch.nn.Embedding(4, 4), {"a": fastft.Task(train=[([1, 2], 0)])}, mix=True,
                                hidden_size=4, distributed="fsdp2", progress=False, device="cpu")


# --- gradual unfreezing: blocks frozen at the start thaw while sharded ----------------------------------


def _thawing():
    from test_distributed import TRAIN as ROWS, VAL as VAL_ROWS, Stack

    trainer = fastft.Trainer(Stack(), ROWS, VAL_ROWS, epochs=2, batch_size=8, lr=3e-2, freeze=2, progress=False,
                             device="cpu", distributed="fsdp2")
    trainer.callbacks.append(fastft.GradualUnfreezing(trainer.freeze_plan, every=3, unit="step"))
    return trainer


class _FrozenUnstepped(fastft.Callback):
    """Records, after the first step, whether any frozen (sharded) parameter got optimizer state."""

    def on_step_end(self, trainer, step, loss):
        if step == 1:
            frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
            self.first = (len(frozen), sum(p in trainer.optimizer.state for p in frozen))


def _thaw_and_save(result_file):
    trainer = _thawing()
    probe = _FrozenUnstepped()
    trainer.callbacks.append(probe)
    trainer.fit()
    assert all(p.requires_grad and D.is_dtensor(p) for p in trainer.model.parameters())  # all thawed, sharded
    torch.save({"weights": _full(trainer.model), "first": probe.first}, f"{result_file}.{D.get_rank()}")


def test_fsdp2_gradual_unfreezing_thaws_sharded_blocks(tmp_path):
    launch(_thaw_and_save, str(tmp_path / "res"))
    single = _thawing()
    single.fit()
    got = torch.load(tmp_path / "res.0")
    assert got["first"][0] > 0 and got["first"][1] == 0  # frozen blocks: sharded, never stepped
    for key, want in single.model.state_dict().items():
        torch.testing.assert_close(got["weights"][key], want, rtol=1e-5, atol=1e-6)


# --- validation by generation: the ranks' generate() calls stay in step ----------------------------------


def _generating():
    from lm_helpers import tiny_bpe_tokenizer, tiny_llama

    tok = tiny_bpe_tokenizer()
    pc = [{"prompt": f"Summarise: the weather in city {i} was mild. Answer:", "completion": f" city {i}"}
          for i in range(12)]
    return fastft.Trainer(tiny_llama(len(tok)), pc, pc[:5], tokenizer=tok, epochs=1, batch_size=4, lr=1e-2,
                          eval_batch_size=2, generation_metrics=("token_f1", "rouge_l"),
                          generation_kwargs={"max_new_tokens": 6}, progress=False, device="cpu",
                          distributed="fsdp2")


def _generate_and_save(result_file):
    trainer = _generating()
    result = trainer.fit()
    torch.save({"history": result.history, "text": trainer.generate(["Summarise: the weather"])},
               f"{result_file}.{D.get_rank()}")


def test_fsdp2_validation_by_generation(tmp_path):
    launch(_generate_and_save, str(tmp_path / "res"))  # 5 prompts: 3 on rank 0, 2 (+ a stand-in) on rank 1
    single = _generating()
    want = single.fit().history[-1]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"res.{rank}")
        for key in ("val_token_f1", "val_rouge_l", "val_loss"):
            assert got["history"][-1][key] == pytest.approx(want[key], rel=1e-5), key
        assert got["text"] == single.generate(["Summarise: the weather"])
