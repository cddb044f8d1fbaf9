"""matmul: bf16 GEMM operands with float32 accumulation, forward and backward, against float64."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from normjax import config_schema, features
from normjax.errors import ConfigError
from normjax.models.factory import create_model
from normjax.models.matmul import matmul
from normjax.models.mobilenet_v2 import PointwiseConv


def _rounded(a) -> np.ndarray:
  """a rounded to bf16, in float64: what a bf16 GEMM multiplies."""
  return np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)


def _operands(m=96, k=40, n=24):
  kx, kw, ky = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(kx, (m, k)), jax.random.normal(kw, (k, n)),
          jax.random.normal(ky, (m, n)))


def _vjp(x, w, dy, gemm_dtype):
  y, pullback = jax.vjp(lambda x, w: matmul(x, w, gemm_dtype), x, w)
  return (y, *pullback(dy.astype(y.dtype)))


def test_without_gemm_dtype_it_is_the_plain_matmul():
  x, w, dy = _operands()
  y, dx, dw = _vjp(x, w, dy, None)
  np.testing.assert_array_equal(y, x @ w)
  np.testing.assert_array_equal(dx, dy @ w.T)
  np.testing.assert_array_equal(dw, x.T @ dy)


def test_bf16_gemms_of_float32_operands_accumulate_in_float32():
  x, w, dy = _operands()
  y, dx, dw = _vjp(x, w, dy, jnp.bfloat16)
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32,) * 3
  # Reference: the same bf16-rounded operands, multiplied and summed in float64. A bf16
  # accumulator would be ~1e-2 off; float32 accumulation is within ~1e-6 of the largest value.
  xr, wr, dyr = _rounded(x), _rounded(w), _rounded(dy)
  for got, want in ((y, xr @ wr), (dx, dyr @ wr.T), (dw, xr.T @ dyr)):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
  # ... and they differ from the float32 matmul by bf16's rounding of the operands.
  assert np.abs(np.asarray(y) - np.asarray(x @ w)).max() > 1e-3


def test_bf16_operands_give_bf16_results_rounded_once():
  x, w, dy = (a.astype(jnp.bfloat16) for a in _operands())
  y, dx, dw = _vjp(x, w, dy, jnp.bfloat16)
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
  xr, wr, dyr = _rounded(x), _rounded(w), _rounded(dy)
  for got, want in ((y, xr @ wr), (dx, dyr @ wr.T), (dw, xr.T @ dyr)):
    np.testing.assert_array_equal(got, _rounded(want.astype(np.float32)))


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, ...]]:
  """The operand dtypes of every dot in compiled HLO text (its computations' parameters)."""
  out = []
  for computation in hlo.split('\n\n'):
    for dot in re.finditer(r' dot\(%([\w.\-]+), %([\w.\-]+)\)', computation):
      out.append(tuple(re.search(rf'%{re.escape(name)} = (\w+)\[', computation).group(1)
                       for name in dot.groups()))
  return out


def test_all_three_gemms_get_bf16_operands_on_cpu():
  """Plain autodiff of a bf16 matmul runs its gradients on float32 copies; the custom VJP does not."""
  x, w, dy = _operands(256, 64, 32)
  step = jax.jit(lambda x, w: _vjp(x, w, dy, jnp.bfloat16))
  dtypes = _dot_operand_dtypes(step.lower(x, w).compile().as_text())
  assert dtypes == [('bf16', 'bf16')] * 3
  # The plain autodiff of a bf16 matmul, for contrast, computes its gradients on f32 copies.
  plain = jax.jit(lambda x, w: jax.grad(lambda x, w: (x @ w).astype(jnp.float32).sum(), (0, 1))(x, w))
  plain_dtypes = _dot_operand_dtypes(
      plain.lower(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).compile().as_text())
  assert ('f32', 'f32') in plain_dtypes


def test_bad_arguments_are_named():
  x, w, _ = _operands()
  with pytest.raises(ValueError, match=r'needs x \(M, K\) and w \(K, N\)'):
    matmul(x, w.T)
  with pytest.raises(ValueError, match='gemm_dtype must be None or bfloat16'):
    matmul(x, w, jnp.float16)


def test_pointwise_conv_with_bf16_gemms():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  conv = PointwiseConv(12, gemm_dtype=jnp.bfloat16)
  params = conv.init(jax.random.key(1), x)
  y = conv.apply(params, x)
  kernel = _rounded(params['params']['kernel'][0, 0])
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, _rounded(x) @ kernel, rtol=0, atol=1e-5)


def _study_config(**model) -> ml_collections.ConfigDict:
  config = base.study('frn', 'none')
  config.model.pretrained = 'none'
  config.model.update(model)
  return config


def test_gemm_dtype_is_validated_and_keys_the_feature_cache():
  with pytest.raises(ConfigError, match=r"model.gemm_dtype = 'float16' .*compute, bfloat16"):
    config_schema.validate(_study_config(gemm_dtype='float16'))
  with pytest.raises(ConfigError, match="gemm_dtype = 'bfloat16' applies to the 1x1 convs"):
    create_model(_study_config(name='lightcnn', gemm_dtype='bfloat16'), 10)
  same = features.cache_key(_study_config(), 'sha')
  assert 'gemm_dtype' not in same['model']  # existing caches keep their digest
  assert features.cache_key(_study_config(gemm_dtype='bfloat16'), 'sha') != same
