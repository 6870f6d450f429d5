#!/usr/bin/env bash
# One short accelerator check: per-layer and train-step benchmarks at batch
# 64/256/1024, the PyTorch comparison, the divergence guard's cost, and a full
# 20-epoch MNIST run, all as JSON under $OUT.
#
# Prepare on the development machine, in the repository root:
#   1. Wheels the GPU machine lacks (jax, flax, optax, orbax and torch are
#      there): tensorflow-datasets and what it needs to read array_record,
#      plus tensorboardX, downloaded for Python 3.12 into .whl/ (see the
#      device tool's notes).
#   2. MNIST prepared into .data/:  TFDS_DATA_DIR=.data python -c \
#        "import jaxgan; jaxgan.load_mnist('train', mnist_dir='../shared/datasets/mnist')"
#   3. Run with carry [".whl", ".data"] and a 600 s limit:
#        bash benchmarks/device_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/device_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TFDS_DATA_DIR="$PWD/.data"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/environment.txt"

python3 benchmarks/layers.py --trials=7 --json="$OUT/layers.json" 2>&1 | tee "$OUT/layers.txt"
python3 benchmarks/train_step.py --batch_sizes=64,256,1024 --trials=5 \
  --steps=50 --fused_steps=937 --data=both --json="$OUT/train_step.json" \
  2>&1 | tee "$OUT/train_step.txt"
python3 benchmarks/compare_pytorch.py --batch_size=64 --steps=200 --trials=5 \
  --json="$OUT/compare_pytorch.json" 2>&1 | tee "$OUT/compare_pytorch.txt"
python3 benchmarks/divergence_guard.py --batch_size=64 --steps=200 --trials=5 \
  --json="$OUT/divergence_guard.json" 2>&1 | tee "$OUT/divergence_guard.txt"
start=$(date +%s.%N)
python3 examples/mnist_dcgan.py --workdir=/tmp/dcgan_full --noprogress \
  2>&1 | tee "$OUT/full_run.txt"
end=$(date +%s.%N)
python3 - "$start" "$end" "$OUT" <<'PY'
import json, sys
start, end, out = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
records = [json.loads(l) for l in open('/tmp/dcgan_full/metrics.jsonl')]
json.dump({'wall_seconds': end - start, 'epochs': len(records),
           'steps': records[-1]['step'], 'final': records[-1]},
          open(f'{out}/full_run.json', 'w'), indent=2)
print(f'full run: {end - start:.1f} s wall clock for {records[-1]["step"]} steps')
PY
cp /tmp/dcgan_full/samples/epoch_020.png "$OUT/" 2>/dev/null || true
