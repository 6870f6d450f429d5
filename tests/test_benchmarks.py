"""The benchmark scripts run from an install and write what they claim."""

import fcntl
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import types

import pytest

from conftest import REPO


def _benchmark_module(name):
  """Imports benchmarks/<name>.py, which imports its neighbours by name."""
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.pop(0)


def _run(script, *args):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', script), *args],
      capture_output=True, text=True, timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stderr
  return result.stdout


# The device check runs every benchmark script, so the scripts' own tests read
# their parts of its archive: one run at toy sizes instead of one per script.


@pytest.fixture(scope='session')
def device_check(tmp_path_factory, mnist_data_dir):
  """`device_check.sh` at toy sizes on real MNIST: {file name: bytes}.

  Under pytest-xdist each worker has its own session; the first worker to
  ask runs the check, in the folder all workers share, and the others wait
  for it and read the same archive.
  """
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    shared = shared.parent
  out = shared / 'device_check'
  finished = out / 'finished.json'
  with open(shared / 'device_check.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not finished.exists():
      out.mkdir(exist_ok=True)
      result = subprocess.run(
          ['bash', os.path.join(REPO, 'benchmarks', 'device_check.sh')],
          capture_output=True, text=True, timeout=1200, cwd=out,
          env={**os.environ, 'DEVICE_CHECK_QUICK': '1', 'OUT': str(out),
               'TFDS_DATA_DIR': mnist_data_dir, 'PYTHON': sys.executable})
      finished.write_text(json.dumps({
          'returncode': result.returncode,
          'output': result.stdout[-3000:] + result.stderr[-3000:]}))
  run = json.loads(finished.read_text())
  assert run['returncode'] == 0, run['output']
  with tarfile.open(out / 'device_check.tar.gz') as archive:
    return {member.name: archive.extractfile(member).read()
            for member in archive.getmembers() if member.isfile()}


def _part_json(device_check, name):
  return json.loads(device_check[f'device_check/{name}.json'])


def _part_output(device_check, name):
  """What the part printed (stdout and stderr)."""
  return device_check[f'device_check/{name}.txt'].decode()


@pytest.mark.slow
def test_device_check_runs_every_part_at_toy_sizes(device_check):
  expected = ['train_step.json', 'full_run.json', 'full_run_warm.json',
              'compare_pytorch.txt', 'divergence_guard.json', 'layers.json',
              'environment.txt', 'epoch_001.png', 'conv_variants.json',
              'profile.json', 'torch_compile.txt', 'timings.txt',
              'loop_variants.json']
  if importlib.util.find_spec('torch') is not None:
    expected += ['compare_pytorch.json', 'torch_compile.json']
  for name in expected:
    assert f'device_check/{name}' in device_check
  timings = _part_output(device_check, 'timings')
  assert [line.split()[0] for line in timings.splitlines()] == [
      'environment', 'train_step', 'full_run', 'full_run_warm',
      'compare_pytorch', 'conv_variants', 'loop_variants', 'divergence_guard',
      'layers', 'profile', 'torch_compile']
  assert all(line.endswith('exit status 0') for line in timings.splitlines())


@pytest.mark.slow
def test_device_check_times_the_full_run_cold_and_warm(device_check):
  for name, cache in (('full_run', 'cold'), ('full_run_warm', 'warm')):
    run = _part_json(device_check, name)
    assert run['compilation_cache'] == cache
    assert run['steps'] == 2 and run['epochs'] == 1
    assert run['wall_seconds'] > 0 and 'fcd' in run['final']
    parts = run['breakdown']
    assert parts['first_epoch_seconds'] > 0
    assert parts['eval_host_seconds'] > 0
    assert parts['later_epochs_seconds'] == 0  # One epoch only.
    assert parts['later_epochs_steps_per_sec'] is None
    # The final evaluation and writes come after the epoch.
    assert parts['between_epochs_seconds'] > 0
    assert parts['start_up_and_exit_seconds'] > 0
    assert (parts['start_up_and_exit_seconds']
            + parts['first_epoch_seconds']
            + parts['between_epochs_seconds']) == pytest.approx(
                run['wall_seconds'])


@pytest.mark.slow
def test_train_step_benchmark_reports_rates_and_flops(device_check):
  stdout = _part_output(device_check, 'train_step')
  assert 'GFLOP/step' in stdout and 'matmul/s' in stdout
  report = _part_json(device_check, 'train_step')
  assert report['matmul_flops_per_sec'] > 1e8
  results = report['results']
  assert [(r['batch_size'], r['data']) for r in results] == [
      (8, 'synthetic'), (8, 'mnist')]
  for result in results:
    for mode in ('step', 'fused'):
      assert result[mode]['steps_per_sec'] > 0
      assert result[mode]['trials'] == 2
      assert (result[mode]['steps_per_sec_min']
              <= result[mode]['steps_per_sec']
              <= result[mode]['steps_per_sec_max'])
      assert 0 < result[mode]['fraction_of_matmul_rate'] < 2
    assert result['fused']['steps_per_call'] == 3
  result = results[0]
  # The analytic count (non-zero products only, about 15 GFLOP at batch 64)
  # and XLA's agree to within 25%: on CPU the im2col transposed convolution
  # also multiplies the zeros of its phase matrix, 11% of the step.
  analytic, xla = result['flops_per_step_analytic'], result['flops_per_step_xla']
  assert analytic == pytest.approx(14.89e9 * 8 / 64, rel=0.01)
  assert xla == pytest.approx(analytic, rel=0.25)
  # The contractions carry nearly all of XLA's FLOPs (the rest: BatchNorm,
  # activations, Adam).
  alone = result['contractions_alone']
  assert 0.9 * xla < alone['flops_per_step'] <= xla
  assert alone['steps_per_sec'] == pytest.approx(
      1 / alone['seconds_per_step'])
  assert sum(op['count'] * op['ms'] for op in alone['operations']) == (
      pytest.approx(alone['seconds_per_step'] * 1e3))
  # D's second convolution as patches x kernel: forward on the real batch,
  # the generated batch in D's update and again in G's.
  (forward,) = [op for op in alone['operations']
                if op['shapes'] == [[8, 7, 7, 1600], [1600, 128]]]
  assert forward['count'] == 3
  assert forward['gflop'] == pytest.approx(2 * 8 * 49 * 1600 * 128 / 1e9)


@pytest.mark.slow
def test_train_step_benchmark_measures_each_setting(device_check):
  report = _part_json(device_check, 'conv_variants')
  settings = [(r['conv_kernel_grad'], r['compute_dtype'])
              for r in report['results']]
  assert settings == [('xla', 'float32'), ('xla', 'bfloat16'),
                      ('im2col', 'float32'), ('im2col', 'bfloat16')]
  for result in report['results']:
    assert result['fused']['steps_per_sec'] > 0
    assert result['contractions_alone'] is None
    # The unoptimised program's count: XLA:CPU keeps its convolutions and
    # dots, so both counts see the same work.
    assert result['flops_per_step_xla_unoptimized'] == pytest.approx(
        result['flops_per_step_xla'], rel=0.1)
  # im2col also multiplies the transposed convolution's phase-matrix zeros.
  flops = {r['conv_kernel_grad']: r['flops_per_step_xla_unoptimized']
           for r in report['results']}
  assert flops['im2col'] > flops['xla']
  assert 'im2col bfloat16' in ' '.join(
      _part_output(device_check, 'conv_variants').split())


@pytest.mark.slow
def test_loop_variants_run_each_in_a_process_of_its_own(device_check):
  report = _part_json(device_check, 'loop_variants')
  rows = report['variants']
  # The default brackets the variants, to show the machine's drift.
  assert [r['name'] for r in rows] == ['default', 'unroll_2_loop_graphs',
                                       'default']
  variant = rows[1]
  assert variant['unroll'] == 2
  assert variant['xla_flags'] == (
      '--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL')
  for row in rows:
    assert 'error' not in row, row
    assert row['steps_per_sec'] > 0 and row['compile_seconds'] > 0
    assert len(row['steps_per_sec_trials']) == report['trials'] == 1
    assert row['finite']
    assert row['over_default'] == pytest.approx(
        row['steps_per_sec'] / report['default_steps_per_sec'])
  # The same program computes the same bits in every process. Another
  # program may round differently (on XLA:CPU, the two-step call unrolled
  # twice does), which the report says rather than hides.
  assert report['default_runs_agree']
  assert rows[0]['states_sha256'] == rows[2]['states_sha256']
  assert variant['same_states_as_default'] == (
      variant['states_sha256'] == rows[0]['states_sha256'])
  assert 'x steps/s' in _part_output(device_check, 'loop_variants')


def test_loop_variants_parse_report_and_fail_per_variant():
  variants = _benchmark_module('loop_variants')
  assert variants.parse_variant('a:2:--x=1 --y=a:b') == (
      'a', 2, '--x=1 --y=a:b')
  assert variants.parse_variant('plain:1:') == ('plain', 1, '')
  for bad in ('a:0:', 'a:two:', ':1:', 'a:1'):
    with pytest.raises(ValueError, match='NAME:UNROLL:XLA_FLAGS'):
      variants.parse_variant(bad)
  rows = [
      {'name': 'default', 'steps_per_sec': 10.0, 'compile_seconds': 2.0,
       'states_sha256': 'aa'},
      {'name': 'fast', 'steps_per_sec': 15.0, 'compile_seconds': 3.0,
       'states_sha256': 'bb'},
      {'name': 'broken', 'error': 'exit status 1: bad flag'},
      {'name': 'default', 'steps_per_sec': 12.0, 'compile_seconds': 4.0,
       'states_sha256': 'aa'}]
  summary = variants.summarise(rows)
  assert summary == {'default_steps_per_sec': 11.0,
                     'default_runs_agree': True}
  assert rows[1]['over_default'] == pytest.approx(15 / 11)
  assert rows[1]['compile_over_default'] == pytest.approx(1.5)
  assert not rows[1]['same_states_as_default']
  assert 'over_default' not in rows[2]
  assert variants.summarise([rows[2]]) == {}
  # A flag this XLA does not know fails its own process, reported, and
  # nothing else.
  args = types.SimpleNamespace(batch_size=8, fused_steps=1, trials=1,
                               device=None, timeout=300)
  row = variants.run_variant('bogus', 1, '--xla_no_such_flag=1', args)
  assert row['name'] == 'bogus' and 'steps_per_sec' not in row
  assert 'xla_no_such_flag' in row['error']


@pytest.mark.slow
def test_compare_pytorch_runs_with_or_without_torch(device_check):
  stdout = _part_output(device_check, 'compare_pytorch')
  if importlib.util.find_spec('torch') is None:
    for part in ('compare_pytorch', 'torch_compile'):
      assert 'PyTorch is not installed' in _part_output(device_check, part)
      assert f'device_check/{part}.json' not in device_check
    return
  report = _part_json(device_check, 'compare_pytorch')
  # torch.compile runs in a part of its own, the check's last.
  assert 'compile_steps_per_sec' not in report['pytorch']
  assert 'compile_error' not in report['pytorch']
  compiled = _part_json(device_check, 'torch_compile')['pytorch']
  assert compiled.get('compile_steps_per_sec', 0) > 0 or (
      compiled['compile_error'])
  assert report['pytorch']['eager_steps_per_sec'] > 0
  assert report['ratio_jaxgan_over_eager'] > 0
  assert 'jaxgan (best) / PyTorch eager' in stdout
  assert report['jaxgan']['contractions_alone_steps_per_sec'] > 0
  assert report['ratio_contractions_alone_over_eager'] == pytest.approx(
      report['jaxgan']['contractions_alone_steps_per_sec']
      / report['pytorch']['eager_steps_per_sec'])
  # The check asks for the mixed-precision pair as well (--bfloat16).
  assert 'bfloat16: jaxgan train_loop' in stdout
  assert report['ratio_bfloat16_jaxgan_over_eager'] == pytest.approx(
      report['jaxgan']['fused_bfloat16_steps_per_sec']
      / report['pytorch']['eager_bfloat16_steps_per_sec'])
  assert len(report['pytorch']['trials_eager_bfloat16']) == report['trials']


@pytest.mark.slow
def test_divergence_guard_benchmark_compares_each_guard_with_none(
    device_check):
  stdout = _part_output(device_check, 'divergence_guard')
  assert 'freeze / unguarded' in stdout and 'detect / unguarded' in stdout
  report = _part_json(device_check, 'divergence_guard')
  checks, selects = report['finiteness_checks'], report['selects']
  assert checks['unguarded'] == 0
  assert checks['freeze'] == checks['detect'] > 0
  assert selects['freeze'] > selects['detect'] == selects['unguarded']
  assert set(report['steps_per_sec']) == {'freeze', 'detect', 'unguarded'}
  assert report['freeze_over_unguarded'] > 0
  assert report['detect_over_unguarded'] > 0


@pytest.mark.slow
def test_layer_benchmark_times_every_implementation(device_check):
  assert 'im2col' in _part_output(device_check, 'layers')
  report = _part_json(device_check, 'layers')
  assert len(report['layers']) == 4
  for row in report['layers']:
    for impl in ('flax', 'matmul_grad', 'im2col', 'winograd'):
      for mode in ('plain', 'scan'):
        assert row[f'{impl}_{mode}_ms'] > 0


@pytest.mark.slow
def test_profile_benchmark_traces_the_fused_loop(device_check):
  assert 'µs per step' in _part_output(device_check, 'profile')
  report = _part_json(device_check, 'profile')
  assert report['wall_us_per_step_untraced'] > 0
  assert (report['compute_dtype'], report['conv_kernel_grad']) == (
      'float32', 'auto')
  # Written where the check's --trace_dir (a folder named trace) says.
  assert f'{os.sep}trace{os.sep}' in report['trace']
  assert report['trace'].endswith('.trace.json.gz')
  busiest = report['timelines'][0]
  assert busiest['busy_us_per_step'] > 0 and busiest['operations']


def test_train_step_benchmark_refuses_unknown_settings():
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'train_step.py'),
       '--conv_kernel_grad=cudnn'], capture_output=True, text=True,
      timeout=300, cwd=REPO)
  assert result.returncode == 2
  assert 'conv_kernel_grad must be one of' in result.stderr


def test_profile_summary_sums_each_timeline():
  profile_step = _benchmark_module('profile_step')
  meta = lambda kind, pid, tid, name: {'ph': 'M', 'name': kind, 'pid': pid,
                                       'tid': tid, 'args': {'name': name}}
  event = lambda pid, name, ts, dur: {'ph': 'X', 'pid': pid, 'tid': 0,
                                      'name': name, 'ts': ts, 'dur': dur}
  trace = {'traceEvents': [
      meta('process_name', 1, 0, '/device:GPU:0'),
      meta('thread_name', 1, 0, 'Stream #1'),
      meta('process_name', 2, 0, '/host:CPU'),
      # Two steps on the device: a conv overlapping a fusion, and a gap.
      event(1, 'conv', 0, 30), event(1, 'fusion', 20, 20),
      event(1, 'conv', 100, 30), event(1, 'fusion', 120, 20),
      event(2, 'launch', 0, 5),
      {'ph': 'i', 'pid': 1, 'tid': 0, 'name': 'marker', 'ts': 3},
  ]}
  device, host = profile_step.summarise_trace(trace, steps=2, top=1)
  assert device['timeline'] == '/device:GPU:0 / Stream #1'
  assert device['busy_us_per_step'] == 40  # The union: 0-40 and 100-140.
  assert device['events_per_step'] == 2
  assert device['operations'] == [
      {'name': 'conv', 'us_per_step': 30, 'calls_per_step': 1}]
  assert host['busy_us_per_step'] == 2.5


def test_step_contractions_counts_nested_and_repeated_operations():
  bench = _benchmark_module('train_step')
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def fn(a, b, images, kernel):
    def body(carry, _):
      return carry @ b, None
    looped, _ = jax.lax.scan(body, a, None, length=3)
    conv = jax.lax.conv_general_dilated(
        images, kernel, (2, 2), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jax.jit(lambda x: x @ b)(looped), conv

  args = (jnp.ones((4, 5)), jnp.ones((5, 5)), jnp.ones((2, 8, 8, 3)),
          jnp.ones((3, 3, 3, 6)))
  found = bench.step_contractions(jax.make_jaxpr(fn)(*args).jaxpr)
  counts = sorted((primitive.name, [list(a.shape) for a in avals], count)
                  for primitive, avals, _, count in found.values())
  assert counts == [
      ('conv_general_dilated', [[2, 8, 8, 3], [3, 3, 3, 6]], 1),
      ('dot_general', [[4, 5], [5, 5]], 4)]
  for primitive, avals, params, _ in found.values():
    flops = bench._contraction_flops(primitive, avals, params)
    if primitive.name == 'dot_general':
      assert flops == 2 * 4 * 5 * 5
    else:  # [2, 4, 4, 6] outputs, 3 * 3 * 3 multiply-adds each.
      assert flops == 2 * (2 * 4 * 4 * 6) * 27
    assert bench._contraction_timer(primitive, avals, params,
                                    jax.devices()[0])() > 0


def test_train_step_benchmark_rejects_bad_flags():
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'train_step.py'),
       '--batch_sizes=64,x'], capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert 'comma-separated integers' in result.stderr


def test_matmul_forms_benchmark_times_every_form_and_dtype(tmp_path):
  out = tmp_path / 'forms.json'
  stdout = _run('matmul_forms.py', '--shapes=48x40x24,16x8x32', '--trials=2',
                '--repeats=1', f'--json={out}')
  assert 'bfloat16_f32_accumulation' in stdout
  rows = json.loads(out.read_text())['results']
  assert {(r['m'], r['k'], r['n'], r['form'], r['dtype']) for r in rows} == {
      (*shape, form, dtype) for shape in ((48, 40, 24), (16, 8, 32))
      for form in ('NN', 'NT', 'TN')
      for dtype in ('float32', 'bfloat16_f32_accumulation',
                    'bfloat16_result')}
  for row in rows:
    assert len(row['gflops_per_sec_trials']) == 2
    assert row['gflops_per_sec'] > 0


def test_matmul_forms_products_agree_with_numpy():
  forms = _benchmark_module('matmul_forms')
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  for form, expected in (('NN', lambda a, b: a @ b),
                         ('NT', lambda a, b: a @ b.T),
                         ('TN', lambda a, b: a.T @ b)):
    a, b = forms.operands(form, 6, 5, 4, jnp.float32)
    result = forms.product(form, jnp.float32)(a, b)
    assert result.shape == {'NN': (6, 4), 'NT': (6, 5), 'TN': (5, 4)}[form]
    np.testing.assert_allclose(result, expected(np.asarray(a), np.asarray(b)),
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='MxKxN'):
    forms.parse_shapes('3136x1600')


@pytest.mark.slow
def test_scaling_benchmark_on_two_simulated_devices(tmp_path):
  out = tmp_path / 'scaling.json'
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'scaling.py'),
       '--devices=1,2', '--per_device_batch=8', '--steps=2', '--trials=2',
       '--dataset_size=256', f'--json={out}'],
      capture_output=True, text=True, timeout=600, cwd=REPO,
      env={**os.environ,
           'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert result.returncode == 0, result.stderr
  assert 'efficiency' in result.stdout
  report = json.loads(out.read_text())
  assert report['device_count'] == 2
  rows = report['results']
  assert [(r['devices'], r['global_batch']) for r in rows] == [(1, 8), (2, 16)]
  assert all(r['steps_per_sec'] > 0 and r['trials'] == 2 for r in rows)
  assert rows[0]['efficiency'] == pytest.approx(1.0)
  assert rows[1]['images_per_sec'] == pytest.approx(
      rows[1]['steps_per_sec'] * 16)


def test_epoch_gaps_benchmark_times_every_boundary(tmp_path,
                                                  mnist_data_dir):
  out = tmp_path / 'gaps.json'
  stdout = _run('epoch_gaps.py', f'--json={out}', '--',
                f'--workdir={tmp_path / "run"}', f'--data_dir={mnist_data_dir}',
                '--steps_per_epoch=2', '--num_epochs=3', '--eval_samples=500')
  assert 'host time at each epoch boundary' in stdout
  report = json.loads(out.read_text())
  assert len(report['gaps_ms']) == 2  # Three epochs, two boundaries.
  assert all(gap > 0 for gap in report['gaps_ms'])
  assert report['first_gap_ms'] == report['gaps_ms'][0]
  assert report['later_gaps_median_ms'] == report['gaps_ms'][1]


def test_device_check_runs_only_the_parts_named(tmp_path):
  def check(parts):
    return subprocess.run(
        ['bash', os.path.join(REPO, 'benchmarks', 'device_check.sh')],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, 'DEVICE_CHECK_QUICK': '1', 'OUT': str(tmp_path),
             'DEVICE_CHECK_PARTS': parts, 'PYTHON': sys.executable})

  result = check('environment')
  assert result.returncode == 0, result.stderr
  with tarfile.open(tmp_path / 'device_check.tar.gz') as archive:
    assert sorted(archive.getnames()) == [
        'device_check', 'device_check/environment.txt',
        'device_check/timings.txt']
  # Each archive is written beside the last one, then renamed over it.
  assert not (tmp_path / 'device_check.tar.gz.partial').exists()
  result = check('environment,trainstep')
  assert result.returncode == 1
  assert "no part named 'trainstep'" in result.stderr


def test_offline_bundle_resolves_the_reading_path_without_tensorflow():
  offline_bundle = _benchmark_module('offline_bundle')
  needed = offline_bundle.closure(offline_bundle.ROOTS, '3.12')
  for name in ('tensorflow-datasets', 'array-record', 'tensorboardx',
               'promise', 'etils', 'numpy'):
    assert name in needed, name
  # Preparing MNIST needs TensorFlow; reading it back does not.
  assert not any(name.startswith('tensorflow-cpu') or name == 'tensorflow'
                 for name in needed)
  assert needed['tensorflow-datasets'] == importlib.metadata.version(
      'tensorflow-datasets')


def test_offline_bundle_downloads_for_the_target_python():
  offline_bundle = _benchmark_module('offline_bundle')
  command = offline_bundle.download_command('dm-tree==0.1.10', '3.12', 'WHL')
  assert command[-3:] == ['-d', 'WHL', 'dm-tree==0.1.10']
  assert command[command.index('--python-version') + 1] == '3.12'
  platforms = [command[i + 1] for i, arg in enumerate(command)
               if arg == '--platform']
  assert platforms == list(offline_bundle.PLATFORMS)
