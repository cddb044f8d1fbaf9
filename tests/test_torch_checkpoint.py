"""normjax.torch_checkpoint against torch.load: bitwise tensors, refused globals, hashes, errors."""
import collections
import hashlib
import io
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch

from normjax import torch_checkpoint
from normjax.errors import WeightsError

V1_FILE = 'mobilenet_v2-b0353104.pth'  # torchvision IMAGENET1K_V1 file name
# ../shared/data/README.md: the file's sha256 (torchvision's name carries its first 8 digits).
V1_SHA256 = 'b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889'


@pytest.fixture(scope='module')
def v1_file(shared_data_dir):
  return shared_data_dir / 'torchvision' / V1_FILE


def _assert_bitwise_equal(ours, reference):
  """ours (numpy) holds exactly reference's (torch) tensors: keys, order, dtype, shape, bytes."""
  assert list(ours) == list(reference)
  for key, tensor in reference.items():
    tensor, array = tensor.detach(), ours[key]
    assert isinstance(array, np.ndarray), key
    assert array.dtype.name == str(tensor.dtype).removeprefix('torch.'), key
    assert array.shape == tuple(tensor.shape), key
    assert array.flags.c_contiguous and array.flags.writeable, key
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    assert array.tobytes() == raw.tobytes(), key


def test_real_v1_file_is_read_bitwise_like_torch_load(v1_file, tmp_path):
  assert hashlib.sha256(v1_file.read_bytes()).hexdigest() == V1_SHA256
  assert not zipfile.is_zipfile(v1_file)  # torchvision's file is in torch's legacy format
  reference = torch.load(v1_file, weights_only=True)
  ours = torch_checkpoint.load_state_dict(str(v1_file))
  assert len(ours) == 314 and ours['features.0.1.num_batches_tracked'].dtype == np.int64
  _assert_bitwise_equal(ours, reference)
  # The same tensors re-saved by this torch in its zip format.
  resaved = tmp_path / 'mobilenet_v2_zip.pth'
  torch.save(reference, resaved)
  assert zipfile.is_zipfile(resaved)
  _assert_bitwise_equal(torch_checkpoint.load_state_dict(str(resaved)), reference)


def _crafted_state_dict() -> collections.OrderedDict:
  """Every storage type, strided views, storages shared at several offsets, 0-d, empty, a
  Parameter."""
  g = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, 5, generator=g)
  counts = torch.randint(-2**62, 2**62, (40,), generator=g)
  return collections.OrderedDict(
      f32=torch.randn(3, 4, generator=g),
      f16=torch.randn(7, generator=g).half(),
      bf16=torch.randn(2, 3, generator=g).bfloat16(),
      i64=torch.randint(-2**62, 2**62, (5,), generator=g),
      f64=torch.randn(3, generator=g).double(),
      i32=torch.randint(-2**31, 2**31 - 1, (4,), generator=g, dtype=torch.int32),
      i16=torch.randint(-2**15, 2**15 - 1, (4,), generator=g, dtype=torch.int16),
      i8=torch.randint(-128, 127, (4,), generator=g, dtype=torch.int8),
      u8=torch.randint(0, 255, (4,), generator=g, dtype=torch.uint8),
      bool=torch.rand(6, generator=g) > 0.5,
      c64=torch.randn(3, generator=g, dtype=torch.complex64),
      base=base,
      transposed=base.transpose(0, 2),  # strides (1, 5, 30) over base's storage
      strided=base[1:, ::2, 1::2],  # offset 31, strides (30, 10, 2)
      row=base[3],  # offset 90
      shared_a=counts[3:11],  # one int64 storage at two offsets
      shared_b=counts[20:].view(4, 5).t(),
      broadcast=torch.arange(3.0).expand(4, 3),  # stride 0
      scalar=torch.tensor(1431430),  # like num_batches_tracked
      empty=torch.zeros(0, 3),
      param=torch.nn.Parameter(torch.randn(2, 2, generator=g)),  # torch._utils._rebuild_parameter
  )


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_crafted_tensors_are_read_bitwise_like_torch_load(tmp_path, zip_format):
  state_dict = _crafted_state_dict()
  path = tmp_path / 'crafted.pth'
  torch.save(state_dict, path, _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(path) == zip_format
  if zip_format:  # the views really share storages: one data record per distinct storage
    storages = {t.untyped_storage().data_ptr() for t in state_dict.values() if t.numel()}
    records = [n for n in zipfile.ZipFile(path).namelist() if n.split('/')[1] == 'data']
    assert len(records) < len(state_dict) and len(records) >= len(storages)
  reference = torch.load(path, weights_only=True)
  ours = torch_checkpoint.load_state_dict(str(path))
  _assert_bitwise_equal(ours, reference)
  assert not np.shares_memory(ours['base'], ours['row'])  # each array is its own copy
  assert ours['bf16'].dtype.name == 'bfloat16' and ours['transposed'].shape == (5, 6, 4)


def test_big_endian_zip_is_byteswapped_like_torch_load(tmp_path):
  little, big = tmp_path / 'little.pth', tmp_path / 'big.pth'
  state_dict = {'a': torch.randn(3, 4), 'b': torch.randn(9)[2:].view(7, 1)}  # float32 only
  torch.save(state_dict, little)
  with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, 'w') as dst:
    for name in src.namelist():
      data = src.read(name)
      if name.endswith('/byteorder'):
        data = b'big'
      elif name.split('/')[1] == 'data':
        data = np.frombuffer(data, '<f4').astype('>f4').tobytes()
      dst.writestr(name, data)
  reference = torch.load(big, weights_only=True)
  assert all(torch.equal(reference[k], v) for k, v in state_dict.items())  # torch: same values
  _assert_bitwise_equal(torch_checkpoint.load_state_dict(str(big)), reference)


class _Storage:
  """A storage as torch pickles it (persistent id), of any declared size."""

  def __init__(self, key: str, numel: int):
    self.key, self.numel = key, numel


class _Tensor:
  """A tensor as torch pickles it, with any geometry."""

  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.args = (storage, offset, size, stride)


class _TorchLikePickler(pickle.Pickler):
  """Writes the pickle torch.save writes (_rebuild_tensor_v2 of a FloatStorage persistent id)."""

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ('storage', torch.FloatStorage, obj.key, 'cpu', obj.numel)
    return None

  def reducer_override(self, obj):
    if isinstance(obj, _Tensor):
      return torch._utils._rebuild_tensor_v2, (*obj.args, False, collections.OrderedDict())
    return NotImplemented


def _write_zip(path, payload: bytes, records: dict[str, bytes] | None = None) -> None:
  """A .pth in torch's zip layout with the given data.pkl and data/<key> records."""
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', payload)
    z.writestr('archive/byteorder', 'little')
    for key, data in (records or {}).items():
      z.writestr(f'archive/data/{key}', data)
    z.writestr('archive/version', '3\n')


def _crafted_tensor_file(path, size, stride, offset=2, numel=10, stored=10) -> None:
  buffer = io.BytesIO()
  tensor = _Tensor(_Storage('0', numel), offset, size, stride)
  _TorchLikePickler(buffer, protocol=2).dump({'w': tensor})
  _write_zip(path, buffer.getvalue(), {'0': np.arange(stored, dtype=np.float32).tobytes()})


def test_tensor_geometry_is_checked_against_its_storage(tmp_path):
  inside = tmp_path / 'inside.pth'
  _crafted_tensor_file(inside, size=(2, 2), stride=(3, 1))  # elements 2, 3, 5, 6 of 10
  _assert_bitwise_equal(torch_checkpoint.load_state_dict(str(inside)),
                        torch.load(inside, weights_only=True))
  cases = {'outside': ((2, 2), (9, 1), 10, 10),  # reaches element 2 + 9 + 1 = 12 of 10
           'short_record': ((2, 2), (3, 1), 10, 8)}  # declares 10 elements, stores 8
  for name, (size, stride, numel, stored) in cases.items():
    path = tmp_path / f'{name}.pth'
    _crafted_tensor_file(path, size, stride, numel=numel, stored=stored)
    with pytest.raises(Exception):
      torch.load(path, weights_only=True)  # torch refuses these files too
    with pytest.raises(WeightsError) as e:
      torch_checkpoint.load(str(path))
    assert str(path) in str(e.value) and '\n' not in str(e.value)
    assert ('reaches element 12 of a storage of 10' if name == 'outside'
            else 'holds 32 bytes, expected 10 x 4') in str(e.value)


def _legacy_file(payload: bytes) -> bytes:
  """torch's legacy layout: magic number, protocol version, sys_info, the object, storage keys."""
  sys_info = {'protocol_version': torch.serialization.PROTOCOL_VERSION, 'little_endian': True,
              'type_sizes': {'short': 2, 'int': 4, 'long': 8}}
  header = b''.join(pickle.dumps(x, protocol=2) for x in (
      torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, sys_info))
  return header + payload + pickle.dumps([], protocol=2)


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_pickle_naming_another_global_is_refused_and_runs_nothing(tmp_path, zip_format):
  marker = tmp_path / 'pwned'

  class Payload:
    def __reduce__(self):
      return os.system, (f'touch {marker}',)

  payload = pickle.dumps({'features.0.0.weight': Payload()}, protocol=2)
  path = tmp_path / 'evil.pth'
  if zip_format:
    _write_zip(path, payload)
  else:
    path.write_bytes(_legacy_file(payload))
  with pytest.raises(WeightsError) as e:
    torch_checkpoint.load(str(path))
  msg = str(e.value)
  assert f'{os.system.__module__}.system' in msg and str(path) in msg and '\n' not in msg
  assert not marker.exists()
  pickle.loads(payload)  # the control: an unrestricted unpickler runs the command
  assert marker.exists()


def test_pickle_cannot_set_attributes_of_allowed_globals(tmp_path):
  for module, name in (('torch._utils', '_rebuild_tensor_v2'), ('collections', 'OrderedDict')):
    # BUILD with slot state {'__defaults__': ()}: setattr on the global, then return it.
    payload = (b'\x80\x02c' + f'{module}\n{name}\n'.encode()
               + b'N}X\x0c\x00\x00\x00__defaults__)s\x86b.')
    path = tmp_path / f'{name}.pth'
    _write_zip(path, payload)
    with pytest.raises(WeightsError, match=f'{path}: '):
      torch_checkpoint.load(str(path))
  # Later loads still work: the allowed functions kept their defaults.
  path = tmp_path / 'after.pth'
  _crafted_tensor_file(path, size=(2, 2), stride=(3, 1))
  _assert_bitwise_equal(torch_checkpoint.load_state_dict(str(path)),
                        torch.load(path, weights_only=True))


def test_whole_pickled_module_is_refused(tmp_path):
  path = tmp_path / 'model.pth'
  torch.save(torch.nn.Linear(2, 3), path)  # a module, not its state_dict
  with pytest.raises(WeightsError, match=r'global torch\.nn\.modules\.linear\.Linear'):
    torch_checkpoint.load(str(path))


def _bad_crc(zip_bytes: bytes) -> bytes:
  """zip_bytes with one byte flipped inside its largest stored tensor record."""
  info = max((i for i in zipfile.ZipFile(io.BytesIO(zip_bytes)).infolist()
              if i.filename.split('/')[1] == 'data'), key=lambda i: i.file_size)
  header = info.header_offset  # local header: 30 bytes, then the name and the extra field
  name_len = int.from_bytes(zip_bytes[header + 26:header + 28], 'little')
  extra_len = int.from_bytes(zip_bytes[header + 28:header + 30], 'little')
  start = header + 30 + name_len + extra_len
  out = bytearray(zip_bytes)
  out[start + info.file_size // 2] ^= 0xFF
  return bytes(out)


def _corrupt_bytes(case: str, v1_file) -> bytes:
  if case in ('truncated_zip', 'zip_bad_crc'):
    buffer = io.BytesIO()
    torch.save(_crafted_state_dict(), buffer)
    data = buffer.getvalue()
    return data[:len(data) * 3 // 5] if case == 'truncated_zip' else _bad_crc(data)
  v1 = v1_file.read_bytes()
  return {
      'empty': b'',
      'text': b'not a checkpoint\n' * 20,
      'random': np.random.default_rng(0).bytes(5000),
      'zip_magic_then_garbage': b'PK\x03\x04' + np.random.default_rng(1).bytes(5000),
      'truncated_legacy_v1': v1[:len(v1) * 3 // 5],  # cut inside the storage bytes
      'truncated_legacy_pickle': v1[:20000],  # cut inside the pickle
  }[case]


@pytest.mark.parametrize('case', ['empty', 'text', 'random', 'zip_magic_then_garbage',
                                  'truncated_zip', 'truncated_legacy_v1',
                                  'truncated_legacy_pickle', 'zip_bad_crc'])
def test_corrupt_file_is_one_line_weights_error(v1_file, tmp_path, case):
  path = tmp_path / f'{case}.pth'  # no hash in the name: the parser must notice
  path.write_bytes(_corrupt_bytes(case, v1_file))
  with pytest.raises(WeightsError) as e:
    torch_checkpoint.load(str(path))
  msg = str(e.value)
  assert msg.startswith(str(path)) and '\n' not in msg, msg


def test_missing_file_is_weights_error(tmp_path):
  with pytest.raises(WeightsError, match='cannot read .*nothing.pth: No such file'):
    torch_checkpoint.load(str(tmp_path / 'nothing.pth'))


def test_torchvision_name_must_match_sha256(v1_file, tmp_path):
  data = v1_file.read_bytes()
  good = tmp_path / 'good' / V1_FILE
  good.parent.mkdir()
  shutil.copy(v1_file, good)
  original = torch_checkpoint.load_state_dict(str(good))
  altered = bytearray(data)
  altered[-100] ^= 0x01  # a bit of the last stored tensor
  for name, content in (('altered', bytes(altered)), ('truncated', data[:len(data) // 2])):
    path = tmp_path / name / V1_FILE
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(WeightsError) as e:
      torch_checkpoint.load(str(path))
    msg = str(e.value)
    assert '\n' not in msg and str(path) in msg
    assert 'does not start with b0353104' in msg and hashlib.sha256(content).hexdigest() in msg
  # Without the hash in its name the altered file parses: only the hash catches the bit flip.
  unnamed = tmp_path / 'mobilenet_v2.pth'
  unnamed.write_bytes(bytes(altered))
  changed = [k for k, v in torch_checkpoint.load_state_dict(str(unnamed)).items()
             if v.tobytes() != original[k].tobytes()]
  assert len(changed) == 1


@pytest.mark.parametrize('name, prefix', [
    ('mobilenet_v2-b0353104.pth', 'b0353104'), ('resnet18-f37072fd.pth', 'f37072fd'),
    ('x-' + V1_SHA256 + '.pth', V1_SHA256), ('mobilenet_v2.pth', None), ('my-model.pth', None),
    ('net-abc123.pth', None), ('net-B0353104.pth', None), ('net-b0353104.pt', None)])
def test_hash_prefix_follows_torchvision_names(name, prefix):
  assert torch_checkpoint.hash_prefix(f'/some/dir-01234567.pth/{name}') == prefix


@pytest.mark.parametrize('env', [
    {'TORCH_HOME': 'th'}, {'TORCH_HOME': 'th', 'XDG_CACHE_HOME': 'xdg'}, {'XDG_CACHE_HOME': 'xdg'},
    {}])
def test_hub_dir_is_torch_hub_get_dir(env, tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  for var in ('TORCH_HOME', 'XDG_CACHE_HOME'):
    monkeypatch.delenv(var, raising=False)
  for var, value in env.items():
    monkeypatch.setenv(var, str(tmp_path / value))
  assert torch_checkpoint.hub_dir() == torch.hub.get_dir()
  assert torch_checkpoint.hub_dir().startswith(str(tmp_path))
