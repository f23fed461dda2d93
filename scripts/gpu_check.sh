#!/usr/bin/env bash
# The GPU validation in one command, for the GPU machine (see docs/benchmarks.md, "GPU").
#
# Here, first:   .venv/bin/python dev/device_wheels.py        (fills the ignored .whl/)
# There (device tool, carry [".whl"]):   bash scripts/gpu_check.sh [tests] [ops] [models]
#
# Installs the carried wheels into /tmp/site, builds soit._C against the machine's own torch
# (kept while the machine stays warm), then runs the chosen parts (default: all three):
#   tests   tests/layers, tests/deploy, tests/modeling (the CUDA tests run instead of skipping)
#   ops     dev/benchmark_ops.py --device cuda
#   models  dev/benchmark.py --device cuda (SOIT, Mask R-CNN, transformers' Deformable DETR)
# and writes each log under $OUT (the device tool's folder) or output/gpu_check. One device
# command may run 10 minutes: split the parts over calls if they do not fit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed: run dev/device_wheels.py here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"; } \
    2>&1 | tee "$OUT/device.txt"

arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if python3 -c "from soit.layers.ms_deform_attn import has_cuda_kernel as h; exit(0 if h() else 1)" 2>/dev/null; then
    echo "soit._C already built with CUDA here"
else
    start=$(date +%s)
    TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} \
        python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
        || { tail -40 "$OUT/build.log"; echo "building soit._C failed (log: $OUT/build.log)"; exit 1; }
    echo "soit._C built for sm_${arch/./} in $(( $(date +%s) - start )) s"
fi
python3 -c "from soit.layers.ms_deform_attn import extension_status as s; print('soit._C:', s())" | tee -a "$OUT/device.txt"

parts=${*:-tests ops models}
rc=0
for part in $parts; do
    case $part in
        tests)
            python3 -m pytest -q -rs tests/layers tests/deploy tests/modeling ${PYTEST_ARGS:-} 2>&1 \
                | tee "$OUT/tests.log" | tail -25
            [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
        ops)
            python3 dev/benchmark_ops.py --device cuda --markdown 2>&1 | tee "$OUT/benchmark_ops.md" | tail -40
            [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
        models)
            python3 dev/benchmark.py --device cuda --markdown --json "$OUT/benchmark.json" 2>&1 \
                | tee "$OUT/benchmark.md" | tail -20
            [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
        *) echo "unknown part $part (tests, ops, models)"; rc=2 ;;
    esac
done
exit "$rc"
