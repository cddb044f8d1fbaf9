"""Grad-CAM: a model whose evidence sits in a known region, channel weights vs jax.grad by hand, the CLI."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from normjax import gradcam, landscape, train
from normjax.models.classifier import Classifier
from normjax.models.factory import create_model
from normjax.models.heads import LinearHead


class _TwoChannelBackbone(nn.Module):
  """A 1x1 stride-2 conv (hand-set to the identity) + ReLU: feature c is input channel c."""

  @nn.compact
  def __call__(self, x, train):
    del train
    return nn.relu(nn.Conv(2, (1, 1), strides=2, use_bias=False, name='features_0')(x))


def _region_model():
  """Class 1 logit = 2 * GAP(feature 0), class 0 logit = GAP(feature 1)."""
  model = Classifier(backbone=_TwoChannelBackbone(), head=LinearHead(2, dropout=0.0))
  params = {'backbone': {'features_0': {'kernel': np.eye(2, dtype=np.float32).reshape(1, 1, 2, 2)}},
            'head': {'out': {'kernel': np.array([[0.0, 2.0], [1.0, 0.0]], np.float32),
                             'bias': np.zeros(2, np.float32)}}}
  return model, {'params': params}


def _region_image():
  """Channel 0 (class 1 evidence) bright in the top-left quadrant, channel 1 in the bottom-right."""
  x = np.random.default_rng(0).uniform(0, 0.01, size=(1, 16, 16, 2)).astype(np.float32)
  x[0, 2:6, 2:6, 0] = 1.0
  x[0, 10:14, 10:14, 1] = 1.0
  return x


def test_heatmap_peaks_where_the_class_evidence_is():
  model, variables = _region_model()
  x = _region_image()
  result = gradcam.grad_cam(model, variables, x)
  assert int(result.target[0]) == 1  # 2 * mean(blob) > mean(blob)
  assert result.features.shape == (1, 8, 8, 2) and result.heatmap.shape == (1, 16, 16)
  # d(2 GAP(A_0)) / dA_0 = 2 / 64 everywhere: alpha = (2/64, 0).
  np.testing.assert_allclose(np.asarray(result.weights), [[2 / 64, 0.0]], rtol=1e-6)
  heat = np.asarray(result.heatmap[0])
  assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0, abs=1e-6)
  row, col = np.unravel_index(np.argmax(heat), heat.shape)
  assert row < 8 and col < 8, (row, col)
  assert heat[:8, :8].sum() > 0.8 * heat.sum()
  # Class-discriminative: explaining class 0 moves the heatmap to the bottom-right blob.
  other = gradcam.grad_cam(model, variables, x, target=np.array([0]))
  np.testing.assert_allclose(np.asarray(other.weights), [[0.0, 1 / 64]], rtol=1e-6)
  row, col = np.unravel_index(np.argmax(np.asarray(other.heatmap[0])), heat.shape)
  assert row >= 8 and col >= 8, (row, col)


def _lightcnn():
  config = smoke.get_config()
  model = create_model(config, 10)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 28, 28, 1))
  variables = jax.device_get(model.init(jax.random.PRNGKey(0), x, train=False))
  return model, variables, x


def _conv(x, p):
  y = jax.lax.conv_general_dilated(x, p['kernel'], (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   precision=jax.lax.Precision.HIGHEST)
  return y + p['bias']


def _pool(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')


def _bilinear_up(cam, size):
  """Half-pixel-centre bilinear upsampling with clamped edges, in NumPy (per axis)."""
  def axis_weights(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - (src - lo)
    m[np.arange(n_out), hi] += src - lo
    return m
  rows, cols = axis_weights(cam.shape[1], size), axis_weights(cam.shape[2], size)
  return np.einsum('ih,nhw,jw->nij', rows, cam, cols)


@pytest.mark.parametrize('layer', [None, 'features_1'])
def test_channel_weights_equal_mean_gradient_of_a_hand_written_network(layer):
  model, variables, x = _lightcnn()
  p = variables['params']
  bb, out = p['backbone'], p['head']['out']
  # LightCNN + linear head by hand: conv-relu-pool, conv-relu-pool, conv-relu, GAP, dense.
  a1 = _conv(x, bb['features_0'])
  a2 = _conv(_pool(jax.nn.relu(a1)), bb['features_1'])
  a3 = jax.nn.relu(_conv(_pool(jax.nn.relu(a2)), bb['features_2']))
  dense = lambda f: jnp.dot(f, out['kernel'], precision=jax.lax.Precision.HIGHEST) + out['bias']
  if layer is None:  # the backbone output (after the last ReLU), before pooling
    a, rest = a3, lambda a: dense(a.mean((1, 2)))
  else:  # features_1's module output: its conv, before the ReLU
    a = a2
    rest = lambda a: dense(jax.nn.relu(_conv(_pool(jax.nn.relu(a)), bb['features_2'])).mean((1, 2)))
  logits = rest(a)
  top = jnp.argmax(logits, -1)
  grads = jax.grad(lambda a: jnp.sum(rest(a)[jnp.arange(len(top)), top]))(a)
  weights = np.asarray(grads.mean((1, 2)))
  cam = np.maximum(np.einsum('nhwc,nc->nhw', np.asarray(a, np.float64), weights), 0)
  cam = cam / cam.max(axis=(1, 2), keepdims=True)

  result = gradcam.grad_cam(model, variables, x, layer)
  np.testing.assert_array_equal(np.asarray(result.target), np.asarray(top))
  np.testing.assert_allclose(np.asarray(result.features), np.asarray(a), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(result.weights), weights, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(result.cam), cam, atol=1e-5)
  np.testing.assert_allclose(np.asarray(result.heatmap), _bilinear_up(cam, 28), atol=1e-5)


def test_default_layer_of_mobilenet_v2_is_features_18():
  config = smoke.get_config()
  config.model.name = 'mobilenet_v2'
  config.model.width_mult = 0.25
  config.model.cifar_stem = True
  model = create_model(config, 10)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  # Random values in init's shapes (model.init itself takes ~15 s on a loaded 2-core CPU).
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.0, s.shape).astype(np.float32) if len(s.shape) <= 1
                           else rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
  # Forward only (a MobileNetV2 backward compiles slowly on CPU): the two captures are one tensor.
  capture = jax.jit(lambda v, x: (
      gradcam._apply_capturing(model, v, x, gradcam.layer_path(None), None),
      gradcam._apply_capturing(model, v, x, gradcam.layer_path('features_18'), None)[1],
      model.apply(v, x, train=False)))
  (logits, default), named, plain = capture(variables, x)
  assert default.shape == (2, 2, 2, 1280)  # the 320->1280 conv's map, 16 px / 8
  np.testing.assert_array_equal(np.asarray(default), np.asarray(named))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), rtol=1e-6)  # capturing changes nothing


def test_unknown_layer_names_the_backbone_blocks():
  model, variables, x = _lightcnn()
  with pytest.raises(ValueError, match='features_0, features_1, features_2'):
    gradcam.grad_cam(model, variables, x, 'features_9')


def test_few_per_class_takes_the_first_of_each_class_then_the_second():
  labels = np.array([2, 0, 0, 1, 2, 1, 0, 2])
  assert gradcam.few_per_class(labels, 5).tolist() == [1, 3, 0, 2, 5]
  assert gradcam.few_per_class(labels, 100).tolist() == [1, 3, 0, 2, 5, 4, 6, 7]


def test_cli_writes_the_grid_and_heatmaps_of_a_trained_run(tmp_path, tfds_dir, shared_data_dir):
  c = smoke.get_config()
  c.data.tfds_dir = str(tfds_dir)
  c.data.source = str(shared_data_dir)
  c.data.train_subset = 320
  c.data.val_fraction = 0.01
  c.train.batch_size = 32
  c.train.max_steps = 4
  c.train.monitor_every_steps = 0
  workdir = tmp_path / 'run'
  train.train_and_evaluate(c, str(workdir))
  assert gradcam.main([str(workdir), '--images=12', '--split=test']) == 0
  png = workdir / 'gradcam' / 'gradcam_test_backbone.png'
  assert png.stat().st_size > 0
  saved = np.load(png.with_suffix('.npz'))
  run = landscape.load_run(workdir)
  labels = run.splits.test.labels
  assert saved['indices'].tolist() == gradcam.few_per_class(labels, 12).tolist()
  assert sorted(set(saved['labels'][:10].tolist())) == list(range(10))  # one of each class first
  logits = run.model.apply(run.variables, run.preprocess(run.splits.test.images[saved['indices']]),
                           train=False)
  np.testing.assert_array_equal(saved['predicted'], np.argmax(np.asarray(logits), -1))
  assert saved['heatmap'].shape == (12, 28, 28)
  assert saved['heatmap'].min() >= 0 and saved['heatmap'].max() <= 1
