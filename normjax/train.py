"""The training loop: train, evaluate each epoch, checkpoint, resume, preemption, summary.

Data order and augmentation are pure functions of (seed, step), and the metric
window is part of the checkpointed state, so a run killed at any step and
resumed ends bit-identical to an uninterrupted one. The jitted programs the
loop runs are built in normjax.steps.
"""
import contextlib
import pathlib
import resource
import signal
import time
from typing import Any, Iterable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from normjax import (checkpoint, config_schema, features, metrics_io, monitor, optim, parallel, pretrained,
                     runs, steps)
from normjax.errors import ConfigError, NonFiniteError, Preempted
from normjax.data import pipeline
from normjax.rundir import RunDir


class _PreemptionFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __enter__(self):
    self.signum = None
    self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning('signal %d: saving a checkpoint after this step, then exiting', signum)
    self.signum = signum

  def __exit__(self, *exc):
    for s, handler in self._old.items():
      signal.signal(s, handler)


class _SkippedSteps:
  """Steps skipped under train.on_nonfinite=skip, over the whole run (resumes included)."""

  def __init__(self, records: Iterable[dict], upto: int):
    self.skipped = self.steps = last = 0
    for r in records:  # the logged windows before the resume point
      if r['kind'] == 'train' and r['step'] <= upto:
        self.skipped += round((r.get('nonfinite') or 0.0) * (r['step'] - last))
        self.steps += r['step'] - last
        last = r['step']
    self._window = (-1, 0, 0)  # (first step, steps, skipped) of the window counted so far

  def update(self, step: int, window_steps: int, window_skipped: int) -> tuple[int, int]:
    """Counts the metric window ending at `step`; returns its (steps, skipped) not counted before."""
    start, seen_steps, seen_skipped = self._window
    if start != step - window_steps:  # a new window
      seen_steps = seen_skipped = 0
    self._window = (step - window_steps, window_steps, window_skipped)
    new = (window_steps - seen_steps, window_skipped - seen_skipped)
    self.steps, self.skipped = self.steps + new[0], self.skipped + new[1]
    return new


def _peak_memory() -> dict[str, int]:
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return {'peak_memory_bytes': int(stats['peak_bytes_in_use'])}
  # No device allocator statistics (CPU): the process's peak resident memory instead. It is a
  # lifetime peak, so in a sweep (one process) it includes the runs before this one, and it counts
  # the resident pages of memory-mapped files: a run on a 39 GB feature cache read 24.5 GB.
  return {'peak_host_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


class _Throughput:
  """Training images/s with eval, checkpoint and logging time left out.

  The first window of each process includes compilation and is not counted in `steady()`.
  """

  def __init__(self, step: int, batch_size: int):
    self.batch_size, self.step, self.start, self.paused = batch_size, step, time.time(), 0.0
    self.counted_images, self.counted_seconds, self.first_window = 0, 0.0, True

  @contextlib.contextmanager
  def pause(self, pending: Any):
    jax.block_until_ready(pending)  # finish queued train steps first: they count as training time
    t = time.time()
    yield
    self.paused += time.time() - t

  def window(self, step: int) -> float:
    seconds = max(time.time() - self.start - self.paused, 1e-9)
    images = (step - self.step) * self.batch_size
    if not self.first_window:
      self.counted_images, self.counted_seconds = self.counted_images + images, self.counted_seconds + seconds
    self.step, self.start, self.paused, self.first_window = step, time.time(), 0.0, False
    return images / seconds

  def steady(self) -> float | None:
    return self.counted_images / self.counted_seconds if self.counted_seconds else None

  def eta(self, images_left: int, window_rate: float, evals_left: int, eval_images: int,
          eval_seconds: float | None) -> float:
    """Seconds to the end: training at the steady rate (compilation left out) plus evaluations.

    Until an evaluation has been timed, one is estimated at a third of a training step's cost
    per image (a forward pass without the backward).
    """
    rate = self.steady() or window_rate
    if eval_seconds is None:
      eval_seconds = eval_images / (3 * max(rate, 1e-9))
    return images_left / max(rate, 1e-9) + evals_left * eval_seconds


def _every(step: int, n: int) -> bool:
  """Whether `step` is one of every n-th steps (the log, monitor and checkpoint intervals); n=0: never."""
  return n > 0 and step % n == 0


def _format_eta(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'


def _wall_times(run: RunDir, start_step: int) -> dict[str, float] | None:
  """{step: training seconds up to that checkpoint}, kept for steps up to `start_step`.

  Resuming adds this process's time to the entry of the step it resumed from, so a run's
  wall_time_s sums every process that trained it (minus work lost after the last checkpoint,
  which is redone and counted again). None where an older run's file lacks the entry.
  """
  times = metrics_io.read_json(run.wall_time) if run.wall_time.exists() else {}
  times = {k: v for k, v in times.items() if int(k) <= start_step}
  if start_step == 0:
    times['0'] = 0.0
  if str(start_step) not in times:
    logging.warning('%s has no training time for step %d (a run from before normjax recorded it): '
                    'wall_time_s counts this process only', run.wall_time, start_step)
    return None
  return times


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       test: bool = True) -> dict[str, Any] | None:
  """Trains config's model, evaluates on validation each epoch and on test at the end.

  Resumes from workdir/checkpoints when present; a finished run of the same config is only
  reported (nothing is written, so a read-only workdir works). Process 0 holds the workdir's
  lock while the run goes on. Returns the summary also written to workdir/summary.json.
  test=False stops after the last checkpoint, without the test pass and summary.json, and
  returns None: normjax.tune's epoch-by-epoch calls, whose trial may go on or be pruned (a
  later call with test=True and the same length only evaluates test and writes the summary).
  """
  config = config_schema.validate(config)
  if '://' in str(workdir):
    raise ConfigError(
        f'--workdir={workdir}: URLs are not supported (metrics.jsonl is appended in place); mount the '
        'bucket (e.g. gcsfuse) or use a shared NFS directory and pass that path')
  workdir = pathlib.Path(workdir).absolute()
  finished = checkpoint.finished_summary(config, workdir)
  if finished is not None:
    logging.info('%s holds a finished run of this config: test accuracy %s (summary.json)', workdir,
                 finished.get('test_accuracy'))
    return finished
  with checkpoint.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _train_and_evaluate(config, workdir, test)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        test: bool) -> dict[str, Any] | None:
  is_chief = jax.process_index() == 0
  mesh = parallel.make_mesh()
  parallel.check_batch_size('train.batch_size', config.train.batch_size, mesh)
  parallel.check_batch_size('train.eval_batch_size', config.train.eval_batch_size, mesh)
  checkpoint.prepare_workdir(config, workdir, is_chief)

  splits = pipeline.load_splits(config.data, config.seed)
  train_split = splits.train
  batch_size = config.train.batch_size
  steps_per_epoch = pipeline.steps_per_epoch(len(train_split.labels), batch_size)
  total_steps = config.train.num_epochs * steps_per_epoch
  if config.train.max_steps:
    total_steps = min(total_steps, config.train.max_steps)
  rows = pipeline.local_rows(batch_size, jax.process_index(), jax.process_count())
  size = config.data.image_size
  image_shape = (size, size, train_split.images.shape[-1])

  programs = steps.build_programs(config, splits.num_classes, image_shape, splits.mean, splits.std,
                                  steps_per_epoch, mesh)
  rng = jax.random.PRNGKey(config.seed)
  shardings = programs.shardings
  p_train_step, p_eval_step = programs.train_step, programs.eval_step
  lr_schedule = optim.learning_rate_schedule(config.optim.lr, config, steps_per_epoch)

  run = RunDir(workdir)
  manager = checkpoint.Checkpoints(run.checkpoints, keep=config.train.keep_checkpoints,
                                   is_chief=is_chief)
  log = metrics_io.MetricsLog(workdir, enabled=is_chief)
  latest, state = manager.restore(programs.abstract_state, shardings)  # skips corrupt steps
  if latest is None:
    state = programs.init(rng)
    if config.model.pretrained != 'none':
      state = _load_pretrained(config, state, shardings)
    log.truncate_after(0)
  else:
    log.truncate_after(latest)
    logging.info('resumed from %s at step %d', run.checkpoints, latest)
  skipped = _SkippedSteps(metrics_io.read_jsonl(log.path), latest or 0)

  val_split, test_split = splits.val, splits.test
  train_images = lambda epoch: train_split.images
  if features.enabled(config):
    store = features.prepare(config, programs.model,
                             {'params': state.params, 'batch_stats': state.batch_stats}, splits)
    val_split = pipeline.ArraySplit(store.val, splits.val.labels)
    test_split = pipeline.ArraySplit(store.test, splits.test.labels)
    train_images = store.train_images

  def evaluate(split: pipeline.ArraySplit) -> dict[str, float]:
    outputs, count = [], 0
    for images, labels, mask in pipeline.eval_batches(split, config.train.eval_batch_size,
                                                      jax.process_index(), jax.process_count()):
      batch = parallel.global_batch({'image': images, 'label': labels, 'mask': mask}, mesh)
      outputs.append(p_eval_step(state, batch['image'], batch['label'], batch['mask']))
      count += int(mask.sum())
    local = np.array([sum(parallel.local_sum(o['loss']) for o in outputs),
                      sum(parallel.local_sum(o['correct']) for o in outputs), count], np.float64)
    loss, correct, n = parallel.sum_over_processes(local)
    return {'loss': loss / n, 'accuracy': correct / n}

  def check_finite() -> None:
    """Stops at a NaN/inf (stop), or warns of skipped steps and stops past the limit (skip)."""
    bad = int(state.first_nonfinite)
    if bad >= 0 and config.train.on_nonfinite == 'stop':
      manager.wait_until_finished()
      raise NonFiniteError(
          f'non-finite loss or gradient at step {bad} (train.on_nonfinite=stop); '
          f'{manager.last_good_text()}. Lower optim.lr, enable optim.clip, '
          'or set train.on_nonfinite=skip to skip such updates.')
    if config.train.on_nonfinite != 'skip':
      return
    window = jax.device_get(state.metrics.nonfinite)
    now, limit = int(state.step), config.train.max_skipped_fraction
    window_steps, new = skipped.update(now, int(window.count), int(round(float(window.total))))
    if new:
      logging.warning('step %d: %d of the last %d steps had a non-finite loss or gradient and were '
                      'skipped; %d of %d so far (%.1f%%; train.max_skipped_fraction=%g)', now, new,
                      window_steps, skipped.skipped, skipped.steps, 100 * skipped.skipped / skipped.steps,
                      limit)
    if skipped.skipped > limit * skipped.steps:
      raise NonFiniteError(
          f'{skipped.skipped} of the {skipped.steps} steps so far had a non-finite loss or gradient '
          f'and were skipped (train.on_nonfinite=skip), more than train.max_skipped_fraction={limit:g}: '
          f'the run is not learning. Lower optim.lr or enable optim.clip; {manager.last_good_text()}.')

  step = int(state.step)
  start_step, t0 = step, time.time()
  wall_times = _wall_times(run, start_step)
  time_before = wall_times[str(start_step)] if wall_times is not None else 0.0  # earlier processes

  def save(step: int) -> None:
    check_finite()
    manager.save(step, state)  # stops the run with one line if the save fails (e.g. a full disk)
    if is_chief and wall_times is not None:
      wall_times[str(step)] = time_before + time.time() - t0
      metrics_io.write_json_atomic(run.wall_time, wall_times)

  throughput = _Throughput(step, batch_size)
  eval_seconds = None  # the last validation pass, for the ETA
  logging.info('compiling the train step: the first step includes compilation (minutes for '
               'MobileNetV2 at 224 px on CPU)')
  batches = pipeline.train_batches(train_images, train_split.labels, batch_size, config.seed, rows,
                                   start_step, total_steps)
  with _PreemptionFlag() as preemption:
    for step, batch in batches:
      batch = parallel.global_batch(batch, mesh)
      state = p_train_step(state, batch['image'], batch['label'], rng)
      epoch, epoch_end = step / steps_per_epoch, step % steps_per_epoch == 0
      if _every(step, config.train.log_every_steps) or epoch_end or step == total_steps:
        values = jax.device_get(state.metrics.compute())
        check_finite()
        ips = throughput.window(step)
        values.update(lr=float(lr_schedule(step - 1)), images_per_sec=ips)
        log.write('train', step, epoch, values)
        # Evaluations left: one per remaining epoch end, then the test set.
        evals_left = total_steps // steps_per_epoch - step // steps_per_epoch + test
        eta = throughput.eta((total_steps - step) * batch_size, ips, evals_left, len(val_split),
                             eval_seconds)
        logging.info('step %d/%d (epoch %.2f) loss %.4f acc %.4f gnorm %.3g | %.0f img/s | ETA %s',
                     step, total_steps, epoch, values['loss'], values['accuracy'],
                     values['grad_norm'], ips, _format_eta(eta))
        state = programs.reset_window(state)
      if _every(step, config.train.monitor_every_steps):
        with throughput.pause(state):
          log.write('layers', step, epoch, jax.device_get(monitor.summarize_layers(state.opt_state)))
      if epoch_end:
        with throughput.pause(state):
          eval_start = time.time()
          val = evaluate(val_split)
          eval_seconds = time.time() - eval_start
        log.write('val', step, epoch, val)
        logging.info('epoch %d: val loss %.4f acc %.4f', step // steps_per_epoch, val['loss'],
                     val['accuracy'])
      if preemption.signum is None and jax.process_count() > 1 and _every(step, config.train.log_every_steps):
        signums = multihost_utils.process_allgather(np.int32(preemption.signum or 0))
        preemption.signum = int(signums.max()) or None
      if (_every(step, config.train.checkpoint_every_steps) or epoch_end or step == total_steps
          or preemption.signum is not None):
        with throughput.pause(state):
          save(step)
      if preemption.signum is not None:
        manager.wait_until_finished()
        raise Preempted(step, preemption.signum)
  manager.wait_until_finished()
  if not test:
    log.close()
    return None

  summary_path = run.summary
  if step == start_step and summary_path.exists():
    return metrics_io.read_json(summary_path)  # already finished: nothing to redo
  test_metrics = evaluate(test_split)
  log.write('test', step, step / steps_per_epoch, test_metrics)
  train_time = time_before + time.time() - t0
  summary = {
      'config': config.to_dict(),
      'test_accuracy': test_metrics['accuracy'],
      'test_loss': test_metrics['loss'],
      'epochs': step / steps_per_epoch,
      'steps': step,
      'wall_time_s': train_time,
      'images_per_sec': throughput.steady(),
      'device_kind': jax.devices()[0].device_kind,
      'num_devices': jax.device_count(),
      'num_params': int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params))),
      **_peak_memory(),
  }
  if is_chief:
    summary.update(runs.record_stats(metrics_io.read_jsonl(log.path)))
    metrics_io.write_json_atomic(summary_path, summary)
  log.close()
  logging.info('test accuracy %.4f; summary in %s', test_metrics['accuracy'], summary_path)
  return summary


def _load_pretrained(config: ml_collections.ConfigDict, state: steps.TrainState,
                     shardings) -> steps.TrainState:
  if config.model.name != 'mobilenet_v2' and not RunDir(config.model.pretrained).checkpoints.is_dir():
    raise ConfigError(
        f'config.model.pretrained = {config.model.pretrained!r}: pretrained weights exist only for '
        f'model.name=mobilenet_v2, not {config.model.name!r}; use pretrained=none or a normjax workdir')
  variables = pretrained.load_pretrained_backbone(
      config.model.pretrained, jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}))
  state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'])
  # jit (not device_put) places host values identically on every process of a multi-host run.
  return jax.jit(lambda s: s, out_shardings=shardings)(state)

