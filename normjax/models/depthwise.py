"""Depthwise 2D convolution that is fast on CPU.

XLA's CPU backend lowers a grouped convolution with feature_group_count=C to a
slow generic loop (~10x slower than the formulation below). A kxk depthwise conv
is k*k per-channel multiply-adds, so on CPU we write it as a sum of shifted,
strided slices of the padded input, which XLA fuses into one elementwise loop.
Its custom VJP keeps that shape: the input gradient is the same tap sum over the
stride-dilated output gradient with the flipped kernel, and the kernel gradient
is k*k reductions; autodiff of the slices would instead materialize every tap.
Faster still on CPU are normjax's C++ kernels (normjax/csrc/depthwise.cc), one pass over the
inputs for each of the forward, input gradient and kernel gradient. `depthwise_conv2d` uses them
wherever normjax.native can build them, under differentiation; a forward without a gradient stays
the tap sum, which XLA fuses with the ops around it. Without the kernels, CPU runs the tap sums
and their custom VJP. On accelerators the grouped convolution is used.
"""
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from normjax import native


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


def _tap_sum(xp: jnp.ndarray, kernel: jnp.ndarray, stride: int,
             out_hw: tuple[int, int]) -> jnp.ndarray:
  """y[:, h, w] = sum_ij xp[:, i + stride * h, j + stride * w] * kernel[i, j, 0], in xp's dtype."""
  kh, kw, _, c = kernel.shape
  n, (ho, wo) = xp.shape[0], out_hw
  y = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(xp, (0, i, j, 0),
                      (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                      (1, stride, stride, 1))
      term = tap * kernel[i, j, 0]
      y = term if y is None else y + term
  return y


def _acc_dtype(dtype: Any) -> Any:
  """Accumulate in at least float32 (as XLA's conv does), so bfloat16 loses no precision."""
  return jnp.promote_types(dtype, jnp.float32)


def _pad_hw(x: jnp.ndarray, padding: int) -> jnp.ndarray:
  return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _out_hw(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: int) -> tuple[int, int]:
  return tuple((d + 2 * padding - k) // stride + 1 for d, k in zip(x.shape[1:3], kernel.shape[:2]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_taps(x, kernel, stride, padding):
  acc = _acc_dtype(x.dtype)
  y = _tap_sum(_pad_hw(x, padding).astype(acc), kernel.astype(acc), stride,
               _out_hw(x, kernel, stride, padding))
  return y.astype(jnp.result_type(x.dtype, kernel.dtype))


def _depthwise_taps_fwd(x, kernel, stride, padding):
  return _depthwise_taps(x, kernel, stride, padding), (x, kernel)


def _depthwise_taps_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  kh, kw, _, c = kernel.shape
  n, h, w, _ = x.shape
  ho, wo = dy.shape[1:3]
  acc = _acc_dtype(dy.dtype)
  dy32 = dy.astype(acc)
  # dx[a] = sum_i dy_dilated[a + padding - i] * k[i]: dilate dy by the stride and pad it
  # so that a stride-1 tap sum with the flipped kernel yields exactly the h x w gradient.
  edges = [(k - 1 - padding, k - 1 - padding + (size + 2 * padding) - ((out - 1) * stride + k),
            stride - 1) for size, out, k in ((h, ho, kh), (w, wo, kw))]
  dyd = lax.pad(dy32, jnp.zeros((), acc), [(0, 0, 0), *edges, (0, 0, 0)])
  dx = _tap_sum(dyd, kernel[::-1, ::-1].astype(acc), 1, (h, w))
  return dx.astype(x.dtype), _kernel_grad(x, dy, kernel, stride, padding)


# Sapphire Rapids' L2 per core (2 MiB): a chunk of images whose input fits stays cached across
# the k*k tap reductions of the kernel gradient.
_KERNEL_GRAD_CHUNK_BYTES = 2 << 20


def _kernel_grad(x: jnp.ndarray, dy: jnp.ndarray, kernel: jnp.ndarray, stride: int,
                 padding: int) -> jnp.ndarray:
  """dk[i, j] = sum over n, h, w of tap_ij(x) * dy, one chunk of the batch at a time.

  Over the whole batch, XLA CPU materializes every tap (recomputing x's producer each time)
  before reducing it; a loop over batch chunks keeps each chunk's taps in cache (measured 1.7x
  faster on a 16x56x56x144 layer).
  """
  kh, kw, _, c = kernel.shape
  n, h, w, _ = x.shape
  ho, wo = dy.shape[1:3]
  acc = _acc_dtype(dy.dtype)
  image_bytes = h * w * c * jnp.dtype(acc).itemsize
  chunk = max([d for d in range(1, n + 1) if n % d == 0 and d * image_bytes <= _KERNEL_GRAD_CHUNK_BYTES],
              default=1)

  def add_chunk(step, dk):
    # Slices of the full arrays: a reshape into chunks would make XLA copy x and dy first.
    xs = lax.dynamic_slice_in_dim(x, step * chunk, chunk)
    dys = lax.dynamic_slice_in_dim(dy, step * chunk, chunk).astype(acc)
    xp = _pad_hw(xs, padding).astype(acc)
    return dk + jnp.stack([
        jnp.sum(lax.slice(xp, (0, i, j, 0),
                          (chunk, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                          (1, stride, stride, 1)) * dys, axis=(0, 1, 2))
        for i in range(kh) for j in range(kw)])

  dk = lax.fori_loop(0, n // chunk, add_chunk, jnp.zeros((kh * kw, c), acc))
  return dk.reshape(kernel.shape).astype(kernel.dtype)


_depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)


def depthwise_conv2d_taps(x: jnp.ndarray, kernel: jnp.ndarray, *, stride: int,
                          padding: int) -> jnp.ndarray:
  """Depthwise conv as k*k shifted multiply-adds (custom VJP; reverse-mode autodiff only).

  Same arguments as `depthwise_conv2d_xla`.
  """
  _check_shapes(x, kernel)
  return _depthwise_taps(x, kernel, stride, padding)


def _ffi(target: str, shape: tuple[int, ...], a: jnp.ndarray, b: jnp.ndarray, stride: int,
         padding: int) -> jnp.ndarray:
  # vmap (the loss landscape batches parameters) runs the kernel once per batch element.
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method='sequential')(
      a, b, stride=np.int64(stride), padding=np.int64(padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_native(x, kernel, stride, padding):
  # Not differentiated (eval, frozen blocks): XLA's tap sum, which XLA fuses with the eval-mode
  # BatchNorm and ReLU6 around it; the C++ forward would write and read both activations once
  # more (measured 0.84x on the eval224 row of benchmarks/compare.py).
  return _tap_sum(_pad_hw(x, padding), kernel, stride, _out_hw(x, kernel, stride, padding))


def _depthwise_native_fwd(x, kernel, stride, padding):
  # Differentiated, x is kept for the backward anyway, and the C++ forward is the faster.
  y = _ffi('normjax_depthwise_forward', (x.shape[0], *_out_hw(x, kernel, stride, padding), x.shape[3]),
           x, kernel, stride, padding)
  return y, (x, kernel)


def _depthwise_native_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  return (_ffi('normjax_depthwise_input_grad', x.shape, dy, kernel, stride, padding),
          _ffi('normjax_depthwise_kernel_grad', kernel.shape, x, dy, stride, padding))


_depthwise_native.defvjp(_depthwise_native_fwd, _depthwise_native_bwd)


def _check_shapes(x: jnp.ndarray, kernel: jnp.ndarray) -> None:
  if x.shape[-1] != kernel.shape[-1] or kernel.shape[2] != 1:
    raise ValueError(f'depthwise_conv2d: input {x.shape} needs kernel (kh, kw, 1, {x.shape[-1]}), '
                     f'got {kernel.shape}')


def depthwise_conv2d_native(x: jnp.ndarray, kernel: jnp.ndarray, *, stride: int,
                            padding: int) -> jnp.ndarray:
  """Depthwise conv by normjax's C++ CPU kernels (custom VJP; reverse-mode autodiff only).

  Same arguments as `depthwise_conv2d_xla`. They compute in float32 (bfloat16 operands are
  widened, the result rounded once, as the tap sums do). Raises RuntimeError where normjax.native
  cannot build them.
  """
  _check_shapes(x, kernel)
  if not native.load():
    raise RuntimeError('normjax\'s C++ CPU kernels are not available (see the log for why)')
  y = _depthwise_native(x.astype(jnp.float32), kernel.astype(jnp.float32), stride, padding)
  return y.astype(jnp.result_type(x.dtype, kernel.dtype))


def depthwise_conv2d(x: jnp.ndarray, kernel: jnp.ndarray, *, stride: int,
                     padding: int) -> jnp.ndarray:
  """Depthwise conv: C++ kernels (else tap sums) on CPU, the grouped XLA conv elsewhere."""
  if jax.default_backend() != 'cpu':
    return depthwise_conv2d_xla(x, kernel, stride=stride, padding=padding)
  if native.load():
    return depthwise_conv2d_native(x, kernel, stride=stride, padding=padding)
  return depthwise_conv2d_taps(x, kernel, stride=stride, padding=padding)


class DepthwiseConv(nn.Module):
  """A bias-free depthwise conv; 'kernel' (k, k, 1, C) as in flax Conv(feature_group_count=C)."""
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
