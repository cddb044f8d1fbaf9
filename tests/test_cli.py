"""`python -m normjax.main`: bad input gets one clear line naming the field and the allowed values."""
import os
import subprocess
import sys

import pytest


def run_main(*args, env=None, timeout=120):
  full_env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  return subprocess.run([sys.executable, '-m', 'normjax.main', *args], capture_output=True, text=True,
                        env=full_env, timeout=timeout)


@pytest.mark.parametrize('override,message', [
    ('--config.train.bogus=1', 'normjax: error: config.train.bogus: unknown field; allowed: train.batch_size'),
    ('--config.model.name=resnet', "normjax: error: config.model.name = 'resnet' is not allowed; expected one "
     'of: lightcnn, mobilenet_v2, nf_mobilenet_v2'),
    ('--config.model.norm=batchnorm', "config.model.norm = 'batchnorm' is not allowed; expected one of: bn, ln, gn, frn, none"),
    ('--config.data.name=imagenet', "config.data.name = 'imagenet' is not allowed"),
    ('--config.train.batch_size=0', 'config.train.batch_size = 0 is not allowed; expected an integer > 0'),
    ('--config.optim.lr=-0.1', 'config.optim.lr = -0.1 is not allowed; expected a number > 0'),
    ('--config.optim.trainable_blocks=7', 'optim.trainable_blocks must be -1 (all), 0 (none) or 1..3'),
])
def test_bad_config_is_one_line_error(tmp_path, override, message):
  result = run_main('--config=configs/smoke.py', f'--workdir={tmp_path}', override)
  assert result.returncode == 2, result.stderr
  assert message in result.stderr
  assert 'Traceback' not in result.stderr


def test_missing_dataset_says_how_to_provide_it(tmp_path):
  result = run_main('--config=configs/smoke.py', f'--workdir={tmp_path}/run',
                    f'--config.data.tfds_dir={tmp_path}/tfds', f'--config.data.source={tmp_path}/nothing',
                    env={'NORMJAX_DATA_DIR': ''})
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  error = [l for l in result.stderr.splitlines() if l.startswith('normjax: error:')]
  assert len(error) == 1
  assert 'data.source' in error[0] and 'NORMJAX_DATA_DIR' in error[0]


def test_without_workdir_the_run_goes_to_workdir_config_stem_and_resumes(tmp_path, shared_data_dir):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = (f'--config={repo}/configs/smoke.py:quick', '--config.train.max_steps=4',
          f'--config.data.tfds_dir={tmp_path}/tfds', f'--config.data.source={shared_data_dir}')
  env = {'PYTHONPATH': repo}
  first = subprocess.run([sys.executable, '-m', 'normjax.main', *args], capture_output=True, text=True,
                         env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env}, timeout=300, cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-2000:]
  run = tmp_path / 'workdir' / 'smoke-quick'
  log_lines = [l for l in first.stderr.splitlines() if l[:1] in 'IWE' and '] ' in l]  # absl's format
  assert log_lines[0].endswith(f'workdir: {run} (from the config name; --workdir overrides); '
                               'rerun the same command to resume'), log_lines[:3]
  assert (run / 'summary.json').exists()
  summary = (run / 'summary.json').read_text()
  again = subprocess.run([sys.executable, '-m', 'normjax.main', *args], capture_output=True, text=True,
                         env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env}, timeout=300, cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-2000:]
  assert (run / 'summary.json').read_text() == summary  # finished: reported, not redone


def test_truncated_weight_file_is_one_line_and_leaves_nothing_to_resume(tmp_path, shared_data_dir):
  real = shared_data_dir / 'torchvision' / 'mobilenet_v2-b0353104.pth'
  truncated = tmp_path / 'mobilenet_v2-b0353104.pth'  # torchvision's name: its sha256 is checked
  truncated.write_bytes(real.read_bytes()[:1_000_000])
  result = run_main('--config=configs/frn_noclip.py:quick', f'--workdir={tmp_path}/run',
                    f'--config.model.pretrained={truncated}', '--config.model.width_mult=1.0',
                    f'--config.data.source={shared_data_dir}', env={'NORMJAX_DATA_DIR': str(shared_data_dir)},
                    timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('normjax: error:')]
  assert len(errors) == 1 and 'b0353104' in errors[0] and 'sha256' in errors[0]
  assert 'Traceback' not in result.stderr
  assert not list((tmp_path / 'run').glob('checkpoints/*'))
