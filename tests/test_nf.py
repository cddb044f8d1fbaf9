"""normjax.models.nf: Scaled WS conv, activation gammas, beta bookkeeping, NF-MobileNetV2."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax import lax

from normjax import config_schema, errors, optim
from normjax.models import nf
from normjax.models.factory import create_model
from normjax.models.classifier import Classifier
from normjax.models.heads import LinearHead
from normjax.models.mobilenet_v2 import BlockSpec, block_specs

WIDTH = 0.5  # small net for speed; last_channels(0.5) is still 1280 (torchvision)
# Whole-network programs here run once or twice: skipping LLVM optimization halves their compile.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
standardize = jax.jit(nf.standardize_weight)


def normal(seed, shape, scale=1.0, loc=0.0):
  """NumPy test inputs: jax.random would compile one sampler per shape."""
  return (loc + scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def uniform(seed, shape, low, high):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def np_standardize(kernel, gain, eps=1e-4):
  """NumPy float64 Scaled WS: (w - mean) * gain / sqrt(max(fan_in * var, eps)) over HWI."""
  k = np.asarray(kernel, np.float64)
  axes = tuple(range(k.ndim - 1))
  mean, var = k.mean(axes, keepdims=True), k.var(axes, keepdims=True)
  fan_in = np.prod(k.shape[:-1])
  return (k - mean) / np.sqrt(np.maximum(var * fan_in, eps)) * np.asarray(gain, np.float64)


@pytest.mark.parametrize('shape', [(3, 3, 4, 8), (1, 1, 16, 24), (3, 3, 1, 12)])
def test_standardized_kernel_zero_mean_unit_fan_in_variance(shape):
  kernel = normal(0, shape, scale=3.0, loc=1.0)
  w = np.asarray(standardize(kernel, np.ones(shape[-1], np.float32)), np.float64)
  axes = (0, 1, 2)
  fan_in = shape[0] * shape[1] * shape[2]  # depthwise (k, k, 1, C): fan_in = k * k = 9
  np.testing.assert_allclose(w.mean(axes), 0.0, atol=1e-6)
  np.testing.assert_allclose(w.var(axes) * fan_in, 1.0, rtol=1e-5)
  gain = uniform(1, (shape[-1],), 0.5, 2.0)
  np.testing.assert_allclose(standardize(kernel, gain), np_standardize(kernel, gain),
                             rtol=1e-5, atol=1e-6)


def test_standardize_floor_engages_for_constant_and_tiny_variance_kernels():
  gain = np.full((8,), 2.0, np.float32)
  const = np.full((3, 3, 4, 8), 0.5, np.float32)
  w = standardize(const, gain)
  assert np.isfinite(np.asarray(w)).all()
  np.testing.assert_allclose(w, 0.0, atol=1e-6)  # (w - mean) = 0; no 0/0 NaN
  grad = jax.jit(jax.grad(lambda k: jnp.sum(nf.standardize_weight(k, gain) ** 2)))(const)
  assert np.isfinite(np.asarray(grad)).all()
  # fan_in * var = 36 * 1e-8 < eps: the scale is rsqrt(eps) = 100, not rsqrt(fan_in * var).
  tiny = normal(0, const.shape, scale=1e-4)
  mean = np.mean(tiny, axis=(0, 1, 2), keepdims=True)
  np.testing.assert_allclose(standardize(tiny, gain), (tiny - mean) * 100.0 * gain,
                             rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize('in_ch,features,kernel_size,strides,groups', [
    (4, 8, 3, 2, 1),     # dense 3x3 stride 2 (stem-like)
    (6, 10, 1, 1, 1),    # pointwise expand / project: the matmul path
    (12, 12, 3, 2, 12),  # depthwise (kernel (3, 3, 1, 12)): the depthwise_conv2d path
    (8, 4, 3, 1, 2),     # grouped: the lax path
])
def test_wsconv_matches_lax_conv_with_standardized_kernel(in_ch, features, kernel_size, strides,
                                                          groups):
  x = normal(0, (2, 9, 9, in_ch))
  conv = nf.WSConv(features, kernel_size, strides, feature_group_count=groups)
  params = jax.jit(conv.init)(jax.random.key(1), x)['params']
  assert set(params) == {'kernel', 'gain', 'bias'}
  assert params['kernel'].shape == (kernel_size, kernel_size, in_ch // groups, features)
  np.testing.assert_array_equal(params['gain'], 1.0)
  params = dict(params,
                gain=uniform(2, (features,), 0.5, 2.0), bias=normal(3, (features,)))
  y = jax.jit(conv.apply)({'params': params}, x)
  pad = (kernel_size - 1) // 2  # torch-style symmetric padding
  ref = lax.conv_general_dilated(
      x, np_standardize(params['kernel'], params['gain']).astype(np.float32),
      (strides, strides), ((pad, pad), (pad, pad)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups, precision=lax.Precision.HIGHEST) + np.asarray(params['bias'])
  out = (9 + 2 * pad - kernel_size) // strides + 1
  assert y.shape == ref.shape == (2, out, out, features)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_wsconv_without_bias_and_bad_groups():
  x = jnp.ones((1, 4, 4, 6))
  params = nf.WSConv(4, 1, use_bias=False).init(jax.random.key(0), x)['params']
  assert set(params) == {'kernel', 'gain'}
  with pytest.raises(ValueError, match='feature_group_count=4 must divide input channels 6'):
    nf.WSConv(8, 3, feature_group_count=4).init(jax.random.key(0), x)


def test_relu6_gamma_reproduced_by_sampling():
  # deepmind-research nfnets/base.py nonlinearities['relu6'] = relu6(x) * 1.7131484746932983
  assert nf.ACTIVATION_GAMMAS['relu6'] == 1.7131484746932983
  assert abs(nf.estimate_gamma(jax.nn.relu6, num_samples=2**20, seed=0) - 1.7131484746932983) < 1e-2
  # relu in closed form: Var[relu(z)] = 1/2 - 1/(2 pi).
  assert abs(nf.ACTIVATION_GAMMAS['relu'] - (0.5 - 0.5 / math.pi) ** -0.5) < 1e-2
  z = normal(1, (2**20,))
  assert abs(float(jnp.var(nf.scaled_activation('relu6')(z))) - 1.0) < 1e-2
  with pytest.raises(ValueError, match="unknown name 'swish'"):
    nf.scaled_activation('swish')


def test_expected_variance_bookkeeping_matches_hand_computation():
  a2 = 0.2**2
  # features_1..17 of MobileNetV2 (torchvision settings); T = transition (no residual, reset to 1).
  by_hand = [
      1.0,           # 1: 32->16 T
      1.0,           # 2: 16->24 s2 T
      1.0,           # 3: 24 residual
      1.0 + a2,      # 4: 24->32 s2 T
      1.0,           # 5: 32 residual
      1.0 + a2,      # 6: 32 residual
      1.0 + 2 * a2,  # 7: 32->64 s2 T
      1.0,           # 8: 64 residual
      1.0 + a2,      # 9
      1.0 + 2 * a2,  # 10
      1.0 + 3 * a2,  # 11: 64->96 T
      1.0,           # 12: 96 residual
      1.0 + a2,      # 13
      1.0 + 2 * a2,  # 14: 96->160 s2 T
      1.0,           # 15: 160 residual
      1.0 + a2,      # 16
      1.0 + 2 * a2,  # 17: 160->320 T
  ]
  for width, cifar_stem in ((1.0, False), (WIDTH, True)):
    np.testing.assert_allclose(nf.expected_input_variances(block_specs(width, cifar_stem), 0.2),
                               by_hand, rtol=1e-12)


def _block_out(block, x, variables=None):
  variables = variables or jax.jit(block.init)(jax.random.key(0), x)
  return jax.jit(block.apply)(variables, x), variables


def test_block_computes_h_plus_alpha_f_of_h_over_beta():
  x = normal(1, (2, 6, 6, 16), scale=1.5)
  residual = BlockSpec(index=5, in_channels=16, out_channels=16, stride=1, expand_ratio=6)
  y, v = _block_out(nf.NFInvertedResidual(residual, beta=1.5, alpha=0.2), x)
  y_f, _ = _block_out(nf.NFInvertedResidual(residual, beta=1.0, alpha=1.0), x / 1.5, v)
  np.testing.assert_allclose(y, x + 0.2 * (y_f - x / 1.5), rtol=1e-5, atol=1e-5)
  # SkipInit gain starts at 0: the residual block is the identity at init.
  y_skip, v_skip = _block_out(nf.NFInvertedResidual(residual, beta=1.5, skip_gain=True), x)
  assert v_skip['params']['skip_gain'].shape == ()
  np.testing.assert_array_equal(y_skip, x)
  # Transition (channel change, stride 2): f(h / beta), no residual; expand_ratio 1 has no expand.
  transition = BlockSpec(index=1, in_channels=16, out_channels=8, stride=2, expand_ratio=1)
  y_t, v_t = _block_out(nf.NFInvertedResidual(transition, beta=1.5), x)
  y_t1, _ = _block_out(nf.NFInvertedResidual(transition, beta=1.0), x / 1.5, v_t)
  assert set(v_t['params']) == {'depthwise', 'project'}
  assert y_t.shape == (2, 3, 3, 8)
  np.testing.assert_allclose(y_t, y_t1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('cifar_stem,spatial', [(True, 4), (False, 1)])
def test_features_shapes_and_no_batch_stats(cifar_stem, spatial):
  model = nf.NFMobileNetV2Features(width_mult=WIDTH, cifar_stem=cifar_stem)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0), x)
  assert set(variables) == {'params'}
  assert sorted(variables['params']) == sorted(f'features_{i}' for i in range(19))
  assert variables['params']['features_0']['conv']['kernel'].shape == (3, 3, 3, 16)
  assert variables['params']['features_18']['conv']['kernel'].shape == (1, 1, 160, 1280)
  y = jax.eval_shape(functools.partial(model.apply, train=True), variables, x)
  assert y.shape == (2, spatial, spatial, 1280)


def test_invalid_trainable_blocks_raises():
  model = nf.NFMobileNetV2Features(width_mult=WIDTH, trainable_blocks=20)
  with pytest.raises(ValueError, match='trainable_blocks must be -1'):
    jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


@pytest.fixture(scope='module')
def backbone_params():
  model = nf.NFMobileNetV2Features(width_mult=WIDTH, cifar_stem=True)
  init = jit(functools.partial(model.init, train=False))
  return init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']


def test_trainable_blocks_freezes_prefix(backbone_params):
  model = nf.NFMobileNetV2Features(width_mult=WIDTH, cifar_stem=True, trainable_blocks=2)
  x = normal(1, (2, 32, 32, 3))
  grads = jit(jax.grad(lambda p: jnp.mean(model.apply({'params': p}, x, train=True) ** 2)))(
      backbone_params)
  for i in range(19):
    norm = float(optax.tree.norm(grads[f'features_{i}']))
    if i < 17:
      assert norm == 0.0, f'features_{i} is frozen but has grad norm {norm}'
    else:
      assert norm > 0.0, f'features_{i} is trainable but has zero grad'


def test_one_train_step_reduces_loss(backbone_params):
  model = Classifier(backbone=nf.NFMobileNetV2Features(width_mult=WIDTH, cifar_stem=True),
                     head=LinearHead(10))
  x = normal(1, (16, 32, 32, 3))
  labels = np.random.default_rng(2).integers(0, 10, 16)
  head = LinearHead(10).init(jax.random.key(3), jnp.zeros((1, 1280)), train=False)['params']
  params = {'backbone': backbone_params, 'head': head}
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  assert set(abstract) == {'params'}
  assert jax.tree.structure(abstract['params']) == jax.tree.structure(params)

  def loss_fn(p, rng):
    logits = model.apply({'params': p}, x, train=True, rngs={'dropout': rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  tx = optax.sgd(0.01)  # 0.1 overshoots: the grad norm at init is ~14

  @jit
  def step(p, opt_state, rng):
    loss, grads = jax.value_and_grad(loss_fn)(p, rng)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  # The second step's loss is the first update's loss on the same batch and dropout mask.
  rng = jax.random.key(4)
  new_params, opt_state, before = step(params, tx.init(params), rng)
  _, _, after = step(new_params, opt_state, rng)
  assert np.isfinite(float(before))
  assert float(after) < float(before) - 0.2, (float(before), float(after))


def test_nf_agc_config_clips_every_layer_but_the_classifier():
  """configs/nf_agc_scratch.py wires unit-wise AGC over the NF net with head/out excluded."""
  config = config_schema.load_config('configs/nf_agc_scratch.py:quick')
  assert config.optim.clip == 'agc' and config.model.name == 'nf_mobilenet_v2'
  model = create_model(config, 10)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))['params']
  mask = traverse_util.flatten_dict(optim.agc_mask(params, config.optim.trainable_blocks), sep='/')
  assert not mask['head/out/kernel'] and not mask['head/out/bias']
  assert all(v for k, v in mask.items() if not k.startswith('head/out/'))
  assert any('depthwise' in k for k in mask)
  # A huge gradient on every leaf: AGC shrinks all of them but the classifier's.
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
  grads = jax.tree.map(lambda p: 1e3 * jnp.ones_like(p), params)
  clipper = optim.make_clipper(config, params)
  clipped, _ = clipper.update(grads, clipper.init(params), params)
  flat = traverse_util.flatten_dict(clipped, sep='/')
  np.testing.assert_array_equal(flat['head/out/kernel'], 1e3)
  assert all(float(jnp.max(jnp.abs(v))) < 1e3 for k, v in flat.items() if not k.startswith('head/out/'))


def test_nf_scratch_classifier_starts_at_zero_as_in_nfnets():
  """model.head_init=zeros (the NF scratch configs' default): zero classifier, so every logit is 0."""
  config = config_schema.load_config('configs/nf_agc_scratch.py:quick')
  assert config.model.head_init == 'zeros'
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  model = create_model(config, 10)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  out = variables['params']['head']['out']
  assert out['kernel'].shape == (1280, 10)
  np.testing.assert_array_equal(out['kernel'], 0.0)
  np.testing.assert_array_equal(out['bias'], 0.0)
  np.testing.assert_array_equal(model.apply(variables, x, train=False), 0.0)
  # The backbone is not zero: the classifier's gradient (features x dlogits) is not either.
  assert float(jnp.std(model.apply(variables, x, train=False, method=lambda m, x, train: m.backbone(x, train=train))
                       )) > 0.1
  # The old init stays available (README's NF+AGC vs BN numbers were measured with flax's).
  config.model.head_init = 'torch'
  torch_init = create_model(config, 10).init(jax.random.PRNGKey(0), x, train=False)['params']['head']['out']
  assert float(jnp.abs(torch_init['kernel']).max()) > 0


def test_zero_init_refuses_an_mlp_head():
  config = config_schema.load_config('configs/nf_agc_scratch.py:quick')
  config.model.head = 'mlp'
  with pytest.raises(errors.ConfigError, match=r"config.model.head_init = 'zeros' .* model.head=linear"):
    create_model(config, 10)
