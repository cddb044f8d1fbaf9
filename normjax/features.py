"""The frozen-feature cache: the frozen backbone prefix computed once, reused by every run.

When `optim.trainable_blocks` freezes MobileNetV2's first blocks and `model.frozen_bn` is
`eval`, the prefix (features_0 .. features_<first-1>) is a fixed function of the
augmented image. The study trains only features.18 and the head, so ~97% of the
forward pass is the same in every epoch of every run: computing it once per image and
augmentation makes a 15-epoch run about as cheap as one pass over the data.

Augmentation variants: in epoch e, image i uses variant e mod K (K =
`data.augment_variants`, 0 meaning one per epoch). Variant v is the augmentation that
the uncached run applies to image i in epoch v (the same (seed, step) keys, batch
positions and crop/flip draws), so with K = num_epochs cached training is exactly the
uncached run. Val and test have one variant (no augmentation).

Layout: `<root>/<digest>/` holds `key.json` (everything the features depend on: the
prefix weights' sha256, data name/split/subset, image size, augmentation settings,
dtype), one `.npy` per split and variant (written in place as a memmap) and
`manifest.json`, the chunks that are complete. A chunk counts only once its rows are
flushed and the manifest naming it has been atomically replaced, so a build killed at
any point resumes without corrupt entries. Builders hold an exclusive flock on `lock`,
so two runs starting together compute each chunk once.
"""
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from normjax import metrics_io
from normjax.data import augment, pipeline
from normjax.errors import ConfigError, FeatureCacheError
from normjax.models import common, mobilenet_v2

ENV_CACHE_DIR = 'NORMJAX_CACHE_DIR'
FORMAT_VERSION = 1
CHUNK_STEPS = 16  # train steps (or eval batches) per manifest entry: ~10 s of work at 224 px on CPU


def cache_root(setting: str) -> pathlib.Path:
  """`train.feature_cache`: 'auto' -> $NORMJAX_CACHE_DIR or ~/.cache/normjax/features; else a path."""
  if setting == 'auto':
    env = os.environ.get(ENV_CACHE_DIR)
    return pathlib.Path(env) if env else pathlib.Path.home() / '.cache' / 'normjax' / 'features'
  return pathlib.Path(setting).expanduser()


def first_trainable(config: ml_collections.ConfigDict) -> int:
  return common.first_trainable(mobilenet_v2.NUM_BLOCKS, config.optim.trainable_blocks)


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether this run trains from the cache.

  'auto' uses it wherever the frozen prefix is a fixed function of the image and trains
  online elsewhere; an explicit directory on a run that cannot use it is a ConfigError.
  """
  if not config.train.feature_cache:
    return False
  if config.train.feature_cache == 'auto':
    return _not_cacheable_because(config) is None
  check_cacheable(config)
  return True


def check_cacheable(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError when train.feature_cache is set on a run whose prefix is not fixed."""
  why = _not_cacheable_because(config)
  if why:
    raise ConfigError(f'config.train.feature_cache = {config.train.feature_cache!r} cannot be used '
                      f'with {why}; set --config.train.feature_cache= (empty) to train online')


def _not_cacheable_because(config: ml_collections.ConfigDict) -> str | None:
  why = None
  if config.model.name != 'mobilenet_v2':
    why = f'model.name={config.model.name!r} (only mobilenet_v2 supports it)'
  elif config.model.frozen_bn != 'eval':
    why = ("model.frozen_bn='train': frozen BatchNorms normalise with batch statistics, so the "
           'prefix depends on the batch')
  elif first_trainable(config) == 0:
    why = f'optim.trainable_blocks={config.optim.trainable_blocks}: no block is frozen'
  return why


def num_variants(config: ml_collections.ConfigDict) -> int:
  """K: augmentation variants per training image (1 without augmentation)."""
  if not config.data.augment:
    return 1
  return config.data.augment_variants or config.train.num_epochs


def weights_digest(variables: Any) -> str:
  """sha256 over the prefix's variables (paths, dtypes, shapes and bytes), independent of tree order."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(variables)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def prefix_variables(variables: dict[str, Any], first: int) -> dict[str, Any]:
  """{collection: {'backbone': ...}} restricted to blocks features_0 .. features_<first-1>."""
  keep = lambda tree: {k: v for k, v in tree.items()
                       if common.block_index(k) is not None and common.block_index(k) < first}
  return {col: {'backbone': keep(tree['backbone'])} for col, tree in variables.items()
          if 'backbone' in tree}


def cache_key(config: ml_collections.ConfigDict, weights_sha256: str) -> dict[str, Any]:
  """Everything the cached features depend on; the cache directory is its digest."""
  d, m = config.data, config.model
  key = {
      'format': FORMAT_VERSION,
      'weights_sha256': weights_sha256,
      'model': {'name': m.name, 'width_mult': m.width_mult, 'cifar_stem': m.cifar_stem,
                'norm': m.norm, 'dtype': m.dtype, 'first_trainable_block': first_trainable(config)},
      'data': {'name': d.name, 'val_fraction': d.val_fraction, 'train_subset': d.train_subset,
               'image_size': d.image_size, 'augment': d.augment, 'crop_padding': d.crop_padding},
      # Augmentation draws are keyed by (seed, step) over global batches: both shape variant v.
      'seed': config.seed,
      'batch_size': config.train.batch_size,
  }
  # Fields added after format 1 enter the key only where they differ from what format 1 did,
  # so existing caches keep their digest.
  if not d.normalize:
    key['data']['normalize'] = False
  if m.gemm_dtype != 'compute':
    key['model']['gemm_dtype'] = m.gemm_dtype
  return key


def _digest(key: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


@dataclasses.dataclass
class FeatureStore:
  """Read access to a complete cache: memory-mapped (n, h, w, c) float32 arrays."""
  directory: pathlib.Path
  train_variants: list[np.ndarray]
  val: np.ndarray
  test: np.ndarray

  def train_images(self, epoch: int) -> np.ndarray:
    return self.train_variants[epoch % len(self.train_variants)]


class _Builder:
  """Fills one cache directory chunk by chunk, under its lock."""

  def __init__(self, directory: pathlib.Path, key: dict[str, Any], feature_shape: tuple[int, ...]):
    self.directory, self.key, self.feature_shape = directory, key, feature_shape
    self.manifest_path = directory / 'manifest.json'

  def manifest(self) -> dict[str, list[int]]:
    if not self.manifest_path.exists():
      return {}
    try:
      return metrics_io.read_json(self.manifest_path)
    except ValueError as e:
      raise FeatureCacheError(f'{self.manifest_path} is unreadable ({e}); delete {self.directory} '
                              'to rebuild the cache') from e

  def array(self, name: str, n: int) -> np.ndarray:
    path = self.directory / f'{name}.npy'
    shape = (n, *self.feature_shape)
    if path.exists():
      array = np.load(path, mmap_mode='r+')
      if array.shape != shape or array.dtype != np.float32:
        raise FeatureCacheError(f'{path} has shape {array.shape} {array.dtype}, expected {shape} '
                                f'float32; delete {self.directory} to rebuild the cache')
      return array
    return np.lib.format.open_memmap(path, mode='w+', dtype=np.float32, shape=shape)

  def fill(self, name: str, n: int, chunks: list[Callable[[], tuple[np.ndarray, np.ndarray]]],
           progress: '_Progress') -> None:
    """Runs every chunk not in the manifest; a chunk returns (row indices, features)."""
    done = set(self.manifest().get(name, []))
    todo = [c for c in range(len(chunks)) if c not in done]
    if not todo:
      return
    array = self.array(name, n)
    for c in todo:
      rows, values = chunks[c]()
      array[rows] = values
      array.flush()
      manifest = self.manifest()
      manifest[name] = sorted(set(manifest.get(name, [])) | {c})
      metrics_io.write_json_atomic(self.manifest_path, manifest)
      progress.advance(name, len(rows))
    del array


class _Progress:
  """Logs images done, images/s and an ETA over the whole build."""

  def __init__(self, total: int):
    self.total, self.done, self.start, self.last_log = total, 0, time.time(), 0.0

  def advance(self, name: str, images: int) -> None:
    self.done += images
    now = time.time()
    if now - self.last_log >= 30 or self.done == self.total:
      rate = self.done / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / max(rate, 1e-9)
      logging.info('feature cache: %s; %d/%d images to compute, %.0f img/s, ETA %dm%02ds',
                   name, self.done, self.total, rate, eta // 60, eta % 60)
      self.last_log = now


@contextlib.contextmanager
def _locked(directory: pathlib.Path) -> Iterator[None]:
  """An exclusive flock on directory/lock: one builder at a time, readers wait for it."""
  with open(directory / 'lock', 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info('feature cache %s is being built by another process; waiting for it', directory)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _check_disk(directory: pathlib.Path, needed: int) -> None:
  free = shutil.disk_usage(directory).free
  logging.info('feature cache %s: %.2f GB still to write, %.2f GB free', directory, needed / 1e9,
               free / 1e9)
  if needed > free:
    raise FeatureCacheError(
        f'the feature cache needs {needed / 1e9:.2f} GB more in {directory} but only '
        f'{free / 1e9:.2f} GB are free; free space, point train.feature_cache (or '
        f'${ENV_CACHE_DIR}) at a larger disk, or lower data.augment_variants')


def prepare(config: ml_collections.ConfigDict, model: Any, variables: dict[str, Any],
            splits: pipeline.Splits) -> FeatureStore:
  """Builds what is missing of this config's cache (resuming a partial one) and opens it."""
  check_cacheable(config)
  first = first_trainable(config)
  prefix_vars = jax.device_get(prefix_variables(variables, first))
  key = cache_key(config, weights_digest(prefix_vars))
  directory = cache_root(config.train.feature_cache) / _digest(key)
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise FeatureCacheError(f'cannot create the feature cache {directory}: {e.strerror}') from e
  key_path = directory / 'key.json'
  if key_path.exists() and metrics_io.read_json(key_path) != key:
    raise FeatureCacheError(f'{key_path} holds another key than this run\'s; delete {directory}')

  size, channels = config.data.image_size, splits.train.images.shape[-1]
  device = jax.local_devices()[0]
  prefix_vars = jax.device_put(prefix_vars, device)
  norm = dict(image_size=size, mean=splits.mean, std=splits.std)
  apply_prefix = lambda x: model.apply(prefix_vars, x, first, method='prefix')
  train_fn = jax.jit(lambda images, k: apply_prefix(augment.train_preprocess(
      images, k, padding=config.data.crop_padding, augment=config.data.augment, **norm)))
  eval_fn = jax.jit(lambda images: apply_prefix(augment.eval_preprocess(images, **norm)))
  feature_shape = jax.eval_shape(eval_fn,
                                 jax.ShapeDtypeStruct((1, size, size, channels), jnp.uint8)).shape[1:]
  row_bytes = int(np.prod(feature_shape)) * 4

  batch = config.train.batch_size
  rng = jax.random.PRNGKey(config.seed)
  n_train = len(splits.train)
  steps = pipeline.steps_per_epoch(n_train, batch)

  def run(fn, images: np.ndarray, *args) -> np.ndarray:
    return np.asarray(jax.device_get(fn(jax.device_put(images, device), *args)), np.float32)

  def train_chunks(variant: int) -> list[Callable[[], tuple[np.ndarray, np.ndarray]]]:
    order = pipeline.train_batch_indices(n_train, batch, config.seed, variant)

    def chunk(c: int) -> tuple[np.ndarray, np.ndarray]:
      rows, values = [], []
      for s in range(c * CHUNK_STEPS, min((c + 1) * CHUNK_STEPS, steps)):
        # The uncached train step's draws: aug_key of split(fold_in(rng, step)).
        aug_key = jax.random.split(jax.random.fold_in(rng, variant * steps + s))[0]
        rows.append(order[s])
        values.append(run(train_fn, splits.train.images[order[s]], aug_key))
      return np.concatenate(rows), np.concatenate(values)

    def remainder() -> tuple[np.ndarray, np.ndarray]:
      # Images the epoch's dropped remainder leaves out: used only by later epochs (e mod K = v).
      rows = np.setdiff1d(np.arange(n_train), order.reshape(-1))
      aug_key = jax.random.fold_in(jax.random.fold_in(rng, 0x7FFFFFFF), variant)
      return rows, run(train_fn, _pad(splits.train.images[rows], batch), aug_key)[:len(rows)]

    chunks = [functools.partial(chunk, c) for c in range(-(-steps // CHUNK_STEPS))]
    return chunks + ([remainder] if steps * batch < n_train else [])

  def eval_chunks(split: pipeline.ArraySplit) -> list[Callable[[], tuple[np.ndarray, np.ndarray]]]:
    def chunk(c: int) -> tuple[np.ndarray, np.ndarray]:
      rows = np.arange(c * CHUNK_STEPS * batch, min((c + 1) * CHUNK_STEPS * batch, len(split)))
      values = [run(eval_fn, _pad(split.images[r], batch))[:len(r)]
                for r in np.array_split(rows, -(-len(rows) // batch))]
      return rows, np.concatenate(values)
    return [functools.partial(chunk, c) for c in range(-(-len(split) // (CHUNK_STEPS * batch)))]

  K = num_variants(config)
  work = [(f'train_v{v}', n_train, train_chunks(v)) for v in range(K)]
  work += [('val', len(splits.val), eval_chunks(splits.val)),
           ('test', len(splits.test), eval_chunks(splits.test))]
  builder = _Builder(directory, key, feature_shape)
  with _locked(directory):
    if not key_path.exists():
      metrics_io.write_json_atomic(key_path, key)
    manifest = builder.manifest()
    missing = {name: [c for c in range(len(chunks)) if c not in set(manifest.get(name, []))]
               for name, _, chunks in work}
    todo_rows = sum(n * len(missing[name]) // max(len(chunks), 1) for name, n, chunks in work)
    if todo_rows:
      _check_disk(directory, todo_rows * row_bytes)
      logging.info('feature cache %s: computing %d images (K=%d variants of %d training images, '
                   'val %d, test %d)', directory, todo_rows, K, n_train, len(splits.val), len(splits.test))
      progress = _Progress(todo_rows)
      for name, n, chunks in work:
        builder.fill(name, n, chunks, progress)
  open_ = lambda name: np.load(directory / f'{name}.npy', mmap_mode='r')
  logging.info('feature cache %s: complete (K=%d), %s features per image', directory, K, feature_shape)
  return FeatureStore(directory, [open_(f'train_v{v}') for v in range(K)], open_('val'), open_('test'))


def _pad(images: np.ndarray, batch: int) -> np.ndarray:
  """Zero-pads to a multiple of `batch` rows, so each jitted function compiles once."""
  pad = -len(images) % batch
  return np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]) if pad else images
