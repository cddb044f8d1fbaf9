"""Builders, loading, the train/val split, batching and data views.

Small builder tests use files they write themselves; the real-data tests read
$NORMJAX_DATA_DIR (see conftest.py) and prepare each dataset once per session.
"""
import gzip
import hashlib
import tarfile

import matplotlib.image
import numpy as np
from PIL import Image
import pytest

from configs import base
from normjax import errors
from normjax.data import builders, pipeline, views


def data_config(name, tfds_dir, source='', val_fraction=0.2, train_subset=0):
  config = base.get_config().data
  config.name = name
  config.tfds_dir = str(tfds_dir)
  config.source = str(source)
  config.val_fraction = val_fraction
  config.train_subset = train_subset
  return config


def write_idx(path, array, type_code=0x08):
  header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  dtype = {0x08: '>u1', 0x0C: '>i4'}[type_code]
  data = header + np.asarray(array, dtype).tobytes()
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'wb') as f:
    f.write(data)


def digests(split):
  """The multiset of (image bytes, label) of a split, order-free."""
  return sorted(hashlib.sha1(image.tobytes() + bytes([label])).hexdigest()
                for image, label in zip(split.images, split.labels))


# --- IDX and the fashion_mnist_idx builder on tiny files ---------------------

@pytest.mark.parametrize('suffix', ['.gz', ''])
def test_read_idx_round_trips(tmp_path, suffix):
  images = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4)
  write_idx(tmp_path / f'images{suffix}', images)
  ints = np.array([-5, 70000, 3], np.int32)
  write_idx(tmp_path / f'ints{suffix}', ints, type_code=0x0C)
  parsed = builders.read_idx(tmp_path / f'images{suffix}')
  assert parsed.dtype == np.uint8 and parsed.shape == (3, 2, 4)
  np.testing.assert_array_equal(parsed, images)
  np.testing.assert_array_equal(builders.read_idx(tmp_path / f'ints{suffix}'), ints)


def test_read_idx_rejects_bad_files(tmp_path):
  (tmp_path / 'bad').write_bytes(b'\x01\x00\x08\x01\x00\x00\x00\x01\x00')
  with pytest.raises(ValueError, match='not an IDX file'):
    builders.read_idx(tmp_path / 'bad')
  (tmp_path / 'short').write_bytes(bytes([0, 0, 8, 1]) + np.asarray([5], '>u4').tobytes() + b'abc')
  with pytest.raises(ValueError, match=r'shape \(5,\) \(5 bytes\) but 3 bytes follow'):
    builders.read_idx(tmp_path / 'short')


def write_tiny_fashion_mnist(folder, n_train=12, n_test=5):
  """Image i is filled with i and labelled i % 10, so pairs can be checked after shuffling."""
  folder.mkdir(parents=True)
  for split, n in (('train', n_train), ('test', n_test)):
    images_file, labels_file = builders.FASHION_MNIST_FILES[split]
    values = np.arange(n, dtype=np.uint8) + (100 if split == 'test' else 0)
    write_idx(folder / images_file, np.broadcast_to(values[:, None, None], (n, 28, 28)))
    write_idx(folder / labels_file, values % 10)


def test_fashion_mnist_idx_builder_on_tiny_files(tmp_path):
  write_tiny_fashion_mnist(tmp_path / 'raw' / 'fashion-mnist')
  splits = pipeline.load_splits(
      data_config('fashion_mnist_idx', tmp_path / 'tfds', tmp_path / 'raw', val_fraction=0.25), seed=0)
  assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 5)
  assert splits.class_names == builders.FASHION_MNIST_CLASSES and splits.num_classes == 10
  assert splits.mean == (0.2860,) and splits.std == (0.3530,)
  for split in (splits.train, splits.val, splits.test):
    assert split.images.shape[1:] == (28, 28, 1) and split.images.dtype == np.uint8
    assert split.labels.dtype == np.int32
    values = split.images[:, 0, 0, 0]
    assert (split.images == values[:, None, None, None]).all()
    np.testing.assert_array_equal(split.labels, values % 10)
  train_values = np.concatenate([splits.train.images, splits.val.images])[:, 0, 0, 0]
  np.testing.assert_array_equal(np.sort(train_values), np.arange(12))
  np.testing.assert_array_equal(np.sort(splits.test.images[:, 0, 0, 0]), 100 + np.arange(5))


# --- the cifar10_jpeg builder on a tiny archive --------------------------------

def class_color(label):
  return np.array([25 * label, 250 - 25 * label, 128], np.uint8)


def write_tiny_cifar(root, per_class):
  """Writes <split>/<class>/NNNN.jpg, each image a solid colour that encodes its class."""
  for split, n in per_class.items():
    for label, name in enumerate(builders.CIFAR10_CLASSES):
      (root / split / name).mkdir(parents=True)
      for i in range(n):
        image = np.broadcast_to(class_color(label), (32, 32, 3))
        Image.fromarray(np.ascontiguousarray(image)).save(root / split / name / f'{i:04d}.jpg')


def make_tiny_cifar_archive(tmp_path):
  write_tiny_cifar(tmp_path / 'extracted', {'train': 3, 'test': 1})
  archive = tmp_path / 'archive' / builders.CIFAR10_JPEG_ARCHIVE
  archive.parent.mkdir()
  with tarfile.open(archive, 'w:gz') as tar:
    for split in ('test', 'train'):  # the shared archive lists test/ first too
      tar.add(tmp_path / 'extracted' / split, arcname=split)
  return archive


@pytest.mark.parametrize('source', ['archive', 'archive_folder', 'extracted_folder'])
def test_cifar10_jpeg_builder_on_tiny_archive(tmp_path, source):
  archive = make_tiny_cifar_archive(tmp_path)
  path = {'archive': archive, 'archive_folder': archive.parent,
          'extracted_folder': tmp_path / 'extracted'}[source]
  splits = pipeline.load_splits(data_config('cifar10_jpeg', tmp_path / 'tfds', path, 0.0), seed=0)
  assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 0, 10)
  assert splits.class_names == builders.CIFAR10_CLASSES
  assert splits.mean == (0.4914, 0.4822, 0.4465) and splits.std == (0.2023, 0.1994, 0.2010)
  for split, n in ((splits.train, 3), (splits.test, 1)):
    assert split.images.shape[1:] == (32, 32, 3) and split.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(split.labels, minlength=10), [n] * 10)
    expected = np.stack([class_color(label) for label in split.labels]).astype(int)
    # JPEG keeps a solid colour within a few levels.
    np.testing.assert_allclose(split.images.mean(axis=(1, 2)), expected, atol=3)


def test_cifar10_jpeg_record_order_is_reproducible(tmp_path):
  archive = make_tiny_cifar_archive(tmp_path)
  first, second = (pipeline.load_splits(data_config('cifar10_jpeg', tmp_path / d, archive, 0.0), seed=0)
                   for d in ('tfds_a', 'tfds_b'))
  np.testing.assert_array_equal(first.train.images, second.train.images)
  np.testing.assert_array_equal(first.train.labels, second.train.labels)
  # Keys are hashed, so the stored order is a shuffle, not the archive's order.
  assert not (np.diff(first.train.labels) >= 0).all()


# --- errors -------------------------------------------------------------------

def test_missing_cifar_names_the_fields_and_the_remedy(tmp_path, monkeypatch):
  monkeypatch.delenv(pipeline.ENV_DATA_DIR, raising=False)
  with pytest.raises(errors.DatasetUnavailableError) as error:
    pipeline.load_splits(data_config('cifar10_jpeg', tmp_path / 'tfds'), seed=0)
  message = str(error.value)
  assert "data.name='cifar10_jpeg'" in message
  assert 'data.source is empty and $NORMJAX_DATA_DIR is not set' in message
  assert '--config.data.source=/path/to/cifar10-jpeg.tar.gz' in message
  assert 'NORMJAX_DATA_DIR=/folder/holding/it' in message
  assert '--config.data.name=cifar10 on a machine with internet' in message


def test_missing_fashion_mnist_names_the_source_tried(tmp_path, monkeypatch):
  monkeypatch.setenv(pipeline.ENV_DATA_DIR, str(tmp_path / 'elsewhere'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(errors.DatasetUnavailableError) as error:
    pipeline.load_splits(data_config('fashion_mnist_idx', tmp_path / 'tfds', tmp_path / 'empty'), seed=0)
  message = str(error.value)
  assert f"found in data.source='{tmp_path / 'empty'}'" in message
  assert 'train-images-idx3-ubyte.gz' in message
  assert 'apt-get install dataset-fashion-mnist' in message
  assert '/usr/share/datasets/fashion-mnist' in message


def test_builtin_dataset_without_tensorflow_fails_before_downloading(tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, '_has_tensorflow', lambda: False)
  with pytest.raises(errors.DatasetUnavailableError) as error:
    pipeline.load_splits(data_config('cifar10', tmp_path / 'tfds'), seed=0)
  message = str(error.value)
  assert "data.name='cifar10' is not prepared" in message and 'TensorFlow' in message
  assert '--config.data.name=cifar10_jpeg' in message


def test_unknown_dataset_name(tmp_path):
  with pytest.raises(ValueError, match=r"data.name='imagenet' is not one of \['cifar10', "
                     r"'cifar10_jpeg', 'fashion_mnist', 'fashion_mnist_idx'\]"):
    pipeline.load_splits(data_config('imagenet', tmp_path), seed=0)


# --- the real shared data -------------------------------------------------------

@pytest.fixture(scope='module')
def fashion(shared_data_dir, tfds_dir):
  """Full Fashion-MNIST, found as $NORMJAX_DATA_DIR/fashion-mnist via data.source."""
  return pipeline.load_splits(data_config('fashion_mnist_idx', tfds_dir, shared_data_dir, 0.0), seed=0)


@pytest.fixture(scope='module')
def cifar(shared_data_dir, tfds_dir):
  """Full cifar10_jpeg, found through $NORMJAX_DATA_DIR (data.source empty)."""
  del shared_data_dir  # Only checks that the env var is set.
  return pipeline.load_splits(data_config('cifar10_jpeg', tfds_dir, '', 0.0), seed=0)


def test_real_fashion_mnist(fashion):
  assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (60000, 0, 10000)
  np.testing.assert_array_equal(np.bincount(fashion.train.labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(fashion.test.labels), [1000] * 10)
  assert fashion.train.images.shape == (60000, 28, 28, 1)
  pixels = fashion.train.images / 255.0
  # The constants are the training set's pixel statistics (0.28604, 0.35302).
  np.testing.assert_allclose(pixels.mean(), pipeline.FASHION_MNIST_MEAN, atol=5e-5)
  np.testing.assert_allclose(pixels.std(), pipeline.FASHION_MNIST_STD, atol=5e-5)


def test_real_cifar10_jpeg(cifar):
  assert (len(cifar.train), len(cifar.val), len(cifar.test)) == (50000, 0, 10000)
  assert cifar.train.images.shape == (50000, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(cifar.train.labels), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(cifar.test.labels), [1000] * 10)
  # The study's mean is that of the training images (JPEG moves it < 2e-4).
  mean = cifar.train.images.reshape(-1, 3).mean(axis=0) / 255.0
  np.testing.assert_allclose(mean, pipeline.CIFAR10_MEAN, atol=2e-4)


def test_real_cifar_80_20_split(cifar, tfds_dir):
  splits = pipeline.load_splits(data_config('cifar10_jpeg', tfds_dir), seed=0)
  assert (len(splits.train), len(splits.val), len(splits.test)) == (40000, 10000, 10000)
  train, val = pipeline.split_train_val(cifar.train, 0.2, seed=0)
  np.testing.assert_array_equal(splits.train.images, train.images)
  np.testing.assert_array_equal(splits.val.labels, val.labels)
  # train and val partition the source's train split.
  assert digests(cifar.train) == sorted(digests(train) + digests(val))


def test_split_is_deterministic_per_seed(cifar):
  train0, val0 = pipeline.split_train_val(cifar.train, 0.2, seed=0)
  again, _ = pipeline.split_train_val(cifar.train, 0.2, seed=0)
  train1, val1 = pipeline.split_train_val(cifar.train, 0.2, seed=1)
  np.testing.assert_array_equal(train0.images, again.images)
  assert len(val1) == 10000
  overlap = len(set(digests(val0)) & set(digests(val1)))
  assert 1500 < overlap < 2500  # independent draws share about 20% of val


def test_train_subset(cifar):
  train, val = pipeline.split_train_val(cifar.train, 0.2, seed=0)
  sub, sub_val = pipeline.split_train_val(cifar.train, 0.2, seed=0, train_subset=1000)
  again, _ = pipeline.split_train_val(cifar.train, 0.2, seed=0, train_subset=1000)
  other, _ = pipeline.split_train_val(cifar.train, 0.2, seed=1, train_subset=1000)
  assert len(sub) == 1000
  np.testing.assert_array_equal(sub_val.images, val.images)
  np.testing.assert_array_equal(sub.images, again.images)
  assert set(digests(sub)) <= set(digests(train))
  assert set(digests(sub)) != set(digests(other))
  with pytest.raises(ValueError, match='data.train_subset=40001 exceeds the 40000'):
    pipeline.split_train_val(cifar.train, 0.2, seed=0, train_subset=40001)


def test_bad_val_fraction():
  split = pipeline.ArraySplit(np.zeros((4, 2, 2, 1), np.uint8), np.zeros(4, np.int32))
  with pytest.raises(ValueError, match=r'data.val_fraction must be in \[0, 1\), got 1.0'):
    pipeline.split_train_val(split, 1.0, seed=0)


# --- batching -------------------------------------------------------------------

def test_steps_per_epoch():
  assert pipeline.steps_per_epoch(100, 32) == 3
  assert pipeline.steps_per_epoch(96, 32) == 3
  with pytest.raises(ValueError, match=r'10 examples, fewer than one global batch of 32 \(train.batch_size\)'):
    pipeline.steps_per_epoch(10, 32)


def test_train_batch_indices():
  batches = pipeline.train_batch_indices(96, 32, seed=0, epoch=0)
  assert batches.shape == (3, 32)
  np.testing.assert_array_equal(np.sort(batches.ravel()), np.arange(96))
  np.testing.assert_array_equal(batches, pipeline.train_batch_indices(96, 32, seed=0, epoch=0))
  assert not np.array_equal(batches, pipeline.train_batch_indices(96, 32, seed=0, epoch=1))
  assert not np.array_equal(batches, pipeline.train_batch_indices(96, 32, seed=1, epoch=0))
  dropped = pipeline.train_batch_indices(100, 32, seed=0, epoch=0)
  assert dropped.shape == (3, 32) and len(np.unique(dropped)) == 96 and dropped.max() < 100


def test_local_rows_partition_the_global_batch():
  rows = [pipeline.local_rows(12, i, 3) for i in range(3)]
  np.testing.assert_array_equal(np.concatenate([np.arange(12)[r] for r in rows]), np.arange(12))
  assert rows[1] == slice(4, 8)
  with pytest.raises(ValueError, match='Global batch 12 is not divisible by 5 processes'):
    pipeline.local_rows(12, 0, 5)
  with pytest.raises(ValueError, match=r'process_index=3 is not in \[0, 3\)'):
    pipeline.local_rows(12, 3, 3)


def test_eval_batches_pad_and_mask():
  n = 10
  split = pipeline.ArraySplit(
      images=np.broadcast_to(np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 1)).copy(),
      labels=np.arange(n, dtype=np.int32))
  hosts = [list(pipeline.eval_batches(split, 4, i, 2)) for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == 3
  seen = []
  for batch in range(3):
    for images, labels, mask in (hosts[0][batch], hosts[1][batch]):
      assert images.shape == (2, 2, 2, 1) and labels.shape == (2,) and mask.dtype == bool
      assert (images[~mask] == 0).all() and (labels[~mask] == 0).all()
      np.testing.assert_array_equal(images[mask][:, 0, 0, 0], labels[mask] + 1)
      seen.extend(labels[mask])
  assert seen == list(range(n))  # every example once, in order
  single = list(pipeline.eval_batches(split, 4))
  np.testing.assert_array_equal([m.sum() for _, _, m in single], [4, 4, 2])


# --- views ----------------------------------------------------------------------

def test_save_data_views_writes_both_pngs(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.array([0] * 7 + [1] * 2 + [2] * 5, np.int32)  # class 1 has fewer than per_class
  split = pipeline.ArraySplit(rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels)
  paths = views.save_data_views(split, ('a', 'b', 'c'), tmp_path / 'views', per_class=5)
  assert [p.name for p in paths] == ['samples.png', 'class_distribution.png']
  for path in paths:
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 200 and width > 300
  grey = pipeline.ArraySplit(split.images[..., :1], labels)
  assert all(p.is_file() for p in views.save_data_views(grey, ('a', 'b', 'c'), tmp_path / 'grey'))
