"""A run's workdir layout, named once: what training writes there and what the tools add.

  <workdir>/config.json     the run's config (resume refuses a different one)
           metrics.jsonl    every train/val/test/layers record, appended
           summary.json     written when the run finishes
           wall_time.json   training seconds up to each checkpointed step, summed over resumes
           checkpoints/     orbax steps (and corrupt-<step> moved aside)
           tensorboard/     the same records as TensorBoard events, where TensorFlow imports
           .normjax.lock    held by the running process
           landscape/       `python -m normjax.landscape` surfaces
           gradcam/         `python -m normjax.gradcam` figures

No JAX: the report and the sweep read runs without it.
"""
import dataclasses
import pathlib
from typing import ClassVar


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The paths inside one run's workdir."""
  path: pathlib.Path

  CONFIG: ClassVar[str] = 'config.json'
  METRICS: ClassVar[str] = 'metrics.jsonl'
  SUMMARY: ClassVar[str] = 'summary.json'
  WALL_TIME: ClassVar[str] = 'wall_time.json'
  CHECKPOINTS: ClassVar[str] = 'checkpoints'
  TENSORBOARD: ClassVar[str] = 'tensorboard'
  LOCK: ClassVar[str] = '.normjax.lock'
  LANDSCAPE: ClassVar[str] = 'landscape'
  GRADCAM: ClassVar[str] = 'gradcam'
  # What training writes: `train.overwrite` removes exactly these.
  RUN_FILES: ClassVar[tuple[str, ...]] = (METRICS, SUMMARY, CONFIG, WALL_TIME)
  RUN_FOLDERS: ClassVar[tuple[str, ...]] = (CHECKPOINTS, TENSORBOARD)

  def __post_init__(self):
    object.__setattr__(self, 'path', pathlib.Path(self.path))  # a str or any os.PathLike works too

  @property
  def config(self) -> pathlib.Path:
    return self.path / self.CONFIG

  @property
  def metrics(self) -> pathlib.Path:
    return self.path / self.METRICS

  @property
  def summary(self) -> pathlib.Path:
    return self.path / self.SUMMARY

  @property
  def wall_time(self) -> pathlib.Path:
    return self.path / self.WALL_TIME

  @property
  def checkpoints(self) -> pathlib.Path:
    return self.path / self.CHECKPOINTS

  @property
  def tensorboard(self) -> pathlib.Path:
    return self.path / self.TENSORBOARD

  @property
  def lock(self) -> pathlib.Path:
    return self.path / self.LOCK

  @property
  def landscape(self) -> pathlib.Path:
    return self.path / self.LANDSCAPE

  @property
  def gradcam(self) -> pathlib.Path:
    return self.path / self.GRADCAM
