"""normjax.models.pooling.max_pool against torch's max_pool2d, forward and backward, ties included."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from normjax.models import lightcnn, pooling


def _torch(x: np.ndarray, window: int, cotangent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  xt = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
  y = torch.nn.functional.max_pool2d(xt, window)  # stride = window, floor
  y.backward(torch.tensor(cotangent.transpose(0, 3, 1, 2), dtype=torch.float64))
  return y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1)


# Odd sizes (floor drops the last row/col), windows 2 and 3, and integer inputs in a small range,
# so most windows hold tied maxima: the gradient must go to the first one in row-major order.
@pytest.mark.parametrize('shape,window', [((2, 8, 8, 3), 2), ((2, 7, 9, 4), 2), ((1, 10, 11, 2), 3)])
@pytest.mark.parametrize('values', ['normal', 'ties'])
def test_max_pool_equals_torch_forward_and_gradient(shape, window, values):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(shape) if values == 'normal' else rng.integers(-1, 2, shape)).astype(np.float32)
  y, vjp = jax.vjp(lambda x: pooling.max_pool(x, window), jnp.asarray(x))
  cotangent = rng.standard_normal(y.shape).astype(np.float32)
  (dx,) = vjp(jnp.asarray(cotangent))
  y_ref, dx_ref = _torch(x, window, cotangent)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=0)
  if values == 'ties':  # the case a tie-splitting gradient would get wrong
    assert (dx_ref != 0).sum() == y.size


def test_max_pool_keeps_bfloat16_and_rejects_a_window_larger_than_the_input():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.bfloat16).reshape(2, 4, 4, 3)
  y, vjp = jax.vjp(lambda x: pooling.max_pool(x, 2), x)
  assert y.dtype == jnp.bfloat16 and vjp(jnp.ones_like(y))[0].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='window 3 is larger than the input'):
    pooling.max_pool(jnp.zeros((1, 2, 5, 1)), 3)


def test_lightcnn_gradient_equals_flax_max_pool_version(monkeypatch):
  """The whole trunk: the same gradient as with flax's select-and-scatter max_pool."""
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  model = lightcnn.LightCNN()
  variables = model.init(jax.random.key(1), x, train=True)
  loss = lambda v: jnp.sum(model.apply(v, x, train=True) ** 2)
  grads = jax.grad(loss)(variables)
  monkeypatch.setattr(pooling, 'max_pool',
                      lambda x, window: nn.max_pool(x, (window, window), strides=(window, window)))
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.grad(loss)(variables))):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
