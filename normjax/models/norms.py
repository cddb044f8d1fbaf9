"""Normalization layers and the `make_norm(name)` factory that blocks take as a partial.

Every norm works on 2D (N, C) and 4D (N, H, W, C) inputs with channels last,
computes its statistics in float32 (also under bfloat16 compute) and casts the
output to `dtype`.
"""
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax import registry
from normjax.errors import ConfigError

ModuleDef = Callable[..., nn.Module]

BN_MOMENTUM = 0.9  # torch BatchNorm momentum 0.1 (torch weights the new value, flax the old)
BN_EPSILON = 1e-5  # torch BatchNorm eps
LN_EPSILON = 1e-5  # torch LayerNorm eps
GN_EPSILON = 1e-5  # torch GroupNorm eps
FRN_EPSILON = 1e-6  # Singh & Krishnan 2020: eps = 1e-6
FRN_LEARNED_EPS_INIT = 1e-4  # Singh & Krishnan 2020: learned eps_l initialised to 1e-4


class Identity(nn.Module):
  """The `none` norm: a no-op with the same call signature."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return x


class BatchNorm(nn.Module):
  """BatchNorm that matches torch's `BatchNorm1d/2d` exactly.

  Train mode normalizes with the biased batch variance but, like torch, the
  running variance tracks the unbiased one (times n/(n-1)); flax's
  `nn.BatchNorm` tracks the biased one, which drifts from ported torch stats.
  Statistics reduce over all axes but the last. Under `jit` with a sharded
  batch, GSPMD makes the mean global, so no `axis_name` is needed. Variable
  names match `nn.BatchNorm`: params {scale, bias}, batch_stats {mean, var}.
  """
  use_running_average: bool
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    scale = self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)

    if self.use_running_average:
      x32 = x.astype(jnp.float32)
      y = (x32 - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
      y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
      return y.astype(self.dtype)
    n = x.size // features
    if n < 2:
      # torch raises too: an unbiased variance needs two values per channel.
      raise ValueError(f'BatchNorm in train mode needs more than 1 value per channel, got '
                       f'input shape {x.shape}')
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = (self.momentum * ra_var.value
                      + (1.0 - self.momentum) * var * (n / (n - 1)))
    return y.astype(self.dtype)


def _batch_norm_train(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray,
                      epsilon: float) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Float32 (y, batch mean, biased batch variance), reducing over all axes but the last."""
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=axes)
  var = jnp.mean(jnp.square(x32 - mean), axis=axes)  # two-pass: no cancellation
  # x + (-mean) is bitwise x - mean, but a different HLO op: see _batch_norm_train_bwd.
  y = (x32 + (-mean)) * jax.lax.rsqrt(var + epsilon)
  return y * scale.astype(jnp.float32) + bias.astype(jnp.float32), mean, var


# Autodiff of the formula above saves full-size intermediates and runs more reductions than the
# gradient needs; the custom VJP keeps only x and per-channel values and makes two fused passes
# (sum(dy), sum(dy * xhat), then dx): 1.4-1.5x faster conv + BN + ReLU6 train layers on CPU.
#
# XLA CPU fuses a subtract into a YNNPACK reduce only when nothing else uses it; a shared
# x - mean is written out instead. Each of the two reduces over x - mean (the variance, dscale)
# therefore gets its own, while y and dx (elementwise, fused anyway) use x + (-mean). With one
# shared x - mean, that full-size buffer lived from the forward to the backward of every BN:
# a third of a MobileNetV2 train step's temp memory and page faults (benchmarks/compare.py).
batch_norm_train = jax.custom_vjp(_batch_norm_train, nondiff_argnums=(3,))


def _batch_norm_train_fwd(x, scale, bias, epsilon):
  y, mean, var = _batch_norm_train(x, scale, bias, epsilon)
  return (y, mean, var), (x, scale, bias, mean, var)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
  x, scale, bias, mean, var = residuals
  dy, dmean, dvar = (c.astype(jnp.float32) for c in cotangents)
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  rstd = jax.lax.rsqrt(var + epsilon)
  x32 = x.astype(jnp.float32)
  dbias = jnp.sum(dy, axis=axes)
  # The barrier keeps XLA from merging this x - mean with the forward variance's.
  dscale = jnp.sum(dy * (x32 - jax.lax.optimization_barrier(mean)), axis=axes) * rstd
  xc = x32 + (-mean)
  # d/dx of y = xhat * scale + bias, with xhat's mean and variance depending on x, plus the
  # terms from the mean and variance outputs (the running statistics; zero in a train step).
  dx = (scale.astype(jnp.float32) * rstd) * (dy - dbias / n - xc * (rstd * dscale / n))
  dx = dx + dmean / n + dvar * (2.0 / n) * xc
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class FRN(nn.Module):
  """Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan, CVPR 2020).

  y = scale * x / sqrt(nu2 + eps) + bias;  z = max(y, tau)  (the paper's Eq. 1-3).
  For 4D (N, H, W, C) inputs nu2 = mean(x^2) over H, W per channel, as in the paper.
  For 2D (N, C) inputs (the study's head) `dense` chooses nu2:
    'features': mean(x^2) over the C features of each example. This is the study's custom
      layer as its report describes it (nu2 over "the feature axes"), and what the study
      configs use, so their numbers compare with the study's.
    'unit': x^2 of each unit alone, the paper's reading of a fully connected layer (N = 1
      spatial position). FRN then nears sign(x), so the paper prescribes a learned eps
      there (Sec. 3, "Learned epsilon"), which 'unit' always uses.
  With `learned_epsilon`, eps = 1e-6 + |eps_l| with a learned scalar eps_l (init 1e-4).
  """
  learned_epsilon: bool = False
  dense: str = 'features'
  epsilon: float = FRN_EPSILON
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim not in (2, 4):
      raise ValueError(f'FRN expects a 2D (N, C) or 4D (N, H, W, C) input, got shape {x.shape}')
    if self.dense not in registry.FRN_DENSE_MODES:
      raise ConfigError(f'model.frn_dense = {self.dense!r}; '
                        f'allowed: {", ".join(registry.FRN_DENSE_MODES)}')
    per_unit = x.ndim == 2 and self.dense == 'unit'
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    tau = self.param('tau', nn.initializers.zeros, (features,), self.param_dtype)
    eps = jnp.float32(self.epsilon)
    if self.learned_epsilon or per_unit:
      eps_l = self.param('eps', nn.initializers.constant(FRN_LEARNED_EPS_INIT), (),
                         self.param_dtype)
      eps = eps + jnp.abs(eps_l.astype(jnp.float32))

    x32 = x.astype(jnp.float32)
    if per_unit:
      nu2 = jnp.square(x32)
    else:
      nu2 = jnp.mean(jnp.square(x32), axis=(1,) if x.ndim == 2 else (1, 2), keepdims=True)
    y = scale.astype(jnp.float32) * x32 * jax.lax.rsqrt(nu2 + eps) + bias.astype(jnp.float32)
    return jnp.maximum(y, tau.astype(jnp.float32)).astype(self.dtype)


class GroupNorm(nn.GroupNorm):
  """`nn.GroupNorm` (Wu & He 2018) with an error that names the config field.

  Groups split the last axis; statistics reduce over the group and H, W (4D)
  or over the group's features (2D).
  """

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.shape[-1] % self.num_groups:
      raise ConfigError(f'model.gn_groups={self.num_groups} does not divide the number of '
                       f'channels {x.shape[-1]} (input shape {x.shape})')
    return super().__call__(x)


def make_norm(name: str, *, train: bool, dtype: Any = jnp.float32, gn_groups: int = 32,
              frn_learned_eps: bool = False, frn_dense: str = 'features') -> ModuleDef:
  """Returns a partial Module class; call it as `norm(name='bn')(x)`."""
  if name == 'bn':
    return functools.partial(BatchNorm, use_running_average=not train, dtype=dtype)
  if name == 'ln':
    return functools.partial(nn.LayerNorm, epsilon=LN_EPSILON, dtype=dtype,
                             use_fast_variance=False)
  if name == 'gn':
    return functools.partial(GroupNorm, num_groups=gn_groups, epsilon=GN_EPSILON, dtype=dtype,
                             use_fast_variance=False)
  if name == 'frn':
    return functools.partial(FRN, learned_epsilon=frn_learned_eps, dense=frn_dense, dtype=dtype)
  if name == 'none':
    return Identity
  raise ConfigError(f'norm: unknown name {name!r}; allowed: {", ".join(registry.NORMS)}')
