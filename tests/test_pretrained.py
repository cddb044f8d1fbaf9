"""Porting torchvision MobileNetV2 weights: exact logits and features, clear errors, loaders.

The real ImageNet file ($NORMJAX_DATA_DIR/torchvision/mobilenet_v2-b0353104.pth) is read without
torch and checked against a torch MobileNetV2 that loads it with torch.load.
"""
import functools
import hashlib
import http.server
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import torch
from absl import app
from absl import flags

from normjax import port
from normjax import pretrained
from normjax.data import pipeline
from normjax.errors import WeightsError
from normjax.models.mobilenet_v2 import MobileNetV2Features, mobilenet_v2
from normjax.models.classifier import Classifier
from normjax.models.heads import MLPHead
from normjax.models.norms import make_norm
from torch_reference import MobileNetV2 as TorchMobileNetV2
from torch_reference import randomize_

V1_FILE = 'mobilenet_v2-b0353104.pth'  # torchvision IMAGENET1K_V1 file name
V1_URL = 'https://download.pytorch.org/models/mobilenet_v2-b0353104.pth'
# torchvision's ImageNet preprocessing (transforms._presets.ImageClassification).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """(torch model, its state_dict file, ported module, ported variables, jitted apply)."""
  torch.manual_seed(0)
  model = randomize_(TorchMobileNetV2())
  path = str(tmp_path_factory.mktemp('torch') / 'mobilenet_v2.pth')
  torch.save(model.state_dict(), path)
  module, variables = pretrained.load_torchvision_mobilenet_v2(path)
  apply = jax.jit(functools.partial(module.apply, train=False, capture_intermediates=True))
  return model, path, module, variables, apply


def _torch_features(model, x, indices):
  """Eval-mode logits and outputs of features.<i> for i in indices, as NHWC numpy."""
  outputs = {}
  hooks = [model.features[i].register_forward_hook(
      lambda m, inp, out, i=i: outputs.__setitem__(i, out.permute(0, 2, 3, 1).numpy().copy()))
           for i in indices]
  with torch.no_grad():
    logits = model(x).numpy()
  for h in hooks:
    h.remove()
  return logits, outputs


# features.0 stem, .1 (expand 1), .2 and .14 stride 2, .3 and .16 residual, .18 last conv.
FEATURES = (0, 1, 2, 3, 14, 16, 18)


@pytest.mark.parametrize('size', [224, 32, 97])
def test_ported_logits_and_features_match_torch(reference, size):
  model, _, _, variables, apply = reference
  x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
  ref_logits, ref_features = _torch_features(model, x, FEATURES)
  logits, state = apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  assert logits.shape == (2, 1000)
  assert np.abs(ref_logits).max() > 1.0  # random BN makes logits non-trivial
  assert np.abs(np.asarray(logits) - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
  ours = state['intermediates']['backbone']
  for i in FEATURES:
    ref = ref_features[i]
    out = np.asarray(ours[f'features_{i}']['__call__'][0])
    assert out.shape == ref.shape, i
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), f'features.{i}'


def test_port_maps_every_tensor(reference):
  model, _, _, variables, _ = reference
  state_dict = model.state_dict()
  n_torch = sum(v.numel() for k, v in state_dict.items() if not k.endswith('num_batches_tracked'))
  assert sum(a.size for a in jax.tree.leaves(variables)) == n_torch
  np.testing.assert_array_equal(
      variables['params']['backbone']['features_2']['conv_1']['0']['kernel'],
      state_dict['features.2.conv.1.0.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['batch_stats']['backbone']['features_18']['1']['var'],
                                state_dict['features.18.1.running_var'].numpy())
  np.testing.assert_array_equal(variables['params']['head']['out']['kernel'],
                                state_dict['classifier.1.weight'].numpy().T)


def _port_error(reference, edit) -> str:
  model, _, module, _, _ = reference
  state_dict = dict(model.state_dict())
  edit(state_dict)
  with pytest.raises(WeightsError) as e:
    pretrained.port_state_dict(state_dict, module)
  return str(e.value)


def test_error_names_every_missing_key(reference):
  def truncate(sd):
    for k in ('features.5.conv.1.0.weight', 'features.18.1.running_var', 'classifier.1.bias'):
      del sd[k]
  msg = _port_error(reference, truncate)
  assert 'missing keys (3):' in msg
  for k in ('features.5.conv.1.0.weight', 'features.18.1.running_var', 'classifier.1.bias'):
    assert f'  {k}\n' in msg + '\n'
  assert 'unexpected' not in msg and 'shape mismatch' not in msg


def test_error_names_unexpected_key(reference):
  msg = _port_error(reference, lambda sd: sd.update({'features.19.0.weight': torch.zeros(3)}))
  assert 'unexpected keys (1):\n  features.19.0.weight' in msg
  assert 'missing' not in msg


def test_error_names_shape_mismatch(reference):
  msg = _port_error(reference, lambda sd: sd.update(
      {'features.3.conv.2.weight': torch.zeros(24, 140, 1, 1)}))
  assert ('shape mismatches (1):\n  features.3.conv.2.weight: torch shape (24, 140, 1, 1), '
          'expected (24, 144, 1, 1)') in msg


def test_one_error_lists_all_problems(reference):
  def break_all(sd):
    del sd['features.0.1.bias']
    sd['extra.weight'] = torch.zeros(1)
    sd['classifier.1.weight'] = torch.zeros(10, 1280)
  msg = _port_error(reference, break_all)
  assert '  features.0.1.bias' in msg and '  extra.weight' in msg
  assert 'classifier.1.weight: torch shape (10, 1280), expected (1000, 1280)' in msg


@pytest.fixture(scope='module')
def target():
  """Variables (all 0.5) of the study's CIFAR model: cifar_stem (same shapes), 10-class MLP head."""
  model = Classifier(
      backbone=MobileNetV2Features(norm=functools.partial(make_norm, 'bn'), cifar_stem=True),
      head=MLPHead(10, norm=functools.partial(make_norm, 'bn')))
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  return jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)


def _assert_backbone_is_ported(loaded, ported, target):
  """loaded has ported's backbone and target's head."""
  for collection in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, loaded[collection]['backbone'],
                 ported[collection]['backbone'])
    jax.tree.map(np.testing.assert_array_equal, loaded[collection]['head'],
                 target[collection]['head'])


def _run_port(argv, capsys) -> str:
  flags.FLAGS(['port'] + argv)
  try:
    port.main(['port'])
  finally:
    flags.FLAGS.unparse_flags()
  return capsys.readouterr().out



@pytest.fixture
def no_download(monkeypatch):
  """Every download fails as offline; returns the list of URLs asked for."""
  asked = []

  def fail(request, *args, **kwargs):
    asked.append(request.full_url)
    raise urllib.error.URLError('offline test')
  monkeypatch.setattr(urllib.request, 'urlopen', fail)
  return asked


@pytest.fixture
def places(tmp_path, monkeypatch):
  """Empty data dir, torch home and normjax cache: (data file, hub file, ported dir) of V1."""
  monkeypatch.setenv(pipeline.ENV_DATA_DIR, str(tmp_path / 'data'))
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
  data_file = tmp_path / 'data' / 'torchvision' / V1_FILE
  hub_file = tmp_path / 'torch' / 'hub' / 'checkpoints' / V1_FILE
  for f in (data_file, hub_file):
    f.parent.mkdir(parents=True)
  return data_file, hub_file, tmp_path / 'normjax' / 'torchvision_v1'


@pytest.fixture(scope='module')
def real_v1(shared_data_dir):
  """(the real IMAGENET1K_V1 file, its normjax module and variables, read without torch)."""
  path = shared_data_dir / 'torchvision' / V1_FILE
  module, variables = pretrained.load_torchvision_mobilenet_v2(str(path))
  return path, module, variables


def test_load_from_pth_and_from_ported_checkpoint(reference, target, tmp_path, capsys,
                                                  no_download):
  path = reference[1]
  from_pth = pretrained.load_pretrained_backbone(path, target)
  _assert_backbone_is_ported(from_pth, reference[3], target)
  out = tmp_path / 'ported'
  printed = _run_port([f'--torchvision={path}', f'--out={out}'], capsys)
  assert f'Wrote {out} from {path}' in printed
  with pytest.raises(app.UsageError, match='exists; pass --overwrite'):
    _run_port([f'--torchvision={path}', f'--out={out}'], capsys)
  from_checkpoint = pretrained.load_pretrained_backbone(str(out), target)
  _assert_backbone_is_ported(from_checkpoint, reference[3], target)
  assert not no_download


def _cifar_images(tarball: pathlib.Path, per_class: int = 2) -> np.ndarray:
  """The first `per_class` test images of each CIFAR-10 class, (10 * per_class, 32, 32, 3) uint8."""
  images = {}
  with tarfile.open(tarball) as tar:
    for member in tar:
      parts = member.name.split('/')
      if len(parts) == 3 and parts[0] == 'test' and int(parts[2][:-4]) < per_class:
        images[member.name] = np.asarray(Image.open(tar.extractfile(member)).convert('RGB'))
      if len(images) == 10 * per_class:
        break
  assert len(images) == 10 * per_class
  return np.stack([images[k] for k in sorted(images)])


def test_real_imagenet_weights_read_without_torch_match_torch_on_real_images(real_v1,
                                                                             shared_data_dir):
  path, module, variables = real_v1
  images = _cifar_images(shared_data_dir / 'cifar10-jpeg.tar.gz')
  x = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BILINEAR))
                for im in images])
  x = ((x.astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)  # NHWC
  model = TorchMobileNetV2()
  model.load_state_dict(torch.load(path, weights_only=True))
  with torch.no_grad():
    ref = model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  logits = np.asarray(jax.jit(functools.partial(module.apply, train=False))(variables, x))
  assert logits.shape == ref.shape == (20, 1000)
  assert np.abs(ref).max() > 5.0  # ImageNet logits, not an all-zero net
  assert np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max()
  np.testing.assert_array_equal(logits.argmax(1), ref.argmax(1))


def test_real_file_loads_and_ports_with_torch_hidden(shared_data_dir):
  path = shared_data_dir / 'torchvision' / V1_FILE
  code = '''if True:
    import hashlib, sys
    sys.modules['torch'] = None  # any `import torch` now raises ImportError
    from normjax import port, pretrained  # port: the CLI's imports too
    state_dict = pretrained.read_state_dict(sys.argv[1])
    module, variables = pretrained.load_torchvision_mobilenet_v2(sys.argv[1])
    print(hashlib.sha256(b''.join(v.tobytes() for v in state_dict.values())).hexdigest())
    print(variables['params']['head']['out']['kernel'].shape)
  '''
  result = subprocess.run([sys.executable, '-c', code, str(path)], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parents[1], timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  reference = torch.load(path, weights_only=True)
  digest = hashlib.sha256(b''.join(v.numpy().tobytes() for v in reference.values())).hexdigest()
  assert result.stdout.split('\n')[:2] == [digest, '(1280, 1000)']


def test_no_module_in_normjax_imports_torch():
  sources = pathlib.Path(pretrained.__file__).parent.rglob('*.py')
  offenders = [f'{p}:{i}' for p in sources for i, line in enumerate(p.read_text().splitlines(), 1)
               if re.match(r'\s*(import|from)\s+torch\b(?!_)', line)]
  assert not offenders


def test_named_spec_lookup_order(real_v1, target, places, capsys, no_download):
  """ported checkpoint, then $NORMJAX_DATA_DIR/torchvision, then the hub cache, then a download.

  A garbage file under the V1 name fails its hash check, so where a load succeeds or which file
  an error names shows which place was read.
  """
  path, _, ported = real_v1
  data_file, hub_file, ported_dir = places
  load = lambda: pretrained.load_pretrained_backbone('torchvision_v1', target,
                                                     cache_dir=str(ported_dir.parent))
  hub_file.write_bytes(b'garbage')
  data_file.symlink_to(path)
  _assert_backbone_is_ported(load(), ported, target)  # data dir before hub
  data_file.unlink()
  with pytest.raises(WeightsError, match=f'{hub_file}: sha256 .* does not start with b0353104'):
    load()  # the hub file is read next (a corrupt file is an error, not skipped)
  shutil.copy(path, hub_file)
  _assert_backbone_is_ported(load(), ported, target)
  _run_port(['--torchvision=torchvision_v1', f'--out={ported_dir}'], capsys)  # reads the hub file
  hub_file.write_bytes(b'garbage')
  data_file.write_bytes(b'garbage')
  _assert_backbone_is_ported(load(), ported, target)  # ported dir first
  assert not no_download


def test_offline_named_spec_lists_every_place_and_what_to_do(target, places, no_download):
  data_file, hub_file, ported_dir = places
  with pytest.raises(WeightsError) as e:
    pretrained.load_pretrained_backbone('torchvision_v1', target, cache_dir=str(ported_dir.parent))
  msg = str(e.value)
  assert no_download == [V1_URL]
  assert (f'Looked, in order, at:\n'
          f'  1. ported checkpoint {ported_dir}: no such directory\n'
          f'  2. $NORMJAX_DATA_DIR/torchvision: {data_file}: no such file\n'
          f'  3. torch hub cache: {hub_file}: no such file\n'
          f'  4. download of {V1_URL} failed: offline test\n') in msg
  assert f'put it at {hub_file} (torch hub cache; $TORCH_HOME moves it) or at {data_file}' in msg
  assert f'python -m normjax.port --torchvision=torchvision_v1 --out={ported_dir}' in msg


def test_offline_error_for_v2_without_data_dir(target, tmp_path, monkeypatch, no_download):
  monkeypatch.delenv(pipeline.ENV_DATA_DIR, raising=False)
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
  with pytest.raises(WeightsError) as e:
    pretrained.load_pretrained_backbone('torchvision_v2', target, cache_dir=str(tmp_path / 'nj'))
  msg = str(e.value)
  assert 'https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth' in msg
  assert '$NORMJAX_DATA_DIR/torchvision: $NORMJAX_DATA_DIR is not set' in msg
  assert f'put it at {tmp_path}/torch/hub/checkpoints/mobilenet_v2-7ebf99e0.pth' in msg
  port_cmd = 'python -m normjax.port --torchvision=torchvision_v2'
  assert f'{port_cmd} --out={tmp_path}/nj/torchvision_v2' in msg


@pytest.fixture
def server(tmp_path, monkeypatch):
  """(folder served on 127.0.0.1, its base URL, the paths requested so far)."""
  root = tmp_path / 'served'
  root.mkdir()
  requested = []

  class Handler(http.server.SimpleHTTPRequestHandler):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, directory=str(root), **kwargs)

    def do_GET(self):
      requested.append(self.path)
      super().do_GET()

    def log_message(self, *args):
      pass

  for var in ('http_proxy', 'HTTP_PROXY', 'all_proxy', 'ALL_PROXY'):
    monkeypatch.delenv(var, raising=False)
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield root, f'http://127.0.0.1:{httpd.server_port}', requested
  httpd.shutdown()
  httpd.server_close()
  thread.join()


def _small_state_dict_file(folder: pathlib.Path) -> tuple[bytes, dict]:
  state_dict = {'conv.weight': torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1)),
                'bn.num_batches_tracked': torch.tensor(7)}
  torch.save(state_dict, folder / 'small.pth')
  return (folder / 'small.pth').read_bytes(), state_dict


def test_named_spec_downloads_into_hub_cache_with_hash_check(server, places, monkeypatch):
  root, base, requested = server
  _, hub_file, _ = places
  data, state_dict = _small_state_dict_file(root)
  name = f'small-{hashlib.sha256(data).hexdigest()[:8]}.pth'
  (root / name).write_bytes(data)
  monkeypatch.setitem(pretrained.TORCHVISION_WEIGHTS, 'torchvision_v1', f'{base}/{name}')
  for _ in range(2):  # the second call reads the cached file
    loaded = pretrained.named_state_dict('torchvision_v1')
    assert list(loaded) == list(state_dict)
    for k, v in state_dict.items():
      np.testing.assert_array_equal(loaded[k], v.numpy())
  assert requested == [f'/{name}']
  assert sorted(os.listdir(hub_file.parent)) == [name]  # no temporary file left
  assert (hub_file.parent / name).read_bytes() == data
  pretrained.read_state_dict(f'{base}/{name}')  # a URL spec finds the same cache file
  assert requested == [f'/{name}']


def test_download_with_wrong_hash_leaves_nothing_in_hub_cache(server, places, monkeypatch):
  root, base, requested = server
  _, hub_file, _ = places
  data, _ = _small_state_dict_file(root)
  (root / 'small-deadbeef.pth').write_bytes(data)
  monkeypatch.setitem(pretrained.TORCHVISION_WEIGHTS, 'torchvision_v1',
                      f'{base}/small-deadbeef.pth')
  with pytest.raises(WeightsError) as e:
    pretrained.named_state_dict('torchvision_v1')
  assert (f'download of {base}/small-deadbeef.pth: sha256 {hashlib.sha256(data).hexdigest()} '
          f'does not start with deadbeef') in str(e.value)
  assert requested == ['/small-deadbeef.pth']
  assert os.listdir(hub_file.parent) == []
  with pytest.raises(WeightsError, match='does not start with deadbeef'):
    pretrained.read_state_dict(f'{base}/small-deadbeef.pth')
  assert os.listdir(hub_file.parent) == []


def test_state_dict_of_another_network_lists_missing_and_unexpected_keys(target, tmp_path):
  path = tmp_path / 'small_net.pth'
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                            torch.nn.Linear(8, 10))
  torch.save(net.state_dict(), path)
  with pytest.raises(WeightsError) as e:
    pretrained.load_pretrained_backbone(str(path), target)
  msg = str(e.value)
  assert 'state_dict does not match normjax MobileNetV2' in msg
  assert 'missing keys (262):\n  classifier.1.bias\n' in msg
  assert ('unexpected keys (8):\n  0.bias\n  0.weight\n  1.bias\n  1.running_mean\n'
          '  1.running_var\n  1.weight\n  3.bias\n  3.weight') in msg


def test_width_mismatch_is_a_clear_error(reference):
  model = mobilenet_v2(10, width_mult=0.5)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(WeightsError) as e:
    pretrained.load_pretrained_backbone(reference[1], variables)
  msg = str(e.value)
  assert 'need width_mult=1.0' in msg
  assert 'params/backbone/features_0/0/kernel: pretrained (3, 3, 3, 32), model (3, 3, 3, 16)' in msg


def test_model_without_batch_norm_is_a_clear_error(reference):
  model = mobilenet_v2(10, norm=functools.partial(make_norm, 'none'))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(WeightsError, match='model has no batch_stats: use the bn backbone norm'):
    pretrained.load_pretrained_backbone(reference[1], variables)


def test_unknown_spec_is_a_clear_error(target, tmp_path):
  with pytest.raises(WeightsError, match='neither one of .*torchvision_v1'):
    pretrained.load_pretrained_backbone(str(tmp_path / 'missing'), target)


def test_corrupt_spec_file_is_a_weights_error(target, tmp_path):
  path = tmp_path / 'mobilenet_v2.pth'
  path.write_bytes(b'PK\x03\x04 cut')
  with pytest.raises(WeightsError, match='truncated or corrupt zip archive'):
    pretrained.load_pretrained_backbone(str(path), target)
