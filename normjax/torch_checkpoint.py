"""Reads torch checkpoints (state_dicts) without torch: the standard library and numpy only.

Two on-disk formats, both written by `torch.save` (torch/serialization.py):
  zip (torch >= 1.6): `<archive>/data.pkl` is the pickle, `<archive>/data/<key>` the raw bytes
    of each storage, `<archive>/byteorder` 'little' or 'big' (little when absent).
  legacy (torch < 1.6, e.g. torchvision's mobilenet_v2-b0353104.pth): five pickles in a row
    (magic number, protocol version, sys_info, the object, the sorted storage keys), then per
    storage an int64 element count and its bytes, always little-endian.
  torch's oldest format, a tar archive, is refused with a WeightsError.
The pickle rebuilds tensors with `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)` and names storages by persistent id ('storage', <torch.XStorage>, key, location, numel[,
view]). A restricted unpickler admits only those globals, `torch._utils._rebuild_parameter`
and `collections.OrderedDict`; any other global raises WeightsError before anything is
called. Tensors come back as C-contiguous numpy arrays (bfloat16 as ml_dtypes.bfloat16), each
a copy, bounds-checked against its storage.

Like torch.hub's check_hash, a file named `<name>-<8 or more hex digits>.pth` (torchvision's
convention) must have a sha256 starting with those digits. `hub_dir` and `download` mirror
torch.hub.get_dir and torch.hub.download_url_to_file.
"""
import collections
import hashlib
import http.client
import io
import os
import pickle
import re
import sys
import tempfile
from typing import Any
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import ml_dtypes  # a jax dependency; numpy has no bfloat16
import numpy as np

from normjax.errors import WeightsError

# torch/serialization.py: the legacy format's first two pickles.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch.<X>Storage -> element type (torch/storage.py, _dtype_to_storage_type_map).
STORAGE_DTYPES = {
    'DoubleStorage': np.dtype(np.float64),
    'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
    'ComplexFloatStorage': np.dtype(np.complex64),
    'ComplexDoubleStorage': np.dtype(np.complex128),
}

# torch.hub.HASH_REGEX is r'-([a-f0-9]*)\.'; torchvision's files carry 8 digits.
_HASH_IN_NAME = re.compile(r'.+-([0-9a-f]{8,64})\.pth')


class _StorageType:
  """What the pickle's `torch.<X>Storage` global resolves to: just an element type."""
  __slots__ = ('name', 'dtype')

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype

  def __setstate__(self, state):
    raise WeightsError(f'pickle tries to set the state of torch.{self.name}')


class _Storage:
  """A storage named by a persistent id: `numel` elements from `offset` of the root `key`."""
  __slots__ = ('key', 'dtype', 'offset', 'numel')

  def __init__(self, key: str, dtype: np.dtype, offset: int, numel: int):
    self.key, self.dtype, self.offset, self.numel = key, dtype, offset, numel

  def __setstate__(self, state):
    raise WeightsError('pickle tries to set the state of a storage')


class _Tensor:
  """A tensor to be cut from its storage once every storage's bytes are known."""
  __slots__ = ('storage', 'offset', 'size', 'stride')

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...],
               stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def __setstate__(self, state):
    raise WeightsError('pickle tries to set the state of a tensor')


def _is_count(x: Any) -> bool:
  return type(x) is int and x >= 0  # pylint: disable=unidiomatic-typecheck  (bool is an int)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _Tensor:
  """torch._utils._rebuild_tensor_v2, deferred; requires_grad, hooks and metadata are dropped."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise WeightsError(f'_rebuild_tensor_v2 got a {type(storage).__name__}, not a storage')
  size, stride = tuple(size), tuple(stride)
  if (not _is_count(storage_offset) or len(size) != len(stride)
      or not all(map(_is_count, size + stride))):
    raise WeightsError(f'invalid tensor geometry: offset {storage_offset!r}, size {size!r}, '
                       f'stride {stride!r}')
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> _Tensor:
  """torch._utils._rebuild_parameter: a Parameter is its tensor here."""
  del requires_grad, backward_hooks
  if not isinstance(data, _Tensor):
    raise WeightsError(f'_rebuild_parameter got a {type(data).__name__}, not a tensor')
  return data


class _Function:
  """An allowed function as the pickle sees it: callable, but its attributes cannot be set
  (a BUILD opcode on a bare function would set them, for every later load too)."""
  __slots__ = ('name', 'function')

  def __init__(self, name: str, function):
    self.name, self.function = name, function

  def __call__(self, *args):
    return self.function(*args)

  def __setstate__(self, state):
    raise WeightsError(f'pickle tries to set attributes of {self.name}')


_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _Function('_rebuild_tensor_v2', _rebuild_tensor_v2),
    ('torch._utils', '_rebuild_parameter'): _Function('_rebuild_parameter', _rebuild_parameter),
    # A type implemented in C: a pickle cannot set its attributes.
    ('collections', 'OrderedDict'): collections.OrderedDict,
    **{('torch', name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
  """pickle.Unpickler that resolves only _GLOBALS and records storages by persistent id."""

  def __init__(self, file: io.BytesIO, source: str, legacy: bool):
    super().__init__(file)
    self.source, self.legacy = source, legacy
    self.storages: dict[str, tuple[np.dtype, int]] = {}  # root key -> (dtype, numel)

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _GLOBALS[module, name]
    except (KeyError, TypeError):
      raise WeightsError(
          f'{self.source}: refused to unpickle the global {module}.{name}, which a state_dict '
          f'never needs (only torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, '
          f'torch.<type>Storage and collections.OrderedDict are allowed); nothing in the file '
          f'was executed') from None

  def persistent_load(self, pid: Any) -> _Storage:
    if not isinstance(pid, tuple) or not pid or _ascii(pid[0]) != 'storage':
      raise WeightsError(f'unknown persistent id {pid!r:.80}')
    if len(pid) != (6 if self.legacy else 5):
      raise WeightsError(f'persistent id of {len(pid)} fields: {pid!r:.80}')
    storage_type, key, _, numel = pid[1:5]
    if (not isinstance(storage_type, _StorageType) or not isinstance(key, str)
        or not _is_count(numel)):
      raise WeightsError(f'invalid storage id {pid!r:.80}')
    if self.storages.setdefault(key, (storage_type.dtype, numel)) != (storage_type.dtype, numel):
      raise WeightsError(f'storage {key} is named with two types or sizes')
    view = pid[5] if self.legacy else None
    if view is None:
      return _Storage(key, storage_type.dtype, 0, numel)
    # legacy storage views (torch < 0.4): (view key, offset, size) into the root storage.
    if not (isinstance(view, tuple) and len(view) == 3 and _is_count(view[1]) and _is_count(view[2])
            and view[1] + view[2] <= numel):
      raise WeightsError(f'invalid storage view {view!r:.80} of a storage of {numel} elements')
    return _Storage(key, storage_type.dtype, view[1], view[2])


def _ascii(x: Any) -> Any:
  """torch.serialization._maybe_decode_ascii: pickles from Python 2 hold bytes."""
  return x.decode('ascii') if isinstance(x, bytes) else x


def _tensor_array(tensor: _Tensor, roots: dict[str, np.ndarray]) -> np.ndarray:
  """The tensor's elements as a new C-contiguous array, after checking it stays in its storage."""
  storage = tensor.storage
  flat = roots[storage.key][storage.offset:storage.offset + storage.numel]
  if 0 in tensor.size:
    return np.zeros(tensor.size, storage.dtype)
  last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
  if last >= flat.size:
    raise WeightsError(f'a tensor reaches element {last} of a storage of {flat.size} elements')
  view = np.lib.stride_tricks.as_strided(
      flat[tensor.offset:], shape=tensor.size,
      strides=[s * flat.itemsize for s in tensor.stride], writeable=False)
  return np.array(view, order='C')


def _materialize(obj: Any, roots: dict[str, np.ndarray]) -> Any:
  """obj with every _Tensor replaced by its array (dicts, lists and tuples are walked)."""
  if isinstance(obj, _Tensor):
    return _tensor_array(obj, roots)
  if isinstance(obj, dict):  # OrderedDict too; its _metadata attribute is dropped
    return {k: _materialize(v, roots) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, roots) for v in obj)
  return obj


def _native(array: np.ndarray, byteorder: str) -> np.ndarray:
  return array if byteorder == sys.byteorder else array.byteswap()


def _load_zip(data: bytes, source: str) -> tuple[Any, dict[str, np.ndarray]]:
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
  except zipfile.BadZipFile as e:
    raise WeightsError(f'truncated or corrupt zip archive ({e})') from None
  with archive:
    pickles = [n for n in archive.namelist() if n.count('/') == 1 and n.endswith('/data.pkl')]
    if len(pickles) != 1:
      raise WeightsError(f'a zip archive but not a torch checkpoint: {len(pickles)} '
                         f'<archive>/data.pkl records')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = 'little'
    if prefix + 'byteorder' in archive.namelist():
      byteorder = archive.read(prefix + 'byteorder').decode('ascii', 'replace')
      if byteorder not in ('little', 'big'):
        raise WeightsError(f'unknown byteorder record {byteorder!r}')
    unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), source, legacy=False)
    obj = unpickler.load()
    roots = {}
    for key, (dtype, numel) in unpickler.storages.items():
      name = f'{prefix}data/{key}'
      try:
        info = archive.getinfo(name)
      except KeyError:
        raise WeightsError(f'storage record {name} is missing') from None
      if info.file_size != numel * dtype.itemsize:  # checked before reading: no zip bomb
        raise WeightsError(f'storage record {name} holds {info.file_size} bytes, expected '
                           f'{numel} x {dtype.itemsize}')
      roots[key] = _native(np.frombuffer(archive.read(name), dtype), byteorder)
  return obj, roots


def _load_legacy(data: bytes, source: str) -> tuple[Any, dict[str, np.ndarray]]:
  f = io.BytesIO(data)
  load = lambda: _Unpickler(f, source, legacy=True).load()
  if load() != LEGACY_MAGIC_NUMBER:
    raise WeightsError('neither a zip archive nor a legacy torch file (no magic number)')
  if (version := load()) != LEGACY_PROTOCOL_VERSION:
    raise WeightsError(f'legacy torch protocol version {version!r}, expected '
                       f'{LEGACY_PROTOCOL_VERSION}')
  load()  # sys_info: torch ignores it too (storage bytes are always little-endian)
  unpickler = _Unpickler(f, source, legacy=True)
  obj = unpickler.load()
  keys = load()
  if not isinstance(keys, list) or sorted(keys) != sorted(unpickler.storages):
    raise WeightsError('the storage key list does not match the storages the pickle names')
  roots = {}
  for key in keys:
    dtype, numel = unpickler.storages[key]
    header = f.read(8)
    count = int.from_bytes(header, 'little', signed=True)
    if len(header) < 8 or count != numel:
      raise WeightsError(f'storage {key}: element count {count if len(header) == 8 else "cut"}, '
                         f'expected {numel}')
    raw = f.read(numel * dtype.itemsize)
    if len(raw) < numel * dtype.itemsize:
      raise WeightsError(f'truncated: storage {key} ends after {len(raw)} of '
                         f'{numel * dtype.itemsize} bytes')
    roots[key] = _native(np.frombuffer(raw, dtype), 'little')
  return obj, roots


def hash_prefix(path: str) -> str | None:
  """The sha256 prefix a torchvision-style name `<name>-<hex>.pth` promises, else None."""
  match = _HASH_IN_NAME.fullmatch(os.path.basename(path))
  return match.group(1) if match else None


def check_hash(path: str, digest: str) -> None:
  """Raises WeightsError when `path`'s name promises a sha256 prefix that `digest` lacks."""
  prefix = hash_prefix(path)
  if prefix is not None and not digest.startswith(prefix):
    raise WeightsError(
        f'{path}: sha256 {digest} does not start with {prefix}, the hash in its name: the file '
        f'is truncated or altered; download it again')


def load(path: str) -> Any:
  """The object `torch.save` wrote to `path`, its tensors as numpy arrays; torch-free and safe.

  Raises one-line WeightsError for a missing, truncated, altered (see check_hash) or unsafe file.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise WeightsError(f'cannot read {path}: {e.strerror or e}') from None
  check_hash(path, hashlib.sha256(data).hexdigest())
  if data[257:262] == b'ustar':
    raise WeightsError(f'{path}: torch\'s oldest (tar) format is not supported; '
                       f'load it with torch and save it again')
  is_zip = data[:4] == b'PK\x03\x04'
  if not data:
    raise WeightsError(f'{path} is empty')
  if not is_zip and data[:1] != b'\x80':  # every torch.save pickle starts with PROTO
    raise WeightsError(f'{path} is not a torch checkpoint (neither torch\'s zip format nor its '
                       f'legacy pickle format)')
  try:
    obj, roots = (_load_zip if is_zip else _load_legacy)(data, path)
    return _materialize(obj, roots)
  except WeightsError as e:
    message = str(e)
    raise WeightsError(message if message.startswith(path) else f'{path}: {message}') from None
  except Exception as e:  # pylint: disable=broad-except  # any malformed pickle is one error
    truncated = isinstance(e, (EOFError, pickle.UnpicklingError))
    kind = 'truncated or corrupt' if truncated else 'corrupt'
    raise WeightsError(f'{path}: {kind} torch checkpoint ({type(e).__name__}: '
                       f'{str(e).splitlines()[0] if str(e) else ""})') from None


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """`load`, checked to be a state_dict: a mapping of names to tensors."""
  obj = load(path)
  if not isinstance(obj, dict):
    raise WeightsError(f'{path} holds a {type(obj).__name__}, not a state_dict')
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise WeightsError(f'{path} is not a state_dict: {len(bad)} entries are not tensors '
                       f'(e.g. {bad[:3]}); save model.state_dict() itself')
  return obj


def hub_dir() -> str:
  """torch.hub.get_dir() without torch: $TORCH_HOME/hub, TORCH_HOME defaulting to
  $XDG_CACHE_HOME/torch, XDG_CACHE_HOME to ~/.cache (torch/hub.py, _get_torch_home)."""
  cache = os.getenv('XDG_CACHE_HOME', os.path.join('~', '.cache'))
  return os.path.join(os.path.expanduser(os.getenv('TORCH_HOME', os.path.join(cache, 'torch'))),
                      'hub')


def download(url: str, path: str, timeout_s: float = 60.0) -> None:
  """Downloads `url` to `path` via a temporary file in the same folder, renamed only after the
  hash check (torch.hub.download_url_to_file), so `path` is never a partial or altered file.

  Raises one-line WeightsError when the download fails or the hash does not match.
  """
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.partial')
  except OSError as e:
    raise WeightsError(f'cannot download {url} into {folder}: {e.strerror or e}') from None
  try:
    sha256 = hashlib.sha256()
    request = urllib.request.Request(url, headers={'User-Agent': 'normjax'})
    with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(request, timeout=timeout_s) as response:
      while chunk := response.read(1 << 20):
        f.write(chunk)
        sha256.update(chunk)
    prefix, digest = hash_prefix(path), sha256.hexdigest()
    if prefix is not None and not digest.startswith(prefix):
      raise WeightsError(f'sha256 {digest} does not start with {prefix}, the hash in the file '
                         f'name: the download is truncated or altered; nothing was saved')
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache file is not secret
    os.replace(tmp, path)
  except WeightsError as e:
    raise WeightsError(f'download of {url}: {e}') from None
  except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
    # URLError's text wraps its reason; HTTPError (a subclass) says the status code.
    reason = e.reason if type(e) is urllib.error.URLError else e  # pylint: disable=unidiomatic-typecheck
    raise WeightsError(f'download of {url} failed: {reason}') from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
