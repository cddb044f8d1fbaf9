"""Run outputs: crash-safe metrics.jsonl appends, atomic JSON files, TensorBoard when TF is present.

metrics.jsonl is the source of truth (readable without TF); TensorBoard events
are written through clu's writers only where TensorFlow imports. Every JSON
file is strict JSON: a NaN or infinity is written as null.
A failed write raises `WorkdirError` naming the file and leaves no temporary file.
"""
import contextlib
import errno
import json
import logging as std_logging
import math
import os
import pathlib
from typing import Any, Iterator

import numpy as np
from absl import logging

from normjax.errors import WorkdirError
from normjax.rundir import RunDir


def to_json(x: Any) -> Any:
  """`x` as plain JSON values: numpy scalars and arrays as numbers and lists, NaN/inf as None."""
  if isinstance(x, dict):
    return {str(k): to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_json(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray)) or hasattr(x, '__array__'):
    x = np.asarray(x)
    return to_json(x.item() if x.ndim == 0 else x.tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  raise TypeError(f'not JSON serializable: {type(x)}')


def dumps(obj: Any, **kwargs) -> str:
  """Strict JSON text (non-finite numbers as null), which every JSON parser reads."""
  return json.dumps(to_json(obj), allow_nan=False, **kwargs)


def write_error(path: str | os.PathLike, e: OSError) -> WorkdirError:
  """One line naming the file and the OS error, e.g. a full disk or a read-only mount."""
  return WorkdirError(f'cannot write {path}: {e.strerror or e}')


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes a temp file then renames it, so a crash leaves the old or the new file, never half."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + '.tmp')
  text = dumps(obj, indent=2, sort_keys=True)
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    raise write_error(path, e) from e
  finally:
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)  # a failed write (or a signal mid-write) leaves no temp file


def read_json(path: str | os.PathLike) -> Any:
  """Reads a JSON file; raises ValueError (naming the file) when it is not valid JSON."""
  try:
    return json.loads(pathlib.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: invalid JSON: {e}') from e


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
  """Yields records; a torn last line (crash mid-write) is ignored."""
  path = pathlib.Path(path)
  if not path.exists():
    return
  with open(path) as f:
    for line in f:
      if line.endswith('\n'):
        yield json.loads(line)


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the progress log (warnings still pass)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def quiet_library_logs() -> None:
  """Filters library INFO lines from absl's log output (entry points call it once)."""
  std_logging.getLogger('absl').addFilter(_QuietLibraries())


def _tensorboard_writer(workdir: pathlib.Path):
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's C++ start-up notices
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # clu.metric_writers needs tensorflow and tensorboard
    logging.info('No TensorBoard events (%s); metrics.jsonl has every record.', e)
    return None
  return metric_writers.SummaryWriter(str(RunDir(workdir).tensorboard))


class MetricsLog:
  """Appends one JSON object per record; mirrors scalars (and layer histograms) to TensorBoard."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.path = RunDir(workdir).metrics
    self.enabled = enabled  # False on every process but 0
    self._tb = _tensorboard_writer(pathlib.Path(workdir)) if enabled else None

  def write(self, kind: str, step: int, epoch: float, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = to_json({'kind': kind, 'step': int(step), 'epoch': float(epoch), **values})
    data = (dumps(record, sort_keys=True) + '\n').encode()
    # One write() on an O_APPEND descriptor: a crash leaves whole lines plus at most one torn line.
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
      raise write_error(self.path, e) from e
    try:
      size = os.fstat(fd).st_size
      try:
        written = os.write(fd, data)
        if written != len(data):  # a full disk can take part of the line
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)
      except OSError as e:
        with contextlib.suppress(OSError):
          os.ftruncate(fd, size)  # no torn line for the next record to be glued to
        raise write_error(self.path, e) from e
    finally:
      os.close(fd)
    if self._tb is not None:
      self._write_tensorboard(kind, step, record)

  def _write_tensorboard(self, kind: str, step: int, record: dict[str, Any]) -> None:
    numbers = {k: v for k, v in record.items() if k not in ('kind', 'step', 'epoch')
               and isinstance(v, (int, float)) and not isinstance(v, bool)}
    try:
      if kind == 'layers':  # hundreds of per-layer values: one histogram per statistic
        groups: dict[str, list[float]] = {}
        for k, v in numbers.items():
          groups.setdefault(k.split('/', 1)[0], []).append(v)
        self._tb.write_histograms(step, {f'layers/{k}': np.asarray(v) for k, v in groups.items()})
      else:
        self._tb.write_scalars(step, {f'{kind}/{k}': v for k, v in numbers.items()})
      self._tb.flush()
    except Exception as e:  # pylint: disable=broad-except  (TensorFlow raises its own error types)
      raise WorkdirError(f'cannot write TensorBoard events in {RunDir(self.path.parent).tensorboard}: '
                         f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from e

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (a resume from the checkpoint at `step`).

    The dropped records are the file's tail in a run written under the workdir lock, so the
    file is cut in place: no temporary copy, which a full disk could not hold. A file out of
    step order is rewritten atomically instead.
    """
    if not self.enabled or not self.path.exists():
      return
    try:
      data = self.path.read_bytes()
      lines = [line for line in data.splitlines(keepends=True) if line.endswith(b'\n')]  # drops a torn one
      keep = [json.loads(line)['step'] <= step for line in lines]
      n = keep.index(False) if False in keep else len(keep)
      if any(keep[n:]):  # out of step order: keep every record up to `step`, wherever it is
        self._rewrite([line for line, k in zip(lines, keep) if k])
        return
      size = sum(len(line) for line in lines[:n])
      if size != len(data):
        with open(self.path, 'r+b') as f:
          f.truncate(size)
          os.fsync(f.fileno())
    except OSError as e:
      raise write_error(self.path, e) from e

  def _rewrite(self, lines: list[bytes]) -> None:
    tmp = self.path.with_name(self.path.name + '.tmp')
    try:
      with open(tmp, 'wb') as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    finally:
      with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
