"""Finished and in-progress runs read back from their workdirs, and their headline numbers.

A run is any directory holding `summary.json` (finished) or only `metrics.jsonl` (in
progress, or stopped before the end); everything here is read from those JSON files (and
`config.json`), so it needs neither JAX nor matplotlib. `normjax.train` writes the same
headline numbers into summary.json with `record_stats`; the report, the sweep and the tuner
read and format them from here.
"""
import dataclasses
import json
import os
import pathlib
import re
import statistics
from typing import Any, Iterable

from normjax import config_schema, metrics_io
from normjax.rundir import RunDir

NA = 'n/a'


@dataclasses.dataclass
class Run:
  """One workdir: its config, summary (None while in progress) and metrics records."""
  name: str
  path: pathlib.Path
  config: dict[str, Any]
  summary: dict[str, Any] | None
  records: list[dict[str, Any]]

  @property
  def finished(self) -> bool:
    return self.summary is not None

  def cfg(self, dotted: str, default: Any = None) -> Any:
    """A config field by dotted name ('optim.clip'), or `default` when absent."""
    node: Any = self.config
    for key in dotted.split('.'):
      if not isinstance(node, dict) or key not in node:
        return default
      node = node[key]
    return node

  def kind(self, kind: str) -> list[dict[str, Any]]:
    return [r for r in self.records if r.get('kind') == kind]


def natural_key(text: str) -> list[Any]:
  """Sort key that orders 'features_2' before 'features_10'."""
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', text)]


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
  """metrics.jsonl's records; names the file when a line is not JSON."""
  try:
    return list(metrics_io.read_jsonl(path))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not a JSON record: {e}') from e


def load_run(path: pathlib.Path, root: pathlib.Path) -> Run:
  run_dir = RunDir(path)
  summary = None
  if run_dir.summary.exists():
    summary = metrics_io.read_json(run_dir.summary)
  config = {}
  if summary is not None and 'config' in summary:
    config = summary['config']
  elif run_dir.config.exists():
    config = metrics_io.read_json(run_dir.config)
  records = []
  if run_dir.metrics.exists():
    records = read_metrics(run_dir.metrics)
  name = path.relative_to(root).as_posix()
  config = config_schema.upgrade(config) if config else config
  return Run(name=path.resolve().name if name == '.' else name, path=path, config=config,
             summary=summary, records=records)


def find_runs(root: str | pathlib.Path) -> list[Run]:
  """Every directory under `root` (itself included) holding summary.json or metrics.jsonl."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f'{root} is not a directory')
  runs = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Prune orbax trees (many files, never a run): never descend there.
    dirnames[:] = [d for d in dirnames if d != RunDir.CHECKPOINTS]
    if RunDir.SUMMARY in filenames or RunDir.METRICS in filenames:
      runs.append(load_run(pathlib.Path(dirpath), root))
  return sorted(runs, key=lambda r: natural_key(r.name))


def record_stats(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
  """Validation accuracies and first/last grad norm from metrics.jsonl records (None when absent).

  From the records, not the process's memory, so the figures survive resumes.
  """
  records = list(records)
  val = [r['accuracy'] for r in records if r.get('kind') == 'val']
  epoch1 = [r['accuracy'] for r in records if r.get('kind') == 'val' and r['epoch'] >= 1 - 1e-6]
  grad = [r['grad_norm'] for r in records if r.get('kind') == 'train' and 'grad_norm' in r]
  return {
      'final_val_accuracy': val[-1] if val else None,
      'best_val_accuracy': max(val) if val else None,
      'epoch1_val_accuracy': epoch1[0] if epoch1 else None,
      'grad_norm_first': grad[0] if grad else None,
      'grad_norm_last': grad[-1] if grad else None,
  }


@dataclasses.dataclass
class Stats:
  """A run's headline numbers; accuracies are fractions, None when unknown."""
  final_val: float | None
  best_val: float | None
  epoch1_val: float | None
  test: float | None
  grad_norm_first: float | None
  grad_norm_last: float | None
  images_per_sec: float | None
  wall_time_s: float | None
  epochs: float | None
  device: str | None
  peak_memory_bytes: float | None    # device allocator peak (GPU/TPU)
  peak_host_rss_bytes: float | None  # written instead on CPU, which has no allocator stats


def run_stats(run: Run) -> Stats:
  """Summary values where the run finished, else what its metrics records show so far."""
  s = run.summary or {}

  def pick(key: str, fallback: Any) -> Any:
    return fallback if s.get(key) is None else s[key]

  so_far = record_stats(run.records)
  test = [r['accuracy'] for r in run.kind('test')]
  # The first window includes compilation, so the fallback is the median window.
  speed = [r['images_per_sec'] for r in run.kind('train') if 'images_per_sec' in r]
  device = f"{s['device_kind']} x{s.get('num_devices', 1)}" if 'device_kind' in s else None
  return Stats(
      final_val=pick('final_val_accuracy', so_far['final_val_accuracy']),
      best_val=pick('best_val_accuracy', so_far['best_val_accuracy']),
      epoch1_val=pick('epoch1_val_accuracy', so_far['epoch1_val_accuracy']),
      test=pick('test_accuracy', test[-1] if test else None),
      grad_norm_first=pick('grad_norm_first', so_far['grad_norm_first']),
      grad_norm_last=pick('grad_norm_last', so_far['grad_norm_last']),
      images_per_sec=pick('images_per_sec', statistics.median(speed) if speed else None),
      wall_time_s=s.get('wall_time_s'),
      epochs=pick('epochs', run.records[-1].get('epoch') if run.records else None),
      device=device,
      peak_memory_bytes=s.get('peak_memory_bytes'),
      peak_host_rss_bytes=s.get('peak_host_rss_bytes'))


def fmt_pct(x: float | None) -> str:
  return NA if x is None else f'{100 * x:.2f}'


def fmt_num(x: float | None, digits: int = 4) -> str:
  return NA if x is None else f'{x:.{digits}g}'


def fmt_duration(seconds: float | None) -> str:
  if seconds is None:
    return NA
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f'{h}:{m:02d}:{s:02d}'
