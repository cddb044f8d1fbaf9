r"""Entry point: `python -m normjax.main --config=configs/frn_noclip.py [--workdir=DIR]`.

Without --workdir the run goes to workdir/<config stem>[-<arg>...] under the current
directory (the same name `normjax.sweep` gives it). Any field can be overridden with
`--config.<field>=<value>`, e.g. `--config.train.batch_size=32`. Rerunning the same command
resumes.
Multi-host: jax.distributed is initialized from the environment (TPU pods,
SLURM, Open MPI) or from --coordinator_address/--num_processes/--process_id.
"""
import pathlib
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from normjax import config_schema, errors, startup

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics.jsonl, '
                                'summary.json. Default: workdir/<config stem>[-<arg>...].')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'jax.distributed coordinator host:port.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'jax.distributed: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'jax.distributed: this process index.')
flags.mark_flags_as_required(['config'])



def _fail(message: str) -> None:
  print(f'normjax: error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with unknown --config.<field> overrides reported by name instead of a traceback."""
  for arg in argv[1:]:
    if arg.startswith('--config='):
      config_schema.make_configs_importable(arg[len('--config='):])
    if arg.startswith('--config.'):
      path = arg[len('--config.'):].split('=', 1)[0]
      if path not in config_schema.SCHEMA:
        _fail(str(config_schema.unknown_field_error(path)))
  try:
    return FLAGS(argv)
  except flags.Error as e:
    # config_flags re-raises get_config()'s errors with a traceback in the message; report the
    # innermost user error (e.g. an unknown `:ARG`) as its one line.
    error, inner = e, e
    while inner is not None:
      error = inner if isinstance(inner, errors.USER_ERRORS) else error
      inner = inner.__cause__ or inner.__context__
    _fail(str(error))


def _preempted_outside_loop(signum: int, frame) -> None:
  del frame
  raise errors.Preempted(None, signum)


def main(argv: list[str]) -> None:
  # Until the training loop installs its own handlers (which save a checkpoint first), SIGTERM and
  # SIGINT end the run with the same one line and exit code as a preemption mid-run.
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, _preempted_outside_loop)
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir = _WORKDIR.value or str(pathlib.Path('workdir') / config_schema.config_stem(
      config_flags.get_config_filename(FLAGS['config'])))
  logging.info('workdir: %s%s; rerun the same command to resume', pathlib.Path(workdir).absolute(),
               '' if _WORKDIR.value else ' (from the config name; --workdir overrides)')
  startup.prepare_process()
  try:
    # Imported under the handlers above: importing jax and orbax takes seconds.
    from normjax import parallel, train  # pylint: disable=g-import-not-at-top
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train.train_and_evaluate(_CONFIG.value, workdir)
  except errors.USER_ERRORS as e:
    _fail(str(e))
  except errors.Preempted as e:
    logging.warning('%s', e)
    sys.exit(128 + e.signum)


if __name__ == '__main__':
  startup.reexec_for_cpu()
  app.run(main, flags_parser=_parse_flags)
