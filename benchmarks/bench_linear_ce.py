"""Benchmark fastft.linear_cross_entropy (the LM loss without its [N, V] logits) against torch, in one run.

One measurement = forward + backward of the mean loss over N tokens of hidden size H and vocabulary V
(10% of the labels are -100, ignored), for:
  fastft   fastft.linear_cross_entropy(hidden, weight, labels)
  torch    F.cross_entropy(F.linear(hidden, weight), labels)   ("torch: F.linear + F.cross_entropy")
  liger    liger_kernel's liger_fused_linear_cross_entropy (CUDA only, when liger-kernel is importable)
in two cases:
  trainable  hidden and weight require grad (a trainable LM head)
  frozen     only hidden requires grad (a frozen, e.g. tied-and-frozen, embedding as the head)

Check: the warm-up call of each variant is also a correctness check: its loss and gradients are compared
  with torch's (with torch's on float32 copies of the inputs for bf16 / fp16, where torch's own error is
  shown too); the max abs differences are printed.
Time: the variants run round-robin (one call each per round, so load drift from other processes hits
  all of them alike), median of --reps rounds after --warmup; ratio = torch ms / variant ms
  (>= 1.0: at least as fast as torch).
Memory: peak memory of one forward + backward above the memory held just before it (inputs allocated,
  .grad None), in MB = 2^20 bytes; it includes the .grad tensors the call leaves behind.
  CPU:  each variant in a fresh subprocess (this script with a hidden flag): the rise of the peak RSS
        (/proc/self/status VmHWM, reset through /proc/self/clear_refs after allocating the inputs and
        after a tiny warm-up call that initialises the BLAS / thread pools) over the RSS at that
        point; where clear_refs is not writable, the rise of getrusage(RUSAGE_SELF).ru_maxrss.
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated().
  ratio = variant MB / torch MB. "grads MB" = the bytes of those .grad tensors (the same for all variants).
Targets (issue 15): memory <= 1/8 of torch's with a trainable head (the frozen head is shown against the
  same bar), time >= 1.0x torch with a trainable and with a frozen head.

Writes long-form CSV + JSON to benchmarks/results/bench_linear_ce_<device>.{csv,json}.

--smollm2 (CPU): a real SmolLM2-135M-Instruct training step in fastft.Trainer (8 x 256 tokens of BBC
News, the lower half of the blocks and the tied embedding frozen, fp32), fused_lm_loss on vs off, each in
a fresh process: median seconds per step and the peak RSS rise of training; targets: step time >= 1.05x,
peak RSS <= 0.7x the plain path. Needs `make .venv/.smollm2`. Writes bench_linear_ce_smollm2_cpu.{csv,json}.

    python benchmarks/bench_linear_ce.py          # CPU: SmolLM2-135M's head, H=576 V=49152 N=4096 fp32 (~2 min, 2 cores)
    python benchmarks/bench_linear_ce.py --device cuda --hidden 4096 --vocab 128256 --tokens 8192 --dtype bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastft
from _common import git_commit, load_smollm2, reset_peak_rss, status_kb, timer, write_results

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CASES = {"trainable": "trainable head (hidden + weight require grad)",
         "frozen": "frozen head (only hidden requires grad)"}
LABELS = {"fastft": "fastft.linear_cross_entropy", "torch": "torch: F.linear + F.cross_entropy",
          "liger": "liger_fused_linear_cross_entropy"}
IGNORED_FRACTION = 0.1
MEMORY_TARGET = 1 / 8  # fastft MB / torch MB, trainable head
TIME_TARGET = 1.0  # torch ms / fastft ms, both cases
#: relative error (max |diff| / max |reference|) accepted in the check, per dtype
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def make_inputs(n, h, v, dtype, device, case):
    """hidden [N, H], weight [V, H] (std 0.02, like an LM head's init), labels [N] with 10% = -100."""
    g = torch.Generator(device=device).manual_seed(0)  # generated on the device: V x H can be GBs
    hidden = torch.randn(n, h, generator=g, device=device).to(dtype)
    weight = torch.randn(v, h, generator=g, device=device).mul_(0.02).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[torch.randperm(n, generator=g, device=device)[:round(IGNORED_FRACTION * n)]] = -100
    hidden.requires_grad_(True)
    weight.requires_grad_(case == "trainable")
    return hidden, weight, labels


def liger_loss():
    """liger-kernel's fused linear cross-entropy, or (None, why not)."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as e:  # noqa: BLE001 - ImportError, or a Triton / CUDA mismatch at import
        return None, f"{type(e).__name__}: {e}"

    def loss(hidden, weight, labels):
        out = liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100)
        return out[0] if isinstance(out, tuple) else out  # some versions return (loss, z_loss)

    return loss, None


def variants(device):
    """{name: loss(hidden, weight, labels)} and a note on liger (None when it is timed)."""
    vs = {"fastft": lambda hd, w, lb: fastft.linear_cross_entropy(hd, w, lb, ignore_index=-100),
          "torch": lambda hd, w, lb: F.cross_entropy(F.linear(hd, w), lb, ignore_index=-100)}
    if device.type != "cuda":
        return vs, "liger-kernel: not timed (its kernels are Triton, CUDA only)"
    fn, why = liger_loss()
    if fn is None:
        return vs, f"liger-kernel: not timed, not importable ({why})"
    vs["liger"] = fn
    return vs, None


def step(fn, hidden, weight, labels):
    """One forward + backward from .grad = None; returns the loss (detached)."""
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels)
    loss.backward()
    return loss.detach()


def grads_fp32(hidden, weight):
    return (hidden.grad.float(), weight.grad.float() if weight.grad is not None else None)


def max_rel_diff(a, b):
    """(max |a - b|, that / max |b|) over float32 tensors."""
    d = float((a.float() - b.float()).abs().max())
    return d, d / max(float(b.float().abs().max()), 1e-30)


def check_and_warm_up(vs, hidden, weight, labels, case):
    """Runs each variant once (its first warm-up) and compares loss and gradients with the reference:
    torch itself for fp32, torch on float32 copies of the inputs for bf16 / fp16."""
    low = hidden.dtype != torch.float32
    if low:
        h32 = hidden.detach().float().requires_grad_(True)
        w32 = weight.detach().float().requires_grad_(weight.requires_grad)
        ref_loss = step(vs["torch"], h32, w32, labels).float()
        ref = (ref_loss,) + grads_fp32(h32, w32)
        h32 = w32 = None
    out = {}
    for name, fn in vs.items():
        loss = step(fn, hidden, weight, labels).float()
        got = (loss,) + grads_fp32(hidden, weight)
        hidden.grad = weight.grad = None
        if not low and name == "torch":
            ref = got
        out[name] = got
    res = {}
    for name, got in out.items():
        if name == "torch" and not low:
            continue
        diffs = {}
        for key, a, b in zip(("loss", "grad_hidden", "grad_weight"), got, ref):
            if b is not None:
                diffs[key], diffs[f"{key}_rel"] = max_rel_diff(a, b)
        res[name] = diffs
    tol = CHECK_TOL[hidden.dtype]
    torch_rel = max((v for k, v in res.get("torch", {}).items() if k.endswith("_rel")), default=0.0)
    for name, diffs in res.items():
        worst = max(v for k, v in diffs.items() if k.endswith("_rel"))
        diffs["check_ok"] = worst <= max(tol, 2 * torch_rel)
        diffs["check_reference"] = "torch fp32" if low else "torch"
    return res


# --- memory -------------------------------------------------------------------------------------------


def cpu_memory_worker(args, spec):
    """In a fresh process: the peak RSS rise of one forward + backward of one variant (see the docstring)."""
    case, name = spec.split(":")
    device, dtype = torch.device("cpu"), DTYPES[args.dtype]
    fn = variants(device)[0][name]
    tiny = make_inputs(64, args.hidden, 1024, dtype, device, case)
    step(fn, *tiny)  # initialises BLAS / OpenMP pools without leaving big freed blocks behind
    tiny = None
    hidden, weight, labels = make_inputs(args.tokens, args.hidden, args.vocab, dtype, device, case)
    gc.collect()
    how = reset_peak_rss()
    if how == "VmHWM":
        before_kb = status_kb("VmRSS")
    else:
        before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(fn, hidden, weight, labels)
    peak_kb = status_kb("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(peak_mb=(peak_kb - before_kb) / 1024, memory_method=f"peak RSS rise ({how}), fresh subprocess")


def cpu_memory(args, case, name):
    cmd = [sys.executable, __file__, "--device", "cpu", "--hidden", str(args.hidden), "--vocab", str(args.vocab),
           "--tokens", str(args.tokens), "--dtype", args.dtype, "--memory-worker", f"{case}:{name}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory worker {case}:{name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_memory(fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(fn, hidden, weight, labels)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    hidden.grad = weight.grad = None
    return dict(peak_mb=(peak - before) / 2**20,
                memory_method="torch.cuda.max_memory_allocated() - memory_allocated() before")


# --- the run ------------------------------------------------------------------------------------------


def bench_case(args, device, dtype, case, reps, warmup, log):
    vs, liger_note = variants(device)
    memory = {}
    if device.type == "cpu":
        for name in vs:
            memory[name] = cpu_memory(args, case, name)
            log(f"{case}: memory {name} done")
    hidden, weight, labels = make_inputs(args.tokens, args.hidden, args.vocab, dtype, device, case)
    if device.type == "cuda":
        for name, fn in vs.items():
            step(fn, hidden, weight, labels)  # compile / autotune outside the measured window
            memory[name] = cuda_memory(fn, hidden, weight, labels)
    checks = check_and_warm_up(vs, hidden, weight, labels, case)
    log(f"{case}: check + warm-up 1 done")
    for _ in range(warmup - 1):
        for fn in vs.values():
            step(fn, hidden, weight, labels)
    measure = timer(device)
    times = {name: [] for name in vs}
    for r in range(reps):
        for name, fn in vs.items():
            times[name] += measure(lambda fn=fn: step(fn, hidden, weight, labels), 1)
        log(f"{case}: round {r + 1}/{reps} done")
    hidden.grad = weight.grad = None
    rows = []
    for name in vs:
        rows.append(dict(case=case, variant=name, label=LABELS[name], ms=statistics.median(times[name]),
                         ms_min=min(times[name]), ms_max=max(times[name]),
                         ms_reps=";".join(f"{t:.3f}" for t in times[name]), **memory[name], **checks.get(name, {})))
    elem = torch.empty((), dtype=dtype).element_size()
    grads_mb = (args.tokens + (args.vocab if case == "trainable" else 0)) * args.hidden * elem / 2**20
    for r in rows:
        r["grads_mb"] = grads_mb  # the .grad tensors every variant leaves behind, part of peak_mb
    base = next(r for r in rows if r["variant"] == "torch")
    for r in rows:
        r["speedup_vs_torch"] = base["ms"] / r["ms"]
        r["memory_vs_torch"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None
    return rows, liger_note


def verdicts(rows):
    """The issue's targets against fastft's rows: [(text, met)]."""
    out = []
    for case in CASES:
        r = next((r for r in rows if r["case"] == case and r["variant"] == "fastft"), None)
        if r is None:
            continue
        sp = r["speedup_vs_torch"]
        met = sp >= TIME_TARGET
        by = f"{sp / TIME_TARGET - 1:+.1%}"
        text = (f"time   {case:<9}: {sp:.2f}x torch, target >= {TIME_TARGET:.1f}x -> "
                f"{'MET' if met else 'MISSED'} ({by} vs the bar)")
        out.append((text, met))
        m = r["memory_vs_torch"]
        if m is not None:
            met = m <= MEMORY_TARGET
            bar = "target" if case == "trainable" else "same bar, informational"
            text = (f"memory {case:<9}: {m:.3f} of torch's (1/{1 / m:.1f}), {bar} <= 1/8 = {MEMORY_TARGET:.3f} -> "
                    f"{'MET' if met else 'MISSED'} ({m / MEMORY_TARGET:.2f}x the bar)")
            out.append((text, met))
    return out


# --- a real SmolLM2-135M training step in the Trainer: fused LM loss vs the model's own ---------------

SMOLLM2_TARGETS = dict(peak_rss_vs_plain_max=0.7, speedup_vs_plain_min=1.05)


def smollm2_worker(variant: str) -> dict:
    """One Trainer run (4 steps of 8 x 256 tokens of BBC News, the lower 15 of 30 blocks and the tied
    embedding frozen, fp32) with ``fused_lm_loss`` on ("fused") or off ("plain"), in this process:
    seconds per optimizer step and the peak RSS of training over the RSS after loading the model."""
    from fastft import datasets

    model, tok = load_smollm2()
    blocks = fastft.lm.pack_blocks([t for t, _ in datasets.bbc_news()][:200], tok, 256)[:8 * 4]
    rows = [{"input_ids": b, "labels": list(b)} for b in blocks]
    stamps = []

    class Clock(fastft.Callback):
        def on_step_end(self, trainer, step, loss):
            stamps.append(time.perf_counter())

    layers = len(fastft.find_layers(model))
    trainer = fastft.Trainer(model, rows, epochs=1, batch_size=8, lr=1e-5, freeze=layers // 2, metrics=(),
                             fused_lm_loss=variant == "fused", group_by_length=False, callbacks=[Clock()],
                             progress=False)
    before = status_kb("VmRSS") / 1024
    reset_peak_rss()
    t0 = time.perf_counter()
    trainer.fit()
    steps = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    return dict(variant=variant, fused_lm=trainer.fused_lm, blocks=layers, frozen_blocks=layers // 2,
                tokens_per_step=8 * 256, step_s=statistics.median(steps[1:]), steps_s=steps,
                peak_rss_rise_mb=status_kb("VmHWM") / 1024 - before, rss_before_mb=before)


def smollm2(args) -> int:
    results = []
    for variant in ("fused", "plain"):
        cmd = [sys.executable, __file__, "--smollm2-worker", variant]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    fused, plain = results
    speed, memory = plain["step_s"] / fused["step_s"], fused["peak_rss_rise_mb"] / plain["peak_rss_rise_mb"]
    meta = dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                torch=torch.__version__, commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"# SmolLM2-135M Trainer step, 8 x 256 tokens, {fused['frozen_blocks']} of {fused['blocks']} blocks frozen, "
          f"fp32 - {meta['machine']} - torch {meta['torch']} - commit {meta['commit']}")
    for r in results:
        print(f"{r['variant']:<6} median s/step {r['step_s']:7.2f}  peak RSS rise {r['peak_rss_rise_mb']:8.0f} MB  "
              f"(steps {', '.join(f'{x:.2f}' for x in r['steps_s'])})")
    print(f"fused vs plain: {speed:.3f}x step time (target >= {SMOLLM2_TARGETS['speedup_vs_plain_min']}x), "
          f"{memory:.3f}x peak RSS rise (target <= {SMOLLM2_TARGETS['peak_rss_vs_plain_max']}x)")
    for r in results:
        r.update(meta, speedup_vs_plain=speed, memory_vs_plain=memory)
    write_results(Path(args.out) / "bench_linear_ce_smollm2_cpu", results, meta, targets=SMOLLM2_TARGETS)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default: 3 on CPU, 20 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds, the first is the check (1 CPU, 3 CUDA)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    ap.add_argument("--smollm2", action="store_true",
                    help="instead: a real SmolLM2-135M Trainer step, fused LM loss vs the model's own")
    ap.add_argument("--smollm2-worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    if args.memory_worker:
        print(json.dumps(cpu_memory_worker(args, args.memory_worker)))
        return 0
    if args.smollm2_worker:
        print(json.dumps(smollm2_worker(args.smollm2_worker)))
        return 0
    if args.smollm2:
        return smollm2(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    reps = args.reps or (3 if device.type == "cpu" else 20)
    warmup = max(1, args.warmup or (1 if device.type == "cpu" else 3))
    t_start = time.time()

    def log(msg):
        print(f"  {msg} ({time.time() - t_start:.0f} s)", file=sys.stderr, flush=True)

    info = fastft.build_info()
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                    f"{torch.get_num_threads()} threads")
    meta = dict(machine=machine, device=device.type, torch=torch.__version__, fastft=info["version"],
                extension=info["extension"], kernel_devices=",".join(info.get("kernel_devices", [])),
                commit=git_commit(), hidden=args.hidden, vocab=args.vocab, tokens=args.tokens, dtype=args.dtype,
                ignored_fraction=IGNORED_FRACTION, reps=reps, warmup=warmup,
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    if device.type not in info.get("kernel_devices", []):
        print(f"warning: fastft's compiled kernels do not cover {device.type} ({info['load_error'] or 'not built'});"
              f" fastft's numbers are its pure-PyTorch fallback", file=sys.stderr)

    rows, liger_note = [], None
    for case in args.cases:
        case_rows, liger_note = bench_case(args, device, dtype, case, reps, warmup, log)
        rows += case_rows
    for r in rows:
        r.update(meta)

    logits_mb = args.tokens * args.vocab * 4 / 2**20
    print(f"# fused linear cross-entropy, fwd+bwd - {machine} - torch {torch.__version__} - commit {meta['commit']}")
    print(f"# H={args.hidden} V={args.vocab} N={args.tokens} {args.dtype}, {IGNORED_FRACTION:.0%} labels ignored - "
          f"median of {reps} round-robin rounds after {warmup} warm-up - fp32 logits would be {logits_mb:.0f} MB")
    header = (f"{'case':<9} {'variant':<34} {'ms':>9} {'min..max ms':>17} {'vs torch':>8} {'peak MB':>9} "
              f"{'mem/torch':>9} {'grads MB':>8} {'|d loss|':>9} {'|d grad h|':>10} {'|d grad W|':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        mem = f"{r['memory_vs_torch']:9.3f}" if r["memory_vs_torch"] is not None else f"{'':>9}"
        gw = f"{r['grad_weight']:10.1e}" if "grad_weight" in r else f"{'-':>10}"
        chk = f"{r['loss']:9.1e} {r['grad_hidden']:10.1e} {gw}" if "loss" in r else f"{'(ref)':>9}"
        if "check_ok" in r and not r["check_ok"]:
            chk += "  MISMATCH"
        print(f"{r['case']:<9} {r['label']:<34} {r['ms']:9.1f} {r['ms_min']:8.1f}..{r['ms_max']:<8.1f} "
              f"{r['speedup_vs_torch']:7.2f}x {r['peak_mb']:9.1f} {mem} {r['grads_mb']:8.1f} {chk}")
    ref = rows[0].get("check_reference", "torch")
    print(f"vs torch = torch ms / variant ms (>= 1: faster); peak MB = {rows[0]['memory_method']}, includes the "
          f"grads left behind (grads MB); |d ...| = max abs difference from {ref} (warm-up call)")
    if liger_note:
        print(liger_note)
    print("targets (issue 15):")
    results = verdicts(rows)
    for text, _ in results:
        print(f"  {text}")

    write_results(Path(args.out) / f"bench_linear_ce_{device.type}", rows, meta,
                  targets=dict(memory_vs_torch_trainable_max=MEMORY_TARGET, speedup_vs_torch_min=TIME_TARGET),
                  verdicts=[dict(text=t, met=m) for t, m in results], liger=liger_note or "timed")
    print(f"({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
