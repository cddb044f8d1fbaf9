"""normjax.signal_propagation: SPP statistics, NF vs plain MobileNetV2 at init, and the plot."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax.models.mobilenet_v2 import MobileNetV2Features
from normjax.models.nf import ACTIVATION_GAMMAS, NFMobileNetV2Features
from normjax.models.norms import make_norm
from normjax.signal_propagation import plot_signal_propagation, signal_propagation

# gamma * E[relu6(z)] ~= gamma / sqrt(2 pi) (P(z > 6) ~ 1e-9): squared mean after gamma*relu6.
RELU6_SQ_MEAN = (ACTIVATION_GAMMAS['relu6'] / math.sqrt(2 * math.pi)) ** 2  # 0.467


def _spp(model, x):
  # Init runs once: skipping LLVM optimization halves its compile time.
  init = jax.jit(functools.partial(model.init, train=False),
                 compiler_options={'xla_backend_optimization_level': 0})
  return signal_propagation(model, init(jax.random.key(1), x), x)


@pytest.fixture(scope='module')
def spps():
  """SPPs at init on a unit-Gaussian batch of 16 at 32x32; width 0.5, cifar stem (ends at 4x4)."""
  x = np.random.default_rng(0).standard_normal((16, 32, 32, 3)).astype(np.float32)
  nf_net = NFMobileNetV2Features(width_mult=0.5, cifar_stem=True)
  # Same topology, no norm and no NF scaling: the BN network with norm 'none' (torchvision init).
  plain = MobileNetV2Features(norm=functools.partial(make_norm, 'none'), width_mult=0.5,
                              cifar_stem=True)
  return {'nf': _spp(nf_net, x), 'plain': _spp(plain, x)}


def test_nf_keeps_average_channel_variance_near_one(spps):
  stats = spps['nf']
  assert [s['block'] for s in stats] == [f'features_{i}' for i in range(19)]
  # Analytic Var at init is 1 .. 1 + 3 alpha^2 = 1.12 (nf.expected_input_variances). Allow a
  # factor 2 either way for finite width (8-160 channels), zero padding on 4x4-8x8 maps and a
  # 16-image batch; a plain net misses this by many orders of magnitude.
  variances = [s['avg_var'] for s in stats]
  assert all(0.5 <= v <= 2.0 for v in variances), variances
  # After gamma*relu6 (stem and last conv) the mean is analytic; residual streams stay centred.
  for i in (0, 18):
    assert stats[i]['avg_sq_mean'] == pytest.approx(RELU6_SQ_MEAN, rel=0.15)
  assert all(s['avg_sq_mean'] < 0.1 for s in stats[1:18]), stats


def test_plain_net_variance_collapses(spps):
  variances = [s['avg_var'] for s in spps['plain']]
  assert len(variances) == 19
  # Without normalization the variance shrinks at every stage: ~1e-16 by features_18.
  assert variances[-1] < 1e-6 * variances[0], variances
  assert variances[-1] < 1e-6, variances


class _Scale(nn.Module):
  factor: float

  @nn.compact
  def __call__(self, x):
    return self.factor * x


class _Nested(nn.Module):
  """A block whose own child is also called features_<i>: not a top-level block."""

  @nn.compact
  def __call__(self, x):
    return _Scale(3.0, name='features_9')(x) + 1.0


class _ToyBackbone(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = _Scale(2.0, name='features_0')(x)
    x = _Nested(name='features_1')(x)
    return nn.BatchNorm(use_running_average=not train, name='features_2')(x)


def test_statistics_match_numpy_and_batch_norm_uses_batch_stats():
  x = (0.5 + np.random.default_rng(0).standard_normal((4, 3, 3, 5))).astype(np.float32)
  model = _ToyBackbone()
  variables = model.init(jax.random.key(1), x, train=False)
  stats = signal_propagation(model, variables, x)  # train=True: BN normalizes with batch stats
  assert [s['index'] for s in stats] == [0, 1, 2]
  xn = np.asarray(x, np.float64)
  for s, y in zip(stats, (2 * xn, 6 * xn + 1)):
    assert s['avg_sq_mean'] == pytest.approx(np.mean(y.mean(axis=(0, 1, 2))**2), rel=1e-5)
    assert s['avg_var'] == pytest.approx(np.mean(y.var(axis=(0, 1, 2))), rel=1e-5)
  assert stats[2]['avg_sq_mean'] < 1e-10
  assert stats[2]['avg_var'] == pytest.approx(1.0, abs=1e-3)  # minus BN's epsilon
  # Eval mode uses the running statistics (mean 0, var 1 at init): BN passes 6x + 1 through.
  eval_stats = signal_propagation(model, variables, x, train=False)
  assert eval_stats[2]['avg_var'] == pytest.approx(stats[1]['avg_var'], rel=1e-4)


class _NoBlocks(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(3, name='dense')(x)


def test_module_without_blocks_raises():
  model, x = _NoBlocks(), jnp.ones((1, 2))
  with pytest.raises(ValueError, match='_NoBlocks has no features_<i> blocks'):
    signal_propagation(model, model.init(jax.random.key(0), x, train=False), x)


def test_plot_writes_png(spps, tmp_path):
  path = tmp_path / 'spp.png'
  plot_signal_propagation(spps, str(path))
  data = path.read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n'
  assert len(data) > 10_000
  with pytest.raises(ValueError, match='no networks to plot'):
    plot_signal_propagation({}, str(tmp_path / 'empty.png'))
