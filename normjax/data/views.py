"""Pictures of a split: sample images per class and the class distribution.

The study's data loader showed both (a 5-samples-per-class grid and a bar
chart of class counts); these are the same views, written as PNG files.
"""
import pathlib
from typing import Sequence

from matplotlib.figure import Figure
import numpy as np

from normjax.data.pipeline import ArraySplit


def save_data_views(split: ArraySplit, class_names: Sequence[str],
                    out_dir: pathlib.Path | str, *, per_class: int = 5,
                    seed: int = 0) -> list[pathlib.Path]:
  """Writes samples.png (rows = classes) and class_distribution.png; returns their paths."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  num_classes = len(class_names)

  # A bare Figure draws with the Agg canvas, without pyplot's global state.
  fig = Figure(figsize=(1.2 * per_class + 1.6, 1.2 * num_classes), layout='constrained')
  axes = fig.subplots(num_classes, per_class, squeeze=False)
  for label, row in enumerate(axes):
    members = np.flatnonzero(split.labels == label)
    chosen = np.sort(rng.choice(members, min(per_class, len(members)), replace=False))
    for ax, index in zip(row, chosen):
      image = split.images[index]
      if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap='gray', vmin=0, vmax=255)
      else:
        ax.imshow(image)
    for ax in row:
      ax.set_xticks([])
      ax.set_yticks([])
    row[0].set_ylabel(class_names[label], rotation=0, ha='right', va='center')
  fig.suptitle(f'{per_class} random samples per class')
  samples = out_dir / 'samples.png'
  fig.savefig(samples, dpi=100)

  counts = np.bincount(split.labels, minlength=num_classes)
  fig = Figure(figsize=(max(6, 0.8 * num_classes), 4), layout='constrained')
  ax = fig.subplots()
  bars = ax.bar(np.arange(num_classes), counts)
  ax.bar_label(bars, labels=[str(c) for c in counts], fontsize=8)
  ax.set_xticks(np.arange(num_classes), class_names, rotation=45, ha='right')
  ax.set_ylabel('images')
  ax.set_title(f'Class distribution ({len(split)} images)')
  distribution = out_dir / 'class_distribution.png'
  fig.savefig(distribution, dpi=100)
  return [samples, distribution]


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m normjax.data.views CONFIG OUT_DIR`: the data views of a config's training split."""
  import argparse  # pylint: disable=g-import-not-at-top
  from normjax import config_schema  # pylint: disable=g-import-not-at-top
  from normjax.data import pipeline  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('config', help='config spec, e.g. configs/frn_noclip.py:quick')
  parser.add_argument('out_dir')
  args = parser.parse_args(argv)
  config = config_schema.load_config(args.config)
  splits = pipeline.load_splits(config.data, config.seed)
  for path in save_data_views(splits.train, splits.class_names, args.out_dir, seed=config.seed):
    print(path)


if __name__ == '__main__':
  main()
