"""MobileNetV2Features: torchvision layout at all widths, residuals, CIFAR stem, freezing, dtype."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest
import torch
from flax import traverse_util

from normjax.models.classifier import Classifier
from normjax.models.heads import LinearHead
from normjax.models.mobilenet_v2 import (ConvNormAct, InvertedResidual, MobileNetV2Features, PatchConv,
                                         PointwiseConv, block_specs, conv_init, has_residual, last_channels,
                                         make_divisible, mobilenet_v2)
from normjax.models.norms import make_norm
from normjax.pretrained import torch_key, torch_shape
from torch_reference import MobileNetV2 as TorchMobileNetV2

BN = functools.partial(make_norm, 'bn')


def _init_shapes(module, image_size=32):
  return jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))


@pytest.mark.parametrize('width_mult', [0.35, 0.5, 0.75, 1.0, 1.4])
def test_layout_matches_torchvision_state_dict(width_mult):
  # Same keys and shapes as torchvision's state_dict proves channel rounding and layout.
  variables = traverse_util.flatten_dict(_init_shapes(mobilenet_v2(10, width_mult)))
  ours = {torch_key(k[0], k[1:]): torch_shape(v.shape) for k, v in variables.items()}
  ref = {k: tuple(v.shape)
         for k, v in TorchMobileNetV2(10, width_mult).state_dict().items()
         if not k.endswith('num_batches_tracked')}
  assert ours == ref


@pytest.mark.parametrize('width_mult,stem,last,stage_out', [
    # torchvision _make_divisible(c * width_mult, 8) of (32, 1280, 16, 24, 32, 64, 96, 160, 320).
    (0.5, 16, 1280, (8, 16, 16, 32, 48, 80, 160)),
    (0.75, 24, 1280, (16, 24, 24, 48, 72, 120, 240)),
    (1.4, 48, 1792, (24, 32, 48, 88, 136, 224, 448)),
])
def test_width_rounding(width_mult, stem, last, stage_out):
  specs = block_specs(width_mult)
  assert make_divisible(32 * width_mult) == stem
  assert last_channels(width_mult) == last
  stage_starts = (0, 1, 3, 6, 10, 13, 16)  # cumulative n of torchvision's (t, c, n, s) settings
  assert tuple(specs[i].out_channels for i in stage_starts) == stage_out


def test_residual_blocks_match_torchvision():
  torch_blocks = TorchMobileNetV2().features[1:18]
  specs = block_specs()
  assert [has_residual(s) for s in specs] == [b.use_res_connect for b in torch_blocks]
  assert [s.index for s in specs if has_residual(s)] == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]


@pytest.mark.parametrize('index,residual', [(3, True), (2, False), (1, False)])
def test_residual_adds_block_input(index, residual):
  # With the last BN's scale and bias zeroed the branch outputs 0, so a block returns
  # its input iff it has the skip connection.
  spec = block_specs()[index - 1]
  block = InvertedResidual(spec, BN(train=False))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, spec.in_channels))
  variables = block.init(jax.random.key(1), x)
  last_bn = f'conv_{3 if spec.expand_ratio != 1 else 2}'
  params = traverse_util.flatten_dict(variables['params'])
  params = {k: jnp.zeros_like(v) if k[0] == last_bn else v for k, v in params.items()}
  y = block.apply({**variables, 'params': traverse_util.unflatten_dict(params)}, x)
  assert y.shape[-1] == spec.out_channels
  np.testing.assert_array_equal(y, x if residual else jnp.zeros_like(y))


def test_pointwise_conv_equals_flax_1x1_conv():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  ours = PointwiseConv(12)
  ref = nn.Conv(12, (1, 1), use_bias=False, kernel_init=conv_init)
  params = ours.init(jax.random.key(1), x)
  np.testing.assert_array_equal(params['params']['kernel'],
                                ref.init(jax.random.key(1), x)['params']['kernel'])
  assert params['params']['kernel'].shape == (1, 1, 8, 12)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('shape,k,stride,padding', [((2, 9, 9, 3), 3, 2, 1), ((2, 8, 7, 3), 3, 1, 1),
                                                     ((1, 10, 11, 4), 5, 2, 2), ((2, 9, 9, 3), 3, 2, 0)])
def test_patch_conv_equals_torch_conv_forward_and_gradients(shape, k, stride, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  ours = PatchConv(6, k, stride, padding)
  params = ours.init(jax.random.key(1), x)
  assert params['params']['kernel'].shape == (k, k, shape[-1], 6)
  y, pullback = jax.vjp(lambda x, p: ours.apply(p, x), x, params)
  cotangent = np.asarray(jax.random.normal(jax.random.key(2), y.shape))
  dx, dparams = pullback(cotangent)
  xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
  wt = torch.tensor(np.asarray(params['params']['kernel']).transpose(3, 2, 0, 1), requires_grad=True)
  yt = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=padding)
  yt.backward(torch.tensor(cotangent.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dparams['params']['kernel'], wt.grad.numpy().transpose(2, 3, 1, 0),
                             rtol=1e-5, atol=1e-4)


def test_stem_conv_is_the_patch_gemm_on_cpu_with_flax_convs_params():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  ref = nn.Conv(8, (3, 3), 2, padding=((1, 1), (1, 1)), use_bias=False, kernel_init=conv_init)
  np.testing.assert_array_equal(PatchConv(8, 3, 2, 1).init(jax.random.key(1), x)['params']['kernel'],
                                ref.init(jax.random.key(1), x)['params']['kernel'])
  stem = ConvNormAct(8, 3, BN(train=False), strides=2)
  variables = stem.init(jax.random.key(1), x)
  jaxpr = str(jax.make_jaxpr(lambda x: stem.apply(variables, x))(x))
  assert ('conv_general_dilated' in jaxpr) == (jax.default_backend() != 'cpu')


@pytest.mark.parametrize('cifar_stem,hw', [(True, 4), (False, 1)])
def test_cifar_stem_output_size(cifar_stem, hw):
  backbone = MobileNetV2Features(norm=BN, width_mult=0.35, cifar_stem=cifar_stem)
  out = jax.eval_shape(lambda: backbone.init_with_output(
      jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)[0])
  assert out.shape == (2, hw, hw, 1280)


@pytest.fixture(scope='module')
def small():
  """(x, variables) of mobilenet_v2(10, width_mult=0.35) on 32x32 images.

  Variables are drawn with numpy on init's shapes (compiling init's random number
  generation takes longer than these tests): He-normal kernels, BN scale 1 and
  bias 0, running mean 0 and variance 1, random head bias.
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 32, 32, 3), dtype=np.float32))
  shapes = jax.eval_shape(functools.partial(mobilenet_v2(10, width_mult=0.35).init, train=False),
                          jax.random.key(1), x)

  def draw(path, s):
    name = path[-1].key
    if name == 'kernel':
      return rng.standard_normal(s.shape, dtype=np.float32) * np.sqrt(2 / np.prod(s.shape[:-1]))
    if name in ('scale', 'var'):
      return np.ones(s.shape, np.float32)
    if name == 'bias' and path[1].key == 'head':
      return rng.standard_normal(s.shape, dtype=np.float32)
    return np.zeros(s.shape, np.float32)

  return x, jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(draw(p, s)), shapes)


def _train_step_effects(trainable_blocks, x, variables):
  """(grads, old batch_stats, new batch_stats) of one train-mode step of the small network."""
  model = Classifier(backbone=MobileNetV2Features(norm=BN, width_mult=0.35,
                                                  trainable_blocks=trainable_blocks),
                     head=LinearHead(10))
  labels = jnp.arange(x.shape[0])

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                                  train=True, mutable=['batch_stats'],
                                  rngs={'dropout': jax.random.key(2)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

  grads, updates = jax.jit(jax.grad(loss_fn, has_aux=True))(variables['params'])
  return grads, variables['batch_stats'], updates['batch_stats']


def _per_block(tree, fn):
  """{block index: fn(leaves of features_<index>)} for the backbone subtree."""
  return {int(name.split('_')[1]): fn(jax.tree.leaves(sub))
          for name, sub in tree['backbone'].items()}


@pytest.mark.parametrize('trainable_blocks', [3, 0, -1])
def test_trainable_blocks_freezes_gradients_and_batch_stats(trainable_blocks, small):
  grads, old_stats, new_stats = _train_step_effects(trainable_blocks, *small)
  first = {3: 16, 0: 19, -1: 0}[trainable_blocks]
  zero_grad = _per_block(grads, lambda leaves: all(not np.any(g) for g in leaves))
  any_zero_leaf = _per_block(grads, lambda leaves: any(not np.any(g) for g in leaves))
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), old_stats, new_stats)
  stats_frozen = _per_block(changed, lambda leaves: not any(leaves))
  stats_all_updated = _per_block(changed, all)
  for i in range(19):
    if i < first:
      assert zero_grad[i] and stats_frozen[i], f'features_{i} should be frozen'
    else:
      assert not any_zero_leaf[i] and stats_all_updated[i], f'features_{i} should train'
  assert all(np.any(g) for g in jax.tree.leaves(grads['head']))


def test_trainable_blocks_out_of_range():
  backbone = MobileNetV2Features(norm=BN, width_mult=0.35, trainable_blocks=20)
  with pytest.raises(ValueError, match='trainable_blocks must be -1 .* got 20'):
    backbone.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def test_classifier_pools_backbone_features_into_head(small):
  x, variables = small
  model = mobilenet_v2(10, width_mult=0.35)
  logits, state = jax.jit(functools.partial(model.apply, train=False, capture_intermediates=True))(
      variables, x)
  features = state['intermediates']['backbone']['__call__'][0]
  head = variables['params']['head']['out']
  np.testing.assert_allclose(logits, features.mean((1, 2)) @ head['kernel'] + head['bias'],
                             rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits(small):
  x, variables = small
  model32 = mobilenet_v2(10, width_mult=0.35)
  model16 = mobilenet_v2(10, width_mult=0.35, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(functools.partial(model16.init, train=False), jax.random.key(1), x)
  assert {a.dtype for a in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  logits16, state = jax.jit(functools.partial(model16.apply, train=False,
                                              capture_intermediates=True))(variables, x)
  logits32 = jax.jit(functools.partial(model32.apply, train=False))(variables, x)
  assert logits16.dtype == jnp.float32
  assert state['intermediates']['backbone']['__call__'][0].dtype == jnp.bfloat16
  np.testing.assert_allclose(logits16, logits32, atol=0.05 * float(jnp.abs(logits32).max()))
