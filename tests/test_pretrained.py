"""Porting torchvision MobileNetV2 weights: exact logits and features, clear errors, loaders."""
import functools
import os
import shutil
import urllib.error

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl import app
from absl import flags

from normjax import port
from normjax import pretrained
from normjax.models.mobilenet_v2 import MobileNetV2Features, mobilenet_v2
from normjax.models.classifier import Classifier
from normjax.models.heads import MLPHead
from normjax.models.norms import make_norm
from torch_reference import MobileNetV2 as TorchMobileNetV2
from torch_reference import randomize_

V1_FILE = 'mobilenet_v2-b0353104.pth'  # torchvision IMAGENET1K_V1 file name


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
  with pytest.raises(ValueError) as e:
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


def _assert_backbone_is_ported(loaded, reference, target):
  ported = reference[3]
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
  def fail(url, *args, **kwargs):
    raise urllib.error.URLError(f'offline test: no download of {url}')
  monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', fail)


def test_load_from_pth_and_from_ported_checkpoint(reference, target, tmp_path, capsys,
                                                  no_download):
  path = reference[1]
  from_pth = pretrained.load_pretrained_backbone(path, target)
  _assert_backbone_is_ported(from_pth, reference, target)
  out = tmp_path / 'ported'
  printed = _run_port([f'--torchvision={path}', f'--out={out}'], capsys)
  assert f'Wrote {out} from {path}' in printed
  with pytest.raises(app.UsageError, match='exists; pass --overwrite'):
    _run_port([f'--torchvision={path}', f'--out={out}'], capsys)
  from_checkpoint = pretrained.load_pretrained_backbone(str(out), target)
  _assert_backbone_is_ported(from_checkpoint, reference, target)


def test_named_spec_prefers_ported_checkpoint_then_hub_file(reference, target, tmp_path, capsys,
                                                           monkeypatch, no_download):
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
  cache = tmp_path / 'normjax'
  hub_file = tmp_path / 'torch' / 'hub' / 'checkpoints' / V1_FILE
  hub_file.parent.mkdir(parents=True)
  shutil.copy(reference[1], hub_file)
  # No ported checkpoint yet: the hub file is read.
  _assert_backbone_is_ported(
      pretrained.load_pretrained_backbone('torchvision_v1', target, cache_dir=str(cache)),
      reference, target)
  # The CLI ports the hub file by name; then the checkpoint is used even without the hub file.
  _run_port(['--torchvision=torchvision_v1', f'--out={cache / "torchvision_v1"}'], capsys)
  os.remove(hub_file)
  _assert_backbone_is_ported(
      pretrained.load_pretrained_backbone('torchvision_v1', target, cache_dir=str(cache)),
      reference, target)


def test_offline_named_spec_says_what_to_download_and_where(target, tmp_path, monkeypatch,
                                                            no_download):
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
  with pytest.raises(FileNotFoundError) as e:
    pretrained.load_pretrained_backbone('torchvision_v2', target, cache_dir=str(tmp_path / 'nj'))
  msg = str(e.value)
  assert 'https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth' in msg
  assert f'put it at {tmp_path}/torch/hub/checkpoints/mobilenet_v2-7ebf99e0.pth' in msg
  port_cmd = 'python -m normjax.port --torchvision=torchvision_v2'
  assert f'{port_cmd} --out={tmp_path}/nj/torchvision_v2' in msg


def test_width_mismatch_is_a_clear_error(reference):
  model = mobilenet_v2(10, width_mult=0.5)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError) as e:
    pretrained.load_pretrained_backbone(reference[1], variables)
  msg = str(e.value)
  assert 'need width_mult=1.0' in msg
  assert 'params/backbone/features_0/0/kernel: pretrained (3, 3, 3, 32), model (3, 3, 3, 16)' in msg


def test_model_without_batch_norm_is_a_clear_error(reference):
  model = mobilenet_v2(10, norm=functools.partial(make_norm, 'none'))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='model has no batch_stats: use the bn backbone norm'):
    pretrained.load_pretrained_backbone(reference[1], variables)


def test_unknown_spec_is_a_clear_error(target, tmp_path):
  with pytest.raises(FileNotFoundError, match='neither one of .*torchvision_v1'):
    pretrained.load_pretrained_backbone(str(tmp_path / 'missing'), target)
