"""MobileNetV2 in Flax, laid out like torchvision's `mobilenet_v2` so its weights port 1:1.

Module names mirror torchvision's state_dict keys with '.' -> '_' on sequential
indices: `features.0.0.weight` is params['features_0']['0']['kernel'],
`features.2.conv.1.1.running_var` is batch_stats['features_2']['conv_1']['1']['var'].
Convs use explicit symmetric padding (k-1)//2 like torch; 'SAME' would pad
stride-2 convs asymmetrically and break ported weights.
"""
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax import registry
from normjax.errors import ConfigError
from normjax.models import common
from normjax.models.classifier import Classifier
from normjax.models.depthwise import DepthwiseConv
from normjax.models.matmul import matmul
from normjax.models.heads import LinearHead, NormFactory
from normjax.models.norms import ModuleDef, make_norm

# torchvision/models/mobilenetv2.py: inverted_residual_setting (t, c, n, s).
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32  # torchvision: input_channel = 32
LAST_CHANNELS = 1280  # torchvision: last_channel = 1280
NUM_BLOCKS = 19  # torchvision features.0 .. features.18
# torchvision: nn.init.kaiming_normal_(conv.weight, mode="fan_out") (untruncated normal).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
  """torchvision's `_make_divisible`: round to a multiple of `divisor`, never below 90% of `v`."""
  if min_value is None:
    min_value = divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:  # torchvision: make sure rounding down does not go down by more than 10%
    new_v += divisor
  return new_v


class BlockSpec(NamedTuple):
  index: int          # torchvision `features.<index>`
  in_channels: int
  out_channels: int
  stride: int
  expand_ratio: int


def stem_stride(cifar_stem: bool) -> int:
  return 1 if cifar_stem else 2


def block_specs(width_mult: float = 1.0, cifar_stem: bool = False) -> list[BlockSpec]:
  """The inverted-residual blocks `features.1..17`.

  cifar_stem keeps resolution early for 32x32 inputs, as common CIFAR MobileNetV2
  variants do (kuangliu/pytorch-cifar): stem stride 1 and the first stride-2 stage
  (c=24) at stride 1, so 32x32 inputs end at 4x4 instead of 1x1.
  """
  in_ch = make_divisible(STEM_CHANNELS * width_mult)
  specs, index = [], 1
  for stage, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTINGS):
    out_ch = make_divisible(c * width_mult)
    if cifar_stem and stage == 1:
      s = 1
    for i in range(n):
      specs.append(BlockSpec(index, in_ch, out_ch, s if i == 0 else 1, t))
      in_ch, index = out_ch, index + 1
  return specs


def last_channels(width_mult: float = 1.0) -> int:
  """torchvision: the last conv widens only for width_mult > 1."""
  return make_divisible(LAST_CHANNELS * max(1.0, width_mult))


class PointwiseConv(nn.Module):
  """A bias-free 1x1 conv as a (N*H*W, I) x (I, O) matmul; 'kernel' (1, 1, I, O) as in flax Conv.

  On CPU XLA runs the matmul and both its gradients as GEMMs, while a 1x1
  convolution's gradients go through slower generic convolution code. gemm_dtype=bfloat16 gives
  the three GEMMs bf16 operands with float32 accumulation (normjax/models/matmul.py), whatever
  the activations' dtype.
  """
  features: int
  dtype: Any = jnp.float32
  gemm_dtype: Any = None
  kernel_init: Callable[..., jnp.ndarray] = conv_init

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    gemm = self.gemm_dtype
    if gemm is None and jnp.dtype(self.dtype) != jnp.float32:
      gemm = self.dtype  # a 16-bit compute dtype: its GEMMs, forward and backward, reach the bf16 kernel
    y = matmul(x.reshape(-1, x.shape[-1]), kernel[0, 0], gemm)
    return y.reshape(*x.shape[:-1], self.features)


class PatchConv(nn.Module):
  """A bias-free kxk conv as one GEMM over its input patches (im2col); 'kernel' as in flax Conv.

  For the stem (3 input channels) on CPU: XLA CPU's convolution takes 59 ms for the forward of a
  batch of 64 at 224 px, the patches and a GEMM 34 ms (forward and kernel gradient: 108 against
  46 ms); the online study step runs 1.10x as fast, eval at 224 px 1.18x, the full 224 px train
  step 1.03x, the CIFAR stem 1.00x (benchmarks/compare.py's docstring). The patches take k*k
  times the input's memory, which for 3 channels is less than the conv's output.
  """
  features: int
  kernel_size: int
  strides: int
  padding: int
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jnp.ndarray] = conv_init

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k, s, p = self.kernel_size, self.strides, self.padding
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    n, h, w, c = x.shape
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    # Channel index (i * k + j) * c + ci matches the HWIO kernel reshaped to (k * k * c, O).
    patches = jnp.concatenate([xp[:, i:i + (ho - 1) * s + 1:s, j:j + (wo - 1) * s + 1:s, :]
                               for i in range(k) for j in range(k)], axis=-1)
    y = patches.reshape(-1, k * k * c) @ kernel.reshape(k * k * c, self.features)
    return y.reshape(n, ho, wo, self.features)


class ConvNormAct(nn.Module):
  """torchvision's Conv2dNormActivation with ReLU6: conv '0' (no bias), norm '1'.

  The conv: PointwiseConv (1x1), DepthwiseConv, else (the stem) PatchConv on CPU and flax's Conv
  elsewhere.
  """
  features: int
  kernel_size: int
  norm: ModuleDef
  strides: int = 1
  depthwise: bool = False
  dtype: Any = jnp.float32
  gemm_dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    pad = (self.kernel_size - 1) // 2  # torchvision: padding = (kernel_size - 1) // 2
    if self.kernel_size == 1 and self.strides == 1:
      x = PointwiseConv(self.features, dtype=self.dtype, gemm_dtype=self.gemm_dtype, name='0')(x)
    elif self.depthwise:
      x = DepthwiseConv(self.features, self.kernel_size, self.strides, pad, dtype=self.dtype,
                        kernel_init=conv_init, name='0')(x)
    elif jax.default_backend() == 'cpu':
      x = PatchConv(self.features, self.kernel_size, self.strides, pad, dtype=self.dtype, name='0')(x)
    else:
      x = nn.Conv(self.features, (self.kernel_size, self.kernel_size), self.strides,
                  padding=((pad, pad), (pad, pad)), use_bias=False, dtype=self.dtype,
                  kernel_init=conv_init, name='0')(x)
    x = self.norm(name='1')(x)
    return nn.relu6(x)


class InvertedResidual(nn.Module):
  """torchvision's InvertedResidual; submodule `conv_<m>` is torchvision's `conv.<m>`."""
  spec: BlockSpec
  norm: ModuleDef
  dtype: Any = jnp.float32
  gemm_dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    s = self.spec
    hidden = int(round(s.in_channels * s.expand_ratio))  # torchvision: hidden_dim
    y, m = x, 0
    if s.expand_ratio != 1:
      y = ConvNormAct(hidden, 1, self.norm, dtype=self.dtype, gemm_dtype=self.gemm_dtype,
                      name='conv_0')(y)
      m = 1
    y = ConvNormAct(hidden, 3, self.norm, strides=s.stride, depthwise=True, dtype=self.dtype,
                    name=f'conv_{m}')(y)
    y = PointwiseConv(s.out_channels, dtype=self.dtype, gemm_dtype=self.gemm_dtype,
                      name=f'conv_{m + 1}')(y)
    y = self.norm(name=f'conv_{m + 2}')(y)
    if has_residual(s):
      y = x + y
    return y


def has_residual(spec: BlockSpec) -> bool:
  """torchvision: use_res_connect = stride == 1 and inp == oup."""
  return spec.stride == 1 and spec.in_channels == spec.out_channels


class MobileNetV2Features(nn.Module):
  """torchvision's `MobileNetV2.features`: returns the NHWC map after features_18 (no pooling).

  `norm(train=...)` must return a ModuleDef, e.g. functools.partial(make_norm, 'bn').
  Blocks before the first trainable one are frozen: their output is wrapped in
  stop_gradient, so they get zero gradients and cost no backward pass. With
  frozen_bn='eval' their norms use running statistics and never change them; with
  'train' they normalise with batch statistics and update the running ones, which is
  torch's `model.train()` with `requires_grad=False` (the study's setting).

  `start`/`stop` run only blocks features_<start>..features_<stop - 1>: the frozen-feature
  cache computes the frozen prefix once (stop=first trainable block) and trains the rest
  from it (start=first trainable block).
  """
  norm: NormFactory
  width_mult: float = 1.0
  cifar_stem: bool = False
  trainable_blocks: int = -1
  frozen_bn: str = 'eval'
  dtype: Any = jnp.float32
  gemm_dtype: Any = None  # the 1x1 convs' GEMM operands; None: dtype (PointwiseConv)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool, start: int = 0,
               stop: int = NUM_BLOCKS) -> jnp.ndarray:
    first = common.first_trainable(NUM_BLOCKS, self.trainable_blocks)
    if self.frozen_bn not in registry.FROZEN_BN_MODES:
      raise ConfigError(f'model.frozen_bn = {self.frozen_bn!r}; '
                        f'allowed: {", ".join(registry.FROZEN_BN_MODES)}')
    norm = lambda i: self.norm(train=train and (i >= first or self.frozen_bn == 'train'))
    last = NUM_BLOCKS - 1
    blocks = [ConvNormAct(make_divisible(STEM_CHANNELS * self.width_mult), 3, norm(0),
                          strides=stem_stride(self.cifar_stem), dtype=self.dtype,
                          name=common.block_name(0))]
    blocks += [InvertedResidual(spec, norm(spec.index), dtype=self.dtype, gemm_dtype=self.gemm_dtype,
                                name=common.block_name(spec.index))
               for spec in block_specs(self.width_mult, self.cifar_stem)]
    blocks.append(ConvNormAct(last_channels(self.width_mult), 1, norm(last), dtype=self.dtype,
                              gemm_dtype=self.gemm_dtype, name=common.block_name(last)))
    for i in range(start, stop):
      x = blocks[i](x)
      if i == first - 1:
        x = jax.lax.stop_gradient(x)
    return x


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0,
                 norm: NormFactory | None = None,
                 dtype: Any = jnp.float32) -> Classifier:
  """torchvision's ImageNet `mobilenet_v2`: features, global average pool, Dropout(0.2) + Linear."""
  if norm is None:
    norm = functools.partial(make_norm, 'bn', dtype=dtype)
  return Classifier(backbone=MobileNetV2Features(norm=norm, width_mult=width_mult, dtype=dtype),
                    head=LinearHead(num_classes, dtype=dtype))
