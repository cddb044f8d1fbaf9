"""The gradient-quantity probe: its norms against NumPy, its scopes against each other and the
train step's own logged gradient norm."""
import jax
import numpy as np
import pytest

from normjax import grad_quantities, monitor, optim, parallel, steps
from normjax.models.factory import create_model
from configs import base


@pytest.fixture(scope='module')
def setup():
  config = base.get_config('quick')  # MobileNetV2 width 0.5, 32 px, features_18 + head trained
  config.model.head_norm = 'ln'
  config.model.dropout = 0.0
  config.train.monitor_every_steps = 0
  model = create_model(config, 10)
  variables = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0)},
                         np.zeros((1, 32, 32, 3), np.float32), train=False)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, 16).astype(np.int32)
  return config, variables, x, y


def test_norms_match_numpy():
  rng = np.random.default_rng(1)
  grads = {'a': rng.normal(size=(3, 4)), 'b': {'c': rng.normal(size=5), 'd': rng.normal(size=(2, 2, 2))}}
  mask = {'a': True, 'b': {'c': False, 'd': True}}
  got = grad_quantities.norms(grads, mask)
  kept = [grads['a'], grads['b']['d']]
  assert got['global_l2'] == pytest.approx(np.sqrt(sum((g ** 2).sum() for g in kept)), rel=1e-6)
  assert got['sum_of_norms'] == pytest.approx(sum(np.linalg.norm(g.ravel()) for g in kept), rel=1e-6)
  assert got['tensors'] == 2


def test_scopes_differ_only_in_the_frozen_blocks(setup):
  config, variables, x, y = setup
  key = jax.random.key(2)
  trainable = grad_quantities.gradient(config, variables, x, y, key, 'train', 'trainable')
  everything = grad_quantities.gradient(config, variables, x, y, key, 'train', 'all')
  labels = optim.param_labels(variables['params'], config.optim.trainable_blocks)
  for lab, g_t, g_a in zip(jax.tree.leaves(labels), jax.tree.leaves(trainable), jax.tree.leaves(everything)):
    if lab == 'frozen':
      assert np.abs(g_t).max() == 0
    else:  # the forward pass is the same; only where gradients stop differs
      np.testing.assert_allclose(g_t, g_a, rtol=1e-4, atol=1e-6)
  frozen_norm = sum(float(np.abs(g).max()) for lab, g in
                    zip(jax.tree.leaves(labels), jax.tree.leaves(everything)) if lab == 'frozen')
  assert frozen_norm > 0


def test_trainable_global_l2_is_what_training_logs(setup):
  config, variables, x, y = setup
  config = config.copy_and_resolve_references()
  config.data.augment = False  # then the train step's input is exactly x / 255 (mean 0, std 1)
  programs = steps.build_programs(config, 10, (32, 32, 3), (0.0,) * 3, (1.0,) * 3, 10,
                                  parallel.make_mesh())
  state = programs.init(jax.random.key(0))
  copy = lambda tree: jax.tree.map(np.array, tree)  # the step donates its state
  state = state.replace(params=copy(variables['params']), batch_stats=copy(variables['batch_stats']))
  images = np.clip(x * 40 + 128, 0, 255).astype(np.uint8)
  rng = jax.random.key(5)
  state = programs.train_step(state, images, y, rng)
  logged = float(monitor.summarize(state.opt_state)['grad_norm'])
  _, dropout_key = jax.random.split(jax.random.fold_in(rng, 0))
  grads = grad_quantities.gradient(config, variables, images.astype(np.float32) / 255.0, y,
                                   dropout_key, 'eval', 'trainable')
  labels = optim.param_labels(variables['params'], config.optim.trainable_blocks)
  mask = jax.tree.map(lambda l: l != 'frozen', labels)
  assert grad_quantities.norms(grads, mask)['global_l2'] == pytest.approx(logged, rel=1e-4)
