"""Depthwise 2D convolution that is fast on CPU.

XLA's CPU backend lowers a grouped convolution with feature_group_count=C to a
slow generic loop (~10x slower than the dense equivalent per FLOP). A 3x3
depthwise conv is only 9 per-channel multiply-adds, so on CPU we write it as a
sum of shifted, strided slices of the padded input, which XLA fuses into one
elementwise loop (and whose gradient is again a fused loop plus 9 reductions).
On accelerators the native grouped convolution is used.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def depthwise_conv2d_xla(x: jnp.ndarray, kernel: jnp.ndarray, *, stride: int,
                         padding: int) -> jnp.ndarray:
  """Depthwise conv as lax.conv_general_dilated with feature_group_count=C.

  Args:
    x: (N, H, W, C) input.
    kernel: (kh, kw, 1, C), flax's HWIO layout for a grouped conv.
    stride: the same stride along H and W.
    padding: zeros added on every side of H and W (torch `padding=`).
  """
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1])


def depthwise_conv2d_taps(x: jnp.ndarray, kernel: jnp.ndarray, *, stride: int,
                          padding: int) -> jnp.ndarray:
  """Depthwise conv as kh*kw shifted multiply-adds; same arguments as `depthwise_conv2d_xla`."""
  kh, kw, _, c = kernel.shape
  if x.shape[-1] != c or kernel.shape[2] != 1:
    raise ValueError(f'depthwise_conv2d: input {x.shape} needs kernel (kh, kw, 1, {x.shape[-1]}), '
                     f'got {kernel.shape}')
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  n, hp, wp, _ = xp.shape
  ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
  # Accumulate in at least float32 (as XLA's conv does) so bfloat16 loses no precision.
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  y = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(xp, (0, i, j, 0),
                      (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                      (1, stride, stride, 1))
      term = tap.astype(acc_dtype) * kernel[i, j, 0].astype(acc_dtype)
      y = term if y is None else y + term
  return y.astype(jnp.result_type(x.dtype, kernel.dtype))


def depthwise_conv2d(x: jnp.ndarray, kernel: jnp.ndarray, *, stride: int,
                     padding: int) -> jnp.ndarray:
  """Depthwise conv: shifted multiply-adds on CPU, the grouped XLA conv elsewhere."""
  if jax.default_backend() == 'cpu':
    return depthwise_conv2d_taps(x, kernel, stride=stride, padding=padding)
  return depthwise_conv2d_xla(x, kernel, stride=stride, padding=padding)


class DepthwiseConv(nn.Module):
  """A bias-free depthwise conv; its 'kernel' (k, k, 1, C) matches flax Conv(feature_group_count=C)."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: int = 1
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jnp.ndarray] = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.shape[-1] != self.features:
      raise ValueError(f'DepthwiseConv({self.features}) got {x.shape[-1]} input channels')
    kernel = self.param('kernel', self.kernel_init,
                        (self.kernel_size, self.kernel_size, 1, self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return depthwise_conv2d(x, kernel, stride=self.strides, padding=self.padding)
