"""Every error a user can fix from the command line.

`normjax.main` prints these as one line (`normjax: error: ...`) and exits 2;
`Preempted` exits 128 + signal. Modules raise them; none of them needs the
config schema to do so.
"""


class ConfigError(ValueError):
  """A config field has an unknown name or a value outside its allowed set."""


class DatasetUnavailableError(RuntimeError):
  """The dataset is not prepared and cannot be prepared from what is here."""


class WeightsError(ValueError):
  """A pretrained weight file cannot be found, is corrupt, unsafe, or does not fit the model."""


class CheckpointError(RuntimeError):
  """A checkpoint or workdir cannot be resumed (corrupted, or made by a different config)."""


class NonFiniteError(RuntimeError):
  """The loss or gradient became NaN/inf and train.on_nonfinite is 'stop'."""


class FeatureCacheError(RuntimeError):
  """The frozen-feature cache cannot be built or read (disk space, a foreign key)."""


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint was saved at `step`."""

  def __init__(self, step: int, signum: int):
    super().__init__(f'preempted by signal {signum} at step {step}; checkpoint saved, '
                     'rerun the same command to resume')
    self.step, self.signum = step, signum


# What `normjax.main` reports as one line and exit 2.
USER_ERRORS = (ConfigError, DatasetUnavailableError, WeightsError, CheckpointError,
               NonFiniteError, FeatureCacheError)
