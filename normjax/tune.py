r"""Hyperparameter search: Optuna with Hyperband pruning over the seed's MNIST CNN space (study.md s. 5).

  python -m normjax.tune --config=configs/tune_mnist.py --trials=5 [--workdir=workdir/tune_mnist] \
      [--max_epochs=7] [--sampler=tpe|random] [--set=FIELD=VALUE ...]

The seed searched with Keras Tuner's Hyperband (max_epochs=7, factor=3) over 2-5 convs (32-256
filters, kernel 3 or 5), 2-5 dense layers (32-256 units), dropout 0-0.5 step 0.1 and LR 1e-4,
5e-4 or 1e-3. Here each trial samples that space (`SEED_SPACE`: filters, kernel and units per
layer, filters and units in steps of 32, one dropout rate after every dense layer), builds a
`tunable_cnn` config from the `--config` file (models/tunable_cnn.py), and trains it with
normjax.train in its own run directory WORKDIR/trial_<k>, one epoch at a time:
train_and_evaluate with train.num_epochs = 1, 2, ... resumes from the previous epoch's
checkpoint, and after each epoch the val accuracy from metrics.jsonl is reported to Optuna, whose
HyperbandPruner(min_resource=1, max_resource=7, reduction_factor=3) may stop the trial there
(it is not asked after the last epoch, when the trial is done anyway). These epoch calls skip the
test set (train_and_evaluate's test=False); a trial that completes is evaluated on test once, by
one more call that trains nothing, and its test accuracy goes into the table (a pruned one has none).
(Optuna's Hyperband runs its successive-halving brackets asynchronously, trial by trial, where
Keras Tuner trains each round's survivors together.) A trial's value is its best epoch's val
accuracy, Keras Tuner's trial score. A schedule that depends on train.num_epochs (cosine) is
refused: the LR must be constant across the epoch-by-epoch resumes.

`--trials=N` runs until the study holds N finished trials (complete, pruned, or failed with an
error). Everything lives in WORKDIR: the study in `optuna.db` (SQLite, reloaded by the same
command), `trials.md` (a table: params, epochs reached, val and test accuracy, state) and `trials.png`
(val accuracy per epoch per trial, pruned ones dashed; best so far against trial number),
rewritten after every trial. One tune process holds WORKDIR's lock at a time.

Resume: rerunning the same command keeps every finished trial. A trial that was killed (SIGKILL,
a crash) or preempted (SIGTERM/SIGINT: its epoch's checkpoint is saved, exit 128+signal) is
marked FAIL and re-run as a new trial with the same params, in its run directory renamed to
trial_<new number>, so it resumes from its last checkpoint and re-reports the epochs already
trained (the pruner sees them again). The table shows the killed trial as FAIL, "re-run as" the
new one; it does not count towards N. The sampler's seed is config.seed plus the number of trials
already in the study, so a resumed search does not redraw the params of its first trials.
"""
import argparse
import dataclasses
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any, Callable, Sequence

from absl import logging
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import ml_collections
import optuna

from normjax import checkpoint, config_schema, errors, metrics_io, runs, startup, train
from normjax.models import tunable_cnn
from normjax.rundir import RunDir

TrialState = optuna.trial.TrialState
STUDY_NAME = 'normjax_tune'
DB_NAME = 'optuna.db'
TABLE_NAME = 'trials.md'
PLOT_NAME = 'trials.png'
# The seed's Hyperband (study.md section 5): max_epochs=7, factor=3; one epoch is the least.
MAX_EPOCHS, REDUCTION_FACTOR, MIN_EPOCHS = 7, 3, 1
# Errors every trial would meet (config, data, workdir) stop the search; a trial's NaN does not.
STOP_ERRORS = tuple(e for e in errors.USER_ERRORS if e is not errors.NonFiniteError)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Ranges are inclusive (lo, hi, step); the seed gives filter and unit ranges without a step."""
  conv_layers: tuple[int, int] = (2, 5)
  filters: tuple[int, int, int] = (32, 256, 32)  # step 32: Keras Tuner's hp.Int examples use it
  kernels: tuple[int, ...] = (3, 5)
  dense_layers: tuple[int, int] = (2, 5)
  units: tuple[int, int, int] = (32, 256, 32)
  dropout: tuple[float, float, float] = (0.0, 0.5, 0.1)
  lrs: tuple[float, ...] = (1e-4, 5e-4, 1e-3)


SEED_SPACE = SearchSpace()  # study.md section 5


def suggest(trial: optuna.Trial, space: SearchSpace = SEED_SPACE) -> dict[str, Any]:
  """Samples one architecture and LR; returns the config fields it sets ('model.conv_layers': ...)."""
  n_conv = trial.suggest_int('conv_layers', *space.conv_layers)
  conv = tuple((trial.suggest_int(f'filters_{i}', *space.filters[:2], step=space.filters[2]),
                trial.suggest_categorical(f'kernel_{i}', list(space.kernels)))
               for i in range(n_conv))
  n_dense = trial.suggest_int('dense_layers', *space.dense_layers)
  units = tuple(trial.suggest_int(f'units_{i}', *space.units[:2], step=space.units[2])
                for i in range(n_dense))
  # A float step gives values like 0.30000000000000004: round the error off.
  dropout = round(trial.suggest_float('dropout', *space.dropout[:2], step=space.dropout[2]), 6)
  lr = trial.suggest_categorical('lr', list(space.lrs))
  return {'model.conv_layers': tunable_cnn.format_conv_layers(conv),
          'model.dense_layers': tunable_cnn.format_dense_layers(units),
          'model.dropout': dropout, 'optim.lr': lr,
          'optim.backbone_lr': lr}  # from scratch: one LR for every layer


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError where the config cannot be trained epoch by epoch as a tunable_cnn."""
  if config.model.name != 'tunable_cnn':
    raise errors.ConfigError(f'config.model.name = {config.model.name!r}: normjax.tune samples '
                             'tunable_cnn architectures; use model.name=tunable_cnn')
  if config.model.head != 'linear':
    raise errors.ConfigError(f'config.model.head = {config.model.head!r}: tunable_cnn ends in its '
                             'dense layers; use model.head=linear (dropout, then the final Dense)')
  if config.optim.schedule != 'constant':
    raise errors.ConfigError(
        f'config.optim.schedule = {config.optim.schedule!r} decays over train.num_epochs, which '
        'normjax.tune raises epoch by epoch (each trial resumes); use optim.schedule=constant')


def trial_config(config: ml_collections.ConfigDict, fields: dict[str, Any]) -> ml_collections.ConfigDict:
  """A validated copy of `config` with `fields` ({'model.dropout': 0.2, ...}) set."""
  config = ml_collections.ConfigDict(config.to_dict())
  for path, value in fields.items():
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config_schema.validate(config)


def make_pruner(max_epochs: int = MAX_EPOCHS) -> optuna.pruners.HyperbandPruner:
  return optuna.pruners.HyperbandPruner(min_resource=MIN_EPOCHS, max_resource=max_epochs,
                                        reduction_factor=REDUCTION_FACTOR)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
  if name == 'tpe':
    return optuna.samplers.TPESampler(seed=seed)
  if name == 'random':
    return optuna.samplers.RandomSampler(seed=seed)
  raise errors.ConfigError(f'--sampler={name}: allowed: tpe, random')


def trial_dir(workdir: pathlib.Path, number: int) -> pathlib.Path:
  return workdir / f'trial_{number}'


def epoch_val_accuracy(run_dir: pathlib.Path) -> dict[int, float]:
  """Epoch -> val accuracy of a run, for the epochs its checkpoints cover.

  A val record newer than the last checkpoint (a kill between the two) is left out: the next
  train_and_evaluate call drops it and trains that epoch again.
  """
  steps = [int(p.name) for p in RunDir(run_dir).checkpoints.glob('*') if p.name.isdigit()]
  if not steps:
    return {}
  latest = max(steps)
  return {int(round(r['epoch'])): r['accuracy'] for r in metrics_io.read_jsonl(RunDir(run_dir).metrics)
          if r['kind'] == 'val' and r['step'] <= latest}


def _counts(trial: optuna.trial.FrozenTrial) -> bool:
  """Finished trials count towards --trials; a killed one does not (its re-run does)."""
  return (trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
          or (trial.state == TrialState.FAIL and 'error' in trial.user_attrs))


def _retry_killed_trials(study: optuna.Study) -> None:
  """Fails trials a killed process left RUNNING and queues each one's re-run (same params)."""
  for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    study.tell(t.number, state=TrialState.FAIL)
  trials = study.get_trials(deepcopy=False)
  retried = {t.user_attrs.get('retry_of') for t in trials}
  for t in trials:
    if t.state == TrialState.FAIL and 'error' not in t.user_attrs and t.number not in retried:
      logging.warning('trial %d did not finish (killed); re-running it as a new trial', t.number)
      study.enqueue_trial(t.params, user_attrs={'retry_of': t.number})


def _adopt_run_dir(workdir: pathlib.Path, trial: optuna.Trial) -> pathlib.Path:
  """trial_<k>, taking over the run directory of the killed trial it re-runs."""
  run_dir = trial_dir(workdir, trial.number)
  old = trial.user_attrs.get('retry_of')
  if old is not None and trial_dir(workdir, old).exists() and not run_dir.exists():
    os.replace(trial_dir(workdir, old), run_dir)
  return run_dir


def _params_text(t: optuna.trial.FrozenTrial) -> str:
  # Float steps give 0.30000000000000004 for 0.3.
  return str({k: round(v, 6) if isinstance(v, float) else v for k, v in t.params.items()})


def _fmt(x: float | None) -> str:
  return '-' if x is None else f'{x:.4f}'


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
  done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
          if t.intermediate_values]
  return max(done, key=lambda t: max(t.intermediate_values.values()), default=None)


def _best_text(study: optuna.Study, current: float | None = None, number: int | None = None) -> str:
  best = _best(study)
  value = max(best.intermediate_values.values()) if best else None
  if current is not None and (value is None or current > value):
    return f'{current:.4f} (trial {number})'
  return f'{value:.4f} (trial {best.number})' if best else '-'


# train.train_and_evaluate(config, workdir, test=...): a summary, or None with test=False.
TrainFn = Callable[..., dict[str, Any] | None]


def run_trial(study: optuna.Study, trial: optuna.Trial, config: ml_collections.ConfigDict,
              workdir: pathlib.Path, max_epochs: int, space: SearchSpace, train_fn: TrainFn,
              tag: str) -> None:
  """Trains one trial epoch by epoch, reporting each epoch's val accuracy; tells the study its end."""
  fields = suggest(trial, space)
  run_config = trial_config(config, fields)
  run_dir = _adopt_run_dir(workdir, trial)
  retry = trial.user_attrs.get('retry_of')
  print(f'{tag} trial {trial.number}{f" (re-run of {retry})" if retry is not None else ""}: '
        f'conv {fields["model.conv_layers"]} dense {fields["model.dense_layers"]} '
        f'dropout {fields["model.dropout"]:g} lr {fields["optim.lr"]:g} in {run_dir}', flush=True)
  t0, best = time.time(), -math.inf
  for epoch in range(1, max_epochs + 1):
    done = epoch_val_accuracy(run_dir)
    if epoch not in done:
      run_config.train.num_epochs = epoch
      train_fn(run_config, str(run_dir), test=False)  # the pruner reads val only
      done = epoch_val_accuracy(run_dir)
      if epoch not in done:  # train.max_steps ended the run before this epoch's end
        break
    accuracy = done[epoch]
    best = max(best, accuracy)
    trial.report(accuracy, epoch)
    print(f'{tag} trial {trial.number} epoch {epoch}/{max_epochs}: val {accuracy:.4f} | '
          f'best so far {_best_text(study, best, trial.number)} | '
          f'{runs.fmt_duration(time.time() - t0)}', flush=True)
    # After the last epoch the trial is done: pruning it then would only mislabel it.
    if epoch < max_epochs and trial.should_prune():
      study.tell(trial, state=TrialState.PRUNED)
      print(f'{tag} trial {trial.number}: pruned after epoch {epoch} (val {accuracy:.4f})', flush=True)
      return
  if best == -math.inf:
    raise errors.ConfigError('train.max_steps ends the trial before its first epoch; raise it or '
                             'set it to 0')
  # Complete: the test pass the epoch calls skipped, at the last whole epoch (nothing left to train).
  run_config.train.num_epochs = max(done)
  test = train_fn(run_config, str(run_dir))['test_accuracy']
  trial.set_user_attr('test_accuracy', test)
  study.tell(trial, best)
  print(f'{tag} trial {trial.number}: complete, best val {best:.4f}, test {test:.4f} in '
        f'{runs.fmt_duration(time.time() - t0)}', flush=True)


def _check_same_search(study: optuna.Study, config: ml_collections.ConfigDict, max_epochs: int) -> None:
  """Refuses to extend a study made with another config or Hyperband length."""
  saved = study.user_attrs.get('config')
  if saved is None:
    study.set_user_attr('config', metrics_io.to_json(config.to_dict()))
    study.set_user_attr('max_epochs', max_epochs)
    return
  diffs = checkpoint.config_diffs(saved, config)
  if study.user_attrs.get('max_epochs') != max_epochs:
    diffs.append(f'--max_epochs: {study.user_attrs.get("max_epochs")} -> {max_epochs}')
  if diffs:
    raise errors.ConfigError(f'the study in this workdir was made with a different search '
                             f'({"; ".join(diffs)}); use another --workdir')


def open_study(workdir: pathlib.Path, sampler: str, seed: int, max_epochs: int,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
  """The study in WORKDIR/optuna.db, created or reloaded."""
  optuna.logging.set_verbosity(optuna.logging.WARNING)  # normjax.tune prints its own progress
  study = optuna.create_study(
      study_name=STUDY_NAME, storage=f'sqlite:///{workdir.absolute() / DB_NAME}', direction='maximize',
      pruner=pruner or make_pruner(max_epochs), load_if_exists=True)
  # Seeded by the trials so far: a resumed search draws new params, not its first trials' again.
  study.sampler = make_sampler(sampler, seed + len(study.get_trials(deepcopy=False)))
  return study


def run_search(config: ml_collections.ConfigDict, workdir: str | os.PathLike, trials: int, *,
               max_epochs: int = MAX_EPOCHS, sampler: str = 'tpe', space: SearchSpace = SEED_SPACE,
               pruner: optuna.pruners.BasePruner | None = None,
               train_fn: TrainFn | None = None) -> optuna.Study:
  """Runs (or resumes) the search until the study holds `trials` finished trials."""
  train_fn = train_fn or train.train_and_evaluate
  config = config_schema.validate(config)
  check_config(config)
  workdir = pathlib.Path(workdir).absolute()
  with checkpoint.WorkdirLock(workdir):
    study = open_study(workdir, sampler, config.seed, max_epochs, pruner)
    _check_same_search(study, config, max_epochs)
    _retry_killed_trials(study)
    t0 = time.time()
    try:
      while (n := sum(_counts(t) for t in study.get_trials(deepcopy=False))) < trials:
        trial = study.ask()
        tag = f'[{n + 1}/{trials}]'
        try:
          run_trial(study, trial, config, workdir, max_epochs, space, train_fn, tag)
        except errors.Preempted:
          raise  # left RUNNING: the next run re-runs it from its checkpoint
        except Exception as e:  # pylint: disable=broad-except  (one failed trial must not stop the rest)
          trial.set_user_attr('error', f'{type(e).__name__}: {e}'.splitlines()[0][:300])
          study.tell(trial, state=TrialState.FAIL)
          print(f'{tag} trial {trial.number}: FAILED: {type(e).__name__}: {e}', flush=True)
          if isinstance(e, STOP_ERRORS):
            raise
        write_outputs(study, workdir)
    finally:
      write_outputs(study, workdir)
  best = _best(study)
  print(f'tune: {trials} trials in {runs.fmt_duration(time.time() - t0)} (this run); best val '
        f'{_best_text(study)}; {workdir / TABLE_NAME}, {workdir / PLOT_NAME}', flush=True)
  if best is not None:
    print(f'tune: best params {_params_text(best)}', flush=True)
  return study


def _arch(t: optuna.trial.FrozenTrial) -> tuple[str, str]:
  p = t.params
  conv = ','.join(f'{p[f"filters_{i}"]}x{p[f"kernel_{i}"]}' for i in range(p.get('conv_layers', 0))
                  if f'filters_{i}' in p and f'kernel_{i}' in p)
  dense = ','.join(str(p[f'units_{i}']) for i in range(p.get('dense_layers', 0)) if f'units_{i}' in p)
  return conv or '-', dense or '-'


def _duration(t: optuna.trial.FrozenTrial) -> str:
  if t.datetime_start is None or t.datetime_complete is None:
    return '-'
  return runs.fmt_duration((t.datetime_complete - t.datetime_start).total_seconds())


def table_markdown(study: optuna.Study) -> str:
  """trials.md: one row per trial, best first line."""
  trials = study.get_trials(deepcopy=False)
  reruns = {t.user_attrs['retry_of']: t.number for t in trials if 'retry_of' in t.user_attrs}
  best = _best(study)
  counts = {s.name: sum(t.state == s for t in trials) for s in TrialState
            if any(t.state == s for t in trials)}
  lines = [
      '# normjax.tune: Optuna + HyperbandPruner on the seed\'s MNIST CNN space', '',
      f'Trials: {", ".join(f"{v} {k.lower()}" for k, v in counts.items()) or "none"}. '
      f'Best val accuracy: {_best_text(study)}.'
      + (f' Best params: `{_params_text(best)}`.' if best else ''), '',
      'Val accuracy: the best epoch\'s (a pruned trial: up to its pruning). Test accuracy: a complete '
      'trial\'s, after its last epoch. Conv layers are `<filters>x<kernel>`.', '',
      '| trial | state | epochs | val accuracy | last val | test accuracy | conv layers | dense units '
      '| dropout | lr | time | note |',
      '|---:|---|---:|---:|---:|---:|---|---|---:|---:|---:|---|',
  ]
  for t in trials:
    values = t.intermediate_values
    conv, dense = _arch(t)
    note = []
    if 'retry_of' in t.user_attrs:
      note.append(f're-run of {t.user_attrs["retry_of"]}')
    if t.number in reruns:
      note.append(f'killed; re-run as {reruns[t.number]}')
    if 'error' in t.user_attrs:
      note.append(t.user_attrs['error'].replace('|', '/'))
    lines.append(
        f'| {t.number} | {t.state.name} | {max(values, default=0)} | '
        f'{_fmt(max(values.values()) if values else None)} | '
        f'{_fmt(values[max(values)] if values else None)} | {_fmt(t.user_attrs.get("test_accuracy"))} | '
        f'{conv} | {dense} | '
        f'{t.params["dropout"]:g} | {t.params["lr"]:g} | {_duration(t)} | {"; ".join(note)} |'
        if 'dropout' in t.params else
        f'| {t.number} | {t.state.name} | 0 |{" - |" * 8} {_duration(t)} | {"; ".join(note)} |')
  return '\n'.join(lines) + '\n'


def write_plot(study: optuna.Study, path: pathlib.Path) -> None:
  """trials.png: val accuracy per epoch per trial (pruned dashed), and best so far by trial."""
  trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
  fig = Figure(figsize=(12, 4.5))  # no pyplot: the global backend stays as it is
  curves, best_ax = fig.subplots(1, 2)
  styles = {TrialState.COMPLETE: '-', TrialState.PRUNED: '--'}
  palette = colormaps['tab20'].colors  # 20 distinct colours: tab10 repeats from the 11th trial
  for i, t in enumerate(trials):
    epochs = sorted(t.intermediate_values)
    curves.plot(epochs, [t.intermediate_values[e] for e in epochs], styles.get(t.state, ':'), marker='o',
                markersize=3, color=palette[i % len(palette)], label=f'{t.number} ({t.state.name.lower()})')
  curves.set(xlabel='epoch', ylabel='val accuracy',
             title='val accuracy per epoch (solid: complete, dashed: pruned, dotted: failed/running)')
  curves.title.set_fontsize(9)
  if trials:
    curves.legend(fontsize=7, ncol=2, title='trial', title_fontsize=7, loc='best', framealpha=0.6)
  finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
  values = [max(t.intermediate_values.values()) for t in finished]
  running = [max(values[:i + 1]) for i in range(len(values))]
  for state, color in ((TrialState.COMPLETE, 'C0'), (TrialState.PRUNED, 'C1')):
    points = [(t.number, v) for t, v in zip(finished, values) if t.state == state]
    if points:
      best_ax.scatter(*zip(*points), s=16, color=color, label=f'trial ({state.name.lower()})', zorder=3)
  best_ax.step([t.number for t in finished], running, where='post', color='k', label='best so far')
  for ax in (curves, best_ax):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  best_ax.set(xlabel='trial', ylabel='best val accuracy of the trial', title='best so far vs trial')
  if finished:
    best_ax.legend(fontsize=8, loc='best', framealpha=0.6)
  fig.tight_layout()
  tmp = path.with_name(path.name + '.tmp.png')
  try:
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
  except OSError as e:
    raise metrics_io.write_error(path, e) from e
  finally:
    tmp.unlink(missing_ok=True)


def write_outputs(study: optuna.Study, workdir: pathlib.Path) -> None:
  """Rewrites trials.md and trials.png (atomically) from the study."""
  path = workdir / TABLE_NAME
  tmp = path.with_name(path.name + '.tmp')
  try:
    tmp.write_text(table_markdown(study))
    os.replace(tmp, path)
  except OSError as e:
    raise metrics_io.write_error(path, e) from e
  finally:
    tmp.unlink(missing_ok=True)
  write_plot(study, workdir / PLOT_NAME)


def _preempted(signum: int, frame) -> None:
  del frame
  raise errors.Preempted(None, signum)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m normjax.tune', description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='config file (model.name=tunable_cnn), e.g. '
                      'configs/tune_mnist.py or configs/tune_mnist.py:quick')
  parser.add_argument('--trials', required=True, type=int, help='finished trials the study should hold')
  parser.add_argument('--workdir', help='study and trial runs; default workdir/<config stem>')
  parser.add_argument('--max_epochs', type=int, default=MAX_EPOCHS,
                      help=f'Hyperband max_resource, epochs per trial at most (seed: {MAX_EPOCHS})')
  parser.add_argument('--sampler', choices=('tpe', 'random'), default='tpe',
                      help='tpe (Optuna\'s default) or random (as Keras Tuner\'s Hyperband samples)')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='config override, e.g. data.train_subset=2000 (repeatable)')
  args = parser.parse_args(argv)
  if args.trials < 1 or args.max_epochs < 1:
    parser.error('--trials and --max_epochs must be >= 1')
  workdir = args.workdir or f'workdir/{config_schema.config_stem(args.config)}'
  logging.set_verbosity(logging.INFO)  # train's progress lines; absl.app would do this in main.py
  for s in (signal.SIGTERM, signal.SIGINT):  # the train loop swaps in its own (checkpoint first)
    signal.signal(s, _preempted)
  startup.prepare_process()
  try:
    config = config_schema.apply_overrides(config_schema.load_config(args.config), args.set)
    run_search(config, workdir, args.trials, max_epochs=args.max_epochs, sampler=args.sampler)
  except errors.USER_ERRORS as e:
    print(f'tune: error: {e}', file=sys.stderr)
    return 2
  except errors.Preempted as e:
    print(f'tune: {e}', file=sys.stderr)  # names the step saved and says to rerun
    return 128 + e.signum
  return 0


if __name__ == '__main__':
  startup.reexec_for_cpu()
  sys.exit(main())
