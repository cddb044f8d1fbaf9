"""The gradient monitor's statistics against hand computations, its window and its state."""
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import base
from normjax import monitor, optim

LAYERS = ('backbone/features_0/bn', 'backbone/features_0/conv', 'backbone/features_2/depthwise',
          'head/fc1', 'head/out')


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  a = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  return {
      'backbone': {
          'features_0': {'conv': {'kernel': a(3, 3, 3, 4)}, 'bn': {'scale': a(4), 'bias': a(4)}},
          'features_2': {'depthwise': {'kernel': a(3, 3, 1, 4)}},
      },
      'head': {'fc1': {'kernel': a(4, 5), 'bias': a(5)}, 'out': {'kernel': a(5, 3), 'bias': a(3)}},
  }


def make_grads(params, seed=1, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32) * scale),
                      params)


def norm(*arrays):
  return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, np.float64)))) for a in arrays))


def layer(tree, name):
  """The leaves of one module, e.g. layer(params, 'head/fc1')."""
  return jax.tree.leaves(functools.reduce(operator.getitem, name.split('/'), tree))


def sgd_monitor(clip_norm, lr=0.5, every=2):
  return monitor.monitored(optax.clip_by_global_norm(clip_norm), optax.sgd(lr),
                           layer_stats_every=every, agc_lambda=None, agc_eps=1e-3)


@pytest.mark.parametrize('clip_norm, fired', [(0.1, 1.0), (1e3, 0.0)])
def test_scalars_match_hand_computation(clip_norm, fired):
  params, grads = make_params(), make_grads(make_params())
  tx = sgd_monitor(clip_norm, lr=0.5)
  updates, state = tx.update(grads, tx.init(params), params)
  stats = monitor.summarize(state)
  assert set(stats) == set(monitor.SCALARS)
  g = norm(*jax.tree.leaves(grads))
  clipped = min(g, clip_norm)
  assert float(stats['grad_norm']) == pytest.approx(g, rel=1e-5)
  assert float(stats['grad_norm_clipped']) == pytest.approx(clipped, rel=1e-5)
  assert float(stats['clip_fired']) == fired
  assert float(stats['param_norm']) == pytest.approx(norm(*jax.tree.leaves(params)), rel=1e-5)
  assert float(stats['update_norm']) == pytest.approx(0.5 * clipped, rel=1e-5)
  assert float(stats['update_norm']) == pytest.approx(norm(*jax.tree.leaves(updates)), rel=1e-5)


def test_layer_stats_match_hand_computation():
  params, grads = make_params(), make_grads(make_params())
  tx = sgd_monitor(0.1, lr=0.5)
  _, state = tx.update(grads, tx.init(params), params)
  layers = monitor.summarize_layers(state)
  assert set(layers) == {f'{s}/{name}' for s in monitor.LAYER_STATS for name in LAYERS}
  scale = 0.1 / norm(*jax.tree.leaves(grads))  # global-norm clipping factor
  for name in LAYERS:
    g, p = layer(grads, name), layer(params, name)
    assert float(layers[f'grad_norm/{name}']) == pytest.approx(norm(*g), rel=1e-5)
    assert float(layers[f'grad_norm_clipped/{name}']) == pytest.approx(scale * norm(*g), rel=1e-5)
    assert float(layers[f'param_norm/{name}']) == pytest.approx(norm(*p), rel=1e-5)
    assert float(layers[f'update_ratio/{name}']) == pytest.approx(
        0.5 * scale * norm(*g) / norm(*p), rel=1e-5)


def test_update_ratio_of_an_all_zero_layer_is_zero():
  params = make_params()
  params['head']['fc1'] = jax.tree.map(jnp.zeros_like, params['head']['fc1'])
  tx = sgd_monitor(1e3)
  _, state = tx.update(make_grads(params), tx.init(params), params)
  assert float(monitor.summarize_layers(state)['update_ratio/head/fc1']) == 0.0


def test_agc_clipped_frac_matches_numpy():
  params = make_params()
  grads = make_grads(params, scale=0.5)
  # Units of different sizes relative to their weights: fractions strictly between 0 and 1.
  grads['backbone']['features_2']['depthwise']['kernel'] *= jnp.array([1e-3, 1e-3, 1.0, 1.0])
  grads['head']['fc1']['kernel'] *= jnp.array([1e-3, 1.0, 1e-3, 1.0, 1e-3])
  lam, eps = 0.05, 1e-3
  config = base.get_config()
  config.optim.update(clip='agc', agc_lambda=lam, agc_eps=eps, trainable_blocks=-1)
  mask = optim.agc_mask(params, -1)
  tx = monitor.monitored(optim.make_clipper(config, params), optax.sgd(1.0), layer_stats_every=1,
                         agc_lambda=lam, agc_eps=eps, agc_mask=mask)
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  layers = monitor.summarize_layers(state)
  fracs = {k.split('/', 1)[1]: float(v) for k, v in layers.items()
           if k.startswith(monitor.AGC_STAT + '/')}
  # AGC does not apply to the final classifier layer, so it has no fraction.
  assert set(fracs) == set(LAYERS) - {'head/out'}

  def clipped_units(g, w):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    axes = tuple(range(g.ndim - 1)) if g.ndim > 1 else None  # units: the last axis
    g_unit = np.sqrt(np.sum(g**2, axis=axes)).reshape(-1)
    w_unit = np.sqrt(np.sum(w**2, axis=axes)).reshape(-1)
    return int(np.sum(g_unit / np.maximum(w_unit, eps) > lam)), g_unit.size

  for name, frac in fracs.items():
    counts = [clipped_units(g, w) for g, w in zip(layer(grads, name), layer(params, name))]
    expected = sum(c for c, _ in counts) / sum(n for _, n in counts)
    assert frac == pytest.approx(expected, abs=1e-6), name
  assert fracs['backbone/features_2/depthwise'] == 0.5
  assert fracs['head/fc1'] == pytest.approx(3 / 6)  # 2 of 5 kernel units plus the bias unit


def test_window_resets_after_each_multiple():
  params, base_grads = make_params(), make_grads(make_params())
  tx = sgd_monitor(1e3, every=3)
  update = jax.jit(tx.update)
  state = tx.init(params)
  assert float(monitor.summarize_layers(state)['grad_norm/head/fc1']) == 0.0
  unit = norm(*layer(base_grads, 'head/fc1'))
  # Step s uses grads * s, so a window's mean layer grad norm is mean(s) * unit.
  expected_mean = {1: 1, 2: 1.5, 3: 2, 4: 4, 5: 4.5, 6: 5, 7: 7}
  for s in range(1, 8):
    _, state = update(jax.tree.map(lambda g: g * s, base_grads), state, params)
    layers = monitor.summarize_layers(state)
    assert float(layers['grad_norm/head/fc1']) == pytest.approx(expected_mean[s] * unit, rel=1e-5)
    assert float(monitor.summarize(state)['grad_norm']) == pytest.approx(
        s * norm(*jax.tree.leaves(base_grads)), rel=1e-5)
    assert int(monitor.find_state(state).count) == s


def test_jit_matches_eager():
  params, grads = make_params(), make_grads(make_params())
  tx = sgd_monitor(0.1)
  state = tx.init(params)
  with pytest.raises(ValueError, match='update needs params'):
    tx.update(grads, state)
  eager = tx.update(grads, state, params)
  jitted = jax.jit(tx.update)(grads, state, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


def make_config(every=2):
  config = base.get_config()
  config.optim.update(name='adam', clip='agc', trainable_blocks=1)
  config.train.monitor_every_steps = every
  return config


def test_state_is_a_pytree_of_arrays_that_checkpoints(tmp_path):
  params, grads = make_params(), make_grads(make_params())
  tx = optim.make_optimizer(make_config(), params)
  state = jax.jit(tx.init)(params)
  for _ in range(2):
    _, state = jax.jit(tx.update)(grads, state, params)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'state', state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / 'state', jax.eval_shape(lambda: state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert monitor.summarize_layers(restored).keys() == monitor.summarize_layers(state).keys()


def test_summaries_find_the_state_in_make_optimizer_and_wrappers():
  params, grads = make_params(), make_grads(make_params())
  tx = optim.make_optimizer(make_config(), params)
  _, state = tx.update(grads, tx.init(params), params)
  assert isinstance(state, monitor.MonitorState)
  layers = monitor.summarize_layers(state)
  assert 'agc_clipped_frac/backbone/features_2/depthwise' in layers
  assert not any(k.startswith('agc_clipped_frac/head/out') for k in layers)
  # Frozen layers (features_0 with trainable_blocks=1) get no AGC fraction.
  assert not any(k.startswith('agc_clipped_frac/backbone/features_0') for k in layers)
  wrapped = optax.apply_if_finite(tx, max_consecutive_errors=3)
  _, wrapped_state = wrapped.update(grads, wrapped.init(params), params)
  np.testing.assert_array_equal(monitor.summarize(wrapped_state)['grad_norm'],
                                monitor.summarize(state)['grad_norm'])
  with pytest.raises(ValueError, match='expected exactly one MonitorState .* found 0'):
    monitor.summarize(optax.sgd(0.1).init(params))


def test_layer_stats_off():
  params, grads = make_params(), make_grads(make_params())
  tx = optim.make_optimizer(make_config(every=0), params)
  _, state = tx.update(grads, tx.init(params), params)
  assert monitor.summarize_layers(state) == {}
  assert float(monitor.summarize(state)['grad_norm']) > 0
  with pytest.raises(ValueError, match='train.monitor_every_steps must be >= 0'):
    monitor.monitored(optax.identity(), optax.sgd(0.1), layer_stats_every=-1, agc_lambda=None,
                      agc_eps=1e-3)
