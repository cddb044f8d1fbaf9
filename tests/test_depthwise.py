"""The CPU tap-sum depthwise formulation equals XLA's grouped conv, forward and backward.

The C++ kernels that CPU runs where they can be built are tested in test_native.py."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from normjax.models import depthwise
from normjax.models.depthwise import (DepthwiseConv, depthwise_conv2d, depthwise_conv2d_taps,
                                      depthwise_conv2d_xla)

# (N, H, W, C), kernel size, stride, padding: odd and even sizes, strides 1 and 2.
CASES = [((2, 7, 9, 5), 3, 1, 1), ((2, 7, 9, 5), 3, 2, 1), ((1, 8, 6, 3), 3, 2, 1),
         ((2, 11, 5, 4), 3, 2, 0), ((1, 9, 10, 6), 5, 1, 2), ((3, 13, 13, 8), 5, 2, 2)]


def _inputs(shape, k, seed=0):
  kx, kk = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, shape), jax.random.normal(kk, (k, k, 1, shape[-1])))


@pytest.mark.parametrize('shape,k,stride,padding', CASES)
def test_taps_equal_grouped_conv_forward_and_gradients(shape, k, stride, padding):
  x, kernel = _inputs(shape, k)

  @jax.jit
  def forward_and_grads(x, kernel, cotangent):
    out = []
    for conv in (depthwise_conv2d_taps, depthwise_conv2d_xla):
      y, vjp = jax.vjp(lambda x, w: conv(x, w, stride=stride, padding=padding), x, kernel)
      out.append((y, *vjp(cotangent)))
    return out

  out_shape = jax.eval_shape(
      lambda: depthwise_conv2d_xla(x, kernel, stride=stride, padding=padding)).shape
  cotangent = jax.random.normal(jax.random.key(1), out_shape)
  (y, dx, dk), (y_ref, dx_ref, dk_ref) = forward_and_grads(x, kernel, cotangent)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('shape,k,stride,padding', CASES[:2])
def test_kernel_gradient_over_batch_chunks(shape, k, stride, padding, monkeypatch):
  """The kernel gradient summed chunk by chunk (one image per chunk) equals the grouped conv's."""
  monkeypatch.setattr(depthwise, '_KERNEL_GRAD_CHUNK_BYTES', 1)  # every chunk is one image
  x, kernel = _inputs((4, *shape[1:]), k)
  loss = lambda conv: lambda w: jnp.sum(conv(x, w, stride=stride, padding=padding) ** 2)
  dk = jax.grad(loss(depthwise_conv2d_taps))(kernel)
  dk_ref = jax.grad(loss(depthwise_conv2d_xla))(kernel)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('shape,k,stride,padding', CASES[:3])
def test_taps_equal_torch_depthwise_conv(shape, k, stride, padding):
  x, kernel = _inputs(shape, k, seed=2)
  y = depthwise_conv2d_taps(x, kernel, stride=stride, padding=padding)
  ref = torch.nn.functional.conv2d(
      torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)),
      torch.from_numpy(np.array(kernel).transpose(3, 2, 0, 1)),
      stride=stride, padding=padding, groups=shape[-1])
  np.testing.assert_allclose(y, ref.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_dispatch_uses_the_grouped_conv_exactly_off_cpu():
  x, kernel = _inputs((1, 5, 5, 2), 3)
  jaxpr = str(jax.make_jaxpr(lambda x, w: depthwise_conv2d(x, w, stride=2, padding=1))(x, kernel))
  assert ('conv_general_dilated' in jaxpr) == (jax.default_backend() != 'cpu')


def test_bfloat16_keeps_dtype_and_accumulates_precisely():
  x, kernel = _inputs((2, 9, 9, 4), 3)
  y = depthwise_conv2d_taps(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), stride=1,
                            padding=1)
  assert y.dtype == jnp.bfloat16
  ref = depthwise_conv2d_xla(x.astype(jnp.bfloat16).astype(jnp.float32),
                             kernel.astype(jnp.bfloat16).astype(jnp.float32), stride=1, padding=1)
  # Only the final rounding to bfloat16 (8 mantissa bits) differs.
  np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=2**-8, atol=1e-6)
  grads = jax.grad(lambda x, w: depthwise_conv2d_taps(x, w, stride=2, padding=1).astype(
      jnp.float32).sum(), argnums=(0, 1))(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


def test_module_matches_flax_grouped_conv_param_and_output():
  x = jax.random.normal(jax.random.key(3), (2, 9, 7, 6))
  ours = DepthwiseConv(6, kernel_size=3, strides=2, padding=1)
  flax_conv = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=6,
                      use_bias=False)
  params = ours.init(jax.random.key(4), x)
  ref_params = flax_conv.init(jax.random.key(4), x)
  assert jax.tree.map(jnp.shape, params) == {'params': {'kernel': (3, 3, 1, 6)}}
  np.testing.assert_array_equal(params['params']['kernel'], ref_params['params']['kernel'])
  np.testing.assert_allclose(ours.apply(params, x), flax_conv.apply(params, x), rtol=1e-5,
                             atol=1e-5)


def test_module_rejects_wrong_channel_count():
  with pytest.raises(ValueError, match=r'DepthwiseConv\(6\) got 5 input channels'):
    DepthwiseConv(6).init(jax.random.key(0), jnp.zeros((1, 4, 4, 5)))
