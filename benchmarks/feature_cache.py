r"""Frozen-feature cache: build rate and cached training rate against online training, one process.

  JAX_PLATFORMS=cpu python benchmarks/feature_cache.py [--config=configs/frn_noclip.py] [--steps=20]

Times, on random images of the config's size and batch, with the training code's own jitted
programs (normjax.steps.build_programs, normjax.features' prefix):
  online  the train step on uint8 images: augmentation, frozen prefix forward, features.18 + head
  build   the cache builder's work per image: augmentation and the frozen prefix forward
  cached  the train step on cached prefix outputs (what a cached run does every step)
and prints images/s, the cached/online speed-up per step, and the wall-time ratio of a
15-epoch run online against building the cache (K = 15 variants) and training from it.
Each figure is the median of --windows timed windows of --steps steps, after a warm-up.
"""
import argparse
import statistics
import sys
import time

sys.path.insert(0, '.')
from normjax import startup  # noqa: E402

if __name__ == '__main__':
  startup.reexec_for_cpu()  # as normjax's entry points do, before anything else
startup.prepare_process()  # as normjax.main does, before jax starts its threads

import jax  # noqa: E402
import numpy as np  # noqa: E402

from normjax import config_schema, features, parallel, steps  # noqa: E402
from normjax.data import augment  # noqa: E402


def _rate(fn, steps: int, windows: int, batch: int) -> float:
  jax.block_until_ready(fn())  # compile and warm up
  rates = []
  for _ in range(windows):
    start = time.perf_counter()
    out = None
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    rates.append(steps * batch / (time.perf_counter() - start))
  return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/frn_noclip.py')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--windows', type=int, default=3)
  args = parser.parse_args(argv)
  config = config_schema.load_config(args.config)
  config.model.pretrained = 'none'  # speed does not depend on the weights' values
  config.train.monitor_every_steps = 0
  size, batch = config.data.image_size, config.train.batch_size
  mean, std = (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, batch).astype(np.int32)
  key = jax.random.key(0)

  config.train.feature_cache = ''
  online = steps.build_programs(config, 10, (size, size, 3), mean, std, 625, mesh)
  state = online.init(key)
  holder = {'state': state}

  def online_step():
    holder['state'] = online.train_step(holder['state'], images, labels, key)
    return holder['state'].step

  online_rate = _rate(online_step, args.steps, args.windows, batch)

  first = features.first_trainable(config)
  variables = {'params': holder['state'].params, 'batch_stats': holder['state'].batch_stats}
  model = online.model
  build = jax.jit(lambda v, x, k: model.apply(v, augment.train_preprocess(
      x, k, image_size=size, mean=mean, std=std, padding=config.data.crop_padding, augment=True),
      first, method='prefix'))
  build_rate = _rate(lambda: build(variables, images, key), args.steps, args.windows, batch)
  cached_inputs = np.asarray(build(variables, images, key))

  config.train.feature_cache = 'auto'
  cached = steps.build_programs(config, 10, (size, size, 3), mean, std, 625, mesh)
  holder['state'] = cached.init(key)

  def cached_step():
    holder['state'] = cached.train_step(holder['state'], cached_inputs, labels, key)
    return holder['state'].step

  cached_rate = _rate(cached_step, args.steps, args.windows, batch)
  epochs, n = config.train.num_epochs, 40_000
  online_s = epochs * n / online_rate
  cached_first_s = epochs * n / build_rate + epochs * n / cached_rate  # K = num_epochs variants
  cached_reuse_s = epochs * n / cached_rate
  print(f'{args.config}: {size} px, batch {batch}, {jax.devices()[0].device_kind} x{jax.device_count()}')
  print('| phase | images/s |\n|---|---|')
  print(f'| online train step | {online_rate:.1f} |\n| cache build (prefix forward) | {build_rate:.1f} |')
  print(f'| cached train step | {cached_rate:.1f} |')
  print(f'cached / online step: {cached_rate / online_rate:.1f}x')
  print(f'{epochs} epochs of {n} images: online {online_s / 60:.1f} min; cached, building the '
        f'cache first {cached_first_s / 60:.1f} min ({online_s / cached_first_s:.2f}x); '
        f'cached, cache already built {cached_reuse_s / 60:.1f} min ({online_s / cached_reuse_s:.1f}x)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
