"""Run logs: the CSV, JSON lines and TensorBoard events hold what was logged."""

import glob
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
from PIL import Image
from tensorboardX.proto.event_pb2 import Event

from jaxgan.logging_utils import RunLogger


def _events(logdir):
  """Every event of the TensorBoard files in `logdir`, in order."""
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents*'))):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack_from('<Q', data, offset)
      offset += 12  # The length and its checksum.
      events.append(Event.FromString(data[offset:offset + length]))
      offset += length + 4  # The record and its checksum.
  return events


def test_logs_every_step_epoch_and_picture(tmp_path):
  logger = RunLogger(str(tmp_path))
  metrics = {'d_loss': np.array([0.5, 0.25, 0.125], np.float32),
             'g_loss': np.array([2.0, 1.5, np.nan], np.float32)}
  logger.log_steps('train', 10, metrics)
  logger.log_epoch({'phase': 'train', 'epoch': 1, 'step': 13,
                    'd_loss': 0.3, 'steps_per_sec': 42.0, 'note': 'text'})
  picture = np.arange(6 * 4, dtype=np.uint8).reshape(6, 4, 1)
  logger.log_image('samples', picture, 13)
  logger.close()

  steps = RunLogger(str(tmp_path), enabled=False).read_steps('train')
  np.testing.assert_array_equal(steps['step'], [11, 12, 13])
  np.testing.assert_allclose(steps['d_loss'], [0.5, 0.25, 0.125])
  np.testing.assert_allclose(steps['g_loss'], [2.0, 1.5, np.nan])
  assert np.isnan(steps['d_penalty']).all()  # Not logged: empty cells.
  (record,) = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert record['steps_per_sec'] == 42.0 and record['note'] == 'text'

  scalars, images = {}, {}
  for event in _events(tmp_path / 'tensorboard'):
    for value in event.summary.value:
      if value.HasField('image'):
        images[value.tag, event.step] = value.image
      else:
        scalars[value.tag, event.step] = value.simple_value
  assert scalars == {
      ('train/d_loss', 11): 0.5, ('train/d_loss', 12): 0.25,
      ('train/d_loss', 13): 0.125, ('train/g_loss', 11): 2.0,
      ('train/g_loss', 12): 1.5, ('train/g_loss', 13): scalars[
          'train/g_loss', 13],
      ('train_epoch/d_loss', 1): np.float32(0.3),
      ('train_epoch/steps_per_sec', 1): 42.0}
  assert np.isnan(scalars['train/g_loss', 13])
  (image,) = images.values()
  assert (image.height, image.width) == (6, 4)
  decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
  np.testing.assert_array_equal(decoded[..., 0], picture[..., 0])
  assert list(images) == [('samples', 13)]


def test_step_events_reach_the_disk_with_their_csv_rows(tmp_path):
  """A run killed between epochs (no close, no epoch record) keeps the
  TensorBoard events of every step its CSV holds."""
  logger = RunLogger(str(tmp_path))
  logger.log_steps('train', 0, {'d_loss': np.array([0.5, 0.25], np.float32)})
  # Read while the writer is still open, as after a SIGKILL.
  steps = sorted(event.step for event in _events(tmp_path / 'tensorboard')
                 if event.summary.value)
  assert steps == [1, 2]
  logger.close()


def test_reading_up_to_a_size_ignores_rows_appended_later(tmp_path):
  logger = RunLogger(str(tmp_path))
  logger.log_steps('train', 0, {'d_loss': np.array([1.0, 2.0], np.float32)})
  logged = os.path.getsize(logger.steps_path)
  logger.log_steps('train', 2, {'d_loss': np.array([3.0], np.float32)})
  with open(logger.steps_path, 'a') as f:
    f.write('train,4,0.')  # A row still being written.
  steps = logger.read_steps('train', upto=logged)
  np.testing.assert_array_equal(steps['step'], [1, 2])
  np.testing.assert_array_equal(steps['d_loss'], [1.0, 2.0])
  assert len(logger.read_steps('train', upto=None)['step']) == 4
  logger.close()


def test_tensorboard_logging_does_not_load_pytorch(tmp_path):
  """tensorboardX would import torch (seconds at start-up); the logger keeps
  it out, and torch still imports afterwards where it is installed."""
  code = f'''
import importlib.util, sys
import numpy as np
from jaxgan.logging_utils import RunLogger
logger = RunLogger({str(tmp_path)!r})
logger.log_steps('train', 0, {{'d_loss': np.ones(2, np.float32)}})
logger.log_image('samples', np.zeros((4, 4, 1), np.uint8), 1)
logger.close()
assert 'torch' not in sys.modules, 'torch was imported'
if importlib.util.find_spec('torch') is not None:
  import torch
  assert torch.zeros(1).shape == (1,)
print('ok')
'''
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'ok'
  assert len(_events(str(tmp_path / 'tensorboard'))) >= 2
