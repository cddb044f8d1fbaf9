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


class WorkdirError(RuntimeError):
  """The workdir cannot be written: another run holds it, it is read-only, or the disk is full."""


# A BaseException, like KeyboardInterrupt: raised from a signal handler at any point, it must not
# be swallowed by an `except Exception` on the way out.
class Preempted(BaseException):
  """SIGTERM/SIGINT arrived; a checkpoint was saved at `step` (None: outside the training loop)."""

  def __init__(self, step: int | None, signum: int):
    if step is None:  # start-up (or the final evaluation): no unsaved training state exists
      message = (f'preempted by signal {signum} outside the training loop, before its first step or '
                 'after its last; no unsaved training state, so nothing to save. Rerun the same '
                 'command to start or resume.')
    else:
      message = (f'preempted by signal {signum} at step {step}; checkpoint saved, rerun the same '
                 'command to resume')
    super().__init__(message)
    self.step, self.signum = step, signum


# What `normjax.main` reports as one line and exit 2.
USER_ERRORS = (ConfigError, DatasetUnavailableError, WeightsError, CheckpointError,
               NonFiniteError, FeatureCacheError, WorkdirError)
