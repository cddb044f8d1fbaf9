"""Data parallelism: N steps on 4 devices (and on 2 processes) equal N steps on 1 device, BN included."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from normjax import checkpoint

# LightCNN with a BatchNorm MLP head: BN statistics must be over the global batch, across devices.
OVERRIDES = ['--config.model.head=mlp', '--config.model.head_norm=bn', '--config.model.head_hidden=32',
             '--config.model.dropout=0.0', '--config.data.augment=true', '--config.data.train_subset=256',
             '--config.train.batch_size=32', '--config.train.eval_batch_size=64', '--config.train.max_steps=6',
             '--config.train.log_every_steps=2', '--config.train.monitor_every_steps=3',
             '--config.optim.clip=global_norm',
             # SGD, not Adam: fc1's bias feeds BN, so its true gradient is 0 and Adam would turn
             # float noise (which differs with the reduction order) into full +-lr steps.
             '--config.optim.name=sgd', '--config.optim.lr=0.05', '--config.optim.backbone_lr=0.05']


def _run(workdir, tfds_dir, data_dir, devices: int, extra=(), wait=True):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'NORMJAX_DATA_DIR': str(data_dir),
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  cmd = [sys.executable, '-m', 'normjax.main', '--config=configs/smoke.py', f'--workdir={workdir}',
         f'--config.data.tfds_dir={tfds_dir}', *OVERRIDES, *extra]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if wait:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
  return proc


def _final(workdir):
  _, restored = checkpoint.restore_latest(workdir)
  return {k: [np.asarray(x) for x in jax.tree.leaves(restored[k])] for k in ('params', 'batch_stats')}


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.fixture(scope='module')
def one_device(tmp_path_factory, tfds_dir, shared_data_dir):
  workdir = tmp_path_factory.mktemp('one_device')
  _run(workdir, tfds_dir, shared_data_dir, devices=1)
  return _final(workdir)


def test_four_devices_equal_one_device(one_device, tmp_path, tfds_dir, shared_data_dir):
  _run(tmp_path, tfds_dir, shared_data_dir, devices=4)
  four = _final(tmp_path)
  assert len(four['batch_stats']) > 0  # BN statistics are part of the comparison
  for key in ('params', 'batch_stats'):
    diff = _max_abs_diff(one_device[key], four[key])
    print(f'4 devices vs 1: max |diff| {key} = {diff:.3g}')
    assert diff < 2e-5, (key, diff)


def test_global_batch_must_divide_devices(tmp_path, tfds_dir, shared_data_dir):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'NORMJAX_DATA_DIR': str(shared_data_dir),
         'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  result = subprocess.run([sys.executable, '-m', 'normjax.main', '--config=configs/smoke.py',
                           f'--workdir={tmp_path}', '--config.train.batch_size=30'],
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert 'config.train.batch_size = 30 must be divisible by the 4 devices' in result.stderr


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(one_device, tmp_path, tfds_dir, shared_data_dir):
  """Two jax.distributed processes on 127.0.0.1 (gloo CPU collectives), one device each."""
  address = f'127.0.0.1:{_free_port()}'
  procs = [_run(tmp_path, tfds_dir, shared_data_dir, devices=1, wait=False,
                extra=[f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}'])
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
  two = _final(tmp_path)
  for key in ('params', 'batch_stats'):
    diff = _max_abs_diff(one_device[key], two[key])
    print(f'2 processes vs 1: max |diff| {key} = {diff:.3g}')
    assert diff < 2e-5, (key, diff)
  # Only process 0 writes metrics: one record per log step, not two.
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert sum('"kind": "train"' in l for l in lines) == 3
