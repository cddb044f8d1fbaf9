r"""Several configs one after another in this process, each in its own workdir.

  python -m normjax.sweep --configs=configs/bn_noclip.py,configs/ln_noclip.py \
      --workdir=workdir/study [--set=train.max_steps=20 --set=data.image_size=32] [--report]

Config i trains into WORKDIR/<stem of config i>[-<its :arg>]. Every config is loaded, overridden
with each --set and validated before the first run starts, so a typo fails in
seconds, not hours in. A run whose summary.json exists is skipped (rerun it with
--set=train.overwrite=True); a run that raises is reported and the sweep goes on,
exiting 1 at the end. A preemption signal stops the sweep (exit 128 + signal);
rerunning the same command resumes the interrupted run from its checkpoint.
Single host; for multi-host runs launch normjax.main (see launch/).
"""
import argparse
import pathlib
import sys
import time
import traceback
from typing import Sequence

from absl import logging
import ml_collections

from normjax import config_schema, errors, runs, startup, train
from normjax.rundir import RunDir


def pct(fraction: float | None) -> str:
  text = runs.fmt_pct(fraction)
  return text if fraction is None else f'{text}%'


def load_all(specs: Sequence[str], overrides: Sequence[str]
             ) -> dict[str, tuple[str, ml_collections.ConfigDict]]:
  """stem -> (spec, validated config with the overrides applied)."""
  stems = [config_schema.config_stem(s) for s in specs]
  duplicates = sorted({s for s in stems if stems.count(s) > 1})
  if duplicates:
    raise errors.ConfigError(
        f'--configs: two configs share the workdir name {", ".join(duplicates)}')
  out = {}
  for stem, spec in zip(stems, specs):
    try:
      out[stem] = spec, config_schema.apply_overrides(config_schema.load_config(spec),
                                                      list(overrides))
    except errors.ConfigError as e:
      raise errors.ConfigError(f'{spec}: {e}') from e
  return out


def run_sweep(specs: Sequence[str], workdir: str | pathlib.Path,
              overrides: Sequence[str] = ()) -> list[str]:
  """Trains each config in order; returns the stems of the runs that failed."""
  configs = load_all(specs, overrides)
  workdir = pathlib.Path(workdir)
  failed, counts = [], {'done': 0, 'skipped': 0, 'failed': 0}
  for i, (stem, (spec, config)) in enumerate(configs.items(), start=1):
    tag = f'[{i}/{len(configs)}] {stem}'
    run_dir = workdir / stem
    if RunDir(run_dir).summary.exists() and not config.train.overwrite:
      print(f'{tag}: skipped, {RunDir(run_dir).summary} exists (a finished run; '
            '--set=train.overwrite=True reruns it)', flush=True)
      counts['skipped'] += 1
      continue
    print(f'{tag}: training {spec} in {run_dir}', flush=True)
    t0 = time.time()
    try:
      summary = train.train_and_evaluate(config, str(run_dir))
    except errors.Preempted:
      print(f'{tag}: preempted; rerun the same command to resume', flush=True)
      raise
    except Exception as e:  # pylint: disable=broad-except  # one failed run must not stop the rest
      traceback.print_exc()
      print(f'{tag}: FAILED after {runs.fmt_duration(time.time() - t0)}: '
            f'{type(e).__name__}: {e}', flush=True)
      failed.append(stem)
      counts['failed'] += 1
      continue
    print(f'{tag}: done in {runs.fmt_duration(time.time() - t0)}, final val '
          f'{pct(summary.get("final_val_accuracy"))}, test {pct(summary.get("test_accuracy"))}',
          flush=True)
    counts['done'] += 1
  line = ', '.join(f'{v} {k}' for k, v in counts.items())
  print(f'sweep: {line}' + (f': {", ".join(failed)}' if failed else ''), flush=True)
  return failed


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m normjax.sweep',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--configs', required=True, help='comma-separated config files, '
                      'e.g. configs/bn_noclip.py,configs/ln_clip.py')
  parser.add_argument('--workdir', required=True, help='root; run i goes to WORKDIR/<stem i>')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='override applied to every config, e.g. train.max_steps=20 (repeatable)')
  parser.add_argument('--report', action='store_true',
                      help='write WORKDIR/report.md (normjax.report) at the end')
  args = parser.parse_args(argv)
  specs = config_schema.split_config_specs(args.configs)
  if not specs:
    parser.error('--configs: no config given')
  logging.set_verbosity(logging.INFO)  # train's progress lines; absl.app would do this in main.py
  startup.prepare_process()
  try:
    failed = run_sweep(specs, args.workdir, args.set)
  except errors.ConfigError as e:
    print(f'sweep: error: {e}', file=sys.stderr)
    return 2
  except errors.Preempted as e:
    return 128 + e.signum
  if args.report:
    from normjax import report  # pylint: disable=g-import-not-at-top  (matplotlib, only for --report)
    try:
      print(f'sweep: wrote {report.write_report(args.workdir)}')
    except ValueError as e:  # e.g. every run failed before writing metrics
      print(f'sweep: no report: {e}', file=sys.stderr)
      return 1
  return 1 if failed else 0


if __name__ == '__main__':
  startup.reexec_for_cpu()
  sys.exit(main())
