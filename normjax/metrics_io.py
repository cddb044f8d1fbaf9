"""Run outputs: crash-safe metrics.jsonl appends, atomic JSON files, TensorBoard when TF is present.

metrics.jsonl is the source of truth (readable without TF); TensorBoard events
are written through clu's writers only where TensorFlow imports.
"""
import json
import logging as std_logging
import os
import pathlib
from typing import Any, Iterator

import numpy as np
from absl import logging


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes a temp file then renames it, so a crash leaves the old or the new file, never half."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_to_builtin)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


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


def _to_builtin(x: Any) -> Any:
  if isinstance(x, (np.generic, np.ndarray)) or hasattr(x, '__array__'):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()
  raise TypeError(f'not JSON serializable: {type(x)}')


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
  return metric_writers.SummaryWriter(str(workdir / 'tensorboard'))


class MetricsLog:
  """Appends one JSON object per record; mirrors scalars (and layer histograms) to TensorBoard."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self.enabled = enabled  # False on every process but 0
    self._tb = _tensorboard_writer(pathlib.Path(workdir)) if enabled else None

  def write(self, kind: str, step: int, epoch: float, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: v if isinstance(v, (int, float, str, bool)) else _to_builtin(v) for k, v in values.items()}
    record = {'kind': kind, 'step': int(step), 'epoch': float(epoch), **values}
    line = json.dumps(record, sort_keys=True) + '\n'
    # One write() on an O_APPEND descriptor: a crash leaves whole lines plus at most one torn line.
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      os.write(fd, line.encode())
      os.fsync(fd)
    finally:
      os.close(fd)
    if self._tb is not None:
      if kind == 'layers':  # hundreds of per-layer values: one histogram per statistic
        groups: dict[str, list[float]] = {}
        for k, v in values.items():
          groups.setdefault(k.split('/', 1)[0], []).append(v)
        self._tb.write_histograms(step, {f'layers/{k}': np.asarray(v) for k, v in groups.items()})
      else:
        self._tb.write_scalars(step, {f'{kind}/{k}': v for k, v in values.items() if isinstance(v, (int, float))})
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (a resume from the checkpoint at `step`), atomically."""
    if not self.enabled or not self.path.exists():
      return
    kept = [r for r in read_jsonl(self.path) if r['step'] <= step]
    tmp = self.path.with_name(self.path.name + '.tmp')
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(r, sort_keys=True) + '\n' for r in kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
