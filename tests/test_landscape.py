"""Loss landscapes: grid values against direct re-evaluation, analytic quadratics, filter norms, resume."""
import dataclasses
import functools
import json
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import smoke
from normjax import checkpoint, landscape, optim, steps, train
from normjax.data import augment, pipeline
from normjax.rundir import RunDir
from normjax.models.factory import create_model

EXAMPLES = 96
TRAINABLE_BLOCKS = 1  # features_0, features_1 frozen: their directions must be zero


def _config(tfds_dir, shared_data_dir) -> ml_collections.ConfigDict:
  """LightCNN + a BatchNorm MLP head (running statistics, 1-D params, frozen blocks)."""
  c = smoke.get_config()
  c.data.tfds_dir = str(tfds_dir)
  c.data.source = str(shared_data_dir)
  c.data.train_subset = 320
  c.data.val_fraction = 0.01  # 600 val examples: evaluation stays quick
  c.model.head = 'mlp'
  c.model.head_norm = 'bn'
  c.model.head_hidden = 16
  c.optim.trainable_blocks = TRAINABLE_BLOCKS
  c.train.batch_size = 32
  c.train.num_epochs = 1
  c.train.max_steps = 6
  c.train.log_every_steps = 3
  c.train.monitor_every_steps = 0
  c.train.checkpoint_every_steps = 6
  return c


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, tfds_dir, shared_data_dir):
  workdir = tmp_path_factory.mktemp('landscape_run') / 'bn_head'
  train.train_and_evaluate(_config(tfds_dir, shared_data_dir), str(workdir))
  return workdir


@pytest.fixture(scope='module')
def loaded(run_dir):
  return landscape.load_run(run_dir)


@pytest.fixture(scope='module')
def independent(run_dir):
  """The run's model, weights and first val examples, rebuilt without normjax.landscape."""
  config = ml_collections.ConfigDict(json.loads((run_dir / 'config.json').read_text()))
  _, restored = checkpoint.restore_latest(run_dir)
  params, batch_stats = jax.device_get(restored['params']), jax.device_get(restored['batch_stats'])
  splits = pipeline.load_splits(config.data, config.seed)
  images, labels = splits.val.images[:EXAMPLES], splits.val.labels[:EXAMPLES]
  # ToTensor + Normalize by hand: 28x28 Fashion-MNIST needs no resize.
  x = ((images.astype(np.float32) / 255.0 - np.float32(pipeline.FASHION_MNIST_MEAN[0]))
       / np.float32(pipeline.FASHION_MNIST_STD[0]))
  model = create_model(config, splits.num_classes)
  return model, params, batch_stats, x, labels, images


def _loss_acc(logits, labels):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(shifted).sum(-1))
  loss = log_z - shifted[np.arange(len(labels)), labels]
  return loss.mean(), (logits.argmax(-1) == labels).mean()


# ----------------------------------------------------------------------------- test 1


@pytest.mark.parametrize('include_bn_bias', [False, True])
def test_grid_points_equal_direct_reevaluation_with_perturbed_weights(loaded, independent, include_bn_bias):
  surface, _ = landscape.run_landscape(loaded.workdir, dims=2, points=5, span=1.0, split='val',
                                       examples=EXAMPLES, seed=3, include_bn_bias=include_bn_bias,
                                       chunk_size=4, batch_size=32, run=loaded, log=None)
  assert surface.complete and surface.loss.shape == (5, 5)
  model, params, batch_stats, x, labels, _ = independent
  mask = jax.tree.map(lambda l: l != 'frozen', optim.param_labels(params, TRAINABLE_BLOCKS))
  d1, d2 = landscape.make_directions(params, mask, 2, 3, include_bn_bias)
  rng = np.random.default_rng(0)
  for flat in rng.choice(25, size=4, replace=False):
    i, j = np.unravel_index(flat, (5, 5))
    a, b = np.float32(surface.xs[i]), np.float32(surface.ys[j])
    moved = jax.tree.map(lambda w, u, v: np.asarray(w) + a * np.asarray(u) + b * np.asarray(v),
                         params, d1, d2)
    logits = model.apply({'params': moved, 'batch_stats': batch_stats}, x, train=False)
    loss, acc = _loss_acc(logits, labels)
    assert abs(surface.loss[i, j] - loss) <= 1e-5, (i, j, surface.loss[i, j], loss)
    assert surface.accuracy[i, j] == pytest.approx(acc, abs=1e-12)


# ----------------------------------------------------------------------------- test 2


def test_centre_equals_train_eval_step_on_the_same_examples(run_dir, loaded, independent):
  surface, _ = landscape.run_landscape(run_dir, dims=1, points=5, span=0.5, split='val',
                                       examples=EXAMPLES, chunk_size=8, batch_size=64, run=loaded,
                                       log=None)
  model, params, batch_stats, _, labels, images = independent
  preprocess = functools.partial(augment.eval_preprocess, image_size=28,
                                 mean=pipeline.FASHION_MNIST_MEAN, std=pipeline.FASHION_MNIST_STD)
  state = types.SimpleNamespace(params=params, batch_stats=batch_stats)
  out = steps.eval_step(state, images, labels, np.ones(len(labels), bool), model=model,
                        preprocess=preprocess)
  assert surface.xs[2] == 0.0
  assert abs(surface.loss[2] - float(np.sum(out['loss'])) / EXAMPLES) <= 1e-5
  assert surface.accuracy[2] == pytest.approx(float(np.sum(out['correct'])) / EXAMPLES, abs=1e-12)
  assert surface.centre() == (surface.loss[2], surface.accuracy[2])


# ----------------------------------------------------------------------------- test 3


def _least_squares(n=40, d_in=5, d_out=3, batch=16):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(n, d_in)).astype(np.float32)
  y = rng.normal(size=(n, d_out)).astype(np.float32)
  w = rng.normal(size=(d_in, d_out)).astype(np.float32)
  batches = []
  for start in range(0, n, batch):
    xb, yb = np.full((batch, d_in), 1e3, np.float32), np.zeros((batch, d_out), np.float32)
    m = min(batch, n - start)
    xb[:m], yb[:m] = x[start:start + m], y[start:start + m]  # padding rows are huge: must be masked
    batches.append((xb, yb, np.arange(batch) < m))
  return x, y, w, batches


def _apply_linear(params, x):
  return x @ params['w']


def _squared(outputs, targets):
  return 0.5 * jnp.sum(jnp.square(outputs - targets), -1), jnp.zeros(outputs.shape[0])


def test_1d_curve_of_a_quadratic_loss_matches_the_analytic_parabola():
  x, y, w, batches = _least_squares()
  d = np.random.default_rng(2).normal(size=w.shape).astype(np.float32)
  xs = np.linspace(-2.0, 2.0, 9)
  surface = landscape.compute_surface(_apply_linear, batches, {'w': w}, ({'w': d},), xs,
                                      per_example=_squared, chunk_size=4)
  # L(t) = mean_n 0.5 ||(w + t d)^T x_n - y_n||^2 = a + b t + c t^2 with c = d^T H d / 2,
  # H = kron(X^T X / N, I) for the row-major flattening of w.
  x64, y64, w64, d64 = (v.astype(np.float64) for v in (x, y, w, d))
  r, xd = x64 @ w64 - y64, x64 @ d64
  a = 0.5 * np.mean(np.sum(r ** 2, 1))
  b = np.mean(np.sum(r * xd, 1))
  hessian = np.kron(x64.T @ x64 / len(x64), np.eye(w.shape[1]))
  c = d64.ravel() @ hessian @ d64.ravel() / 2
  np.testing.assert_allclose(surface.loss, a + b * xs + c * xs ** 2, rtol=1e-5)
  # Sharpness of a parabola: (L(-1/2) + L(1/2)) / 2 - L(0) = c / 4.
  assert landscape.sharpness_of(surface)['sharpness'] == pytest.approx(c / 4, rel=1e-4)


def test_2d_surface_of_a_quadratic_loss_matches_the_analytic_form_and_orientation():
  x, y, w, batches = _least_squares()
  rng = np.random.default_rng(3)
  d1, d2 = (rng.normal(size=w.shape).astype(np.float32) for _ in range(2))
  xs, ys = np.linspace(-1.0, 1.0, 5), np.linspace(-0.5, 1.5, 3)  # different axes: catches a transpose
  surface = landscape.compute_surface(_apply_linear, batches, {'w': w}, ({'w': d1}, {'w': d2}),
                                      xs, ys, per_example=_squared, chunk_size=4)
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  expected = np.zeros((5, 3))
  for i, s in enumerate(xs):
    for j, t in enumerate(ys):
      r = x64 @ (w + s * d1.astype(np.float64) + t * d2.astype(np.float64)) - y64
      expected[i, j] = 0.5 * np.mean(np.sum(r ** 2, 1))
  np.testing.assert_allclose(surface.loss, expected, rtol=1e-5)


# ----------------------------------------------------------------------------- test 4


def _init_params(tfds_dir, shared_data_dir):
  config = _config(tfds_dir, shared_data_dir)
  model = create_model(config, 10)
  init = jax.jit(lambda r: model.init(r, jnp.zeros((1, 28, 28, 1)), train=False)['params'])
  return jax.device_get(init(jax.random.PRNGKey(0)))


def _leaves(tree, as_array=True):
  return {'/'.join(str(k.key) for k in path): np.asarray(v) if as_array else v
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_filter_normalised_direction_norms_biasbn_and_frozen_zeros(tfds_dir, shared_data_dir):
  params = _init_params(tfds_dir, shared_data_dir)
  labels = _leaves(optim.param_labels(params, TRAINABLE_BLOCKS), as_array=False)
  mask = landscape.trained_mask(params, TRAINABLE_BLOCKS)
  weights = _leaves(params)
  default = _leaves(landscape.random_direction(jax.random.PRNGKey(7), params, mask))
  with_bias = _leaves(landscape.random_direction(jax.random.PRNGKey(7), params, mask, include_bn_bias=True))
  assert set(labels.values()) == {'frozen', 'backbone', 'head'}
  checked_filters = 0
  for name, w in weights.items():
    d, db = default[name], with_bias[name]
    if labels[name] == 'frozen':
      assert not d.any() and not db.any(), name
    elif w.ndim <= 1:  # biases, BatchNorm scale/bias
      assert not d.any(), name
      np.testing.assert_array_equal(db, w)  # the paper code's d.copy_(w)
    else:
      np.testing.assert_array_equal(db, d)
      for o in range(w.shape[-1]):  # filter = output unit, the last axis of HWIO and (in, out)
        np.testing.assert_allclose(np.linalg.norm(d[..., o]), np.linalg.norm(w[..., o]), rtol=1e-5)
        checked_filters += 1
      cosine = np.sum(d * w) / (np.linalg.norm(d) * np.linalg.norm(w))
      assert abs(cosine) < 0.9, name  # random, not the weight itself
  assert checked_filters == 32 + 16 + 10  # features_2 conv, head fc1, head out


def test_directions_are_seeded_distinct_and_filter_normalise_depthwise_kernels():
  w = np.random.default_rng(0).normal(size=(3, 3, 1, 4)).astype(np.float32)
  w[..., 2] = 0.0  # a dead filter stays zero
  params = {'backbone': {'features_0': {'kernel': w}}, 'head': {'out': {'kernel': np.ones((4, 2), np.float32)}}}
  mask = landscape.trained_mask(params, -1)
  d1, d2 = landscape.make_directions(params, mask, 2, seed=5)
  again = landscape.make_directions(params, mask, 1, seed=5)[0]
  other = landscape.make_directions(params, mask, 1, seed=6)[0]
  k1, k2 = np.asarray(d1['backbone']['features_0']['kernel']), np.asarray(d2['backbone']['features_0']['kernel'])
  np.testing.assert_array_equal(np.asarray(again['backbone']['features_0']['kernel']), k1)  # 1-D dir = 2-D's first
  assert not np.allclose(np.asarray(other['backbone']['features_0']['kernel']), k1)
  assert not np.allclose(k1, k2)
  for o in range(4):
    np.testing.assert_allclose(np.linalg.norm(k1[..., o]), np.linalg.norm(w[..., o]), rtol=1e-5, atol=1e-8)
  assert not k1[..., 2].any()


# ----------------------------------------------------------------------------- test 5


class _Interrupt(Exception):
  pass


def test_interrupted_surface_resumes_to_the_uninterrupted_result(run_dir, loaded):
  args = dict(dims=2, points=5, span=1.0, split='val', examples=64, seed=1, chunk_size=4,
              batch_size=32, run=loaded, log=None)

  def interrupt_after_two(surface, chunks):
    if chunks == 2:
      raise _Interrupt

  with pytest.raises(_Interrupt):
    landscape.run_landscape(run_dir, on_chunk=interrupt_after_two, **args)
  path = run_dir / 'landscape' / 'surface_2d_p5_s1.0_val_n64_seed1_biasbn0.npz'
  partial = landscape.Surface.load(path)
  assert partial.done.sum() == 8 and not partial.complete
  assert not list(path.parent.glob('*.tmp'))
  assert not path.with_suffix('.png').exists()  # plotted only when complete

  chunks = []
  resumed, _ = landscape.run_landscape(run_dir, on_chunk=lambda s, c: chunks.append(c), **args)
  assert chunks == [1, 2, 3, 4, 5]  # ceil(17 remaining / 4): the done points were skipped
  assert resumed.complete and path.with_suffix('.png').exists()
  np.testing.assert_array_equal(resumed.loss.ravel()[:8], partial.loss.ravel()[:8])

  # The uninterrupted computation, without a file.
  mask = landscape.trained_mask(loaded.params, TRAINABLE_BLOCKS)
  directions = landscape.make_directions(loaded.params, mask, 2, 1)
  batches = landscape.ImageBatches(loaded.splits.val.take(np.arange(64)), 32, loaded.preprocess)
  fresh = landscape.compute_surface(loaded.apply_fn, batches, loaded.params, directions,
                                    resumed.xs, resumed.ys, chunk_size=4)
  np.testing.assert_allclose(resumed.loss, fresh.loss, rtol=0, atol=1e-6)
  np.testing.assert_allclose(resumed.accuracy, fresh.accuracy, rtol=0, atol=1e-12)

  # A complete file is not recomputed; a file from another checkpoint is.
  landscape.run_landscape(run_dir, on_chunk=lambda s, c: pytest.fail('recomputed'), **args)
  stale = landscape.Surface.load(path)
  stale.meta['step'] += 1
  stale.save(path)
  chunks.clear()
  landscape.run_landscape(run_dir, on_chunk=lambda s, c: chunks.append(c), **args)
  assert len(chunks) == 7


def test_max_chunks_stops_early_and_saves_the_partial_grid(tmp_path):
  x, y, w, batches = _least_squares()
  d = np.ones_like(w)
  path = tmp_path / 'quad.npz'
  kwargs = dict(per_example=_squared, chunk_size=2, path=path)
  partial = landscape.compute_surface(_apply_linear, batches, {'w': w}, ({'w': d},),
                                      np.linspace(-1, 1, 7), max_chunks=1, **kwargs)
  assert partial.done.tolist() == [True, True] + [False] * 5
  assert landscape.Surface.load(path).done.sum() == 2
  full = landscape.compute_surface(_apply_linear, batches, {'w': w}, ({'w': d},),
                                   np.linspace(-1, 1, 7), **kwargs)
  assert full.complete and not np.isnan(full.loss).any()


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_surface_png_and_compare_writes_plots_and_sharpness_table(run_dir, tmp_path):
  common = ['--points=5', '--examples=64', '--batch_size=32', '--seed=2']
  assert landscape.main([str(run_dir), '--dims=1', *common]) == 0
  stem = 'surface_1d_p5_s1.0_val_n64_seed2_biasbn0'
  surface = landscape.Surface.load(run_dir / 'landscape' / f'{stem}.npz')
  assert (run_dir / 'landscape' / f'{stem}.png').stat().st_size > 0
  expected = (surface.loss[1] + surface.loss[3]) / 2 - surface.loss[2]  # xs = -1, -0.5, 0, 0.5, 1
  assert landscape.sharpness(run_dir, stem) == pytest.approx(expected, rel=1e-12)

  twin = tmp_path / 'twin'  # a second run with the same weights: the same landscape
  shutil.copytree(run_dir, twin, ignore=shutil.ignore_patterns('landscape'))
  out = tmp_path / 'cmp'
  assert landscape.main(['--compare', str(run_dir), str(twin), '--dims=2', f'--out={out}', *common]) == 0
  for name in ('compare_1d.png', 'compare_2d.png', 'sharpness.md'):
    assert (out / name).stat().st_size > 0, name
  table = (out / 'sharpness.md').read_text()
  rows = [l for l in table.splitlines() if l.startswith('| bn_head') or l.startswith('| twin')]
  assert len(rows) == 2
  assert all(f'{expected:.4f}' in row for row in rows)
  assert landscape.sharpness(twin) == pytest.approx(expected, abs=1e-6)


def test_cached_run_is_evaluated_from_its_feature_cache(tmp_path, shared_data_dir):
  """A run trained from the frozen-feature cache: the landscape reads the cached val features,
  and the result equals evaluating the same weights online on the images."""
  from configs import base
  config = base.get_config('quick')
  config.data.source = str(shared_data_dir)
  config.data.train_subset = 64
  config.train.batch_size = 32
  config.train.max_steps = 2
  config.train.monitor_every_steps = 0
  config.train.feature_cache = str(tmp_path / 'cache')
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  cached = landscape.load_run(tmp_path / 'run')
  assert cached.features is not None and cached.start_block == 18
  online = dataclasses.replace(cached, features=None, start_block=0)
  kwargs = dict(dims=1, points=3, span=0.5, examples=48, plot=False, log=None)
  a, _ = landscape.run_landscape(tmp_path / 'run', run=cached, **kwargs)
  import shutil
  shutil.rmtree(RunDir(tmp_path / 'run').landscape)
  b, _ = landscape.run_landscape(tmp_path / 'run', run=online, **kwargs)
  np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5)
  np.testing.assert_array_equal(a.accuracy, b.accuracy)
  # Grad-CAM differentiates with respect to images: it loads the run without the cache.
  from normjax import gradcam
  assert landscape.load_run(tmp_path / 'run', use_feature_cache=False).features is None
  png = gradcam.run_gradcam(tmp_path / 'run', images=4, split='test')
  assert png.exists() and png.stat().st_size > 0
