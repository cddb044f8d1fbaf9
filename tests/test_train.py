"""End-to-end training on real Fashion-MNIST: outputs, resume, refusals, non-finite handling, no-TF core."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import smoke
from normjax import checkpoint, errors, metrics_io, train

TIMING_KEYS = {'images_per_sec'}


@pytest.fixture
def config(tfds_dir, shared_data_dir):
  c = smoke.get_config()
  c.data.tfds_dir = str(tfds_dir)
  c.data.source = str(shared_data_dir)
  c.data.train_subset = 320
  c.train.batch_size = 32
  c.train.num_epochs = 2
  c.train.log_every_steps = 4
  c.train.monitor_every_steps = 5
  c.train.checkpoint_every_steps = 6
  return c


def records(workdir, kind=None):
  return [r for r in metrics_io.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl') if kind in (None, r['kind'])]


def latest_params(workdir):
  step, restored = checkpoint.restore_latest(workdir)
  return step, restored['params']


def test_train_writes_summary_metrics_and_checkpoints(config, tmp_path):
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == 20 and summary['epochs'] == 2.0
  assert summary['num_params'] == 6218  # study section 4
  assert 0.0 <= summary['test_accuracy'] <= 1.0 and summary['test_accuracy'] > 0.2  # 10 classes: chance 0.1
  on_disk = json.loads((tmp_path / 'summary.json').read_text())
  for key in ('final_val_accuracy', 'best_val_accuracy', 'test_accuracy', 'epochs', 'wall_time_s',
              'images_per_sec', 'device_kind', 'config', 'grad_norm_first', 'grad_norm_last'):
    assert on_disk[key] is not None, key
  assert on_disk['config']['model']['name'] == 'lightcnn'
  kinds = [r['kind'] for r in records(tmp_path)]
  assert kinds.count('val') == 2 and kinds.count('test') == 1 and kinds.count('layers') == 4
  train_records = records(tmp_path, 'train')
  assert [r['step'] for r in train_records] == [4, 8, 10, 12, 16, 20]  # every 4 steps and at epoch ends
  for r in train_records:
    assert {'loss', 'accuracy', 'grad_norm', 'grad_norm_clipped', 'clip_fired', 'param_norm',
            'update_norm', 'lr', 'images_per_sec'} <= set(r)
  layers = records(tmp_path, 'layers')[0]
  assert 'grad_norm/backbone/features_0' in layers and 'update_ratio/head/out' in layers
  assert (tmp_path / 'config.json').exists()
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()) == [18, 20]


def test_rerun_of_finished_run_returns_its_summary(config, tmp_path):
  first = train.train_and_evaluate(config, str(tmp_path))
  n = len(records(tmp_path))
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again['test_accuracy'] == first['test_accuracy']
  assert len(records(tmp_path)) == n


def test_resume_continues_to_more_epochs_exactly(config, tmp_path):
  config.train.num_epochs = 1
  train.train_and_evaluate(config, str(tmp_path / 'a'))
  config.train.num_epochs = 2
  resumed = train.train_and_evaluate(config, str(tmp_path / 'a'))
  straight = train.train_and_evaluate(config, str(tmp_path / 'b'))
  _, pa = latest_params(tmp_path / 'a')
  _, pb = latest_params(tmp_path / 'b')
  for a, b in zip(_leaves(pa), _leaves(pb)):
    np.testing.assert_array_equal(a, b)
  assert resumed['test_accuracy'] == straight['test_accuracy']


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_different_config_in_same_workdir_is_refused(config, tmp_path):
  config.train.max_steps = 3
  train.train_and_evaluate(config, str(tmp_path))
  config.optim.lr = 0.5
  with pytest.raises(errors.CheckpointError, match=r'different config \(optim.lr: 0.003 -> 0.5\)'):
    train.train_and_evaluate(config, str(tmp_path))
  config.train.overwrite = True
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['config']['optim']['lr'] == 0.5


def test_corrupted_checkpoint_is_an_error_not_a_fresh_start(config, tmp_path):
  config.train.max_steps = 6
  config.train.num_epochs = 2
  train.train_and_evaluate(config, str(tmp_path))
  step_dir = tmp_path / 'checkpoints' / '6'
  for f in step_dir.rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')
  config.train.max_steps = 12
  with pytest.raises(errors.CheckpointError, match=r'no checkpoint in .*/checkpoints can be restored \(step 6: '):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['6']  # nothing moved aside


def test_nonfinite_stop_names_step_and_keeps_last_good_checkpoint(config, tmp_path):
  config.optim.name = 'sgd'
  config.optim.momentum = 0.0
  config.optim.lr = 1e30  # diverges within a few steps
  config.train.checkpoint_every_steps = 1
  config.train.log_every_steps = 1
  with pytest.raises(errors.NonFiniteError, match=r'non-finite loss or gradient at step \d+') as e:
    train.train_and_evaluate(config, str(tmp_path))
  bad = int(str(e.value).split('at step ')[1].split()[0])
  step, params = latest_params(tmp_path)
  assert step < bad
  assert all(np.isfinite(x).all() for x in _leaves(params))


def test_nonfinite_skip_keeps_weights_finite(config, tmp_path):
  config.optim.name = 'sgd'
  config.optim.momentum = 0.0
  config.optim.lr = 1e30
  config.train.on_nonfinite = 'skip'
  config.train.max_skipped_fraction = 0.9  # 7 of the 8 steps are skipped
  config.train.max_steps = 8
  train.train_and_evaluate(config, str(tmp_path))
  _, params = latest_params(tmp_path)
  assert all(np.isfinite(x).all() for x in _leaves(params))
  assert max(r['nonfinite'] for r in records(tmp_path, 'train')) > 0


def _main_cmd(workdir, tfds_dir, *extra):
  return [sys.executable, '-m', 'normjax.main', '--config=configs/smoke.py', f'--workdir={workdir}',
          f'--config.data.tfds_dir={tfds_dir}', '--config.data.train_subset=320',
          '--config.train.batch_size=32', '--config.train.log_every_steps=1', *extra]


def test_core_trains_with_tensorflow_blocked(tmp_path, tfds_dir, shared_data_dir, tf_blocker):
  blocker = tf_blocker
  env = {**os.environ, 'PYTHONPATH': f'{blocker}{os.pathsep}{os.environ.get("PYTHONPATH", "")}',
         'JAX_PLATFORMS': 'cpu', 'NORMJAX_DATA_DIR': str(shared_data_dir)}
  probe = subprocess.run([sys.executable, '-c', 'import tensorflow'], env=env, capture_output=True, text=True)
  assert "No module named 'tensorflow'" in probe.stderr
  result = subprocess.run(_main_cmd(tmp_path / 'run', tfds_dir, '--config.train.max_steps=5'),
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert summary['steps'] == 5 and 'tensorflow' not in ' '.join(os.listdir(tmp_path / 'run'))


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path, tfds_dir, shared_data_dir):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'NORMJAX_DATA_DIR': str(shared_data_dir)}
  cmd = _main_cmd(tmp_path, tfds_dir, '--config.train.num_epochs=200', '--config.train.checkpoint_every_steps=100000')
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for_step(tmp_path, 3, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert 'checkpoint saved' in stderr
  step, _ = latest_params(tmp_path)
  assert step >= 3 and step == max(r['step'] for r in records(tmp_path, 'train'))  # saved at the signal's step


def _wait_for_step(workdir, step, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    if any(r['kind'] == 'train' and r['step'] >= step for r in records(workdir)):
      return
    time.sleep(0.05)
  raise TimeoutError(f'run did not reach step {step}')


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, tfds_dir, shared_data_dir):
  """Issue 5: kill a real run with SIGKILL mid-epoch, resume, compare with an uninterrupted run."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'NORMJAX_DATA_DIR': str(shared_data_dir)}
  common = ['--config.train.num_epochs=3', '--config.train.checkpoint_every_steps=4',
            '--config.train.monitor_every_steps=3', '--config.data.augment=true']
  straight = subprocess.run(_main_cmd(tmp_path / 'straight', tfds_dir, *common), env=env,
                            capture_output=True, text=True, timeout=300)
  assert straight.returncode == 0, straight.stderr[-3000:]
  proc = subprocess.Popen(_main_cmd(tmp_path / 'killed', tfds_dir, *common), env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for_step(tmp_path / 'killed', 15, proc)  # epoch 2 of 3 (10 steps per epoch)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(r['step'] for r in records(tmp_path / 'killed'))
  assert 0 < killed_at < 30
  resumed = subprocess.run(_main_cmd(tmp_path / 'killed', tfds_dir, *common), env=env,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from' in resumed.stderr
  sa, pa = latest_params(tmp_path / 'straight')
  sb, pb = latest_params(tmp_path / 'killed')
  assert sa == sb == 30
  for a, b in zip(_leaves(pa), _leaves(pb)):
    np.testing.assert_array_equal(a, b)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]
  assert strip(records(tmp_path / 'straight')) == strip(records(tmp_path / 'killed'))



def test_tensorboard_events_mirror_metrics_jsonl(config, tmp_path):
  """With TensorFlow installed (the test extra), clu's writer records the same scalars."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  config.train.max_steps = 8
  train.train_and_evaluate(config, str(tmp_path))
  events = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'), size_guidance={'tensors': 0})
  events.Reload()
  logged = {r['step']: r['loss'] for r in records(tmp_path, 'train')}
  from_tb = {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors('train/loss')}
  assert from_tb.keys() == logged.keys()
  for step, loss in logged.items():
    assert abs(from_tb[step] - loss) < 1e-6
  assert any(tag.startswith('layers/grad_norm') for tag in events.Tags()['tensors'])


def test_self_pretrained_backbone_from_a_normjax_workdir(config, tmp_path):
  config.train.max_steps = 6
  train.train_and_evaluate(config, str(tmp_path / 'source'))
  _, source = checkpoint.restore_latest(tmp_path / 'source')
  config.model.pretrained = str(tmp_path / 'source')
  config.optim.trainable_blocks = 0  # frozen backbone: it must stay exactly the source's
  train.train_and_evaluate(config, str(tmp_path / 'finetune'))
  _, tuned = checkpoint.restore_latest(tmp_path / 'finetune')
  for a, b in zip(_leaves(source['params']['backbone']), _leaves(tuned['params']['backbone'])):
    np.testing.assert_array_equal(a, b)
  assert any(np.any(a != b) for a, b in zip(_leaves(source['params']['head']), _leaves(tuned['params']['head'])))


def test_eta_leaves_compilation_out_and_counts_evaluation():
  t = train._Throughput(0, 10)
  t.first_window = False
  t.counted_images, t.counted_seconds = 1000, 10.0  # steady 100 img/s
  # The current window (compilation: 5 img/s) is ignored once a steady rate exists.
  assert t.eta(500, 5.0, 0, 0, None) == pytest.approx(5.0)
  # Two evaluations left, one timed at 3 s: 5 s of training + 6 s of evaluation.
  assert t.eta(500, 5.0, 2, 1000, 3.0) == pytest.approx(11.0)
  # Not yet timed: 1000 images at a third of the training cost each, i.e. 300 img/s.
  assert t.eta(500, 5.0, 2, 1000, None) == pytest.approx(5.0 + 2 * 1000 / 300)
  fresh = train._Throughput(0, 10)  # no steady rate yet: the window's rate stands in
  assert fresh.eta(100, 50.0, 0, 0, None) == pytest.approx(2.0)


def test_wall_time_sums_the_processes_that_trained_the_run(config, tmp_path):
  config.train.num_epochs = 1
  train.train_and_evaluate(config, str(tmp_path))
  times = json.loads((tmp_path / 'wall_time.json').read_text())
  assert sorted(times, key=int) == ['0', '6', '10'] and 0 < times['6'] < times['10']
  times['10'] = 1000.0  # as if the first process had trained for 1000 s
  (tmp_path / 'wall_time.json').write_text(json.dumps(times))
  config.train.num_epochs = 2
  start = time.time()
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert 1000.0 < summary['wall_time_s'] < 1000.0 + time.time() - start
  assert json.loads((tmp_path / 'wall_time.json').read_text())['20'] > 1000.0
