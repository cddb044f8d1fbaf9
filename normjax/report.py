"""The comparison report: every run under one or more directories -> report.md + PNGs.

  python -m normjax.report WORKDIR [WORKDIR...] [--out=DIR]

Runs whose configs differ only in `seed` are also summarised as mean +- std over their seeds.

A run is any directory holding `summary.json` (finished) or only
`metrics.jsonl` (in progress, or stopped before the end): normjax.runs reads them and
normjax.study maps them to the original study; this module writes the tables and figures.
The report needs neither TensorFlow nor JAX (JAX only to read a run's landscape surfaces).
The figures use matplotlib's object API (no pyplot), so importing this module never changes
the global backend.
"""
import argparse
import collections
import json
import math
import pathlib
import sys
from typing import Any, Iterable, Sequence

from matplotlib import colormaps
from matplotlib.figure import Figure
import numpy as np

from normjax.models import common
from normjax.rundir import RunDir
from normjax.runs import NA, Run, Stats, find_runs, fmt_duration, fmt_num, fmt_pct, natural_key, run_stats
from normjax.study import STUDY_RUNS, augment_variants, study_deviations, study_run

# Output files this module owns; a section that no longer applies removes its stale file.
CURVES_PNG = 'curves.png'
LAYER_NORMS_PNG = 'layer_grad_norms.png'
LAYER_DIST_PNG = 'layer_grad_dist.png'
AGC_FRAC_PNG = 'agc_clipped_frac.png'
BATCH_SIZE_PNG = 'batch_size.png'
REPORT_MD = 'report.md'


def fmt_memory(st: Stats) -> str:
  if st.peak_memory_bytes is not None:
    return f'{st.peak_memory_bytes / 2**30:.2f} GiB'
  if st.peak_host_rss_bytes is not None:
    return f'{st.peak_host_rss_bytes / 2**30:.2f} GiB (host RSS, mapped files included)'
  return NA


def fmt_clip(run: Run) -> str:
  clip = run.cfg('optim.clip', NA)
  if clip == 'global_norm':
    return f"global_norm ({run.cfg('optim.clip_norm')})"
  if clip == 'agc':
    return f"agc (lambda={run.cfg('optim.agc_lambda')})"
  return clip


def fmt_backbone_norm(run: Run) -> str:
  """The backbone's normalization; normalizer-free and LightCNN backbones ignore model.norm."""
  name = run.cfg('model.name', NA)
  if name == 'nf_mobilenet_v2':
    return 'none (NF)'
  return 'none' if name == 'lightcnn' else run.cfg('model.norm', NA)


def fmt_head(run: Run) -> str:
  head = run.cfg('model.head', NA)
  return head if head == 'linear' else f"{head}/{run.cfg('model.head_norm', NA)}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c).replace('|', '/') for c in row) + ' |' for row in rows]
  return lines


RUN_COLUMNS = ('run', 'status', 'model', 'backbone norm', 'head', 'clip', 'batch', 'epochs',
               'data', 'image size', 'aug. variants', 'final val %', 'best val %', 'epoch-1 val %', 'test %',
               'study ref: final val %', 'grad norm start', 'grad norm end', 'sharpness',
               'images/s', 'wall time', 'device')


def runs_section(runs: list[Run]) -> list[str]:
  rows = []
  notes: dict[tuple[str, ...], list[str]] = {}  # deviations -> runs; one footnote each
  for run in runs:
    st = run_stats(run)
    ref = study_run(run)
    ref_cell = '-'
    if ref is not None:
      value = STUDY_RUNS[ref].final_val
      ref_cell = f"{ref}: {NA if value is None else f'{value:.2f}'}"
      deviations = tuple(study_deviations(run))
      if deviations:
        notes.setdefault(deviations, []).append(run.name)
        ref_cell += f' [{list(notes).index(deviations) + 1}]'
    rows.append((
        f'`{run.name}`', 'done' if run.finished else 'in progress',
        run.cfg('model.name', NA), fmt_backbone_norm(run), fmt_head(run), fmt_clip(run),
        run.cfg('train.batch_size', NA), fmt_num(st.epochs), run.cfg('data.name', NA),
        run.cfg('data.image_size', NA), augment_variants(run) or 'fresh',
        fmt_pct(st.final_val), fmt_pct(st.best_val),
        fmt_pct(st.epoch1_val), fmt_pct(st.test), ref_cell, fmt_num(st.grad_norm_first),
        fmt_num(st.grad_norm_last), fmt_num(run_sharpness(run)), fmt_num(st.images_per_sec),
        fmt_duration(st.wall_time_s),
        st.device or NA))
  lines = ['## Runs', '']
  lines += md_table(RUN_COLUMNS, rows)
  lines += [
      '',
      'Accuracies in %. "in progress": metrics.jsonl but no summary.json yet (running, or '
      'stopped early); its numbers are the latest records. Grad norm: global norm before '
      'clipping in the first and last train log window. Every accuracy belongs with the '
      'data set and image size in its row. Aug. variants: K for a run trained from the '
      'frozen-feature cache (epoch e uses augmentation e mod K), "fresh" for a new draw every epoch. '
      'Sharpness: (L(-0.5) + L(+0.5)) / 2 - L(0) along one random filter-normalised direction '
      '(Li et al. 2018) of `python -m normjax.landscape RUN`; n/a before that has run.',
  ]
  if any(r.cfg('optim.clip') == 'agc' and r.cfg('optim.name') in ('adam', 'adamw') for r in runs):
    lines.append(
        '\nAGC with Adam: AGC rescales each unit\'s gradient so that ||g|| <= lambda ||W|| '
        'before Adam sees it. NFNets pair AGC with SGD, where that bounds the update relative '
        'to the weight directly. Adam divides by its running RMS of the gradient, so a '
        'consistently clipped unit still moves about lr per step: here AGC changes the '
        'direction and the moment estimates, not the step size.')
  for i, (deviations, names) in enumerate(notes.items(), start=1):
    lines.append(f'\n[{i}] Not the study\'s recipe: ' + '; '.join(deviations) + '. Runs: '
                 + ', '.join(f'`{n}`' for n in names) + '.')
  return lines


def run_sharpness(run: Run) -> float | None:
  """The loss rise at +-0.5 along the run's 1-D landscape (`python -m normjax.landscape`), if any."""
  if not RunDir(run.path).landscape.is_dir():
    return None
  from normjax import landscape  # pylint: disable=g-import-not-at-top  (JAX, only for surfaces)
  return landscape.sharpness(run.path)


def study_section() -> list[str]:
  rows = [(name, NA if r.final_val is None else f'{r.final_val:.2f}',
           NA if r.epoch1_val is None else f'{r.epoch1_val:.2f}', r.grad_norm or NA)
          for name, r in STUDY_RUNS.items()]
  return [
      '## Study reference', '',
      'The original study (shared/docs/study.md section 1): torchvision MobileNetV2 with '
      'ImageNet-pretrained weights, only `features.18` and the head trained, on the original '
      'CIFAR-10 resized to 224x224, Adam (head 1e-3, block 1e-5), batch 64, 15 epochs. '
      'A run is mapped to a study run by model (mobilenet_v2, BN backbone, MLP head), head norm '
      'and clipping (none, or global norm 1.0); a run on `cifar10_jpeg` sees a JPEG '
      're-encoding of CIFAR-10, not the images the study used.', '',
      *md_table(('study run', 'final val %', 'epoch-1 val %', 'grad norm start -> end'), rows),
  ]


# ---------------------------------------------------------------- figures


LINESTYLES = {'none': '-', 'global_norm': '--', 'agc': '-.'}
NORM_STATS = ('grad_norm', 'grad_norm_clipped', 'param_norm')  # L2 norms: blocks combine by RSS


def styles(runs: list[Run]) -> dict[str, dict[str, Any]]:
  """One colour per run, the same in every figure; dashed = global-norm clip, dash-dot = AGC."""
  palette = colormaps['tab10' if len(runs) <= 10 else 'tab20']
  return {r.name: {'color': palette(i % palette.N),
                   'linestyle': LINESTYLES.get(r.cfg('optim.clip'), '-')}
          for i, r in enumerate(runs)}


def legend_below(fig: Figure, axes: Sequence[Any], order: Sequence[str] = ()) -> None:
  """One legend for all panels, below them; labels in `order` first, in that order."""
  handles = {}
  for ax in axes:
    for h, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, h)
  labels = sorted(handles, key=lambda l: order.index(l) if l in order else len(order))
  if labels:
    longest = max(len(l) for l in labels)
    columns = 1 if longest > 60 else 2 if longest > 35 else 3  # long labels must not overflow the figure
    fig.legend([handles[l] for l in labels], labels, loc='outside lower center',
               ncols=min(columns, len(labels)), fontsize='small')


def run_label(run: Run) -> str:
  return run.name if run.finished else f'{run.name} (in progress)'


def plot_curves(runs: list[Run], style: dict[str, dict[str, Any]], path: pathlib.Path) -> bool:
  """Validation accuracy and loss per epoch, train loss and global grad norm per log window."""
  fig = Figure(figsize=(12, 8.5), layout='constrained')
  axes = fig.subplots(2, 2).ravel()
  panels = (('val', 'accuracy', 'validation accuracy (%)', 100.0),
            ('val', 'loss', 'validation loss', 1.0),
            ('train', 'loss', 'train loss (per log window)', 1.0),
            ('train', 'grad_norm', 'train grad norm, before clipping (log)', 1.0))
  drawn = False
  for ax, (kind, key, title, scale) in zip(axes, panels):
    for run in runs:
      # null: a window whose every step was skipped as non-finite (train.on_nonfinite=skip).
      pts = [(r['epoch'], r[key] * scale) for r in run.kind(kind) if r.get(key) is not None]
      if pts:
        x, y = zip(*pts)
        marker = 'o' if kind == 'val' or len(pts) <= 3 else None  # a lone point needs one
        ax.plot(x, y, marker=marker, markersize=3, linewidth=1.3, label=run_label(run),
                **style[run.name])
        drawn = True
    ax.set_title(title, fontsize='medium')
    ax.set_xlabel('epoch')
    ax.grid(alpha=0.3)
  axes[3].set_yscale('log')
  legend_below(fig, axes, [run_label(r) for r in runs])
  if drawn:
    fig.savefig(path, dpi=110)
  return drawn


def depth_key(layer: str) -> tuple[int, list[Any]]:
  """Network order: backbone blocks (features_<i> naturally sorted), then the head."""
  return {'backbone': 0, 'head': 1}.get(layer.split('/')[0], 2), natural_key(layer)


def block_of(layer: str) -> str:
  """'backbone/features_3/conv_0' -> 'backbone/features_3'; 'head/fc1' stays."""
  return '/'.join(layer.split('/')[:2])


def short_block(block: str) -> str:
  """'backbone/features_3' -> '3'; any other block stays."""
  top, _, name = block.partition('/')
  index = common.block_index(name) if top == 'backbone' else None
  return block if index is None else str(index)


def layer_values(run: Run, stat: str) -> dict[str, np.ndarray]:
  """layer -> the stat's values over the run's "layers" records."""
  out = collections.defaultdict(list)
  prefix = stat + '/'
  for r in run.kind('layers'):
    for k, v in r.items():
      if k.startswith(prefix):
        out[k[len(prefix):]].append(v)
  return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def block_values(run: Run, stat: str) -> dict[str, np.ndarray]:
  """block -> per-record stat: norms combine by root-sum-square, fractions by the mean."""
  per_layer = layer_values(run, stat)
  groups = collections.defaultdict(list)
  for layer, v in per_layer.items():
    groups[block_of(layer)].append(v)
  out = {}
  for block in sorted(groups, key=depth_key):
    vs = np.stack(groups[block])
    out[block] = np.sqrt((vs**2).sum(0)) if stat in NORM_STATS else vs.mean(0)
  return out


def positive(v: np.ndarray) -> np.ndarray:
  """Frozen layers have exactly zero gradient; they have no place on a log axis."""
  return v[v > 0]


def plot_layer_norms(runs: list[Run], style: dict[str, dict[str, Any]],
                     path: pathlib.Path) -> None:
  """Per run: per-block grad norm by depth, median over training with a min-max band."""
  ncols = min(3, len(runs))
  nrows = math.ceil(len(runs) / ncols)
  fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows + 0.6), layout='constrained')
  axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
  for ax, run in zip(axes, runs):
    color = style[run.name]['color']
    stats = [('grad_norm', 'before clipping', '-', 'o')]
    if run.cfg('optim.clip', 'none') != 'none':
      stats.append(('grad_norm_clipped', 'after clipping', '--', 's'))
    for stat, label, ls, marker in stats:
      blocks = block_values(run, stat)
      names = [b for b in blocks if positive(blocks[b]).size]
      x = np.arange(len(names))
      med = [np.median(positive(blocks[b])) for b in names]
      lo = [positive(blocks[b]).min() for b in names]
      hi = [positive(blocks[b]).max() for b in names]
      ax.plot(x, med, linestyle=ls, marker=marker, markersize=4, color=color, label=label)
      ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
      ax.set_xticks(x, [short_block(b) for b in names], rotation=90, fontsize='x-small')
    ax.set_yscale('log')
    ax.set_title(f'{run_label(run)}\nhead {fmt_head(run)}, clip {fmt_clip(run)}', fontsize='small')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='x-small')
  for ax in axes[len(runs):]:
    ax.set_visible(False)
  fig.supxlabel('block (backbone features_<i>, then head)', fontsize='small')
  fig.supylabel('per-block gradient L2 norm', fontsize='small')
  fig.savefig(path, dpi=110)


def plot_layer_dist(runs: list[Run], style: dict[str, dict[str, Any]],
                    path: pathlib.Path) -> None:
  """Per run: distribution over layers and records of log10 grad norm, before / after clipping."""
  fig = Figure(figsize=(max(6.0, 1.3 * len(runs) + 2), 5.0), layout='constrained')
  ax = fig.subplots()
  for i, run in enumerate(runs):
    color = style[run.name]['color']
    for offset, stat, hatch in ((-0.18, 'grad_norm', None), (0.18, 'grad_norm_clipped', '///')):
      values = layer_values(run, stat)
      if not values:
        continue
      data = np.log10(positive(np.concatenate(list(values.values()))))
      box = ax.boxplot([data], positions=[i + offset], widths=0.32, patch_artist=True,
                       showfliers=True, flierprops={'markersize': 2})
      face = (*color[:3], 0.55) if hatch is None else 'white'
      box['boxes'][0].set(facecolor=face, edgecolor=color, hatch=hatch)
      box['medians'][0].set(color='black')
  ax.set_xticks(range(len(runs)), [r.name for r in runs], rotation=30, ha='right',
                fontsize='small')
  ax.set_xlim(-0.6, len(runs) - 0.4)
  ax.set_ylabel('log10 per-layer gradient L2 norm')
  ax.set_title('per-layer gradient norms, all layers and records:\nfilled = before clipping, '
               'hatched = after', fontsize='medium')
  ax.grid(axis='y', alpha=0.3)
  fig.savefig(path, dpi=110)


def plot_agc_frac(runs: list[Run], style: dict[str, dict[str, Any]],
                  path: pathlib.Path) -> None:
  """Per AGC run: the mean fraction of each block's units that AGC clipped."""
  fig = Figure(figsize=(max(6.0, 4.6 * len(runs)), 3.8), layout='constrained')
  axes = np.atleast_1d(fig.subplots(1, len(runs), sharey=True, squeeze=False)).ravel()
  for ax, run in zip(axes, runs):
    blocks = block_values(run, 'agc_clipped_frac')
    ax.bar(range(len(blocks)), [v.mean() for v in blocks.values()],
           color=style[run.name]['color'])
    ax.set_xticks(range(len(blocks)), [short_block(b) for b in blocks], rotation=90,
                  fontsize='x-small')
    ax.set_title(f'{run.name}, {fmt_clip(run)}', fontsize='small')
    ax.set_ylim(0, 1)
    ax.grid(axis='y', alpha=0.3)
  axes[0].set_ylabel('AGC clipped fraction (mean)')
  fig.savefig(path, dpi=110)


def layers_section(runs: list[Run], style: dict[str, dict[str, Any]],
                   out: pathlib.Path) -> list[str]:
  with_layers = [r for r in runs if r.kind('layers')]
  agc = [r for r in with_layers if layer_values(r, 'agc_clipped_frac')]
  for name, keep in ((LAYER_NORMS_PNG, with_layers), (LAYER_DIST_PNG, with_layers),
                     (AGC_FRAC_PNG, agc)):
    if not keep:
      (out / name).unlink(missing_ok=True)
  lines = ['## Per-layer gradient norms', '']
  if not with_layers:
    return lines + ['No run has "layers" records (train.monitor_every_steps = 0).']
  plot_layer_norms(with_layers, style, out / LAYER_NORMS_PNG)
  plot_layer_dist(with_layers, style, out / LAYER_DIST_PNG)
  lines += [
      'Per block, in network order: median over the run\'s "layers" records of the gradient '
      'L2 norm, band = min..max over training; layers inside a block combine by root-sum-square. '
      'Frozen blocks (zero gradient) are left out.', '',
      f'![per-block gradient norms]({LAYER_NORMS_PNG})', '',
      'Distribution over all logged layers and records, before and after clipping:', '',
      f'![per-layer gradient norm distributions]({LAYER_DIST_PNG})',
  ]
  if agc:
    plot_agc_frac(agc, style, out / AGC_FRAC_PNG)
    lines += ['', 'AGC: mean fraction of each block\'s units whose gradient was clipped:', '',
              f'![AGC clipped fraction]({AGC_FRAC_PNG})']
  return lines


def batch_group(run: Run) -> str:
  return f"{run.cfg('model.name', NA)} (norm {fmt_backbone_norm(run)}, clip {fmt_clip(run)})"


def val_error(st: Stats) -> float | None:
  """The final epoch's validation error in %, the y axis of Wu & He 2018's Figure 1."""
  return None if st.final_val is None else 100.0 * (1.0 - st.final_val)


def plot_batch_size(groups: dict[str, list[tuple[int, Run, Stats]]],
                    path: pathlib.Path) -> None:
  """Wu & He 2018 Fig. 1: val error against batch size, one line per model and norm, on a log2
  axis falling from the largest batch on the left to the smallest; then images/s and, where
  measured, peak device memory on the same axis."""
  panels = [(val_error, 'val error (%)'), (lambda st: st.images_per_sec, 'images/s')]
  if any(st.peak_memory_bytes is not None for g in groups.values() for _, _, st in g):
    panels.append((lambda st: None if st.peak_memory_bytes is None else st.peak_memory_bytes / 2**30,
                   'peak device memory (GiB)'))
  sizes = sorted({bs for g in groups.values() for bs, _, _ in g})
  fig = Figure(figsize=(4.6 * len(panels), 4.4), layout='constrained')
  axes = fig.subplots(1, len(panels)).ravel()
  for ax, (value, title) in zip(axes, panels):
    for label, members in groups.items():
      pts = sorted((bs, value(st)) for bs, _, st in members if value(st) is not None)
      if pts:
        ax.plot(*zip(*pts), marker='o', label=label)
    ax.set_xscale('log', base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.invert_xaxis()  # Wu & He: batch size falls from left to right
    ax.set_xlabel('batch size (images per step)')
    ax.set_title(title, fontsize='medium')
    ax.grid(alpha=0.3)
  legend_below(fig, axes)
  fig.savefig(path, dpi=110)


def batch_error_change(members: list[tuple[int, Run, Stats]]) -> str:
  """'47.10% at batch 64 -> 60.20% at batch 2 (+13.10 points); range 12.0 points' for one line."""
  pts = sorted((bs, val_error(st)) for bs, _, st in members if val_error(st) is not None)
  if len(pts) < 2:
    return 'fewer than two batch sizes with a val error'
  (small, e_small), (large, e_large) = pts[0], pts[-1]
  errors = [e for _, e in pts]
  return (f'{e_large:.2f}% at batch {large} -> {e_small:.2f}% at batch {small} '
          f'({e_small - e_large:+.2f} points); range {max(errors) - min(errors):.2f} points')


def batch_size_section(runs: list[Run], out: pathlib.Path) -> list[str]:
  """Val error (Wu & He 2018, Fig. 1), test accuracy and speed across batch sizes, one group per
  model, backbone norm and clipping; only when the finished runs differ in train.batch_size.
  A run still in progress is left out: its latest val error is not the end of its schedule."""
  sized = [r for r in runs if r.cfg('train.batch_size') is not None]
  unfinished = sum(not r.finished for r in sized)
  sized = [r for r in sized if r.finished]
  if len({r.cfg('train.batch_size') for r in sized}) < 2:
    (out / BATCH_SIZE_PNG).unlink(missing_ok=True)
    return []
  groups = collections.defaultdict(list)
  for run in sized:
    groups[batch_group(run)].append((run.cfg('train.batch_size'), run, run_stats(run)))
  rows = []
  for label in sorted(groups):
    for bs, run, st in sorted(groups[label], key=lambda m: (m[0], m[1].name)):
      err = val_error(st)
      rows.append((label, bs, f'`{run.name}`', NA if err is None else f'{err:.2f}', fmt_pct(st.test),
                   fmt_num(st.images_per_sec), fmt_memory(st)))
  plot_batch_size(dict(sorted(groups.items())), out / BATCH_SIZE_PNG)
  changes = [f'- {label}: {batch_error_change(groups[label])}' for label in sorted(groups)]
  return ['## Batch size', '',
          *md_table(('model', 'batch', 'run', 'val error %', 'test %', 'images/s', 'peak memory'), rows),
          '', 'Val error: 100 - the final epoch\'s val accuracy (Wu & He 2018 plot it against batch '
          'size in their Figure 1). From the largest batch to the smallest:', '', *changes, '',
          *([f'{unfinished} run(s) still in progress are left out of this section.', '']
            if unfinished else []),
          f'![batch size comparison]({BATCH_SIZE_PNG})']


def seed_groups(runs: list[Run]) -> list[list[Run]]:
  """Finished runs whose configs are equal but for `seed`, in groups of two or more seeds."""
  groups = collections.defaultdict(list)
  for run in runs:
    if run.finished and run.config:
      groups[json.dumps({k: v for k, v in run.config.items() if k != 'seed'}, sort_keys=True)].append(run)
  return [sorted(g, key=lambda r: (r.cfg('seed'), r.name)) for g in groups.values()
          if len({r.cfg('seed') for r in g}) >= 2]


def fmt_mean_std(values: Sequence[float | None]) -> str:
  """'80.36 +- 0.12' in % over the known values (sample std, n - 1); n/a when none is known."""
  known = [100 * v for v in values if v is not None]
  if not known:
    return NA
  if len(known) == 1:
    return f'{known[0]:.2f}'
  return f'{np.mean(known):.2f} ± {np.std(known, ddof=1):.2f}'


def seeds_section(runs: list[Run]) -> list[str]:
  """Mean +- std over seeds of every config run with several seeds, best mean final val first."""
  rows = []
  for group in seed_groups(runs):
    stats = [run_stats(r) for r in group]
    label = study_run(group[0]) or pathlib.PurePath(group[0].name).name
    finals = [st.final_val for st in stats]
    rows.append((float(np.mean([v for v in finals if v is not None] or [math.nan])), (
        label, ', '.join(str(r.cfg('seed')) for r in group), len(group), fmt_mean_std(finals),
        fmt_mean_std([st.test for st in stats]), fmt_mean_std([st.epoch1_val for st in stats]),
        ' / '.join(fmt_pct(v) for v in finals), ', '.join(f'`{r.name}`' for r in group))))
  if not rows:
    return []
  rows.sort(key=lambda r: -r[0] if not math.isnan(r[0]) else math.inf)
  return ['## Seeds', '', *md_table(
      ('config', 'seeds', 'n', 'final val %', 'test %', 'epoch-1 val %', 'final val % per seed', 'runs'),
      [r for _, r in rows]), '',
      'Runs whose configs differ only in `seed` (which draws the train/val split, the augmentations, '
      'the head init, dropout and the batch order): mean ± sample standard deviation (n - 1) over '
      'the seeds, best mean final val first.']


def write_report(roots: str | pathlib.Path | Sequence[str | pathlib.Path],
                 out_dir: str | pathlib.Path | None = None) -> pathlib.Path:
  """Writes report.md and its PNGs for every run under `roots` into `out_dir`.

  `out_dir` defaults to the root when there is one. With several roots every run is named
  `<root name>/<run>` (a root that is a run: `<root name>`), and `out_dir` is required.
  """
  if isinstance(roots, (str, pathlib.Path)):
    roots = [roots]
  roots = [pathlib.Path(r) for r in roots]
  if not roots:
    raise ValueError('no run directory given')
  if out_dir is None and len(roots) > 1:
    raise ValueError(f'{len(roots)} run directories given: name the report\'s directory with out_dir (--out)')
  runs = []
  for root in roots:
    found = find_runs(root)
    if not found:
      raise ValueError(f'no runs under {root}: no directory holds summary.json or metrics.jsonl')
    if len(roots) > 1:
      for run in found:  # a root that is itself a run keeps its own name
        run.name = root.resolve().name + ('' if run.path == root else f'/{run.name}')
    runs += found
  if len({r.name for r in runs}) < len(runs):
    raise ValueError(f'run names repeat across {", ".join(map(str, roots))}: give directories '
                     f'with different names')
  out = pathlib.Path(out_dir) if out_dir is not None else roots[0]
  out.mkdir(parents=True, exist_ok=True)
  style = styles(runs)
  done = sum(r.finished for r in runs)
  where = ', '.join(f'`{root}`' for root in roots)
  lines = ['# normjax comparison report', '',
           f'{where}: {len(runs)} runs, {done} done, {len(runs) - done} in progress.', '']
  lines += runs_section(runs) + [''] + study_section()
  seeds = seeds_section(runs)
  if seeds:
    lines += [''] + seeds
  lines += ['', '## Curves', '']
  if plot_curves(runs, style, out / CURVES_PNG):
    lines += ['Solid: no clipping; dashed: global-norm clipping; dash-dot: AGC.', '',
              f'![curves]({CURVES_PNG})']
  else:
    (out / CURVES_PNG).unlink(missing_ok=True)
    lines += ['No metrics records yet.']
  lines += [''] + layers_section(runs, style, out)
  batch = batch_size_section(runs, out)
  if batch:
    lines += [''] + batch
  path = out / REPORT_MD
  path.write_text('\n'.join(lines) + '\n')
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m normjax.report', description=__doc__.split(
      '\n')[0])
  parser.add_argument('workdirs', nargs='+', metavar='WORKDIR',
                      help='directories searched recursively for runs')
  parser.add_argument('--out', default=None, help='output directory (default: the one WORKDIR)')
  args = parser.parse_args(argv)
  try:
    path = write_report(args.workdirs, args.out)
  except (ValueError, FileNotFoundError) as e:
    parser.exit(2, f'error: {e}\n')
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
