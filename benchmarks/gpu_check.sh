#!/usr/bin/env bash
# Everything a GPU machine has to show, in one call (well under 10 minutes):
#   1. install the prebuilt CUDA wheel from dist/ when there is one for this Python (`make cuda-wheel` /
#      `make cuda-wheel2`: built against torch 2.11, the oldest fastft supports; carry dist/ along), else
#      build fastft with CUDA for this card from source; print fastft.build_info()
#   2. every CUDA test under tests/ (test_adamw/optim, test_pooling, test_linear_ce, ...: kernels against
#      the references, every dtype, chunk/launch boundaries), then cross_entropy_rows_ past 2^31 elements
#   3. compute-sanitizer memcheck and racecheck over a small optimizer step, pooling fwd/bwd and
#      cross_entropy_rows_ (odd vocab, unaligned rows, ignored rows, row_scale)
#   4. benchmarks (CUDA-event medians), the table printed last and written to benchmarks/results/
# Needs: torch >= 2.11 with CUDA 13, pytest; to build from source also nvcc, cmake, ninja, scikit-build-core
# (no network). Everything runs with `python -P` (no current directory on sys.path), so the installed
# fastft is the one tested: the wheel, or the editable build.
# Results are also copied to $OUT when it is set (the device tool brings $OUT back).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PATH=/usr/local/cuda/bin:$PATH
RES=benchmarks/results
mkdir -p "$RES"
LOG=$RES/gpu_check.log
: > "$LOG"
status=0
step() { echo; echo "== $*" | tee -a "$LOG"; }

ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')")
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name())")
TAG=$($PY -c "import sys; print(f'cp{sys.version_info.major}{sys.version_info.minor}')")
WHEEL=$(ls dist/fastft-*-"$TAG"-*.whl 2>/dev/null | head -1)
if [ -n "$WHEEL" ]; then
  step "install the prebuilt $WHEEL on sm_$ARCH ($GPU), torch $($PY -c 'import torch; print(torch.__version__)')"
  $PY -m pip install -q --no-index --no-deps --force-reinstall "$WHEEL" 2>&1 | tail -20 | tee -a "$LOG"
else
  step "no prebuilt wheel for $TAG in dist/: build for sm_$ARCH ($GPU), torch $($PY -c 'import torch; print(torch.__version__)')"
  FASTFT_CUDA=ON FASTFT_CUDA_ARCHS=$ARCH $PY -m pip install -q --no-index --no-build-isolation --no-deps \
    -C build-dir=build/gpu -C build.verbose=false -e . 2>&1 | tail -20 | tee -a "$LOG"
fi
$PY -P -c "import fastft, json; i = fastft.build_info(); print(fastft.__file__, json.dumps(i)); assert i['cuda'] and i['extension'] and 'cuda' in i['kernel_devices'], i" \
  2>&1 | tee -a "$LOG" || { echo "fastft with CUDA kernels could not be loaded"; exit 1; }

step "CUDA tests"
timeout 300 $PY -P -m pytest -q -x tests -k "cuda" 2>&1 | tail -25 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# (tests/test_linear_ce.py is part of the run above.) Logits past 2^31 elements (8.6 GB, too big for a
# test): the row offsets r * V need 64 bits.
BIG='
import torch, fastft
from fastft import _reference
n, V = 16800, 128256
x = torch.randn(n, V, device="cuda")
labels = torch.randint(0, V, (n,), device="cuda")
tail = x[-3:].clone()
loss = torch.ops.fastft.cross_entropy_rows_(x, labels, None, 0.5, -100, True)
want = _reference.cross_entropy_rows_(tail, labels[-3:], None, 0.5, -100, True)
torch.testing.assert_close(loss[-3:], want, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(x[-3:], tail, rtol=1e-5, atol=1e-9)
print(f"cross_entropy_rows_ [{n}, {V}] = {n * V} elements: last rows match the reference")
'
timeout 120 $PY -P -c "$BIG" 2>&1 | tail -4 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compute-sanitizer"
CASE='
import torch, fastft
from fastft import ops
torch.manual_seed(0)
shapes = [(3, 5), (70001,), (0,), (131073,), (7,)]
for dtype in (torch.float32, torch.bfloat16):
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = fastft.AdamW(ps, lr=1e-3, l2_init=0.1, amsgrad=True, max_grad_norm=1.0, anchor_dtype=torch.bfloat16)
    opt.set_importance({p: torch.rand_like(p) for p in ps[:3]})  # EWC on some, plain L2-to-init on the rest
    opt.step(); opt.step(grad_scale=torch.tensor(2.0, device="cuda"), found_inf=torch.tensor(0.0, device="cuda"))
    print(float(ops.sum_of_squares([p.grad for p in ps])))
for dtype in (torch.float32, torch.bfloat16):
    for B, T, H in ((3, 17, 40), (2, 9, 1030), (4, 5, 3)):
        h = torch.randn(B, T, H, device="cuda", dtype=dtype, requires_grad=True)
        m = (torch.arange(T, device="cuda")[None] < torch.tensor([T, 1, 0, 2][:B], device="cuda")[:, None]).long()
        for mode in fastft.POOL_MODES:
            fastft.pool(h, m, mode).float().sum().backward()
            fastft.pool(h.transpose(0, 1).contiguous().transpose(0, 1), None, mode).float().sum().backward()
# cross_entropy_rows_: one vocab per launch shape (warp per row, 128 and 512 threads per row); rows that
# start off a 16-byte boundary (odd V, and a base 1 float in); ignored rows; row_scale; with/without grad.
for n, V in ((9, 7), (5, 4099), (3, 20011), (4, 20012)):
    for offset in (0, 1):
        buf = torch.randn(n * V + offset, device="cuda")
        x = buf[offset:].view(n, V)
        labels = torch.randint(0, V, (n,), device="cuda")
        labels[1] = -100
        for rs in (None, torch.rand(n, device="cuda")):
            for write_grad in (False, True):
                torch.ops.fastft.cross_entropy_rows_(x, labels, rs, 0.5, -100, write_grad)
torch.cuda.synchronize()
'
if command -v compute-sanitizer >/dev/null; then
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 1 $PY -P -c "$CASE" 2>&1 | tail -4 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  timeout 240 compute-sanitizer --tool racecheck --error-exitcode 1 $PY -P -c "$CASE" 2>&1 | tail -4 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "compute-sanitizer not found" | tee -a "$LOG"; status=1
fi

step "benchmarks"
timeout 200 $PY benchmarks/bench_pool.py --device cuda 2>&1 | tee "$RES/gpu_bench_pool.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 240 $PY benchmarks/bench_adamw.py --device cuda --sizes 23M 350M 1.3B 2>&1 | tee "$RES/gpu_bench_adamw.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 240 $PY benchmarks/bench_linear_ce.py --device cuda --hidden 4096 --vocab 128256 --tokens 8192 --dtype bf16 \
  2>&1 | tee "$RES/gpu_bench_linear_ce.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ -n "${OUT:-}" ]; then cp -r "$RES"/. "$OUT"/; fi
echo; echo "gpu_check status: $status (0 = all passed)"
exit $status
