"""Loading splits into host memory, the train/val split and deterministic batching.

Every dataset takes one path: a tfds builder prepares ArrayRecord files once,
`tfds.data_source` reads all records back (NumPy only, no TensorFlow) into
uint8 arrays in host RAM, and batches are index arrays computed from
(seed, epoch), so a run resumed at step k sees exactly the batches it would
have seen. Augmentation runs later, on device (`normjax.data.augment`).
"""
import dataclasses
import importlib.util
import os
import pathlib
import time
from typing import Callable, Iterator

from absl import logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from normjax.data import builders
from normjax.errors import DatasetUnavailableError

ENV_DATA_DIR = 'NORMJAX_DATA_DIR'

# The study's CIFAR-10 normalization (study.md section 1; the same constants as
# kuangliu/pytorch-cifar main.py).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
# Pixel mean and std of the 60,000 Fashion-MNIST training images, in [0, 1]
# units (computed over all pixels: 0.28604, 0.35302; test_data.py checks it).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
# MNIST's, as the PyTorch MNIST example normalizes (github.com/pytorch/examples,
# mnist/main.py: Normalize((0.1307,), (0.3081,))); test_data.py checks them.
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

# How a dataset is prepared: a normjax builder from local files only, a normjax
# builder from a local copy or its download, or tfds's own builder (TensorFlow).
LOCAL, LOCAL_OR_DOWNLOAD, TFDS = 'local', 'local_or_download', 'tfds'


@dataclasses.dataclass(frozen=True)
class _Dataset:
  tfds_name: str  # the tfds builder that prepares it
  kind: str  # LOCAL | LOCAL_OR_DOWNLOAD | TFDS
  offline_name: str  # the data.name that holds the same data and prepares offline
  mean: tuple[float, ...]
  std: tuple[float, ...]


# data.name -> how to get it; the names are normjax.registry.DATASETS (tests/test_config_schema.py checks).
DATASETS = {
    'cifar10': _Dataset('cifar10_pickle', LOCAL_OR_DOWNLOAD, 'cifar10_jpeg', CIFAR10_MEAN,
                        CIFAR10_STD),
    'cifar10_jpeg': _Dataset('cifar10_jpeg', LOCAL, 'cifar10_jpeg', CIFAR10_MEAN, CIFAR10_STD),
    'fashion_mnist': _Dataset('fashion_mnist', TFDS, 'fashion_mnist_idx', FASHION_MNIST_MEAN,
                              FASHION_MNIST_STD),
    'fashion_mnist_idx': _Dataset('fashion_mnist_idx', LOCAL, 'fashion_mnist_idx',
                                  FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    'mnist_idx': _Dataset('mnist_idx', LOCAL, 'mnist_idx', MNIST_MEAN, MNIST_STD),
}

# Tags that keep the random streams drawn from one seed apart.
_VAL_STREAM, _SUBSET_STREAM, _EPOCH_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """One split in host memory: uint8 NHWC images and int32 labels."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices: np.ndarray) -> 'ArraySplit':
    return ArraySplit(self.images[indices], self.labels[indices])


@dataclasses.dataclass(frozen=True)
class Splits:
  """train/val (from the source's train split) and test, plus dataset facts."""
  name: str
  train: ArraySplit
  val: ArraySplit
  test: ArraySplit
  class_names: tuple[str, ...]
  # Per channel, in [0, 1] units: preprocessing gives (x/255 - mean) / std. With
  # data.normalize False they are 0 and 1, so inputs are x/255 (ToTensor only).
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def load_splits(data_cfg: ml_collections.ConfigDict, seed: int) -> Splits:
  """Prepares the dataset if needed and loads train/val/test into host memory.

  The val split is a `data_cfg.val_fraction` share of the source's train
  split, chosen by `seed`; `data_cfg.train_subset` > 0 keeps only that many
  (seed-chosen) examples of the rest. `data_cfg.normalize` False scales pixels
  to [0, 1] only (mean 0, std 1).
  """
  if data_cfg.name not in DATASETS:
    raise ValueError(f'data.name={data_cfg.name!r} is not one of {sorted(DATASETS)}.')
  dataset = DATASETS[data_cfg.name]
  builder = tfds.builder(dataset.tfds_name, data_dir=data_cfg.tfds_dir or None,
                         file_format='array_record')
  if not builder.is_prepared():
    _prepare(builder, data_cfg)

  start = time.perf_counter()
  full_train = _read_split(builder, 'train')
  test = _read_split(builder, 'test')
  logging.info('Read %s (%d train, %d test) from %s in %.1f s.', data_cfg.name,
               len(full_train), len(test), builder.data_dir, time.perf_counter() - start)

  train, val = split_train_val(full_train, data_cfg.val_fraction, seed,
                               data_cfg.train_subset)
  mean, std = dataset.mean, dataset.std
  if not data_cfg.normalize:
    mean, std = (0.0,) * len(mean), (1.0,) * len(std)
  return Splits(
      name=data_cfg.name, train=train, val=val, test=test,
      class_names=tuple(builder.info.features['label'].names), mean=mean, std=std)


def split_train_val(full_train: ArraySplit, val_fraction: float, seed: int,
                    train_subset: int = 0) -> tuple[ArraySplit, ArraySplit]:
  """Splits off a seed-chosen `val_fraction` as val.

  `train_subset` > 0 keeps that many (seed-chosen) examples of the rest.
  """
  if not 0 <= val_fraction < 1:
    raise ValueError(f'data.val_fraction must be in [0, 1), got {val_fraction}.')
  n = len(full_train)
  order = np.random.default_rng([seed, _VAL_STREAM]).permutation(n)
  n_val = int(round(n * val_fraction))
  # Sorted, so each part keeps the (already shuffled) on-disk record order.
  val = full_train.take(np.sort(order[:n_val]))
  train = full_train.take(np.sort(order[n_val:]))
  if train_subset > 0:
    if train_subset > len(train):
      raise ValueError(f'data.train_subset={train_subset} exceeds the {len(train)} '
                       'training examples left after the val split.')
    keep = np.random.default_rng([seed, _SUBSET_STREAM]).choice(
        len(train), train_subset, replace=False)
    train = train.take(np.sort(keep))
  return train, val


def _prepare(builder: tfds.core.DatasetBuilder, data_cfg: ml_collections.ConfigDict) -> None:
  """Writes the ArrayRecord files: from local files, a download, or tfds's own builder."""
  start = time.perf_counter()
  dataset = DATASETS[data_cfg.name]
  if dataset.kind == LOCAL:
    manual_dir = _local_source(data_cfg)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  elif dataset.kind == LOCAL_OR_DOWNLOAD:
    _prepare_local_or_download(builder, data_cfg)
  else:
    offline = (f'Offline, use --config.data.name={dataset.offline_name} with '
               f'--config.data.source=<local files> or ${ENV_DATA_DIR}.')
    # tfds encodes its built-ins' images with TensorFlow: fail before a download.
    if not _has_tensorflow():
      raise DatasetUnavailableError(
          f'data.name={data_cfg.name!r} is not prepared in {builder.data_dir}, and '
          'tfds needs TensorFlow (pip install tensorflow-cpu) and internet to '
          f'prepare it. {offline}')
    try:
      builder.download_and_prepare()
    except Exception as e:  # Most likely offline: say what to do instead.
      raise DatasetUnavailableError(
          f'data.name={data_cfg.name!r} is not prepared in {builder.data_dir} and '
          f'tfds could not download and prepare it ({type(e).__name__}: {e}). '
          f'{offline}') from e
  logging.info('Prepared %s in %s in %.1f s.', data_cfg.name, builder.data_dir,
               time.perf_counter() - start)


def _has_tensorflow() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def _prepare_local_or_download(builder: tfds.core.DatasetBuilder,
                               data_cfg: ml_collections.ConfigDict) -> None:
  """The original CIFAR-10: a local cifar-10-python.tar.gz if there is one, else its download."""
  manual_dir = _local_source(data_cfg, required=bool(data_cfg.source))
  archive = builders.CIFAR10_PYTHON_ARCHIVE
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except builders.DownloadError as e:
    env = os.environ.get(ENV_DATA_DIR, '')
    looked = (f'none in ${ENV_DATA_DIR}={env!r}' if env else
              f'data.source is empty and ${ENV_DATA_DIR} is not set')
    raise DatasetUnavailableError(
        f'data.name={data_cfg.name!r} needs {archive} (the original CIFAR-10 python release, '
        f'md5 {builders.CIFAR10_PYTHON_MD5}): {looked}, and downloading '
        f'{builders.CIFAR10_PYTHON_URL} failed ({e}). Put the file in ${ENV_DATA_DIR} or pass '
        f'--config.data.source=/path/to/{archive} (or the folder holding it); offline, '
        '--config.data.name=cifar10_jpeg has the same images as JPEG files.') from e
  except builders.SourceError as e:
    raise DatasetUnavailableError(
        f'data.name={data_cfg.name!r}: {e}. Get {archive} again from '
        f'{builders.CIFAR10_PYTHON_URL} (md5 {builders.CIFAR10_PYTHON_MD5}).') from e


@dataclasses.dataclass(frozen=True)
class _LocalFiles:
  """Where a normjax builder's raw files may be, and what to say when they are not."""
  find: Callable[[pathlib.Path], pathlib.Path | None]  # a path -> the file or folder, or None
  wanted: str
  remedy: str
  defaults: tuple[tuple[str, pathlib.Path], ...] = ()  # (label, path) tried after the env var


def _idx_remedy(subfolder: str, alternative: str) -> str:
  return (f'Set --config.data.source=/folder/with/them or {ENV_DATA_DIR}=/folder (the files '
          f'directly in it or in its {subfolder}/ subfolder), {alternative}')


_IDX_WANTED = 'IDX files (' + ', '.join(f for pair in builders.IDX_FILES.values() for f in pair) + ')'
_LOCAL_FILES = {
    'cifar10': _LocalFiles(
        builders.find_cifar10_python, builders.CIFAR10_PYTHON_ARCHIVE,
        f'Set --config.data.source=/path/to/{builders.CIFAR10_PYTHON_ARCHIVE} (or the folder '
        f'holding it) or {ENV_DATA_DIR}=/folder/holding/it, or leave both unset to download '
        f'{builders.CIFAR10_PYTHON_URL}; offline, --config.data.name=cifar10_jpeg has the same '
        'images as JPEG files.'),
    'cifar10_jpeg': _LocalFiles(
        builders.find_cifar10_jpeg,
        f'{builders.CIFAR10_JPEG_ARCHIVE} (or its extracted train/ and test/ folders)',
        f'Set --config.data.source=/path/to/{builders.CIFAR10_JPEG_ARCHIVE} (or the folder '
        f'holding it or its extracted folders) or {ENV_DATA_DIR}=/folder/holding/it, or use '
        '--config.data.name=cifar10 (the original python release: a local '
        f'{builders.CIFAR10_PYTHON_ARCHIVE} or its download).'),
    'fashion_mnist_idx': _LocalFiles(
        builders.find_fashion_mnist, f'Fashion-MNIST {_IDX_WANTED}',
        _idx_remedy('fashion-mnist', '`apt-get install dataset-fashion-mnist` (installs them in '
                    f'{builders.DEBIAN_FASHION_MNIST_DIR}), or use '
                    '--config.data.name=fashion_mnist on a machine with internet and TensorFlow.'),
        (("Debian's dataset-fashion-mnist", builders.DEBIAN_FASHION_MNIST_DIR),)),
    'mnist_idx': _LocalFiles(
        builders.find_mnist, f'MNIST {_IDX_WANTED}',
        _idx_remedy('mnist', 'e.g. the four files from yann.lecun.com/exdb/mnist.')),
}


def _local_source(data_cfg: ml_collections.ConfigDict, required: bool = True) -> pathlib.Path | None:
  """The tfds manual_dir holding the raw files of a normjax builder.

  Looks in data.source, else $NORMJAX_DATA_DIR and the dataset's default
  places. Not found: DatasetUnavailableError, or None if not `required`.
  """
  local = _LOCAL_FILES[data_cfg.name]
  if data_cfg.source:
    candidates = [(f'data.source={data_cfg.source!r}', pathlib.Path(data_cfg.source))]
  else:
    env = os.environ.get(ENV_DATA_DIR, '')
    candidates = [(f'${ENV_DATA_DIR}={env!r}', pathlib.Path(env))] if env else []
    candidates += local.defaults
  for _, path in candidates:
    found = local.find(path)
    if found is not None:
      return found.parent if found.is_file() else found
  if not required:
    return None
  if candidates:
    where = 'found in ' + ', '.join(label for label, _ in candidates)
  else:
    where = f'found: data.source is empty and ${ENV_DATA_DIR} is not set'
  raise DatasetUnavailableError(
      f'data.name={data_cfg.name!r} is prepared from local files, but no {local.wanted} '
      f'were {where}. {local.remedy}')


def _read_split(builder: tfds.core.DatasetBuilder, split: str) -> ArraySplit:
  """Reads every record of `split` into uint8/int32 arrays.

  `as_data_source` gives the ArrayRecord data source that `tfds.data_source`
  returns, from the builder already at hand.
  """
  source = builder.as_data_source(split=split)
  # One batched read: ArrayRecord fetches the records in parallel, tfds decodes.
  examples = source.__getitems__(range(len(source)))
  images = np.stack([e['image'] for e in examples]).astype(np.uint8, copy=False)
  labels = np.fromiter((e['label'] for e in examples), np.int32, len(examples))
  return ArraySplit(images, labels)


def steps_per_epoch(n: int, global_batch: int) -> int:
  """Full batches in an epoch of `n` examples (the remainder is dropped)."""
  if n < global_batch:
    raise ValueError(f'The training split has {n} examples, fewer than one global '
                     f'batch of {global_batch} (train.batch_size).')
  return n // global_batch


def train_batch_indices(n: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
  """(steps, global_batch) example indices of one epoch, a permutation by (seed, epoch)."""
  steps = steps_per_epoch(n, global_batch)
  order = np.random.default_rng([seed, _EPOCH_STREAM, epoch]).permutation(n)
  return order[:steps * global_batch].reshape(steps, global_batch)


def train_batches(images: Callable[[int], np.ndarray], labels: np.ndarray, global_batch: int, seed: int,
                  rows: slice, start_step: int, total_steps: int
                  ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Yields (step, this host's batch) for steps start_step + 1 .. total_steps, across epochs.

  `step` is the global step the batch completes (1-based), so a run resumed from the
  checkpoint at step k continues with exactly the batch step k + 1 would have seen. The
  images of epoch e are `images(e)` (the feature cache has a variant per epoch).
  """
  n = len(labels)
  per_epoch = steps_per_epoch(n, global_batch)
  step = start_step
  while step < total_steps:
    epoch = step // per_epoch
    order, epoch_images = train_batch_indices(n, global_batch, seed, epoch), images(epoch)
    for i in range(step % per_epoch, min(per_epoch, total_steps - epoch * per_epoch)):
      idx = order[i][rows]
      step += 1
      yield step, {'image': epoch_images[idx], 'label': labels[idx]}


def local_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  """The contiguous rows of every global batch that this host loads."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count}).')
  if global_batch % process_count:
    raise ValueError(f'Global batch {global_batch} is not divisible by '
                     f'{process_count} processes.')
  per_host = global_batch // process_count
  return slice(process_index * per_host, (process_index + 1) * per_host)


def eval_batches(split: ArraySplit, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields this host's (images, labels, mask) of every example, in order.

  The last batch is padded to full size with zero images (mask False), so all
  batches share one shape and the eval step compiles once.
  """
  rows = local_rows(global_batch, process_index, process_count)
  n = len(split)
  for start in range(0, n, global_batch):
    indices = np.arange(start, start + global_batch)[rows]
    mask = indices < n
    indices = np.where(mask, indices, 0)
    images, labels = split.images[indices], split.labels[indices]
    images[~mask] = 0
    labels[~mask] = 0
    yield images, labels, mask
