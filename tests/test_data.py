"""Builders, loading, the train/val split, batching and data views.

Small builder tests use files they write themselves; the real-data tests read
$NORMJAX_DATA_DIR (see conftest.py) and prepare each dataset once per session.
"""
import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import subprocess
import sys
import tarfile

import matplotlib.image
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import base
from normjax import errors
from normjax.data import augment, builders, pipeline, views


def data_config(name, tfds_dir, source='', val_fraction=0.2, train_subset=0, normalize=True):
  config = base.get_config().data
  config.name = name
  config.tfds_dir = str(tfds_dir)
  config.source = str(source)
  config.val_fraction = val_fraction
  config.train_subset = train_subset
  config.normalize = normalize
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


# --- IDX and the fashion_mnist_idx / mnist_idx builder on tiny files ----------

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


def write_tiny_idx_release(folder, n_train=12, n_test=5):
  """Image i is filled with i and labelled i % 10, so pairs can be checked after shuffling."""
  folder.mkdir(parents=True)
  for split, n in (('train', n_train), ('test', n_test)):
    images_file, labels_file = builders.IDX_FILES[split]
    values = np.arange(n, dtype=np.uint8) + (100 if split == 'test' else 0)
    write_idx(folder / images_file, np.broadcast_to(values[:, None, None], (n, 28, 28)))
    write_idx(folder / labels_file, values % 10)


@pytest.mark.parametrize('name,subfolder,classes,mean,std', [
    ('fashion_mnist_idx', 'fashion-mnist', ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                                            'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot'),
     0.2860, 0.3530),
    ('mnist_idx', 'mnist', ('0', '1', '2', '3', '4', '5', '6', '7', '8', '9'), 0.1307, 0.3081),
])
def test_idx_builders_on_tiny_files(tmp_path, name, subfolder, classes, mean, std):
  write_tiny_idx_release(tmp_path / 'raw' / subfolder)
  splits = pipeline.load_splits(
      data_config(name, tmp_path / 'tfds', tmp_path / 'raw', val_fraction=0.25), seed=0)
  assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 5)
  assert splits.class_names == classes and splits.num_classes == 10
  assert splits.mean == (mean,) and splits.std == (std,)
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


# --- the original CIFAR-10 (python release) on a tiny release-format archive -------

class Py2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes what Python 2's cPickle wrote for the CIFAR release (protocol 2).

  Python 2 str (keys, labels' names, the array's raw bytes) is SHORT_BINSTRING
  or BINSTRING, which Python 3 loads as bytes with encoding='bytes'; NumPy's
  array reconstructor is named numpy.core.multiarray._reconstruct, as then.
  """
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def save_py2_str(self, obj):
    data = obj.encode('latin-1') if isinstance(obj, str) else obj
    if len(data) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
    else:
      self.write(pickle.BINSTRING + struct.pack('<i', len(data)) + data)
    self.memoize(obj)

  def save_reconstruct(self, obj, name=None):
    del name
    self.write(pickle.GLOBAL + b'numpy.core.multiarray\n_reconstruct\n')
    self.memoize(obj)

  dispatch[str] = save_py2_str
  dispatch[bytes] = save_py2_str
  dispatch[type(np.ndarray.__reduce__(np.zeros(0))[0])] = save_reconstruct


def py2_pickle(obj):
  out = io.BytesIO()
  Py2Pickler(out, protocol=2).dump(obj)
  return out.getvalue()


def release_rows(images):
  """HWC images -> the release's rows: 1,024 red values (row-major), then green, then blue."""
  return np.stack([np.concatenate([image[:, :, c].ravel() for c in range(3)]) for image in images])


def write_cifar10_python(path, per_batch=3, label_names=builders.CIFAR10_CLASSES, members=None, seed=0):
  """A cifar-10-python.tar.gz in the release's layout with `per_batch` random images per batch file.

  Returns {split: (HWC images, labels)} as written. `members` overrides member bytes by name.
  """
  rng = np.random.default_rng(seed)
  files, written = {}, {'train': ([], []), 'test': ([], [])}
  for split, batches in (('train', [f'data_batch_{i}' for i in range(1, 6)]), ('test', ['test_batch'])):
    for b, batch in enumerate(batches):
      images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
      labels = [int(x) for x in rng.integers(0, 10, per_batch)]
      files[batch] = py2_pickle({
          'batch_label': f'training batch {b + 1} of 5' if split == 'train' else 'testing batch 1 of 1',
          'labels': labels, 'data': release_rows(images),
          'filenames': [f'img_{batch}_{i}.png' for i in range(per_batch)]})
      written[split][0].append(images)
      written[split][1].append(labels)
  files['batches.meta'] = py2_pickle({'num_cases_per_batch': per_batch, 'label_names': list(label_names),
                                      'num_vis': 3072})
  files['readme.html'] = b'<html></html>'
  files.update(members or {})
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, 'w:gz') as tar:
    folder = tarfile.TarInfo('cifar-10-batches-py')
    folder.type = tarfile.DIRTYPE
    tar.addfile(folder)
    for name, data in files.items():
      info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return {split: (np.concatenate(i), np.concatenate(l)) for split, (i, l) in written.items()}


def assert_same_examples(split, images, labels):
  """The split holds exactly these (image, label) pairs, in any order."""
  expected = pipeline.ArraySplit(images, labels.astype(np.int32))
  assert len(split) == len(expected) and digests(split) == digests(expected)


def test_release_rows_are_channel_planes():
  image = np.zeros((1, 32, 32, 3), np.uint8)
  image[0, 2, 5] = (10, 20, 30)  # row 2, column 5
  row = release_rows(image)[0]
  assert (row[2 * 32 + 5], row[1024 + 2 * 32 + 5], row[2048 + 2 * 32 + 5]) == (10, 20, 30)
  assert row.sum() == 60


def test_decode_cifar10_batch_is_chw_to_hwc():
  rows = np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8)
  images, labels = builders.decode_cifar10_batch({b'data': rows, b'labels': [3, 7]}, 'b')
  assert images.shape == (2, 32, 32, 3) and labels.tolist() == [3, 7]
  for n, r, c, ch in ((0, 0, 0, 0), (0, 2, 5, 1), (1, 31, 30, 2), (1, 7, 0, 0)):
    assert images[n, r, c, ch] == rows[n, ch * 1024 + r * 32 + c]


@pytest.mark.parametrize('source', ['file', 'folder'])
def test_cifar10_python_builder_on_tiny_release(tmp_path, monkeypatch, source):
  archive = tmp_path / 'raw' / builders.CIFAR10_PYTHON_ARCHIVE
  written = write_cifar10_python(archive)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download',
                      lambda *a: pytest.fail('downloaded although a local copy was given'))
  splits = pipeline.load_splits(
      data_config('cifar10', tmp_path / 'tfds', archive if source == 'file' else archive.parent, 0.0), seed=0)
  assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 0, 3)
  assert splits.class_names == builders.CIFAR10_CLASSES
  assert splits.mean == (0.4914, 0.4822, 0.4465) and splits.std == (0.2023, 0.1994, 0.2010)
  for split, name in ((splits.train, 'train'), (splits.test, 'test')):
    assert split.images.shape[1:] == (32, 32, 3) and split.images.dtype == np.uint8
    assert_same_examples(split, *written[name])


def test_cifar10_python_through_the_env_var_with_an_80_20_split(tmp_path, monkeypatch):
  written = write_cifar10_python(tmp_path / 'data' / builders.CIFAR10_PYTHON_ARCHIVE, per_batch=4)
  monkeypatch.setenv(pipeline.ENV_DATA_DIR, str(tmp_path / 'data'))
  splits = pipeline.load_splits(data_config('cifar10', tmp_path / 'tfds'), seed=0)
  assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 4)
  both = pipeline.ArraySplit(np.concatenate([splits.train.images, splits.val.images]),
                             np.concatenate([splits.train.labels, splits.val.labels]))
  assert_same_examples(both, *written['train'])


def test_cifar10_class_names_come_from_batches_meta(tmp_path):
  archive = tmp_path / builders.CIFAR10_PYTHON_ARCHIVE
  write_cifar10_python(archive, label_names=('a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j'))
  splits, class_names = builders.read_cifar10_python(archive)
  assert class_names == ('a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j') and len(splits['test'][0]) == 3
  # The builder's ClassLabel is CIFAR-10's: an archive that names other classes is refused.
  with pytest.raises(errors.DatasetUnavailableError) as error:
    pipeline.load_splits(data_config('cifar10', tmp_path / 'tfds', archive), seed=0)
  assert "batches.meta names the classes ('a', 'b'" in str(error.value)
  assert "not CIFAR-10's ('airplane', 'automobile'" in str(error.value)


def test_cifar10_downloads_the_release_through_tfds(tmp_path, monkeypatch):
  release = tmp_path / 'served' / builders.CIFAR10_PYTHON_ARCHIVE
  written = write_cifar10_python(release)
  urls = []

  def fake_download(self, url):
    del self
    urls.append(url)
    return release

  monkeypatch.delenv(pipeline.ENV_DATA_DIR, raising=False)
  monkeypatch.setattr(builders.socket, 'getaddrinfo', lambda *a: [])
  monkeypatch.setattr(tfds.download.DownloadManager, 'download', fake_download)
  # The release's md5 does not match the tiny archive: refused, naming both.
  with pytest.raises(errors.DatasetUnavailableError) as error:
    pipeline.load_splits(data_config('cifar10', tmp_path / 'tfds_a', '', 0.0), seed=0)
  assert f'has md5 {builders.md5sum(release)}, not the release\'s c58f30108f718f92721af3b95e74349a' in str(error.value)
  monkeypatch.setattr(builders, 'CIFAR10_PYTHON_MD5', builders.md5sum(release))
  splits = pipeline.load_splits(data_config('cifar10', tmp_path / 'tfds_b', '', 0.0), seed=0)
  assert urls == ['https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'] * 2
  assert_same_examples(splits.test, *written['test'])
  assert_same_examples(splits.train, *written['train'])


@pytest.mark.parametrize('env', ['unset', 'elsewhere'])
def test_cifar10_offline_without_the_archive_says_what_to_do(tmp_path, monkeypatch, env):
  def offline(*args):
    raise socket.gaierror(-2, 'Name or service not known')

  if env == 'unset':
    monkeypatch.delenv(pipeline.ENV_DATA_DIR, raising=False)
  else:
    (tmp_path / 'elsewhere').mkdir()
    monkeypatch.setenv(pipeline.ENV_DATA_DIR, str(tmp_path / 'elsewhere'))
  monkeypatch.setattr(builders.socket, 'getaddrinfo', offline)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download',
                      lambda *a: pytest.fail('tried a download although the host does not resolve'))
  with pytest.raises(errors.DatasetUnavailableError) as error:
    pipeline.load_splits(data_config('cifar10', tmp_path / 'tfds'), seed=0)
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith("data.name='cifar10' needs cifar-10-python.tar.gz")
  assert 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz failed (cannot resolve www.cs.toronto.edu' in message
  assert 'Put the file in $NORMJAX_DATA_DIR or pass --config.data.source=/path/to/cifar-10-python.tar.gz' in message
  assert '--config.data.name=cifar10_jpeg' in message
  where = (f"none in $NORMJAX_DATA_DIR='{tmp_path / 'elsewhere'}'" if env == 'elsewhere'
           else 'data.source is empty and $NORMJAX_DATA_DIR is not set')
  assert where in message


def test_cifar10_missing_at_an_explicit_source_does_not_download(tmp_path, monkeypatch):
  (tmp_path / 'empty').mkdir()
  monkeypatch.setattr(tfds.download.DownloadManager, 'download',
                      lambda *a: pytest.fail('downloaded although data.source was given'))
  with pytest.raises(errors.DatasetUnavailableError) as error:
    pipeline.load_splits(data_config('cifar10', tmp_path / 'tfds', tmp_path / 'empty'), seed=0)
  assert f"no cifar-10-python.tar.gz were found in data.source='{tmp_path / 'empty'}'" in str(error.value)
  assert '--config.data.name=cifar10_jpeg' in str(error.value)


@pytest.mark.parametrize('corruption,message', [
    ('truncated', 'is not a readable CIFAR-10 python archive'),
    ('not_gzip', 'is not a readable CIFAR-10 python archive (ReadError'),
    ('missing_member', 'lacks cifar-10-batches-py/test_batch'),
    ('bad_pickle', 'is not a readable CIFAR-10 python archive (EOFError: Ran out of input)'),
    ('wrong_shape', 'cifar-10-batches-py/data_batch_3: b"data" is not an (N, 3072) uint8 array'),
    ('bad_labels', 'cifar-10-batches-py/data_batch_1: b"labels" is not 3 integers in 0..9'),
])
def test_corrupt_cifar10_archive_is_one_line_error(tmp_path, corruption, message):
  archive = tmp_path / 'raw' / builders.CIFAR10_PYTHON_ARCHIVE
  if corruption == 'not_gzip':
    archive.parent.mkdir()
    archive.write_bytes(b'not an archive at all' * 100)
  elif corruption == 'missing_member':
    write_cifar10_python(archive)
    with tarfile.open(archive) as tar:
      kept = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar if 'test_batch' not in m.name]
    with tarfile.open(archive, 'w:gz') as tar:
      for member, data in kept:
        tar.addfile(member, io.BytesIO(data) if data is not None else None)
  else:
    members = {
        'bad_pickle': {'data_batch_2': b'\x80\x02}q\x00(U\x04data'},  # cut off mid-pickle
        'wrong_shape': {'data_batch_3': py2_pickle({'data': np.zeros((3, 1024), np.uint8), 'labels': [0, 1, 2]})},
        'bad_labels': {'data_batch_1': py2_pickle({'data': np.zeros((3, 3072), np.uint8), 'labels': [0, 10, 2]})},
    }.get(corruption)
    write_cifar10_python(archive, members=members)
    if corruption == 'truncated':
      archive.write_bytes(archive.read_bytes()[:len(archive.read_bytes()) // 2])
  with pytest.raises(errors.DatasetUnavailableError) as error:
    pipeline.load_splits(data_config('cifar10', tmp_path / 'tfds', archive), seed=0)
  assert message in str(error.value) and str(archive) in str(error.value)
  assert '\n' not in str(error.value)
  assert 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz' in str(error.value)


def test_release_unpickler_refuses_every_other_global(tmp_path):
  marker = tmp_path / 'ran'
  exploit = b'cposix\nsystem\n(S"touch ' + str(marker).encode() + b'"\ntR.'
  with pytest.raises(pickle.UnpicklingError, match='global posix.system is not allowed'):
    builders.load_release_pickle(io.BytesIO(exploit))
  for module, name in (('builtins', 'eval'), ('numpy', 'load'), ('numpy.core.multiarray', 'scalar')):
    with pytest.raises(pickle.UnpicklingError, match=f'global {module}.{name} is not allowed'):
      builders.load_release_pickle(io.BytesIO(f'c{module}\n{name}\n.'.encode()))
  assert not marker.exists()
  # What the release holds does load: builtins and a plain uint8 array.
  batch = builders.load_release_pickle(io.BytesIO(py2_pickle({'labels': [1], 'data': np.ones((1, 3), np.uint8)})))
  assert batch[b'labels'] == [1] and batch[b'data'].dtype == np.uint8


def test_cifar10_python_prepares_without_tensorflow(tmp_path, tf_blocker):
  blocker = tf_blocker
  archive = tmp_path / builders.CIFAR10_PYTHON_ARCHIVE
  written = write_cifar10_python(archive)
  np.save(tmp_path / 'expected.npy', written['test'][0])
  script = (
      'import sys, numpy as np\n'
      'from configs import base\n'
      'from normjax.data import pipeline\n'
      'c = base.get_config().data\n'
      f'c.name, c.tfds_dir, c.source = "cifar10", {str(tmp_path / "tfds")!r}, {str(archive)!r}\n'
      's = pipeline.load_splits(c, 0)\n'
      f'expected = np.load({str(tmp_path / "expected.npy")!r})\n'
      'assert sorted(map(bytes, s.test.images)) == sorted(map(bytes, expected))\n'
      'assert "tensorflow" not in sys.modules\n'
      'print("ok", len(s.train), len(s.val), len(s.test))\n')
  env = {**os.environ, 'PYTHONPATH': f'{blocker}{os.pathsep}{os.getcwd()}'}
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split()[-4:] == ['ok', '12', '3', '3']


# --- data.normalize -----------------------------------------------------------------

@pytest.mark.parametrize('normalize', [True, False])
def test_normalize_false_is_plain_zero_one_scaling(tmp_path, normalize):
  write_tiny_idx_release(tmp_path / 'raw' / 'mnist')
  splits = pipeline.load_splits(data_config('mnist_idx', tmp_path / 'tfds', tmp_path / 'raw',
                                            normalize=normalize), seed=0)
  images = splits.test.images
  x = np.asarray(augment.eval_preprocess(images, image_size=28, mean=splits.mean, std=splits.std))
  if normalize:
    np.testing.assert_allclose(x, (images / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)
  else:
    assert splits.mean == (0.0,) and splits.std == (1.0,)
    # ToTensor: exactly x / 255 in float32.
    np.testing.assert_array_equal(x, images.astype(np.float32) / np.float32(255))
    assert x.min() >= 0 and x.max() <= 1


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
  assert '--config.data.name=cifar10 (the original python release' in message
  assert '\n' not in message


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


def test_missing_mnist_names_the_files_and_the_subfolder(tmp_path, monkeypatch):
  monkeypatch.setenv(pipeline.ENV_DATA_DIR, str(tmp_path))  # holds no mnist/
  with pytest.raises(errors.DatasetUnavailableError) as error:
    pipeline.load_splits(data_config('mnist_idx', tmp_path / 'tfds'), seed=0)
  message = str(error.value)
  assert 'no MNIST IDX files (train-images-idx3-ubyte.gz' in message
  assert f"found in $NORMJAX_DATA_DIR='{tmp_path}'" in message and 'mnist/ subfolder' in message


def test_tfds_fashion_mnist_without_tensorflow_fails_before_downloading(tmp_path, monkeypatch):
  assert tfds.builder_cls('fashion_mnist').__module__.startswith('tensorflow_datasets.')
  assert pipeline.DATASETS['fashion_mnist'].tfds_name == 'fashion_mnist'  # tfds's own, as before
  monkeypatch.setattr(pipeline, '_has_tensorflow', lambda: False)
  with pytest.raises(errors.DatasetUnavailableError) as error:
    pipeline.load_splits(data_config('fashion_mnist', tmp_path / 'tfds'), seed=0)
  message = str(error.value)
  assert "data.name='fashion_mnist' is not prepared" in message and 'TensorFlow' in message
  assert '--config.data.name=fashion_mnist_idx' in message


def test_unknown_dataset_name(tmp_path):
  with pytest.raises(ValueError, match=r"data.name='imagenet' is not one of \['cifar10', "
                     r"'cifar10_jpeg', 'fashion_mnist', 'fashion_mnist_idx', 'mnist_idx'\]"):
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


@pytest.fixture(scope='module')
def mnist(shared_data_dir, tfds_dir):
  """Full MNIST, found as $NORMJAX_DATA_DIR/mnist (data.source empty)."""
  del shared_data_dir  # Only checks that the env var is set.
  return pipeline.load_splits(data_config('mnist_idx', tfds_dir, '', 0.0), seed=0)


def test_real_mnist(mnist):
  assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (60000, 0, 10000)
  assert mnist.train.images.shape == (60000, 28, 28, 1) and mnist.class_names == tuple('0123456789')
  # The per-digit counts of the MNIST release (e.g. torchvision's and tfds's mnist agree).
  np.testing.assert_array_equal(np.bincount(mnist.train.labels),
                                [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
  np.testing.assert_array_equal(np.bincount(mnist.test.labels),
                                [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
  pixels = mnist.train.images / 255.0
  # The PyTorch example's constants are the training set's pixel mean and std (0.13066, 0.30811).
  np.testing.assert_allclose(pixels.mean(), pipeline.MNIST_MEAN, atol=5e-5)
  np.testing.assert_allclose(pixels.std(), pipeline.MNIST_STD, atol=5e-5)


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


def test_train_batches_cross_epochs_and_resume_at_any_step():
  labels = np.arange(10, dtype=np.int32)
  images = lambda epoch: labels * 10 + epoch  # the epoch's variant (the feature cache's case)
  run = lambda start: list(pipeline.train_batches(images, labels, 4, 3, slice(1, 3), start, 5))
  full = run(0)
  assert [step for step, _ in full] == [1, 2, 3, 4, 5]  # 2 steps per epoch; stops mid-epoch 2
  for step, batch in full:
    epoch = (step - 1) // 2
    idx = pipeline.train_batch_indices(10, 4, 3, epoch)[(step - 1) % 2][1:3]  # this host's rows
    np.testing.assert_array_equal(batch['label'], labels[idx])
    np.testing.assert_array_equal(batch['image'], labels[idx] * 10 + epoch)
  for start in range(6):  # a resume from the checkpoint at `start` sees exactly the rest
    resumed = run(start)
    assert [s for s, _ in resumed] == [s for s, _ in full[start:]]
    for (_, a), (_, b) in zip(resumed, full[start:]):
      np.testing.assert_array_equal(a['label'], b['label'])
      np.testing.assert_array_equal(a['image'], b['image'])
