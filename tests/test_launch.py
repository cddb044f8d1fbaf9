"""launch/ scripts: syntax, and the exact commands they print (DRY_RUN=1) and run (fake tools)."""
import os
import pathlib
import shlex
import stat
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
SCRIPTS = ('local_sweep.sh', 'slurm.sbatch', 'tpu_vm.sh')
OWN_VARS = ('WORKDIR', 'GPUS', 'PYTHON', 'DRY_RUN', 'CONFIG', 'TPU_NAME', 'ZONE', 'PROJECT',
            'REPO_DIR', 'INSTALL', 'JAX_LOCAL_DEVICE_IDS', 'CUDA_VISIBLE_DEVICES')


def sh(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  """Runs launch/<script> with bash in the repo root, with a clean launch environment."""
  base = {k: v for k, v in os.environ.items() if k not in OWN_VARS and not k.startswith('SLURM_')}
  return subprocess.run(['bash', str(LAUNCH / script), *args], cwd=REPO, env={**base, **env},
                        capture_output=True, text=True, timeout=60)


def lines(proc: subprocess.CompletedProcess) -> list[list[str]]:
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(l) for l in proc.stdout.splitlines()]


def fake_tool(bin_dir: pathlib.Path, name: str, body: str) -> pathlib.Path:
  """An executable `name` that appends its argv (one line, shell-quoted) to bin_dir/calls."""
  bin_dir.mkdir(exist_ok=True)
  path = bin_dir / name
  path.write_text('#!/usr/bin/env bash\n'
                  f'printf "%q " "$0" "$@" >> {bin_dir}/calls; echo >> {bin_dir}/calls\n' + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


def calls(bin_dir: pathlib.Path) -> list[list[str]]:
  return [shlex.split(l) for l in (bin_dir / 'calls').read_text().splitlines()]


@pytest.mark.parametrize('script', SCRIPTS)
def test_syntax_and_usage_header(script):
  subprocess.run(['bash', '-n', str(LAUNCH / script)], check=True)
  text = (LAUNCH / script).read_text()
  assert '# Usage' in text and 'DRY_RUN=1' in text
  assert os.access(LAUNCH / script, os.X_OK)


def main_cmd(config: str, workdir: str, *extra: str) -> list[str]:
  return ['python', '-m', 'normjax.main', f'--config={config}', f'--workdir={workdir}', *extra]


def test_local_sweep_sequential_dry_run():
  proc = sh('local_sweep.sh', 'configs/bn_noclip.py', 'configs/ln_clip.py:quick', '--',
            '--config.train.max_steps=10', '--config.data.source=/data dir',
            DRY_RUN='1', WORKDIR='workdir/study')
  assert lines(proc) == [
      main_cmd('configs/bn_noclip.py', 'workdir/study/bn_noclip', '--config.train.max_steps=10',
               '--config.data.source=/data dir'),
      main_cmd('configs/ln_clip.py:quick', 'workdir/study/ln_clip',
               '--config.train.max_steps=10', '--config.data.source=/data dir'),
  ]
  assert not (REPO / 'workdir' / 'study' / 'logs').exists()


def test_local_sweep_one_run_per_gpu_dry_run():
  configs = [f'configs/{n}.py' for n in ('bn_noclip', 'ln_noclip', 'frn_noclip', 'bn_clip',
                                          'ln_clip')]
  proc = sh('local_sweep.sh', *configs, DRY_RUN='1', GPUS='0 1 3')
  expected = []
  for slot, gpu in enumerate(('0', '1', '3')):  # config i -> GPUS[i mod 3], in slot order
    for config in configs[slot::3]:
      stem = pathlib.Path(config).stem
      expected.append(['env', f'CUDA_VISIBLE_DEVICES={gpu}',
                       *main_cmd(config, f'workdir/sweep/{stem}'),
                       '>', f'workdir/sweep/logs/{stem}.log', '2>&1'])
  assert lines(proc) == expected


def test_local_sweep_runs_continue_past_failures(tmp_path):
  # A fake python that records its GPU and fails for the LayerNorm run.
  bin_dir = tmp_path / 'bin'
  python = fake_tool(bin_dir, 'python', 'echo "gpu=$CUDA_VISIBLE_DEVICES"\n'
                     '[[ "$*" != *ln_noclip* ]]\n')
  configs = ['configs/bn_noclip.py', 'configs/ln_noclip.py', 'configs/frn_noclip.py']
  workdir = str(tmp_path / 'sweep')
  proc = sh('local_sweep.sh', *configs, '--', '--flag', PYTHON=str(python), WORKDIR=workdir)
  assert proc.returncode == 1
  assert proc.stderr.endswith('1 of 3 runs failed: ln_noclip\n')
  assert calls(bin_dir) == [[str(python), *main_cmd(c, f'{workdir}/{pathlib.Path(c).stem}',
                                                   '--flag')[1:]] for c in configs]
  assert proc.stdout.count('gpu=\n') == 3  # sequential runs leave CUDA_VISIBLE_DEVICES alone

  (bin_dir / 'calls').unlink()
  proc = sh('local_sweep.sh', *configs, PYTHON=str(python), WORKDIR=workdir, GPUS='4 5')
  assert proc.returncode == 1
  assert proc.stderr.endswith('1 of 3 runs failed: ln_noclip\n')
  assert sorted(calls(bin_dir)) == sorted(
      [str(python), *main_cmd(c, f'{workdir}/{pathlib.Path(c).stem}')[1:]] for c in configs)
  logs = {p.name: p.read_text() for p in (tmp_path / 'sweep' / 'logs').iterdir()}
  assert logs == {'bn_noclip.log': 'gpu=4\n', 'ln_noclip.log': 'gpu=5\n',
                  'frn_noclip.log': 'gpu=4\n'}


def test_local_sweep_usage_errors():
  proc = sh('local_sweep.sh', DRY_RUN='1')
  assert proc.returncode == 2 and 'usage:' in proc.stderr
  proc = sh('local_sweep.sh', 'configs/bn_clip.py', 'other/bn_clip.py:quick', DRY_RUN='1')
  assert proc.returncode == 2
  assert proc.stderr.endswith(
      'configs/bn_clip.py and other/bn_clip.py:quick share the workdir workdir/sweep/bn_clip\n')
  assert proc.stdout == ''


SLURM_ENV = {'SLURM_JOB_ID': '4242', 'SLURM_JOB_NUM_NODES': '2', 'SLURM_NTASKS_PER_NODE': '4',
             'SLURM_CPUS_PER_TASK': '8', 'CONFIG': 'configs/bn_clip.py',
             'WORKDIR': '/shared/normjax/bn_clip'}
SRUN_ARGS = ['--nodes=2', '--ntasks-per-node=4', '--gpus-per-task=1', '--cpus-per-task=8',
             '--kill-on-bad-exit=1']


def test_slurm_dry_run():
  proc = sh('slurm.sbatch', '--config.train.batch_size=256', DRY_RUN='1', **SLURM_ENV)
  assert lines(proc) == [[
      'JAX_LOCAL_DEVICE_IDS=0', 'srun', *SRUN_ARGS,
      *main_cmd('configs/bn_clip.py', '/shared/normjax/bn_clip', '--config.train.batch_size=256')]]


def test_slurm_runs_srun(tmp_path):
  bin_dir = tmp_path / 'bin'
  fake_tool(bin_dir, 'srun', 'echo "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"\n')
  proc = sh('slurm.sbatch', PATH=f'{bin_dir}:{os.environ["PATH"]}', **SLURM_ENV)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == 'JAX_LOCAL_DEVICE_IDS=0\n'
  assert calls(bin_dir) == [[str(bin_dir / 'srun'), *SRUN_ARGS,
                             *main_cmd('configs/bn_clip.py', '/shared/normjax/bn_clip')]]


def test_slurm_directives_and_errors():
  directives = [l.split()[1] for l in (LAUNCH / 'slurm.sbatch').read_text().splitlines()
                if l.startswith('#SBATCH')]
  assert '--gpus-per-task=1' in directives
  assert '--ntasks-per-node=8' in directives and '--signal=TERM@300' in directives
  env = dict(SLURM_ENV)
  del env['CONFIG']
  proc = sh('slurm.sbatch', DRY_RUN='1', **env)
  assert proc.returncode != 0 and 'CONFIG: set CONFIG=configs/<name>.py' in proc.stderr
  proc = sh('slurm.sbatch', DRY_RUN='1', CONFIG='c.py', WORKDIR='w')
  assert proc.returncode != 0 and 'not inside a SLURM allocation' in proc.stderr


def gcloud_ssh(*rest: str) -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-v4-32', '--zone=us-central2-b',
          *rest, '--worker=all']


def test_tpu_vm_dry_run():
  env = {'TPU_NAME': 'my-v4-32', 'ZONE': 'us-central2-b', 'DRY_RUN': '1'}
  proc = sh('tpu_vm.sh', 'configs/bn_clip.py', '/mnt/shared/normjax/bn_clip',
            '--config.train.batch_size=256', '--config.data.source=/mnt/my data', **env)
  (argv,) = lines(proc)
  assert argv == gcloud_ssh() + [
      '--command=cd normjax && python -m normjax.main --config=configs/bn_clip.py '
      '--workdir=/mnt/shared/normjax/bn_clip --config.train.batch_size=256 '
      '"--config.data.source=/mnt/my data"']
  remote = shlex.split(argv[-1].removeprefix('--command='))
  assert remote[remote.index('&&') + 1:][-1] == '--config.data.source=/mnt/my data'

  proc = sh('tpu_vm.sh', 'configs/bn_clip.py', '/mnt/shared/w', INSTALL='1', PROJECT='proj',
            REPO_DIR='src/normjax', **env)
  assert lines(proc) == [
      gcloud_ssh('--project=proj') + [
          '--command=cd src/normjax && pip install -U "jax[tpu]" -e .'],
      gcloud_ssh('--project=proj') + [
          '--command=cd src/normjax && python -m normjax.main --config=configs/bn_clip.py '
          '--workdir=/mnt/shared/w'],
  ]


def test_tpu_vm_runs_gcloud_and_errors(tmp_path):
  bin_dir = tmp_path / 'bin'
  fake_tool(bin_dir, 'gcloud', '')
  proc = sh('tpu_vm.sh', 'configs/bn_clip.py', '/mnt/shared/w', TPU_NAME='my-v4-32',
            ZONE='us-central2-b', PATH=f'{bin_dir}:{os.environ["PATH"]}')
  assert proc.returncode == 0, proc.stderr
  assert calls(bin_dir) == [[str(bin_dir / 'gcloud'), *gcloud_ssh()[1:],
                             '--command=cd normjax && python -m normjax.main '
                             '--config=configs/bn_clip.py --workdir=/mnt/shared/w']]
  proc = sh('tpu_vm.sh', 'configs/bn_clip.py', TPU_NAME='t', ZONE='z', DRY_RUN='1')
  assert proc.returncode == 2 and 'usage:' in proc.stderr
  proc = sh('tpu_vm.sh', 'configs/bn_clip.py', '/mnt/shared/w', ZONE='z', DRY_RUN='1')
  assert proc.returncode != 0 and 'TPU_NAME: set TPU_NAME' in proc.stderr
