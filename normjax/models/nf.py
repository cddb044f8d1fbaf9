"""Normalizer-free (NF) MobileNetV2: Scaled WS convs, gamma-scaled activations, analytic beta.

Follows Brock, De, Smith, ICLR 2021 ("Characterizing signal propagation to close
the performance gap in unnormalized ResNets") and Brock, De, Smith, Simonyan,
ICML 2021 (NFNets), matching DeepMind's reference (deepmind-research/nfnets:
base.py `WSConv2D` / `nonlinearities`, nf_regnet.py `NFBlock` bookkeeping).
Without BatchNorm, signal variance is kept at ~1 by construction instead:
- Scaled Weight Standardization makes every conv variance-preserving at init;
- each activation is multiplied by gamma = 1 / std(act(z)), z ~ N(0, 1);
- a residual block computes h + alpha * f(h / beta), beta = sqrt(Var[h]) tracked
  analytically, so each branch sees unit-variance input and adds alpha^2.
MobileNetV2's transition blocks (stride 2 or a channel change) have no residual,
so their output f(h / beta) has unit variance again: the expected variance resets.
The classifier on these features (models/heads.py) starts at zero under model.head_init=zeros,
the NF scratch configs' default, as the reference's does (nfnets/nfnet.py:
`hk.Linear(num_classes, w_init=jnp.zeros)`).
"""
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from normjax.models import common
from normjax.models.depthwise import depthwise_conv2d
from normjax.models.mobilenet_v2 import (NUM_BLOCKS, STEM_CHANNELS, BlockSpec, block_specs, has_residual,
                                         last_channels, make_divisible, stem_stride)

# Variance-preserving gains: gamma = 1 / std(act(z)) for z ~ N(0, 1).
ACTIVATION_GAMMAS = {
    'identity': 1.0,
    'relu': 1.7139588594436646,   # deepmind-research nfnets/base.py nonlinearities['relu']
    'relu6': 1.7131484746932983,  # deepmind-research nfnets/base.py nonlinearities['relu6']
    'gelu': 1.7015043497085571,   # deepmind-research nfnets/base.py nonlinearities['gelu']
    'silu': 1.7881293296813965,   # deepmind-research nfnets/base.py nonlinearities['silu']
}
ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    'identity': lambda x: x,
    'relu': jax.nn.relu,
    'relu6': jax.nn.relu6,
    'gelu': jax.nn.gelu,
    'silu': jax.nn.silu,
}
WS_EPS = 1e-4  # deepmind-research nfnets/base.py WSConv2D.standardize_weight: floor on fan_in * var
ALPHA = 0.2  # NFNets (Brock et al. 2021): residual branch scale alpha = 0.2


def scaled_activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """act(x) * gamma, the variance-preserving activation used inside NF networks."""
  if name not in ACTIVATION_GAMMAS:
    raise ValueError(f'scaled_activation: unknown name {name!r}; '
                     f'allowed: {", ".join(ACTIVATION_GAMMAS)}')
  fn, gamma = ACTIVATIONS[name], ACTIVATION_GAMMAS[name]
  return lambda x: fn(x) * jnp.asarray(gamma, x.dtype)


def estimate_gamma(fn: Callable[[jnp.ndarray], jnp.ndarray], num_samples: int = 2**20,
                   seed: int = 0) -> float:
  """1 / std(fn(z)) for z ~ N(0, 1), by sampling, as Brock et al. (ICLR 2021) derive gammas."""
  z = jax.random.normal(jax.random.key(seed), (num_samples,), jnp.float32)
  return float(lax.rsqrt(jnp.var(fn(z))))


def standardize_weight(kernel: jnp.ndarray, gain: jnp.ndarray, eps: float = WS_EPS) -> jnp.ndarray:
  """Scaled WS: (w - mean) * gain / sqrt(fan_in * var), moments over all axes but the last (HWI).

  As in the reference, fan_in * var is floored at `eps`, so a constant kernel
  (var = 0) gives a finite, zero-mean weight instead of NaN.
  """
  axes = tuple(range(kernel.ndim - 1))
  mean = jnp.mean(kernel, axis=axes, keepdims=True)
  var = jnp.var(kernel, axis=axes, keepdims=True)
  fan_in = math.prod(kernel.shape[:-1])
  scale = lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
  return kernel * scale - mean * scale


class WSConv(nn.Module):
  """Conv2D with Scaled Weight Standardization, a learned per-channel gain and a bias.

  Torch-style explicit padding (k - 1) // 2. A depthwise conv
  (feature_group_count == input channels == features) has kernel (k, k, 1, C),
  fan_in = k * k, and runs through `depthwise_conv2d` (fast on CPU); a stride-1
  1x1 conv runs as a matmul.
  """
  features: int
  kernel_size: int = 1
  strides: int = 1
  feature_group_count: int = 1
  use_bias: bool = True  # the reference always adds a bias (nfnets/base.py WSConv2D)
  eps: float = WS_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    in_ch, groups, k = x.shape[-1], self.feature_group_count, self.kernel_size
    if in_ch % groups or self.features % groups:
      raise ValueError(f'WSConv: feature_group_count={groups} must divide input channels {in_ch} '
                       f'and features {self.features}')
    # Fan-in scaled normal init as in the reference; WS makes the result insensitive to it.
    kernel = self.param('kernel', nn.initializers.variance_scaling(1.0, 'fan_in', 'normal'),
                        (k, k, in_ch // groups, self.features), jnp.float32)
    gain = self.param('gain', nn.initializers.ones, (self.features,), jnp.float32)
    w = standardize_weight(kernel, gain, self.eps)
    x, w = nn.dtypes.promote_dtype(x, w, dtype=self.dtype)
    pad = (k - 1) // 2
    if groups > 1 and groups == in_ch == self.features:
      y = depthwise_conv2d(x, w, stride=self.strides, padding=pad)
    elif k == 1 and groups == 1 and self.strides == 1:
      # A matmul over channels: XLA:CPU runs a 1x1 conv's kernel gradient as a slow generic conv.
      y = lax.dot_general(x, w[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
    else:
      y = lax.conv_general_dilated(x, w, window_strides=(self.strides, self.strides),
                                   padding=((pad, pad), (pad, pad)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   feature_group_count=groups)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(y.dtype)
    return y


def expected_input_variances(specs: Sequence[BlockSpec], alpha: float = ALPHA) -> list[float]:
  """Analytic Var[h] at the input of each block at init (the block's beta is its sqrt).

  The stem emits unit variance. A transition block outputs f(h / beta), unit
  variance again (reset); a residual block adds alpha^2 (its branch has unit variance).
  Unlike NF-ResNets (nf_regnet.py keeps 1 + alpha^2 after a transition: its
  shortcut conv plus branch), MobileNetV2 transitions have no shortcut to add to.
  """
  var, out = 1.0, []
  for spec in specs:
    out.append(var)
    var = var + alpha**2 if has_residual(spec) else 1.0
  return out


class NFConvAct(nn.Module):
  """WSConv -> gamma * relu6: MobileNetV2's stem (features_0) and last conv (features_18)."""
  features: int
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = WSConv(self.features, self.kernel_size, self.strides, dtype=self.dtype, name='conv')(x)
    return scaled_activation('relu6')(x)


class NFInvertedResidual(nn.Module):
  """NF inverted residual: h + alpha * f(h / beta), or f(h / beta) for a transition block.

  f = [expand 1x1 -> gamma*relu6] -> depthwise 3x3 -> gamma*relu6 -> project 1x1
  (linear bottleneck), all WSConv; expand_ratio 1 skips the expand conv.
  skip_gain multiplies the branch by a learned scalar initialised at 0 (SkipInit,
  De & Smith 2020; nfnets `skip_gain`), so each residual block starts as identity.
  """
  spec: BlockSpec
  beta: float
  alpha: float = ALPHA
  skip_gain: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    spec = self.spec
    if x.shape[-1] != spec.in_channels:
      raise ValueError(f'NFInvertedResidual {spec.index}: expects {spec.in_channels} input '
                       f'channels, got {x.shape[-1]}')
    act = scaled_activation('relu6')
    hidden = spec.in_channels * spec.expand_ratio
    out = x * jnp.asarray(1.0 / self.beta, x.dtype)
    if spec.expand_ratio != 1:
      out = act(WSConv(hidden, 1, dtype=self.dtype, name='expand')(out))
    out = WSConv(hidden, 3, spec.stride, feature_group_count=hidden, dtype=self.dtype,
                 name='depthwise')(out)
    out = WSConv(spec.out_channels, 1, dtype=self.dtype, name='project')(act(out))
    if not has_residual(spec):
      return out
    if self.skip_gain:
      out = out * self.param('skip_gain', nn.initializers.zeros, (), jnp.float32).astype(out.dtype)
    return x + jnp.asarray(self.alpha, out.dtype) * out


class NFMobileNetV2Features(nn.Module):
  """MobileNetV2 (torchvision topology) with every BN removed and NF signal propagation instead.

  Blocks: features_0 stem (3x3 WSConv, gamma*relu6), features_1..17 NF inverted
  residuals, features_18 1x1 WSConv to last_channels + gamma*relu6. No batch_stats.
  """
  width_mult: float = 1.0
  cifar_stem: bool = False
  trainable_blocks: int = -1
  alpha: float = ALPHA
  skip_gain: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    del train  # no train-dependent layers: the frozen prefix needs no eval mode either
    specs = block_specs(self.width_mult, self.cifar_stem)
    first_trainable = common.first_trainable(NUM_BLOCKS, self.trainable_blocks)

    def freeze(index: int, y: jnp.ndarray) -> jnp.ndarray:
      # Cutting the gradient after the last frozen block skips the whole frozen backward pass.
      return lax.stop_gradient(y) if index + 1 == first_trainable else y

    x = x.astype(self.dtype)
    x = NFConvAct(make_divisible(STEM_CHANNELS * self.width_mult), 3, stem_stride(self.cifar_stem),
                  dtype=self.dtype, name=common.block_name(0))(x)
    x = freeze(0, x)
    for spec, var in zip(specs, expected_input_variances(specs, self.alpha)):
      x = NFInvertedResidual(spec, beta=math.sqrt(var), alpha=self.alpha, skip_gain=self.skip_gain,
                             dtype=self.dtype, name=common.block_name(spec.index))(x)
      x = freeze(spec.index, x)
    last = NUM_BLOCKS - 1
    x = NFConvAct(last_channels(self.width_mult), 1, dtype=self.dtype, name=common.block_name(last))(x)
    return freeze(last, x)
