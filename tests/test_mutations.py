"""Behaviour the rest of the suite let slip (issue 14, item 7), each through the public path.

Each test here failed on one mutation that every other relevant test file passed:
  - AGC's default floor on ||W|| changed from 1e-3 to 1e-6;
  - global-norm clipping moved after Adam inside make_optimizer;
  - head_norm='ln' silently built with no norm by create_model;
  - evaluation run with dropout active.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import base, smoke
from normjax import monitor, optim, steps
from normjax.models.factory import create_model


def _optim_config(**fields):
  config = base.get_config()  # the shared recipe's defaults, e.g. optim.agc_eps
  config.optim.trainable_blocks = -1
  config.optim.lr = config.optim.backbone_lr = 1.0
  for name, value in fields.items():
    setattr(config.optim, name, value)
  return config


def test_agc_default_floor_on_weight_norm_is_1e_3():
  """AGC clips a unit's gradient to agc_lambda * max(||W_unit||, eps): a zero unit gets lambda * eps."""
  config = _optim_config(name='sgd', momentum=0.0, clip='agc')
  params = {'backbone': {'features_0': {'kernel': jnp.zeros((3, 4))}},  # zero weights: the floor decides
            'head': {'out': {'kernel': jnp.ones((4, 2))}}}
  grads = {'backbone': {'features_0': {'kernel': jnp.ones((3, 4))}},
           'head': {'out': {'kernel': jnp.ones((4, 2))}}}
  tx = optim.make_optimizer(config, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  unit_norms = np.linalg.norm(np.asarray(updates['backbone']['features_0']['kernel']), axis=0)
  np.testing.assert_allclose(unit_norms, config.optim.agc_lambda * 1e-3, rtol=1e-4)  # lr 1: update = -g
  np.testing.assert_allclose(updates['head']['out']['kernel'], -1.0)  # the classifier is not clipped


def test_global_norm_clipping_acts_on_the_gradient_before_adam():
  """Clipped before Adam, the clip only rescales the gradient, which Adam's first step cancels:
  the update is -lr * sign(g). Clipping Adam's update instead would cut it to norm clip_norm."""
  config = _optim_config(name='adam', clip='global_norm', clip_norm=1.0)
  params = {'backbone': {'features_0': {'kernel': jnp.ones((3, 4))}},
            'head': {'out': {'kernel': jnp.ones((4, 2))}}}
  signs = jnp.where(jnp.arange(20) % 3 == 0, -1.0, 1.0)
  grads = {'backbone': {'features_0': {'kernel': 100.0 * signs[:12].reshape(3, 4)}},
           'head': {'out': {'kernel': 100.0 * signs[12:].reshape(4, 2)}}}
  tx = optim.make_optimizer(config, params)
  updates, state = tx.update(grads, tx.init(params), params)
  for update, grad in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    np.testing.assert_allclose(update, -jnp.sign(grad), rtol=1e-5)
  stats = monitor.summarize(state)
  np.testing.assert_allclose(stats['grad_norm'], 100.0 * np.sqrt(20), rtol=1e-5)
  np.testing.assert_allclose(stats['grad_norm_clipped'], 1.0, rtol=1e-5)


def test_ln_head_has_a_layer_norm():
  config = smoke.get_config()
  config.model.head = 'mlp'
  config.model.head_norm = 'ln'
  config.model.head_hidden = 16
  model = create_model(config, 10)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 28, 28, 1))
  variables = model.init({'params': jax.random.PRNGKey(1), 'dropout': jax.random.PRNGKey(2)}, x, train=False)
  assert set(variables['params']['head']['norm']) == {'scale', 'bias'}
  # Normalized over its features, the hidden layer is blind to the scale of fc1's output.
  scaled = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 10.0 if 'fc1' in jax.tree_util.keystr(path) else v, variables)
  np.testing.assert_allclose(model.apply(scaled, x, train=False), model.apply(variables, x, train=False),
                             rtol=1e-3, atol=1e-5)


def test_eval_step_runs_the_model_without_dropout():
  config = smoke.get_config()
  config.model.head = 'linear'
  config.model.dropout = 0.5
  model = create_model(config, 10)
  state = steps.init_state(model, optax.sgd(0.1), (28, 28, 1), jax.random.PRNGKey(0))
  images = jax.random.normal(jax.random.PRNGKey(1), (16, 28, 28, 1))
  labels = jnp.arange(16) % 10
  mask = jnp.ones(16, bool)
  out = steps.eval_step(state, images, labels, mask, model=model, preprocess=lambda x: x)
  logits = model.apply({'params': state.params}, images, train=False)
  np.testing.assert_allclose(out['loss'], optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                             rtol=1e-5)
  np.testing.assert_array_equal(out['correct'], (jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  dropped = model.apply({'params': state.params}, images, train=True, rngs={'dropout': jax.random.PRNGKey(2)})
  assert not np.allclose(dropped, logits)  # dropout changes these logits, so the check above can see it
