#!/usr/bin/env bash
# The GPU validation in one command, for the GPU machine (see docs/benchmarks.md, "GPU").
#
# Here, first:   .venv/bin/python tools/device_wheels.py        (fills the ignored .whl/)
# There (device tool, carry [".whl"]):   bash scripts/gpu_check.sh
#
# Installs the carried wheels into /tmp/site, builds soit._C against the machine's own torch,
# runs the tests that exercise the GPU (with every CPU test of those folders) and the op
# benchmark, and writes each log under $OUT (the device tool's folder) or output/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed: run tools/device_wheels.py here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"; } \
    2>&1 | tee "$OUT/device.txt"

arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
start=$(date +%s)
TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} \
    python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; echo "building soit._C failed (log: $OUT/build.log)"; exit 1; }
echo "soit._C built for sm_${arch/./} in $(( $(date +%s) - start )) s"
python3 -c "from soit.layers.ms_deform_attn import extension_status as s; print('soit._C:', s())" | tee -a "$OUT/device.txt"

python3 -m pytest -q -rs tests/layers tests/deploy tests/modeling ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

python3 tools/benchmark_ops.py --device cuda --markdown 2>&1 | tee "$OUT/benchmark_ops.md" | tail -40
exit "$tests_rc"
