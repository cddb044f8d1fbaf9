"""Optimizer chains: param groups, frozen blocks, clipping and schedules against hand computations."""
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from normjax import optim


def make_params(seed=0):
  """A Classifier-shaped tree; features_10 checks numeric (not lexicographic) block order."""
  rng = np.random.default_rng(seed)
  a = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  return {
      'backbone': {
          'features_0': {'conv': {'kernel': a(3, 3, 3, 4)}, 'bn': {'scale': a(4), 'bias': a(4)}},
          'features_2': {'depthwise': {'kernel': a(3, 3, 1, 4)}},
          'features_10': {'conv': {'kernel': a(1, 1, 4, 6)}, 'bn': {'scale': a(6), 'bias': a(6)}},
      },
      'head': {'fc1': {'kernel': a(6, 5), 'bias': a(5)}, 'out': {'kernel': a(5, 3), 'bias': a(3)}},
  }


def make_grads(params, seed=1, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32) * scale),
                      params)


def make_config(**optim_fields):
  config = base.get_config()
  config.optim.update(optim_fields)
  config.train.monitor_every_steps = 0
  return config


def group(tree, labels, name):
  return [x for x, lab in zip(jax.tree.leaves(tree), jax.tree.leaves(labels)) if lab == name]


def test_param_labels_last_k_blocks_by_index():
  params = make_params()
  labels = optim.param_labels(params, 2)
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  assert labels['head'] == {'fc1': {'kernel': 'head', 'bias': 'head'},
                            'out': {'kernel': 'head', 'bias': 'head'}}
  assert set(jax.tree.leaves(labels['backbone']['features_0'])) == {'frozen'}
  assert set(jax.tree.leaves(labels['backbone']['features_2'])) == {'backbone'}
  assert set(jax.tree.leaves(labels['backbone']['features_10'])) == {'backbone'}
  only_last = optim.param_labels(params, 1)
  assert set(jax.tree.leaves(only_last['backbone']['features_2'])) == {'frozen'}
  assert set(jax.tree.leaves(only_last['backbone']['features_10'])) == {'backbone'}
  assert set(jax.tree.leaves(optim.param_labels(params, -1)['backbone'])) == {'backbone'}
  assert set(jax.tree.leaves(optim.param_labels(params, 0)['backbone'])) == {'frozen'}
  # Abstract params (jax.eval_shape) label the same way.
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  assert optim.param_labels(abstract, 2) == labels


def test_param_labels_rejects_bad_inputs():
  params = make_params()
  with pytest.raises(ValueError, match=r'optim.trainable_blocks must be -1 .* 1\.\.3 .* got 4'):
    optim.param_labels(params, 4)
  with pytest.raises(ValueError, match='optim.trainable_blocks'):
    optim.param_labels(params, -2)
  params['backbone']['stem'] = params['backbone'].pop('features_0')
  with pytest.raises(ValueError, match="backbone block 'stem' is not named features_<i>"):
    optim.param_labels(params, 1)


@pytest.mark.parametrize('name', ['adam', 'sgd'])
def test_frozen_params_stay_bit_identical(name):
  params = make_params()
  config = make_config(name=name, trainable_blocks=1, weight_decay=1e-2, clip='global_norm')
  tx = optim.make_optimizer(config, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  new = params
  for step in range(3):
    updates, state = update(make_grads(params, seed=step), state, new)
    new = optax.apply_updates(new, updates)
  labels = optim.param_labels(params, 1)
  for before, after in zip(group(params, labels, 'frozen'), group(new, labels, 'frozen')):
    np.testing.assert_array_equal(before, after)
  for lab in ('backbone', 'head'):
    for before, after in zip(group(params, labels, lab), group(new, labels, lab)):
      assert np.any(np.asarray(before) != np.asarray(after))


def test_sgd_moves_each_group_with_its_learning_rate():
  params, grads = make_params(), make_grads(make_params())
  config = make_config(name='sgd', momentum=0.0, lr=0.1, backbone_lr=0.003, trainable_blocks=2)
  tx = optim.make_optimizer(config, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  labels = optim.param_labels(params, 2)
  for lab, lr in (('head', 0.1), ('backbone', 0.003), ('frozen', 0.0)):
    for g, u in zip(group(grads, labels, lab), group(updates, labels, lab)):
      np.testing.assert_allclose(u, -lr * np.asarray(g), rtol=1e-6)


def test_sgd_momentum_and_weight_decay_follow_torch():
  params, grads = make_params(), make_grads(make_params())
  config = make_config(name='sgd', momentum=0.9, lr=0.1, backbone_lr=0.1, weight_decay=0.01,
                       trainable_blocks=-1)
  tx = optim.make_optimizer(config, params)
  state = tx.init(params)
  p, buf = params, None
  for _ in range(2):
    updates, state = tx.update(grads, state, p)
    # torch.optim.SGD: d = g + wd * p; buf = momentum * buf + d; p -= lr * buf.
    d = jax.tree.map(lambda g, w: g + 0.01 * w, grads, p)
    buf = d if buf is None else jax.tree.map(lambda b, x: 0.9 * b + x, buf, d)
    jax.tree.map(lambda u, b: np.testing.assert_allclose(u, -0.1 * b, rtol=1e-5, atol=1e-7),
                 updates, buf)
    p = optax.apply_updates(p, updates)


def test_adam_first_step_is_lr_times_sign():
  params, grads = make_params(), make_grads(make_params())
  config = make_config(name='adam', lr=1e-3, backbone_lr=1e-5, trainable_blocks=-1)
  tx = optim.make_optimizer(config, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's bias-corrected first step is lr * g / (|g| + eps) ~ lr * sign(g).
  np.testing.assert_allclose(updates['head']['fc1']['kernel'],
                             -1e-3 * np.sign(grads['head']['fc1']['kernel']), rtol=1e-4)
  np.testing.assert_allclose(updates['backbone']['features_0']['conv']['kernel'],
                             -1e-5 * np.sign(grads['backbone']['features_0']['conv']['kernel']),
                             rtol=1e-4)


def test_global_norm_clipping_matches_hand_computation():
  params = make_params()
  grads = make_grads(params, scale=10.0)
  config = make_config(clip='global_norm', clip_norm=1.0, trainable_blocks=1)
  clipper = optim.make_clipper(config, params)
  clipped, _ = clipper.update(grads, clipper.init(params), params)
  labels = optim.param_labels(params, 1)
  # Only trainable grads count (torch clips parameters with requires_grad), frozen pass through.
  norm = math.sqrt(sum(float(np.sum(np.square(g))) for lab in ('backbone', 'head')
                       for g in group(grads, labels, lab)))
  assert norm > 1.0
  for lab in ('backbone', 'head'):
    for g, c in zip(group(grads, labels, lab), group(clipped, labels, lab)):
      np.testing.assert_allclose(c, np.asarray(g) / norm, rtol=1e-5)
  for g, c in zip(group(grads, labels, 'frozen'), group(clipped, labels, 'frozen')):
    np.testing.assert_array_equal(c, g)
  # Below the threshold nothing changes.
  small = jax.tree.map(lambda g: g * 0.01 / norm, grads)
  unchanged, _ = clipper.update(small, clipper.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, unchanged, small)


def get(tree, path):
  return functools.reduce(operator.getitem, path, tree)


def agc_reference(g, w, lam, eps):
  """NumPy unit-wise AGC (Brock et al. 2021): units are the last axis; vectors are one unit."""
  g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
  axes = tuple(range(g.ndim - 1)) if g.ndim > 1 else None
  g_norm = np.sqrt(np.sum(g**2, axis=axes, keepdims=axes is not None))
  w_norm = np.sqrt(np.sum(w**2, axis=axes, keepdims=axes is not None))
  max_norm = lam * np.maximum(w_norm, eps)
  return np.where(g_norm > max_norm, g * max_norm / g_norm, g)


def test_agc_matches_numpy_unitwise_reference():
  params = make_params()
  # A zero unit in a conv kernel: its max norm is lam * eps (the floor on ||W||).
  params['backbone']['features_10']['conv']['kernel'] = (
      params['backbone']['features_10']['conv']['kernel'].at[..., 0].set(0.0))
  grads = make_grads(params, scale=0.05)
  # Some units far below the threshold so both branches are exercised.
  grads['backbone']['features_2']['depthwise']['kernel'] = (
      grads['backbone']['features_2']['depthwise']['kernel'].at[..., :2].multiply(1e-3))
  lam, eps = 0.05, 1e-3
  config = make_config(clip='agc', agc_lambda=lam, agc_eps=eps, trainable_blocks=-1)
  clipper = optim.make_clipper(config, params)
  clipped, _ = clipper.update(grads, clipper.init(params), params)

  # The final classifier layer is not clipped (NFNets).
  jax.tree.map(np.testing.assert_array_equal, clipped['head']['out'], grads['head']['out'])
  paths = [('backbone', 'features_0', 'conv', 'kernel'), ('backbone', 'features_0', 'bn', 'bias'),
           ('backbone', 'features_2', 'depthwise', 'kernel'),  # depthwise: per channel C
           ('backbone', 'features_10', 'conv', 'kernel'), ('head', 'fc1', 'kernel'),
           ('head', 'fc1', 'bias')]
  for path in paths:
    g, w, c = get(grads, path), get(params, path), get(clipped, path)
    np.testing.assert_allclose(c, agc_reference(g, w, lam, eps), rtol=1e-5, atol=1e-8,
                               err_msg=str(path))
  dw = get(clipped, paths[2])
  np.testing.assert_array_equal(dw[..., :2], get(grads, paths[2])[..., :2])
  assert np.all(dw[..., 2:] != get(grads, paths[2])[..., 2:])
  # The zero unit is clipped to lam * eps.
  zero_unit = get(clipped, paths[3])[..., 0]
  np.testing.assert_allclose(np.linalg.norm(zero_unit), lam * eps, rtol=1e-5)


def test_agc_skips_frozen_blocks():
  params = make_params()
  grads = make_grads(params, scale=10.0)
  config = make_config(clip='agc', agc_lambda=0.01, trainable_blocks=1)
  clipper = optim.make_clipper(config, params)
  clipped, _ = clipper.update(grads, clipper.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, clipped['backbone']['features_0'],
               grads['backbone']['features_0'])
  assert np.all(np.asarray(clipped['backbone']['features_10']['conv']['kernel'])
                != np.asarray(grads['backbone']['features_10']['conv']['kernel']))


def test_constant_schedule_with_warmup():
  config = make_config(schedule='constant', warmup_epochs=2.0)
  sched = optim.learning_rate_schedule(0.4, config, steps_per_epoch=5)
  np.testing.assert_allclose([sched(s) for s in (0, 5, 10, 11, 500)], [0.0, 0.2, 0.4, 0.4, 0.4],
                             rtol=1e-6)
  config.optim.warmup_epochs = 0.0
  assert float(optim.learning_rate_schedule(0.4, config, 5)(0)) == pytest.approx(0.4)


def test_cosine_schedule_over_epochs_or_max_steps():
  config = make_config(schedule='cosine', warmup_epochs=0.0)
  config.train.num_epochs = 4
  sched = optim.learning_rate_schedule(1.0, config, steps_per_epoch=25)  # 100 steps
  for s in (0, 30, 50, 99, 100):
    assert float(sched(s)) == pytest.approx(0.5 * (1 + math.cos(math.pi * s / 100)), abs=1e-6)
  config.optim.warmup_epochs = 0.4  # 10 warmup steps, then cosine over the remaining 90
  sched = optim.learning_rate_schedule(1.0, config, steps_per_epoch=25)
  assert float(sched(5)) == pytest.approx(0.5)
  for s in (10, 40, 100):
    assert float(sched(s)) == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - 10) / 90)), abs=1e-6)
  config.train.max_steps = 20  # overrides num_epochs * steps_per_epoch
  config.optim.warmup_epochs = 0.0
  sched = optim.learning_rate_schedule(1.0, config, steps_per_epoch=25)
  assert float(sched(10)) == pytest.approx(0.5, abs=1e-6)
  assert float(sched(20)) == pytest.approx(0.0, abs=1e-6)
  config.optim.warmup_epochs = 1.0  # 25 warmup steps >= 20 steps
  with pytest.raises(ValueError, match='optim.warmup_epochs=1.0 gives 25 warmup steps'):
    optim.learning_rate_schedule(1.0, config, steps_per_epoch=25)


def test_optimizer_follows_the_schedule():
  params, grads = make_params(), make_grads(make_params())
  config = make_config(name='sgd', momentum=0.0, lr=1.0, backbone_lr=0.1, schedule='cosine',
                       trainable_blocks=-1)
  config.train.max_steps = 4
  tx = optim.make_optimizer(config, params)
  state = tx.init(params)
  for step in range(3):
    updates, state = tx.update(grads, state, params)
    lr = 0.5 * (1 + math.cos(math.pi * step / 4))
    np.testing.assert_allclose(updates['head']['fc1']['bias'], -lr * np.asarray(grads['head']['fc1']['bias']),
                               rtol=1e-5)
    np.testing.assert_allclose(updates['backbone']['features_0']['bn']['scale'],
                               -0.1 * lr * np.asarray(grads['backbone']['features_0']['bn']['scale']),
                               rtol=1e-5)


@pytest.mark.parametrize('field, value, message', [
    ('name', 'rmsprop', r"optim.name: unknown value 'rmsprop'; allowed: adam, adamw, sgd"),
    ('schedule', 'step', r"optim.schedule: unknown value 'step'; allowed: constant, cosine"),
    ('clip', 'value', r"optim.clip: unknown value 'value'; allowed: none, global_norm, agc"),
])
def test_bad_names_raise_with_the_field(field, value, message):
  config = make_config(**{field: value})
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer(config, make_params())


def test_nesterov_needs_momentum():
  config = make_config(name='sgd', momentum=0.0, nesterov=True)
  with pytest.raises(ValueError, match='optim.nesterov needs optim.momentum > 0'):
    optim.make_optimizer(config, make_params())


@pytest.mark.parametrize('name, torch_cls', [('adam', 'Adam'), ('adamw', 'AdamW')])
def test_weight_decay_follows_torch(name, torch_cls):
  """adam + weight_decay is torch.optim.Adam's coupled L2; adamw is torch.optim.AdamW."""
  import torch
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(4, 3)).astype(np.float32)
  grads = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(4)]
  config = make_config(name=name, lr=1e-2, backbone_lr=1e-2, trainable_blocks=-1, weight_decay=0.1)
  params = {'head': {'out': {'kernel': jnp.asarray(w0)}}}
  tx = optim._base_optimizer(config, optax.constant_schedule(1e-2))
  state = tx.init(params)
  p = params
  for g in grads:
    updates, state = tx.update({'head': {'out': {'kernel': jnp.asarray(g)}}}, state, p)
    p = optax.apply_updates(p, updates)
  w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  opt = getattr(torch.optim, torch_cls)([w], lr=1e-2, weight_decay=0.1)
  for g in grads:
    w.grad = torch.from_numpy(g)
    opt.step()
  np.testing.assert_allclose(p['head']['out']['kernel'], w.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_block_naming_and_first_trainable_have_one_rule():
  from normjax.models import common
  assert common.block_name(18) == 'features_18' and common.block_index('features_18') == 18
  assert common.block_index('stem') is None and common.block_index('features_1/conv_0') is None
  assert [common.first_trainable(19, k) for k in (-1, 0, 1, 19)] == [0, 19, 18, 0]
  with pytest.raises(ValueError, match=r'optim.trainable_blocks must be -1 .* 1\.\.3 .* got 4'):
    common.first_trainable(3, 4)
