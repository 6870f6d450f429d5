#!/usr/bin/env bash
# One accelerator check, most important first: the train step at batch
# 64/256/1024 on synthetic and real data, the full 20-epoch MNIST run as the
# example runs by default (timed twice: compiling every program, then loading
# them from the compilation cache the first run filled), the PyTorch
# comparison (eager, float32 and bfloat16), the train step under each
# convolution implementation and compute dtype, the fused loop under XLA
# flags and scan unrolls (one process each), the divergence guard's cost,
# the per-layer benchmark, a profile of the fused loop and, last because its
# compile time has no bound and it can fail, the comparison with
# torch.compile. Everything (JSON, text, sample grids) lands in one archive,
# $OUT/device_check.tar.gz (OUT defaults to /tmp/device_check), replaced whole
# after each part, so an interrupted check keeps what it finished.
#
# The machine needs jax with its accelerator plugin, flax, optax,
# orbax-checkpoint and, for the comparison, torch. For a machine without a
# package index, run benchmarks/offline_bundle.py where pip works: it puts the
# other wheels in .whl/ and MNIST, prepared, in .data/; copy both along with
# the repository, and this script installs the wheels first.
#
#   bash benchmarks/device_check.sh                          # the whole check
#   DEVICE_CHECK_QUICK=1 bash benchmarks/device_check.sh     # toy sizes, any machine
#   DEVICE_CHECK_PARTS=compare_pytorch,layers bash benchmarks/device_check.sh
#
# The parts: environment, train_step, full_run, full_run_warm,
# compare_pytorch, conv_variants, loop_variants, divergence_guard, layers,
# profile, torch_compile.
# DEVICE_CHECK_PARTS runs only the named ones (to finish a check that was
# cut short); each part's wall time is in timings.txt. PYTHON picks the
# interpreter (default python3). The exit status is 1 if any part failed or
# an unknown part was named; the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TFDS_DATA_DIR="${TFDS_DATA_DIR:-$PWD/.data}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/jaxgan_site .whl/*.whl \
    && export PYTHONPATH="/tmp/jaxgan_site:$PYTHONPATH"
fi
WORKDIR="$(mktemp -d)"
trap 'rm -rf "$WORKDIR"' EXIT
RESULTS="$WORKDIR/device_check"
mkdir -p "$RESULTS"
# Written beside and then renamed: a check stopped while it archives keeps
# the previous, complete archive.
archive() {
  tar czf "$OUT/device_check.tar.gz.partial" -C "$WORKDIR" device_check \
    && mv -f "$OUT/device_check.tar.gz.partial" "$OUT/device_check.tar.gz"
}

if [ -n "${DEVICE_CHECK_QUICK:-}" ]; then
  TRAIN_STEP=(--batch_sizes=8 --trials=2 --steps=2 --fused_steps=3)
  RUN=(--num_epochs=1 --steps_per_epoch=2 --eval_samples=500
       --num_test_samples=500)
  COMPARE=(--batch_size=8 --steps=2 --trials=1 --no_compile --bfloat16)
  COMPILE=(--batch_size=8 --steps=2 --trials=1)
  GUARD=(--batch_size=8 --steps=2 --trials=1)
  LAYERS=(--batch_size=2 --trials=1)
  PROFILE=(--batch_size=8 --steps=2)
  VARIANTS=(--batch_sizes=8 --conv_kernel_grad=xla,im2col
            --compute_dtype=float32,bfloat16 --trials=1 --steps=1
            --fused_steps=1)
  LOOP_GRAPHS='--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL'
  LOOP=(--batch_size=8 --fused_steps=2 --trials=1
        --variant="unroll_2_loop_graphs:2:$LOOP_GRAPHS")
else
  TRAIN_STEP=(--batch_sizes=64,256,1024 --trials=5 --steps=50
              --fused_steps=300)
  RUN=()
  COMPARE=(--batch_size=64 --steps=200 --trials=5 --no_compile --bfloat16)
  COMPILE=(--batch_size=64 --steps=200 --trials=3)
  GUARD=(--batch_size=64 --steps=200 --trials=5)
  LAYERS=(--trials=7)
  PROFILE=(--batch_size=64 --steps=100)
  VARIANTS=(--batch_sizes=64 --conv_kernel_grad=auto,xla,im2col
            --compute_dtype=float32,bfloat16 --trials=3 --steps=50
            --fused_steps=300)
  LOOP=(--batch_size=64 --fused_steps=300 --trials=3)
fi

PARTS=(environment train_step full_run full_run_warm compare_pytorch
       conv_variants loop_variants divergence_guard layers profile
       torch_compile)
FAILED=()
parts_asked="${DEVICE_CHECK_PARTS:-}"
for name in ${parts_asked//,/ }; do
  if [[ " ${PARTS[*]} " != *" $name "* ]]; then
    echo "DEVICE_CHECK_PARTS: no part named '$name'; the parts are" \
      "${PARTS[*]}" >&2
    FAILED+=("$name")
  fi
done
# part NAME COMMAND...: runs it (unless DEVICE_CHECK_PARTS leaves it out)
# with its output in NAME.txt, notes a failure and its wall time and goes on,
# then refreshes the archive.
part() {
  local name="$1"; shift
  if [ -n "${DEVICE_CHECK_PARTS:-}" ] \
      && [[ ",$DEVICE_CHECK_PARTS," != *",$name,"* ]]; then
    return
  fi
  local start=$SECONDS status
  "$@" 2>&1 | tee "$RESULTS/$name.txt"
  status="${PIPESTATUS[0]}"
  [ "$status" -eq 0 ] || FAILED+=("$name")
  echo "$name $((SECONDS - start)) s, exit status $status" \
    | tee -a "$RESULTS/timings.txt"
  archive
}

environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv \
    2>/dev/null || echo 'no nvidia-smi'
  "$PYTHON" -c "import jax, flax, optax; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
}
part environment environment

part train_step "$PYTHON" benchmarks/train_step.py "${TRAIN_STEP[@]}" \
  --data=both --json="$RESULTS/train_step.json"

# A full run of the example: wall clock from the shell, data loading and
# compilation included, and its last metrics. Both runs share a compilation
# cache that starts empty here: the first compiles, the second loads.
CACHE="$WORKDIR/xla_cache"
full_run() {  # name, then flags for the example
  local name="$1"; shift
  local start end cache=cold
  [ -n "$(ls -A "$CACHE" 2>/dev/null)" ] && cache=warm
  start=$(date +%s.%N)
  "$PYTHON" examples/mnist_dcgan.py --workdir="$WORKDIR/$name" --noprogress \
    --compilation_cache_dir="$CACHE" "${RUN[@]}" "$@" \
    | tee "$WORKDIR/$name.log" || return
  end=$(date +%s.%N)
  "$PYTHON" - "$name" "$start" "$end" "$WORKDIR/$name" "$RESULTS" "$cache" \
    <<'PY'
import json, re, sys
name, start, end, workdir, out, cache = sys.argv[1:]
records = [json.loads(l) for l in open(f'{workdir}/metrics.jsonl')]
log = open(f'{workdir}.log').read()
wall = float(end) - float(start)
# Where the wall clock went, from the example's own epoch records and the
# training loop's time on its "Done:" line. Start-up includes compiling the
# first call's program (the example compiles it while it draws the first
# grid and readies the evaluation). "between_epochs" is host time after an
# epoch's last call before the next epoch's first one, and the final writes;
# the evaluation's host time overlaps the epochs (it is collected while the
# next epoch runs), so it is reported beside them, not added.
first, later = records[0]['seconds'], sum(r['seconds'] for r in records[1:])
loop = float(re.search(r'Done: .* in ([0-9.]+)s;', log).group(1))
breakdown = {
    'start_up_and_exit_seconds': wall - loop,
    'first_epoch_seconds': first, 'later_epochs_seconds': later,
    'later_epochs_steps_per_sec': (
        (records[-1]['step'] - records[0]['step']) / later if later else None),
    'between_epochs_seconds': loop - first - later,
    'eval_host_seconds': sum(r.get('eval_seconds', 0.0) for r in records)}
summary = {'wall_seconds': wall, 'compilation_cache': cache,
           'epochs': len(records),
           'steps': records[-1]['step'], 'breakdown': breakdown,
           'final': records[-1]}
json.dump(summary, open(f'{out}/{name}.json', 'w'), indent=2)
print(f'{name}: {wall:.1f} s wall clock for {summary["steps"]} steps: ' +
      ', '.join(f'{k} {v:.1f}' for k, v in breakdown.items()
                if v is not None))
PY
}
part full_run full_run full_run
cp "$WORKDIR"/full_run/samples/epoch_*.png "$WORKDIR"/full_run/losses.png \
  "$RESULTS/" 2>/dev/null && archive
part full_run_warm full_run full_run_warm

part compare_pytorch "$PYTHON" benchmarks/compare_pytorch.py "${COMPARE[@]}" \
  --json="$RESULTS/compare_pytorch.json"
part conv_variants "$PYTHON" benchmarks/train_step.py "${VARIANTS[@]}" \
  --no_contractions --json="$RESULTS/conv_variants.json"
part loop_variants "$PYTHON" benchmarks/loop_variants.py "${LOOP[@]}" \
  --json="$RESULTS/loop_variants.json"
part divergence_guard "$PYTHON" benchmarks/divergence_guard.py "${GUARD[@]}" \
  --json="$RESULTS/divergence_guard.json"
part layers "$PYTHON" benchmarks/layers.py "${LAYERS[@]}" \
  --json="$RESULTS/layers.json"
part profile "$PYTHON" benchmarks/profile_step.py "${PROFILE[@]}" \
  --trace_dir="$WORKDIR/trace" --json="$RESULTS/profile.json"
# Times jaxgan and PyTorch eager again beside torch.compile, so that its
# ratios, too, come from one process.
part torch_compile "$PYTHON" benchmarks/compare_pytorch.py "${COMPILE[@]}" \
  --json="$RESULTS/torch_compile.json"

echo "wrote $OUT/device_check.tar.gz"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "failed: ${FAILED[*]} (see their .txt files in the archive)" >&2
  exit 1
fi
