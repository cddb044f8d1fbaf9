"""Faults a run must survive, or report in one line (issues 12 and 14).

Two runs on one workdir, a full disk, skipped non-finite steps, SIGTERM at start-up, a read-only
workdir and a corrupt checkpoint, on real Fashion-MNIST with the smoke config. Faults are real
where a test can make them (a second process, a file-size limit the kernel enforces inside
TensorStore's writer, chmod when not root) and simulated at the OS-call boundary otherwise.
"""
import asyncio
import builtins
import contextlib
import errno
import gc
import io
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import smoke
from normjax import checkpoint, errors, metrics_io, train
from normjax.data import pipeline
from normjax.rundir import RunDir

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMING_KEYS = {'images_per_sec'}


@pytest.fixture
def config(tfds_dir, shared_data_dir):
  c = smoke.get_config()
  c.data.tfds_dir = str(tfds_dir)
  c.data.source = str(shared_data_dir)
  c.data.train_subset = 320  # 10 steps per epoch
  c.train.batch_size = 32
  c.train.num_epochs = 1
  c.train.log_every_steps = 2
  c.train.monitor_every_steps = 0
  c.train.checkpoint_every_steps = 4
  return c


@pytest.fixture
def prepared(config):
  """The dataset prepared in tfds_dir before a subprocess is faulted (preparation writes a lot)."""
  pipeline.load_splits(config.data, config.seed)
  return config


def records(workdir, kind=None):
  return [r for r in metrics_io.read_jsonl(pathlib.Path(workdir) / 'metrics.jsonl') if kind in (None, r['kind'])]


def strip_timing(rs):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]


def leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def litter(workdir):
  """Temporary files or directories a failed write could leave behind."""
  return sorted(str(p) for p in pathlib.Path(workdir).rglob('*')
                if p.name.endswith('.tmp') or 'orbax-checkpoint-tmp' in p.name)


def strict_json(text):
  """json.loads that rejects NaN and Infinity, as strict parsers (JavaScript, Go, jq) do."""
  def reject(constant):
    raise ValueError(f'not JSON: {constant}')
  return json.loads(text, parse_constant=reject)


def cli(workdir, tfds_dir, *extra):
  return [sys.executable, '-m', 'normjax.main', '--config=configs/smoke.py', f'--workdir={workdir}',
          f'--config.data.tfds_dir={tfds_dir}', '--config.data.train_subset=320',
          '--config.train.batch_size=32', '--config.train.log_every_steps=2',
          '--config.train.checkpoint_every_steps=4', '--config.train.monitor_every_steps=0', *extra]


def cli_env(shared_data_dir):
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'NORMJAX_DATA_DIR': str(shared_data_dir)}


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith('normjax: error:')]


# 1. Two runs on one workdir.

def test_second_run_on_a_held_workdir_is_refused_naming_the_holder(prepared, tmp_path, tfds_dir,
                                                                   shared_data_dir):
  workdir = tmp_path / 'run'
  with checkpoint.WorkdirLock(workdir):  # the first run: this process
    with pytest.raises(errors.WorkdirError, match='is in use by another run'):
      train.train_and_evaluate(prepared, str(workdir))
    second = subprocess.run(cli(workdir, tfds_dir, '--config.train.max_steps=2'), cwd=ROOT,
                            env=cli_env(shared_data_dir), capture_output=True, text=True, timeout=300)
  assert second.returncode == 2, second.stderr[-3000:]
  assert 'Traceback' not in second.stderr
  [line] = error_lines(second.stderr)
  assert f'{workdir} is in use by another run (pid {os.getpid()} on host {socket.gethostname()}, started ' in line
  assert sorted(p.name for p in workdir.iterdir()) == [RunDir.LOCK]  # the refused runs wrote nothing


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(config, tmp_path, caplog):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\nfrom normjax import checkpoint\n'
       'checkpoint.WorkdirLock(sys.argv[1]).__enter__()\nprint("locked", flush=True)\ntime.sleep(600)',
       str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(errors.WorkdirError, match=f'pid {holder.pid} on host'):
      train.train_and_evaluate(config, str(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  config.train.max_steps = 2
  caplog.set_level(logging.WARNING)
  assert train.train_and_evaluate(config, str(tmp_path))['steps'] == 2
  assert any('taking over the lock of a run that is no longer running' in r.getMessage()
             and f'pid {holder.pid} on host' in r.getMessage() for r in caplog.records)
  assert (tmp_path / RunDir.LOCK).read_text() == ''  # released, naming no holder


# 2. A full disk.

def _fail_checkpoint_writes_at(monkeypatch, step):
  """Orbax's array writer fails with ENOSPC for `step`, after writing part of the checkpoint."""
  original = ocp.StandardCheckpointHandler.async_save

  async def async_save(self, directory, *args, **kwargs):
    if f'/{step}.orbax-checkpoint-tmp' in str(directory):
      pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
      (pathlib.Path(directory) / 'partial').write_bytes(bytes(4096))
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await original(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'async_save', async_save)


def test_failed_save_stops_at_once_without_litter_and_the_rerun_resumes(config, tmp_path, monkeypatch):
  config.train.max_steps = 10  # checkpoints at 4, 8 and 10
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  workdir = tmp_path / 'full'
  with monkeypatch.context() as full_disk:
    _fail_checkpoint_writes_at(full_disk, 8)
    for _ in range(2):  # the run, then a rerun on the still-full disk: it resumes from 4, fails again
      with pytest.raises(errors.WorkdirError) as e:
        train.train_and_evaluate(config, str(workdir))
      assert str(e.value).startswith(f'cannot save checkpoint step 8 to {workdir}/checkpoints/8: No space '
                                     'left on device (ENOSPC). Stopped at once; the last good checkpoint '
                                     f'is step 4 in {workdir}/checkpoints.')
      assert len(str(e.value).splitlines()) == 1
      assert max(r['step'] for r in records(workdir)) == 8  # no step after the failed save
      assert litter(workdir) == []
      assert (workdir / RunDir.LOCK).read_text() == ''
  summary = train.train_and_evaluate(config, str(workdir))  # space again: resumes from step 4
  assert summary['steps'] == 10
  assert strip_timing(records(workdir)) == strip_timing(records(tmp_path / 'straight'))
  for a, b in zip(leaves(checkpoint.restore_latest(workdir)[1]), leaves(checkpoint.restore_latest(tmp_path / 'straight')[1])):
    np.testing.assert_array_equal(a, b)


def test_os_refusing_the_checkpoint_write_is_one_line(prepared, tmp_path, tfds_dir, shared_data_dir):
  """The kernel refuses the array file inside TensorStore's writer (a 20 kB file-size limit: EFBIG)."""
  workdir = tmp_path / 'run'
  limit = ('import os, resource, sys\nresource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n'
           'os.execv(sys.executable, [sys.executable] + sys.argv[1:])')
  cmd = [sys.executable, '-c', limit, *cli(workdir, tfds_dir, '--config.train.max_steps=6')[1:]]
  result = subprocess.run(cmd, cwd=ROOT, env=cli_env(shared_data_dir), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr and 'Exception ignored' not in result.stderr
  [line] = error_lines(result.stderr)
  assert line.startswith(f'normjax: error: cannot save checkpoint step 4 to {workdir}/checkpoints/4: File '
                         'too large (EFBIG). Stopped at once; there is no checkpoint in ')
  assert len(result.stderr.splitlines()) < 20, result.stderr  # was ~450 lines and 5 tracebacks
  assert max(r['step'] for r in records(workdir)) == 4
  assert litter(workdir) == []


def _unretrieved_future_report(filename: str) -> list[logging.LogRecord]:
  """What asyncio logs when a Future whose exception was raised in `filename` dies unretrieved."""
  namespace = {}
  exec(compile('def fail():\n  raise ValueError("write failed")\n', filename, 'exec'), namespace)
  seen = []
  handler = logging.Handler()
  handler.emit = seen.append
  asyncio_logger = logging.getLogger('asyncio')
  asyncio_logger.addHandler(handler)
  loop = asyncio.new_event_loop()
  try:
    future = loop.create_future()
    try:
      namespace['fail']()
    except ValueError as e:
      future.set_exception(e)
    del future
    gc.collect()
  finally:
    loop.close()
    asyncio_logger.removeHandler(handler)
  return seen


def test_an_abandoned_orbax_future_reports_nothing_after_a_failed_save():
  """The CI race behind 'Future exception was never retrieved': a bare Future names no coroutine,
  only its traceback shows that the write was orbax's."""
  with pytest.raises(OSError), checkpoint.quiet_orbax():
    raise OSError(errno.EFBIG, 'a failed save')
  assert _unretrieved_future_report('/site-packages/orbax/checkpoint/serialization.py') == []
  [other] = _unretrieved_future_report('/site-packages/mylib/writer.py')  # not orbax's: still reported
  assert other.getMessage().startswith('Future exception was never retrieved')


class _FullDiskFile:
  """A file object on a full disk: it opens (and creates the file), but no byte can be written."""

  def __init__(self, f):
    self._f = f

  def write(self, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  writelines = write

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


@contextlib.contextmanager
def full_disk(root, monkeypatch):
  """Writes under `root` fail with ENOSPC as on a full disk: opens succeed, data does not fit."""
  real_open, real_write = builtins.open, os.write

  def full_open(file, mode='r', *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    inside = isinstance(file, (str, os.PathLike)) and str(file).startswith(str(root))
    return _FullDiskFile(f) if inside and any(c in mode for c in 'wax+') else f

  def short_write(fd, data):  # the disk takes half of what is written, then is full
    if os.readlink(f'/proc/self/fd/{fd}').startswith(str(root)):
      data = data[:len(data) // 2]
    return real_write(fd, data)

  with monkeypatch.context() as m:
    m.setattr(builtins, 'open', full_open)
    m.setattr(io, 'open', full_open)
    m.setattr(os, 'write', short_write)
    yield


def test_metrics_files_on_a_full_disk_fail_in_one_line_and_leave_no_temp_file(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics_io, '_tensorboard_writer', lambda workdir: None)
  log = metrics_io.MetricsLog(tmp_path)
  for step in (2, 4, 6, 8):
    log.write('train', step, step / 10, {'loss': 1.0 / step})
  (tmp_path / 'summary.json').write_text('{"old": true}')
  path = tmp_path / 'metrics.jsonl'
  with open(path, 'a') as f:
    f.write('{"kind": "train", "st')  # torn by a crash
  with full_disk(tmp_path, monkeypatch):
    log.truncate_after(4)  # a resume needs no free space: the file is cut in place
    assert [r['step'] for r in records(tmp_path)] == [2, 4] and path.read_bytes().endswith(b'\n')
    before = path.read_bytes()
    with pytest.raises(errors.WorkdirError, match=f'^cannot write {path}: No space left on device$'):
      log.write('train', 6, 0.6, {'loss': 0.1})
    assert path.read_bytes() == before  # no torn half line
    with pytest.raises(errors.WorkdirError, match=f'cannot write {tmp_path / "summary.json"}: No space'):
      metrics_io.write_json_atomic(tmp_path / 'summary.json', {'new': True})
    assert (tmp_path / 'summary.json').read_text() == '{"old": true}'
  with open(path, 'a') as f:  # records out of step order need a rewritten copy, which cannot fit
    f.write(json.dumps({'kind': 'train', 'step': 9}) + '\n' + json.dumps({'kind': 'val', 'step': 3}) + '\n')
  before = path.read_bytes()
  with full_disk(tmp_path, monkeypatch):
    with pytest.raises(errors.WorkdirError, match=f'cannot write {path}: No space left on device'):
      log.truncate_after(4)
  assert path.read_bytes() == before
  assert litter(tmp_path) == []


# 3. on_nonfinite=skip is not silent; every JSON file is strict.

def _diverging(config):
  config.optim.name = 'sgd'
  config.optim.momentum = 0.0
  config.optim.lr = 1e30  # step 1 is finite, every later step overflows
  config.train.on_nonfinite = 'skip'
  config.train.checkpoint_every_steps = 100
  return config


def test_skipped_steps_warn_each_window_and_stop_past_the_limit(config, tmp_path, caplog):
  config = _diverging(config)
  config.train.max_steps = 8
  config.train.max_skipped_fraction = 0.9
  config.optim.clip_norm = float('inf')  # a non-finite config value (unused with clip=none)
  caplog.set_level(logging.WARNING)
  summary = train.train_and_evaluate(config, str(tmp_path / 'a'))
  warnings = [r.getMessage() for r in caplog.records if 'were skipped' in r.getMessage()]
  assert [w.split(':')[0] for w in warnings] == ['step 2', 'step 4', 'step 6', 'step 8']  # every window
  assert warnings[0].startswith('step 2: 1 of the last 2 steps had a non-finite loss or gradient')
  assert '7 of 8 so far (87.5%; train.max_skipped_fraction=0.9)' in warnings[-1]
  for name in ('metrics.jsonl', 'summary.json', 'config.json'):
    text = (tmp_path / 'a' / name).read_text()
    for line in text.splitlines() if name.endswith('l') else [text]:
      strict_json(line)
  windows = {r['step']: r for r in records(tmp_path / 'a', 'train')}
  assert windows[4]['nonfinite'] == 1.0 and windows[4]['loss'] is None  # NaN is written as null
  assert strict_json((tmp_path / 'a' / 'config.json').read_text())['optim']['clip_norm'] is None
  assert train.train_and_evaluate(config, str(tmp_path / 'a')) == strict_json(
      (tmp_path / 'a' / 'summary.json').read_text())  # null in config.json still matches: reported
  assert summary['steps'] == 8

  config.train.max_skipped_fraction = 0.1  # the default
  with pytest.raises(errors.NonFiniteError) as e:
    train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert str(e.value).startswith('1 of the 2 steps so far had a non-finite loss or gradient and were '
                                 'skipped (train.on_nonfinite=skip), more than train.max_skipped_fraction=0.1')


def test_skipped_fraction_counts_the_steps_before_a_resume(config, tmp_path):
  config = _diverging(config)
  config.train.max_skipped_fraction = 0.8
  config.train.max_steps = 4  # 3 of 4 skipped: under the limit
  train.train_and_evaluate(config, str(tmp_path))
  config.train.max_steps = 10
  with pytest.raises(errors.NonFiniteError, match='^5 of the 6 steps so far'):  # 3 + 2 of 4 + 2
    train.train_and_evaluate(config, str(tmp_path))


# 4. on_nonfinite=stop before any checkpoint.

def test_nonfinite_stop_before_any_checkpoint_says_there_is_none(config, tmp_path):
  config = _diverging(config)
  config.train.on_nonfinite = 'stop'
  with pytest.raises(errors.NonFiniteError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert 'None' not in str(e.value)
  assert f'there is no checkpoint in {tmp_path}/checkpoints yet' in str(e.value)


# 5. SIGTERM during start-up.

def test_sigterm_during_startup_is_one_line_and_exit_143(prepared, tmp_path, tfds_dir, shared_data_dir):
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(cli(workdir, tfds_dir, '--config.train.max_steps=4'), cwd=ROOT,
                          env=cli_env(shared_data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while not (workdir / 'config.json').exists():  # written at start-up, well before the first step
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.01)
  proc.send_signal(signal.SIGSTOP)
  assert records(workdir) == []
  proc.send_signal(signal.SIGTERM)
  proc.send_signal(signal.SIGCONT)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert 'Traceback' not in stderr
  [line] = [line for line in stderr.splitlines() if 'preempted by signal' in line]
  assert line.endswith('preempted by signal 15 outside the training loop, before its first step or after '
                       'its last; no unsaved training state, so nothing to save. Rerun the same command to '
                       'start or resume.')
  assert records(workdir) == [] and not list((workdir / 'checkpoints').glob('[0-9]*'))
  assert litter(workdir) == []


# 6. A read-only workdir.

def _snapshot(root):
  return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
          for p in [root, *root.rglob('*')]}


@contextlib.contextmanager
def read_only(root, monkeypatch):
  """`root` read-only for this process: chmod where it binds; as root (where it does not), every
  write call under `root` fails with EROFS, as on a read-only mount."""
  paths = [root, *root.rglob('*')]
  for p in paths:
    p.chmod(0o555 if p.is_dir() else 0o444)
  try:
    probe = root / '.write-probe'
    try:
      probe.touch()
    except PermissionError:
      yield  # chmod binds: a real read-only workdir
      return
    probe.unlink()

    def inside(path):
      return isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(str(root))

    def refuse(path):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real = {name: getattr(os, name) for name in ('open', 'mkdir', 'rename', 'replace', 'unlink', 'rmdir',
                                                 'truncate')}
    real_open = builtins.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def guarded(name):
      def call(path, *args, **kwargs):
        flags = args[0] if args else kwargs.get('flags', 0)
        if inside(path) and (name != 'open' or flags & writes):
          refuse(path)
        return real[name](path, *args, **kwargs)
      return call

    def guarded_open(file, mode='r', *args, **kwargs):
      if inside(file) and any(c in mode for c in 'wax+'):
        refuse(file)
      return real_open(file, mode, *args, **kwargs)

    with monkeypatch.context() as m:
      for name in real:
        m.setattr(os, name, guarded(name))
      m.setattr(builtins, 'open', guarded_open)
      m.setattr(io, 'open', guarded_open)
      yield
  finally:
    for p in paths:
      p.chmod(0o755 if p.is_dir() else 0o644)


def test_read_only_workdir_reports_a_finished_run_and_refuses_more_in_one_line(config, tmp_path, monkeypatch):
  config.train.max_steps = 4
  workdir = tmp_path / 'run'
  first = train.train_and_evaluate(config, str(workdir))
  with read_only(workdir, monkeypatch):
    before = _snapshot(workdir)
    again = train.train_and_evaluate(config, str(workdir))  # finished: reported without writing
    assert again['test_accuracy'] == first['test_accuracy'] and again['steps'] == 4
    config.train.max_steps = 6  # more training has to write
    with pytest.raises(errors.WorkdirError) as e:
      train.train_and_evaluate(config, str(workdir))
  assert str(e.value).startswith(f'cannot write to {workdir}: ')
  assert 'Read-only file system (EROFS)' in str(e.value) or 'Permission denied (EACCES)' in str(e.value)
  assert len(str(e.value).splitlines()) == 1
  assert _snapshot(workdir) == before


# Issue 12: a corrupt latest checkpoint.

def test_corrupt_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(
    config, tmp_path, caplog, capfd, monkeypatch):
  config.train.max_steps = 8  # checkpoints 4 and 8
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  step_dir = tmp_path / 'run' / 'checkpoints' / '8'
  array_file = max((f for f in step_dir.rglob('*') if f.is_file() and f.parent.name == 'd'),
                   key=lambda f: f.stat().st_size)
  data = bytearray(array_file.read_bytes())
  # Flip the bits of the file's middle third: zeroing could hit bytes that are already zero.
  third = len(data) // 3
  data[third:2 * third] = bytes(b ^ 0xFF for b in data[third:2 * third])
  array_file.write_bytes(bytes(data))
  corrupt = {str(f.relative_to(step_dir)): f.read_bytes() for f in step_dir.rglob('*') if f.is_file()}

  unraisable = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  caplog.set_level(logging.INFO)
  assert checkpoint.restore_latest(tmp_path / 'run')[0] == 4 and step_dir.is_dir()  # a reader moves nothing
  capfd.readouterr()
  config.train.max_steps = 10
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  gc.collect()
  assert summary['steps'] == 10
  moved = tmp_path / 'run' / 'checkpoints' / 'corrupt-8'
  assert {str(f.relative_to(moved)): f.read_bytes() for f in moved.rglob('*') if f.is_file()} == corrupt
  messages = [r.getMessage() for r in caplog.records]
  assert any(m.startswith(f'checkpoint step 8 in {tmp_path}/run/checkpoints is unreadable (')
             and m.endswith(f'moved it to {moved} and resumed from step 4') for m in messages)
  assert f'resumed from {tmp_path}/run/checkpoints at step 4' in messages
  assert not [r for r in caplog.records if '/orbax/' in r.pathname and r.levelno >= logging.ERROR]
  assert unraisable == []  # orbax's abandoned coroutines reported nothing
  assert 'Traceback' not in capfd.readouterr().err
  config.train.max_steps = 10
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  assert strip_timing(records(tmp_path / 'run')) == strip_timing(records(tmp_path / 'straight'))


def test_restore_latest_takes_a_relative_workdir(config, tmp_path, monkeypatch):
  config.train.max_steps = 4
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  monkeypatch.chdir(tmp_path)
  step, restored = checkpoint.restore_latest('run')
  assert step == 4 and 'params' in restored
