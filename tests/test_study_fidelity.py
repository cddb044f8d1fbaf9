"""The study's PyTorch semantics: frozen-BN mode, torch head init, FRN on the dense head, a real step.

References are independent: a torch MobileNetV2 (tests/torch_reference.py), torch's nn.Linear,
and the FRN paper's equations written out per element.
"""
import functools
import sys
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from normjax import parallel, pretrained, steps
from normjax.models import heads, norms
from normjax.models.classifier import Classifier
from normjax.models.mobilenet_v2 import MobileNetV2Features

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from torch_reference import MobileNetV2 as TorchMobileNetV2  # noqa: E402
from torch_reference import randomize_  # noqa: E402


def _normjax_net(frozen_bn: str) -> Classifier:
  return Classifier(
      backbone=MobileNetV2Features(norm=functools.partial(norms.make_norm, 'bn'), width_mult=0.5,
                                   trainable_blocks=1, frozen_bn=frozen_bn),
      head=heads.LinearHead(10, dropout=0.0))


def _torch_train_mode_steps(reference: TorchMobileNetV2, x: np.ndarray, y: np.ndarray, lr: float):
  """torch's model.train() with requires_grad=False outside features.18 + classifier: 2 SGD steps."""
  for name, p in reference.named_parameters():
    p.requires_grad = name.startswith(('features.18.', 'classifier.'))
  reference.classifier[0].p = 0.0
  reference.train()
  opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=lr)
  logits = []
  for _ in range(2):
    opt.zero_grad()
    out = reference(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    torch.nn.functional.cross_entropy(out, torch.from_numpy(y)).backward()
    opt.step()
    logits.append(out.detach().numpy())
  return logits, reference.state_dict()


def _normjax_steps(frozen_bn: str, variables, x, y, lr: float):
  model = _normjax_net(frozen_bn)
  trainable = lambda path: path[0].key == 'head' or path[1].key == 'features_18'

  @jax.jit
  def step(variables):
    def loss_fn(params):
      out, updated = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), (out, updated)
    grads, (out, updated) = jax.grad(loss_fn, has_aux=True)(variables['params'])
    params = jax.tree_util.tree_map_with_path(
        lambda path, p, g: p - lr * g if trainable(path) else p, variables['params'], grads)
    return {'params': params, 'batch_stats': updated['batch_stats']}, out

  logits = []
  for _ in range(2):
    variables, out = step(variables)
    logits.append(np.asarray(out))
  return logits, variables


@pytest.fixture(scope='module')
def reference_and_batch():
  torch.manual_seed(0)
  reference = randomize_(TorchMobileNetV2(num_classes=10, width_mult=0.5), seed=3, image_size=32)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, size=8).astype(np.int64)
  return reference, x, y


def test_frozen_bn_train_matches_torch_train_mode_with_frozen_params(reference_and_batch):
  reference, x, y = reference_and_batch
  initial = {k: v.clone() for k, v in reference.state_dict().items()}
  variables = pretrained.port_state_dict(initial, _normjax_net('train'))
  torch_logits, torch_state = _torch_train_mode_steps(reference, x, y, lr=0.05)
  logits, after = _normjax_steps('train', variables, x, y.astype(np.int32), lr=0.05)
  for got, want in zip(logits, torch_logits):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())
  ported_after = pretrained.port_state_dict(torch_state, _normjax_net('train'))
  for name in ('features_1', 'features_9', 'features_17', 'features_18'):
    for stat in ('mean', 'var'):
      got = jax.tree.leaves(after['batch_stats']['backbone'][name])
      want = jax.tree.leaves(ported_after['batch_stats']['backbone'][name])
      for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  # The frozen blocks' running statistics moved (momentum 0.1), but their weights did not.
  before = variables['batch_stats']['backbone']['features_1']['conv_0']['1']['mean']
  assert np.abs(after['batch_stats']['backbone']['features_1']['conv_0']['1']['mean'] - before).max() > 1e-3
  np.testing.assert_array_equal(after['params']['backbone']['features_1']['conv_0']['0']['kernel'],
                                variables['params']['backbone']['features_1']['conv_0']['0']['kernel'])


def test_frozen_bn_eval_keeps_imagenet_statistics_and_differs_from_train_mode(reference_and_batch):
  reference, x, y = reference_and_batch
  variables = pretrained.port_state_dict(reference.state_dict(), _normjax_net('eval'))
  eval_logits, after = _normjax_steps('eval', variables, x, y.astype(np.int32), lr=0.05)
  train_logits, _ = _normjax_steps('train', variables, x, y.astype(np.int32), lr=0.05)
  for name in ('features_0', 'features_9', 'features_17'):
    for got, want in zip(jax.tree.leaves(after['batch_stats']['backbone'][name]),
                         jax.tree.leaves(variables['batch_stats']['backbone'][name])):
      np.testing.assert_array_equal(got, want)
  assert np.abs(eval_logits[0] - train_logits[0]).max() > 1e-2


@pytest.mark.parametrize('fan_in, fan_out', [(1280, 256), (256, 10)])
def test_torch_head_init_has_nn_linear_statistics(fan_in, fan_out):
  layer = heads.dense(fan_out, fan_in, 'torch', jnp.float32, 'fc')
  kernels, biases = [], []
  for seed in range(4 if fan_in > 1000 else 40):
    p = layer.init(jax.random.key(seed), jnp.zeros((1, fan_in)))['params']
    kernels.append(np.asarray(p['kernel']).ravel())
    biases.append(np.asarray(p['bias']).ravel())
  kernel, bias = np.concatenate(kernels), np.concatenate(biases)
  torch_layer = torch.nn.Linear(fan_in, fan_out)  # the independent reference
  torch_w = torch_layer.weight.detach().numpy().ravel()
  bound = 1 / np.sqrt(fan_in)  # the formula: kaiming_uniform(a=sqrt(5)) and U(+-1/sqrt(fan_in))
  for values in (kernel, bias, torch_w):
    assert np.abs(values).max() <= bound
    assert np.abs(values).max() > 0.95 * bound
  for values in (kernel, bias):
    # U(-b, b): mean 0, variance b^2 / 3; 6 standard errors of slack.
    assert abs(values.mean()) < 6 * bound / np.sqrt(3 * values.size)
    assert abs(values.var() / (bound ** 2 / 3) - 1) < 6 * np.sqrt(0.8 / values.size)
  assert abs(kernel.std() / torch_w.std() - 1) < 0.05
  flax_init = heads.dense(fan_out, fan_in, 'flax', jnp.float32, 'fc').init(
      jax.random.key(0), jnp.zeros((1, fan_in)))['params']
  assert np.abs(flax_init['bias']).max() == 0  # flax: zero bias, unlike torch


def _frn_paper(x: np.ndarray, gamma, beta, tau, eps: float, dense: str) -> np.ndarray:
  """Singh & Krishnan 2020, Eq. 1-3, one output at a time.

  nu2 = (1/N) sum_i x_i^2 over the N spatial positions of one channel of one example;
  x_hat = x / sqrt(nu2 + eps); y = gamma x_hat + beta; z = max(y, tau). A dense layer has
  N = 1 ('unit'); the study instead averaged over the example's features ('features').
  """
  x = x.astype(np.float64)
  out = np.empty_like(x)
  if x.ndim == 4:
    b_, h_, w_, c_ = x.shape
    for b in range(b_):
      for c in range(c_):
        nu2 = sum(x[b, i, j, c] ** 2 for i in range(h_) for j in range(w_)) / (h_ * w_)
        for i in range(h_):
          for j in range(w_):
            out[b, i, j, c] = max(gamma[c] * x[b, i, j, c] / np.sqrt(nu2 + eps) + beta[c], tau[c])
    return out
  b_, c_ = x.shape
  for b in range(b_):
    mean_sq = sum(x[b, k] ** 2 for k in range(c_)) / c_
    for c in range(c_):
      nu2 = x[b, c] ** 2 if dense == 'unit' else mean_sq
      out[b, c] = max(gamma[c] * x[b, c] / np.sqrt(nu2 + eps) + beta[c], tau[c])
  return out


@pytest.mark.parametrize('shape, dense, learned', [
    ((2, 3, 4, 5), 'features', False), ((2, 3, 4, 5), 'features', True),
    ((3, 16), 'features', False), ((3, 16), 'features', True), ((3, 16), 'unit', True)])
def test_frn_matches_the_paper_equations(shape, dense, learned):
  rng = np.random.default_rng(1)
  x = (rng.normal(size=shape) * 0.1).astype(np.float32)
  module = norms.make_norm('frn', train=True, frn_learned_eps=learned, frn_dense=dense)(name='n')
  variables = module.init(jax.random.key(0), x)
  c = shape[-1]
  params = {'scale': rng.uniform(0.5, 1.5, c).astype(np.float32),
            'bias': rng.normal(size=c).astype(np.float32) * 0.3,
            'tau': rng.normal(size=c).astype(np.float32) * 0.3}
  eps = 1e-6
  if 'eps' in variables['params']:
    params['eps'] = np.float32(-3e-3)  # eps = 1e-6 + |eps_l|
    eps += 3e-3
  got = module.apply({'params': params}, x)
  want = _frn_paper(x, params['scale'], params['bias'], params['tau'], eps, dense)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The paper prescribes the learned eps for N = 1: 'unit' always has it.
  assert ('eps' in variables['params']) == (learned or dense == 'unit')


@pytest.mark.parametrize('config_file', ['configs/ln_noclip.py', 'configs/frn_noclip.py'])
def test_a_study_config_trains_through_train_step(config_file):
  """The study's model (MobileNetV2 + MLP head, LN/FRN) and Adam, at 32 px: loss falls, only
  features_18 and the head move, and the frozen blocks' BN statistics stay put."""
  from normjax import config_schema
  config = config_schema.load_config(config_file)
  config.model.pretrained = 'none'
  config.train.monitor_every_steps = 0
  config.train.feature_cache = ''  # images in: the whole online step (the cached one: test_features.py)
  mesh = parallel.make_mesh()
  programs = steps.build_programs(config, 10, (32, 32, 3), (0.5,) * 3, (0.25,) * 3, 10, mesh)
  state = programs.init(jax.random.key(0))
  before = jax.device_get(state)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(64, 32, 32, 3)).astype(np.uint8)
  labels = (images[..., 0].mean(axis=(1, 2)) > 127).astype(np.int32)  # learnable from the pixels
  losses = []
  for _ in range(6):
    state = programs.train_step(state, images, labels, jax.random.key(1))
    losses.append(float(state.metrics.compute()['loss']))
    state = programs.reset_window(state)
  assert losses[-1] < losses[0]
  after = jax.device_get(state)
  moved = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 0
  for name, block in before.params['backbone'].items():
    assert any(jax.tree.leaves(jax.tree.map(moved, block, after.params['backbone'][name]))) == (name == 'features_18'), name
  head_moved = jax.tree.map(moved, before.params['head'], after.params['head'])
  # FRN's tau starts at 0 and the head's ReLU follows the TLU: where max(y, tau) = tau = 0,
  # ReLU's gradient at 0 is 0 (in torch too), so tau cannot move from its init.
  assert head_moved['norm'].pop('tau', False) is False
  assert all(jax.tree.leaves(head_moved))
  for name in ('features_0', 'features_10', 'features_17'):
    assert not any(jax.tree.leaves(jax.tree.map(moved, before.batch_stats['backbone'][name],
                                                after.batch_stats['backbone'][name])))
  assert moved(before.batch_stats['backbone']['features_18']['1']['mean'],
               after.batch_stats['backbone']['features_18']['1']['mean'])
