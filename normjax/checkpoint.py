"""A run's workdir: one run at a time, checkpoints that fail loudly, and resume past corrupt ones.

- `WorkdirLock`: an exclusive flock on `<workdir>/.normjax.lock`, naming its holder.
- `prepare_workdir`: refuses a workdir made by a different config; wipes it only when asked.
- `finished_summary`: the summary of a finished run, read without writing anything (so a
  finished run on a read-only mount can still be reported).
- `Checkpoints`: orbax's CheckpointManager with saves that stop the run at the first failure
  (one line, no temporary directories left) and a restore that falls back to the newest
  readable step, moving a corrupt one aside to `checkpoints/corrupt-<step>`.
- `restore_latest`: a run's newest readable checkpoint as single-device arrays.
"""
import contextlib
import datetime
import errno
import fcntl
import gc
import json
import logging as std_logging
import os
import pathlib
import re
import shutil
import socket
import sys
import traceback
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from normjax import config_schema, metrics_io
from normjax.errors import CheckpointError, WorkdirError
from normjax.rundir import RunDir

CORRUPT_PREFIX = 'corrupt-'
_TMP_MARK = '.orbax-checkpoint-tmp'


def describe_error(e: BaseException) -> str:
  """A one-line cause for an OS, orbax or TensorStore error (their messages run to pages)."""
  chain, x = [], e
  while x is not None and x not in chain:
    chain.append(x)
    x = x.__cause__ or x.__context__
  for x in chain:
    if isinstance(x, OSError) and x.errno:
      return f'{x.strerror or os.strerror(x.errno)} ({errno.errorcode.get(x.errno, x.errno)})'
    code = re.search(r"os_error_code='?(\d+)", str(x))  # TensorStore's form of an OS error
    if code:
      n = int(code.group(1))
      return f'{os.strerror(n)} ({errno.errorcode.get(n, n)})'
  text = next((line for line in str(chain[-1]).splitlines() if line.strip()), type(chain[-1]).__name__)
  return text if len(text) <= 300 else text[:297] + '...'


class _DropOrbaxRecords(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    return '/orbax/' not in record.pathname


def _from_orbax(obj: Any) -> bool:
  code = getattr(obj, 'cr_code', None) or getattr(obj, 'gi_code', None)
  return code is not None and '/orbax/' in code.co_filename


def _closed_loop_report(exc_type, exc, tb) -> bool:
  return (exc_type is RuntimeError and str(exc) == 'Event loop is closed'
          and any(frame.f_code.co_name == 'call_soon_threadsafe' for frame, _ in traceback.walk_tb(tb)))


class _DropOrbaxTaskReports(std_logging.Filter):
  """asyncio's 'Task/Future exception was never retrieved' about orbax's abandoned work.

  A Task names its orbax coroutine in the message; a bare Future names nothing, so its
  traceback (exc_info) is searched for orbax frames as well.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if '/orbax/' in record.getMessage():
      return False
    tb = record.exc_info[2] if record.exc_info else None
    return not any('/orbax/' in frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb))


def _drop_late_orbax_reports() -> None:
  """Drops, for the rest of the process, what a failed orbax call reports after it returned.

  Orbax's abandoned coroutines report their errors when garbage collected; TensorStore's reads
  and writes still in flight complete into orbax's closed event loop and print
  RuntimeError('Event loop is closed') from their threads; orbax's unfinished tasks and futures log
  'Task/Future exception was never retrieved' through asyncio when destroyed.
  """
  if not getattr(sys.excepthook, 'normjax_quiet', False):
    previous_excepthook = sys.excepthook

    def excepthook(exc_type, exc, tb):
      if not _closed_loop_report(exc_type, exc, tb):
        previous_excepthook(exc_type, exc, tb)

    excepthook.normjax_quiet = True
    sys.excepthook = excepthook
  if not getattr(sys.unraisablehook, 'normjax_quiet', False):
    previous_unraisablehook = sys.unraisablehook

    def unraisablehook(u):
      if not (_from_orbax(u.object) or _closed_loop_report(u.exc_type, u.exc_value, u.exc_traceback)):
        previous_unraisablehook(u)

    unraisablehook.normjax_quiet = True
    sys.unraisablehook = unraisablehook
  asyncio_logger = std_logging.getLogger('asyncio')
  if not any(isinstance(f, _DropOrbaxTaskReports) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_DropOrbaxTaskReports())


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """Silences orbax's own reports of a failure (they run to hundreds of lines of tracebacks).

  Around calls whose failures normjax reports itself, as one line: orbax's log lines during the
  call, and (see `_drop_late_orbax_reports`) what its abandoned work prints afterwards.
  """
  _drop_late_orbax_reports()
  quiet = _DropOrbaxRecords()
  logger = std_logging.getLogger('absl')  # orbax logs through absl
  logger.addFilter(quiet)
  try:
    yield
  except BaseException:
    gc.collect()  # finalize the failed call's coroutines now, not noisily at interpreter exit
    raise
  finally:
    logger.removeFilter(quiet)


def _holder_text(raw: str) -> str:
  try:
    h = json.loads(raw)
    return f'pid {h["pid"]} on host {h["host"]}, started {h["started"]}'
  except (ValueError, KeyError, TypeError):
    return 'holder unknown'


class WorkdirLock:
  """An exclusive lock on a workdir for the length of a run (process 0 holds it).

  flock is released by the kernel when its holder dies, so a lock left by a killed run is free
  to take; the file still names that run, which is reported. A clean exit empties the file.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.path = RunDir(self.workdir).lock
    self.enabled = enabled
    self._fd: int | None = None

  def __enter__(self) -> 'WorkdirLock':
    if not self.enabled:
      return self
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f'cannot write to {self.workdir}: {describe_error(e)}. A run needs a writable '
                         '--workdir (a finished run of the same config is reported without writing).') from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder_text(os.pread(fd, 4096, 0).decode(errors='replace'))
      os.close(fd)
      raise WorkdirError(f'{self.workdir} is in use by another run ({holder}; lock {self.path}). Wait '
                         'for it to finish or stop it, or use another --workdir.') from None
    try:
      previous = os.pread(fd, 4096, 0).decode(errors='replace')
      if previous.strip():
        logging.warning('%s: taking over the lock of a run that is no longer running (%s)',
                        self.path, _holder_text(previous))
      me = {'pid': os.getpid(), 'host': socket.gethostname(),
            'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(me).encode(), 0)
      os.fsync(fd)
    except OSError as e:
      os.close(fd)
      raise WorkdirError(f'cannot write {self.path}: {describe_error(e)}') from e
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      os.ftruncate(self._fd, 0)  # a clean exit leaves no holder named
    os.close(self._fd)  # releases the flock
    self._fd = None


def config_diffs(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """'field: saved -> current' for the fields that differ and may not change on resume."""
  saved = config_schema.flatten(config_schema.upgrade(saved))
  current = config_schema.flatten(metrics_io.to_json(config.to_dict()))  # as config.json holds it
  return [f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in sorted(set(saved) | set(current))
          if saved.get(k) != current.get(k) and k not in config_schema.RESUMABLE_CHANGES]


def finished_summary(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any] | None:
  """summary.json of a finished run of this config (same length of training), else None.

  Reads only, so rerunning a finished run works on a read-only mount.
  """
  if config.train.overwrite:
    return None
  run = RunDir(workdir)
  try:
    summary = metrics_io.read_json(run.summary)
    saved = metrics_io.read_json(run.config)
  except (OSError, ValueError):
    return None
  done = summary.get('config', {}).get('train', {}) if isinstance(summary, dict) else {}
  same_length = (done.get('num_epochs'), done.get('max_steps')) == (config.train.num_epochs,
                                                                    config.train.max_steps)
  return summary if same_length and not config_diffs(saved, config) else None


def prepare_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path, is_chief: bool) -> None:
  """Refuses to resume a run made by a different config; wipes the run only when asked."""
  run = RunDir(workdir)
  saved_config = run.config
  if is_chief:
    if config.train.overwrite:
      for name in RunDir.RUN_FOLDERS:
        shutil.rmtree(workdir / name, ignore_errors=True)
      for name in RunDir.RUN_FILES:
        try:
          (workdir / name).unlink(missing_ok=True)
        except OSError as e:
          raise metrics_io.write_error(workdir / name, e) from e
    elif saved_config.exists():
      try:
        saved = metrics_io.read_json(saved_config)
      except ValueError as e:
        raise CheckpointError(f'{saved_config} is corrupted ({e}); restore it, or pass '
                              '--config.train.overwrite=True to start this run afresh') from e
      diffs = config_diffs(saved, config)
      if diffs:
        raise CheckpointError(
            f'{workdir} holds a run made with a different config ({"; ".join(diffs)}). Use another '
            '--workdir, or --config.train.overwrite=True to discard that run.')
    elif any(run.checkpoints.glob('*')):
      raise CheckpointError(f'{run.checkpoints} exists but {saved_config} does not, so the '
                            'checkpoints cannot be checked against this config; use another --workdir')
    metrics_io.write_json_atomic(saved_config, config.to_dict())
  multihost_utils.sync_global_devices('normjax_prepare_workdir')


def _all_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (each reads its own shards of a checkpoint)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.int32(ok)).min())


class Checkpoints:
  """A run's checkpoints directory.

  Saves are synchronous: a save that fails (a full disk) stops the run at that step with one
  line, instead of surfacing a checkpoint interval later; a normjax state is small next to a
  training interval, so little is lost by waiting.
  """

  def __init__(self, directory: pathlib.Path, *, keep: int, is_chief: bool):
    self.directory = pathlib.Path(directory)
    self._is_chief = is_chief
    try:
      with quiet_orbax():
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                enable_async_checkpointing=False))
    except OSError as e:
      raise metrics_io.write_error(self.directory, e) from e

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def last_good_text(self) -> str:
    """'the last good checkpoint is step N in DIR', or that there is none yet."""
    step = self.latest_step()
    if step is None:
      return f'there is no checkpoint in {self.directory} yet, so a rerun starts from the beginning'
    return f'the last good checkpoint is step {step} in {self.directory}'

  def save(self, step: int, state: Any) -> None:
    """Saves `state` at `step`; raises WorkdirError (and removes the partial save) on failure."""
    try:
      with quiet_orbax():
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (orbax and TensorStore raise many types)
      self._remove_partial_saves()
      with contextlib.suppress(Exception):
        self._manager.reload()
      raise WorkdirError(
          f'cannot save checkpoint step {step} to {self.directory / str(step)}: {describe_error(e)}. '
          f'Stopped at once; {self.last_good_text()}. Free space (or fix the mount), then rerun the '
          'same command.') from e

  def wait_until_finished(self) -> None:
    """Saves are synchronous; kept so callers may wait as for any orbax manager."""
    with quiet_orbax():
      self._manager.wait_until_finished()

  def _remove_partial_saves(self) -> None:
    if self._is_chief:
      for tmp in self.directory.glob(f'*{_TMP_MARK}*'):
        shutil.rmtree(tmp, ignore_errors=True)

  def restore(self, abstract_state: Any, shardings: Any) -> tuple[int | None, Any]:
    """(step, state) of the newest readable checkpoint, or (None, None) when there is none.

    A newer unreadable step is moved aside to `corrupt-<step>` (never deleted) with a warning.
    When no step is readable nothing is moved: it is an error, not a fresh start.
    """
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    failed: list[tuple[int, str]] = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      state, error = None, ''
      try:
        with quiet_orbax():
          state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many types for bad files)
        error = describe_error(e)
      if not _all_agree(state is not None):
        failed.append((step, error or 'unreadable on another process'))
        continue
      for bad, why in failed:
        self._move_aside(bad, why, step)
      if failed:
        multihost_utils.sync_global_devices('normjax_corrupt_checkpoints_moved')
        self._manager.reload()
      return step, state
    if failed:
      causes = '; '.join(f'step {s}: {why}' for s, why in failed)
      raise CheckpointError(
          f'no checkpoint in {self.directory} can be restored ({causes}). Move those step '
          'directories away to start afresh in this workdir, or pass --config.train.overwrite=True.')
    return None, None

  def _move_aside(self, step: int, why: str, resumed: int) -> None:
    if not self._is_chief:
      return
    src = self.directory / str(step)
    dst = self.directory / f'{CORRUPT_PREFIX}{step}'
    n = 1
    while dst.exists():
      n += 1
      dst = self.directory / f'{CORRUPT_PREFIX}{step}.{n}'
    try:
      src.rename(dst)
    except OSError as e:
      raise metrics_io.write_error(src, e) from e
    logging.warning('checkpoint step %d in %s is unreadable (%s); moved it to %s and resumed from '
                    'step %d', step, self.directory, why, dst, resumed)


def restore_latest(workdir: str | os.PathLike) -> tuple[int, dict[str, Any]]:
  """The newest readable checkpoint of a run as single-device arrays, whatever topology saved it.

  Reads only: an unreadable newer step is skipped with a warning, not moved.
  """
  checkpoints = RunDir(pathlib.Path(workdir).absolute()).checkpoints  # orbax wants absolute paths
  manager = None
  if checkpoints.is_dir():
    with quiet_orbax():
      manager = ocp.CheckpointManager(checkpoints, item_handlers=ocp.StandardCheckpointHandler(),
                                      options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  steps = sorted(manager.all_steps(), reverse=True) if manager else []
  if not steps:
    raise CheckpointError(f'{workdir}: no checkpoints to restore (expected {checkpoints}/<step>)')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  failed = []
  for step in steps:
    try:
      with quiet_orbax():
        tree = manager.item_metadata(step).tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types for bad files)
      failed.append(f'step {step}: {describe_error(e)}')
      continue
    if failed:
      logging.warning('%s: skipped unreadable checkpoints (%s); using step %d', checkpoints,
                      '; '.join(failed), step)
    return step, restored
  raise CheckpointError(f'no checkpoint in {checkpoints} can be restored ({"; ".join(failed)})')
