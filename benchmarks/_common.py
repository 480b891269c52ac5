"""Helpers shared by the benchmark scripts: the commit, a timer per device, result files."""

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
