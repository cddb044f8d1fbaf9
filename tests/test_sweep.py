"""normjax.sweep with train_and_evaluate replaced by a fake that writes a run's files."""
import pathlib
import re

import pytest

from normjax import config_schema, errors, metrics_io, sweep, train

REPO = pathlib.Path(__file__).resolve().parents[1]
STEMS = ('bn_noclip', 'ln_clip', 'frn_noclip')
CONFIGS = ','.join(str(REPO / 'configs' / f'{s}.py') for s in STEMS)


class FakeTrain(list):
  """Stands in for train.train_and_evaluate: records (workdir, config), writes a finished run's
  metrics.jsonl and summary.json, and raises for the workdir names in `fail`."""

  def __init__(self):
    super().__init__()
    self.fail = set()
    self.final_val = 0.5

  def __call__(self, config, workdir):
    self.append((workdir, config))
    run = pathlib.Path(workdir)
    if run.name in self.fail:
      raise RuntimeError(f'boom in {workdir}')
    run.mkdir(parents=True, exist_ok=True)
    metrics = metrics_io.MetricsLog(run)
    metrics.write('train', 1, 0.5, {'loss': 2.0, 'accuracy': 0.1, 'grad_norm': 3.0})
    metrics.write('val', 2, 1.0, {'loss': 1.5, 'accuracy': 0.5})
    metrics.write('test', 2, 1.0, {'loss': 1.5, 'accuracy': 0.25})
    summary = {'config': config.to_dict(), 'final_val_accuracy': self.final_val,
               'test_accuracy': 0.25}
    metrics_io.write_json_atomic(run / 'summary.json', summary)
    return summary


@pytest.fixture
def calls(monkeypatch):
  fake = FakeTrain()
  monkeypatch.setattr(train, 'train_and_evaluate', fake)
  return fake


def test_runs_in_order_with_overrides(tmp_path, calls, capsys):
  rc = sweep.main([f'--configs={CONFIGS}', f'--workdir={tmp_path}',
                   '--set=train.max_steps=20', '--set=data.image_size=32'])
  assert rc == 0
  assert [w for w, _ in calls] == [str(tmp_path / s) for s in STEMS]
  assert [(c.model.head_norm, c.optim.clip) for _, c in calls] == [
      ('bn', 'none'), ('ln', 'global_norm'), ('frn', 'none')]
  for _, config in calls:
    assert (config.train.max_steps, config.data.image_size) == (20, 32)
    assert config.train.batch_size == 64  # untouched fields keep the config's value
  out = [re.sub(r'done in \d+:\d\d:\d\d', 'done in 0:00:00', l) for l in capsys.readouterr().out.splitlines()]
  assert out == [
      f'[1/3] bn_noclip: training {REPO}/configs/bn_noclip.py in {tmp_path}/bn_noclip',
      '[1/3] bn_noclip: done in 0:00:00, final val 50.00%, test 25.00%',
      f'[2/3] ln_clip: training {REPO}/configs/ln_clip.py in {tmp_path}/ln_clip',
      '[2/3] ln_clip: done in 0:00:00, final val 50.00%, test 25.00%',
      f'[3/3] frn_noclip: training {REPO}/configs/frn_noclip.py in {tmp_path}/frn_noclip',
      '[3/3] frn_noclip: done in 0:00:00, final val 50.00%, test 25.00%',
      'sweep: 3 done, 0 skipped, 0 failed',
  ]


def test_skips_finished_runs(tmp_path, calls, capsys):
  (tmp_path / 'ln_clip').mkdir()
  metrics_io.write_json_atomic(tmp_path / 'ln_clip' / 'summary.json', {'test_accuracy': 0.9})
  assert sweep.main([f'--configs={CONFIGS}', f'--workdir={tmp_path}']) == 0
  assert [pathlib.Path(w).name for w, _ in calls] == ['bn_noclip', 'frn_noclip']
  out = capsys.readouterr().out
  assert (f'[2/3] ln_clip: skipped, {tmp_path}/ln_clip/summary.json exists (a finished run; '
          '--set=train.overwrite=True reruns it)\n') in out
  assert out.endswith('sweep: 2 done, 1 skipped, 0 failed\n')
  # A second sweep finds every run finished and trains nothing.
  calls.clear()
  assert sweep.main([f'--configs={CONFIGS}', f'--workdir={tmp_path}']) == 0
  assert calls == []
  assert capsys.readouterr().out.endswith('sweep: 0 done, 3 skipped, 0 failed\n')
  # overwrite=True reruns finished runs.
  assert sweep.main([f'--configs={CONFIGS}', f'--workdir={tmp_path}',
                     '--set=train.overwrite=True']) == 0
  assert len(calls) == 3


def test_failed_run_does_not_stop_the_others(tmp_path, calls, capsys):
  calls.fail.add('ln_clip')
  assert sweep.main([f'--configs={CONFIGS}', f'--workdir={tmp_path}', '--report']) == 1
  assert [pathlib.Path(w).name for w, _ in calls] == list(STEMS)
  captured = capsys.readouterr()
  assert ('[2/3] ln_clip: FAILED after 0:00:00: RuntimeError: boom in '
          f'{tmp_path}/ln_clip\n') in captured.out
  assert 'sweep: 2 done, 0 skipped, 1 failed: ln_clip\n' in captured.out
  assert 'Traceback' in captured.err and 'RuntimeError: boom' in captured.err
  # --report still covers the runs that finished.
  assert f'sweep: wrote {tmp_path}/report.md' in captured.out
  md = (tmp_path / 'report.md').read_text()
  assert '| `bn_noclip` | done |' in md and '| `frn_noclip` | done |' in md
  assert '`ln_clip`' not in md
  assert not (tmp_path / 'ln_clip').exists()


def test_config_errors_stop_before_any_training(tmp_path, calls, capsys):
  rc = sweep.main([f'--configs={CONFIGS}', f'--workdir={tmp_path}', '--set=train.max_step=20'])
  assert rc == 2
  assert calls == []
  err = capsys.readouterr().err
  assert err.startswith(f'sweep: error: {REPO}/configs/bn_noclip.py: config.train.max_step: '
                        'unknown field')
  rc = sweep.main([f'--configs={CONFIGS}', f'--workdir={tmp_path}', '--set=data.image_size=big'])
  assert rc == 2
  assert "config.data.image_size = 'big': expected a int" in capsys.readouterr().err
  rc = sweep.main([f'--configs={CONFIGS},{tmp_path}/x/bn_noclip.py', f'--workdir={tmp_path}'])
  assert rc == 2
  assert capsys.readouterr().err == (
      'sweep: error: --configs: two configs share the workdir name bn_noclip\n')
  rc = sweep.main([f'--configs={tmp_path}/missing.py', f'--workdir={tmp_path}'])
  assert rc == 2
  assert 'no such config file' in capsys.readouterr().err
  assert calls == []
  with pytest.raises(SystemExit) as e:
    sweep.main(['--configs=,', f'--workdir={tmp_path}'])
  assert e.value.code == 2
  assert '--configs: no config given' in capsys.readouterr().err


def test_preemption_stops_the_sweep(tmp_path, monkeypatch, capsys):
  seen = []

  def preempted(config, workdir):
    seen.append(pathlib.Path(workdir).name)
    raise errors.Preempted(step=7, signum=15)

  monkeypatch.setattr(train, 'train_and_evaluate', preempted)
  assert sweep.main([f'--configs={CONFIGS}', f'--workdir={tmp_path}']) == 128 + 15
  assert seen == ['bn_noclip']
  assert capsys.readouterr().out.endswith(
      '[1/3] bn_noclip: preempted; rerun the same command to resume\n')


def test_status_line_without_validation(tmp_path, calls, capsys):
  calls.final_val = None  # max_steps stopped the run before the first epoch ended
  assert sweep.main([f'--configs={REPO}/configs/bn_clip.py', f'--workdir={tmp_path}']) == 0
  assert re.search(r'\[1/1\] bn_clip: done in \d+:\d\d:\d\d, final val n/a, test 25.00%\n',
                   capsys.readouterr().out)


def test_config_stem():
  assert config_schema.config_stem('configs/bn_clip.py') == 'bn_clip'
  assert config_schema.config_stem('configs/bn_clip.py:quick') == 'bn_clip-quick'
  assert config_schema.config_stem('configs/nf_agc_scratch.py:cpu,batch=8,lambda=0.01') == 'nf_agc_scratch-cpu-batch8-lambda0.01'


def test_sweep_imports_no_matplotlib():
  import subprocess
  import sys
  code = 'import sys, normjax.sweep; print("matplotlib" in sys.modules)'
  assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        check=True).stdout.strip() == 'False'  # report (figures) only with --report
