r"""Per-block gradient distributions of finished runs, before and after their clipping.

  python -m normjax.layer_gradients RUN [RUN ...] [--batches=2] [--out=DIR]

The study asked how gradients differ between layers with and without clipping. The
monitor logs per-layer norms of what trains (features.18 and the head in the study); this
tool also gives the gradients that the frozen blocks would receive. At each run's latest
checkpoint, on its first training batches (the run's data order and augmentation), it
differentiates the mean cross-entropy through the run's own forward (eval-mode frozen
BatchNorms stay in eval mode) with respect to every parameter, then applies the run's clipper
to the trained parameters only, as training does. Per block (features_0..18, then each head
layer) it keeps the histogram of log10|g| over every gradient element, before and after
clipping, and draws each block's distribution as two boxes (5/25/50/75/95th percentiles):
left before clipping, right after (trained blocks only). Global-norm clipping scales every
trained block by one factor, so it shifts their boxes by the same log10 amount; AGC clips
unit by unit and can change a block's shape.

Outputs in --out (default: the first run's parent): layer_gradients.npz (bins, per run and
block the histogram counts and percentiles), layer_gradients.png, layer_gradients.md (per-block
L2 norms before / after).
"""
import argparse
import collections
import pathlib
import sys
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from normjax import checkpoint, grad_quantities, landscape, monitor, optim, report, startup
from normjax.data import pipeline

# log10|g| histogram bins: float32 gradients below 1e-12 are rounding noise next to the
# 1e-6..1 range these nets show; exact zeros (dead ReLU6 units) are counted apart.
BINS = np.linspace(-12.0, 2.0, 141)
PERCENTILES = (5, 25, 50, 75, 95)


def clipped(config: ml_collections.ConfigDict, params: Any, grads: Any) -> Any:
  """The run's clipper (optim.make_clipper: the trained params only) applied to `grads`."""
  clipper = optim.make_clipper(config, params)
  out, _ = clipper.update(grads, clipper.init(params), params)
  return out


def by_block(grads: Any, trained: Any) -> dict[str, tuple[np.ndarray, bool]]:
  """block -> (every gradient element as a flat float64 array, whether the block trains)."""
  parts, trains = collections.defaultdict(list), {}
  for (path, g), t in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(trained)):
    block = report.block_of(monitor.layer_name(path))  # 'backbone/features_3', 'head/fc1'
    parts[block].append(np.asarray(g, dtype=np.float64).ravel())
    trains[block] = trains.get(block, False) or bool(t)
  return {b: (np.concatenate(v), trains[b]) for b, v in parts.items()}


def distribution(g: np.ndarray) -> dict[str, Any]:
  """Histogram over BINS of log10|g| for the nonzero elements, the zero count, percentiles."""
  a = np.abs(g)
  nonzero = np.log10(a[a > 0])
  return {'counts': np.histogram(np.clip(nonzero, BINS[0], BINS[-1]), BINS)[0],
          'zeros': int(np.sum(a == 0)), 'l2': float(np.sqrt(np.sum(g * g))),
          'percentiles': (np.percentile(nonzero, PERCENTILES) if nonzero.size
                          else np.full(len(PERCENTILES), np.nan))}


def measure(workdir: str | pathlib.Path, batches: int) -> dict[str, Any]:
  """{'name', 'blocks': [block...], 'trains': [...], 'before'/'after': [distribution...]}."""
  config = landscape.read_run_config(workdir)
  step, state = checkpoint.restore_latest(workdir)
  variables = {'params': state['params'], 'batch_stats': state.get('batch_stats') or {}}
  splits = pipeline.load_splits(config.data, config.seed)
  labels = optim.param_labels(variables['params'], config.optim.trainable_blocks)
  trained = jax.tree.map(lambda lab: lab != 'frozen', labels)
  before, after = [], []
  for x, y, key in grad_quantities.first_batches(config, splits, batches):
    g = grad_quantities.gradient(config, variables, x, y, key, config.model.frozen_bn, 'all',
                                splits.num_classes)
    before.append(by_block(g, trained))
    after.append(by_block(clipped(config, variables['params'], g), trained))
  blocks = sorted(before[0], key=report.depth_key)
  merge = lambda parts, b: np.concatenate([p[b][0] for p in parts])
  return {'name': pathlib.Path(workdir).name, 'step': int(step), 'clip': config.optim.clip,
          'blocks': blocks, 'trains': [before[0][b][1] for b in blocks],
          'before': [distribution(merge(before, b)) for b in blocks],
          'after': [distribution(merge(after, b)) for b in blocks]}


def plot(results: list[dict[str, Any]], path: pathlib.Path) -> None:
  """One panel per run: per block, boxes of log10|g| before (light) and after clipping (dark)."""
  width = max(8.0, 0.42 * max(len(r['blocks']) for r in results) + 2)
  fig = Figure(figsize=(width, 2.6 * len(results) + 0.8), layout='constrained')
  axes = np.atleast_1d(fig.subplots(len(results), 1, sharex=True, sharey=True))
  for ax, r in zip(axes, results):
    for i, (trains, b, a) in enumerate(zip(r['trains'], r['before'], r['after'])):
      for offset, d, color in ((-0.2, b, '#9ecae1' if trains else '#d9d9d9'), (0.2, a, '#08519c')):
        if d is a and not trains:
          continue  # a frozen block is never clipped (nor updated)
        p5, p25, p50, p75, p95 = d['percentiles']
        ax.vlines(i + offset, p5, p95, color='0.3', lw=0.8)
        ax.bar(i + offset, p75 - p25, bottom=p25, width=0.36, color=color, edgecolor='0.3', lw=0.6)
        ax.hlines(p50, i + offset - 0.18, i + offset + 0.18, color='black', lw=1.2)
    ax.set_title(f"{r['name']} (step {r['step']}, clip {r['clip']})", fontsize='medium')
    ax.set_ylabel('log10 |gradient|')
    ax.grid(axis='y', alpha=0.3)
  blocks = results[-1]['blocks']
  axes[-1].set_xticks(range(len(blocks)), [report.short_block(b) for b in blocks], rotation=45,
                      ha='right', fontsize='small')
  axes[-1].set_xlabel('block (backbone features.<i>, then head layers); boxes: 5/25/50/75/95th '
                      'percentiles. Grey: frozen, light blue: trained, before clipping; '
                      'dark blue: after', fontsize='small')
  fig.savefig(path, dpi=110)


def markdown(results: list[dict[str, Any]]) -> str:
  names = [r['name'] for r in results]
  lines = ['| block | ' + ' | '.join(f'{n} before / after' for n in names) + ' |',
           '|---|' + '---|' * len(names)]
  for i, block in enumerate(results[0]['blocks']):
    cells = []
    for r in results:
      j = r['blocks'].index(block) if block in r['blocks'] else None
      if j is None:
        cells.append('')
      elif r['trains'][j]:
        cells.append(f"{r['before'][j]['l2']:.3g} / {r['after'][j]['l2']:.3g}")
      else:
        cells.append(f"{r['before'][j]['l2']:.3g} (frozen)")
    lines.append(f'| {report.short_block(block)} | ' + ' | '.join(cells) + ' |')
  lines.append('\nPer-block L2 norm of the gradient of the mean cross-entropy at the latest checkpoint, '
               'on the first training batches; "(frozen)": the gradient a frozen block would get.')
  return '\n'.join(lines)


def save(results: list[dict[str, Any]], out: pathlib.Path) -> None:
  arrays = {'bins': BINS}
  for r in results:
    for when in ('before', 'after'):
      arrays[f"{r['name']}/{when}/counts"] = np.stack([d['counts'] for d in r[when]])
      arrays[f"{r['name']}/{when}/percentiles"] = np.stack([d['percentiles'] for d in r[when]])
    arrays[f"{r['name']}/blocks"] = np.asarray(r['blocks'])
  np.savez(out / 'layer_gradients.npz', **arrays)
  plot(results, out / 'layer_gradients.png')
  (out / 'layer_gradients.md').write_text(markdown(results) + '\n')


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m normjax.layer_gradients',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+', metavar='RUN', help='finished run directories')
  parser.add_argument('--batches', type=int, default=2, help='training batches per run')
  parser.add_argument('--out', default='', help='output directory (default: the first run\'s parent)')
  args = parser.parse_args(argv)
  startup.prepare_process()
  out = pathlib.Path(args.out or pathlib.Path(args.workdirs[0]).absolute().parent)
  out.mkdir(parents=True, exist_ok=True)
  results = []
  for w in args.workdirs:
    results.append(measure(w, args.batches))
    print(f"{results[-1]['name']}: {len(results[-1]['blocks'])} blocks", flush=True)
  save(results, out)
  print(markdown(results))
  print(f'wrote {out}/layer_gradients.{{npz,png,md}}')
  return 0


if __name__ == '__main__':
  startup.reexec_for_cpu()
  sys.exit(main())
