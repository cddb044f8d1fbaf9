"""A (M, K) x (K, N) matmul whose bf16 GEMMs, forward and backward, reach XLA CPU's bf16 kernel.

XLA CPU (jax 0.10.2) hands a bf16 x bf16 dot to YNNPACK's bf16 GEMM (AVX512-BF16 on the
development machine, about 2x float32's rate) only when the dot asks for a float32 result and
its operands are in canonical form: the lhs contracts its last dimension, the rhs its first.
Any other bf16 dot gets both operands converted to float32 copies first. Autodiff of `x @ w`
gives two non-canonical dots (dy @ w.T and x.T @ dy), so the backward GEMMs of a bf16 step ran
in float32 on converted copies.

`matmul` writes each of its three GEMMs so that XLA's dot canonicalisation (a size-1 batch
dimension, which XLA strips by materialising the transposed operand) sends them to the bf16
kernel, with float32 accumulation in all three: torch's CPU autocast semantics for a linear
layer. `benchmarks/matmul_bf16.py` times the three GEMMs against float32 and autodiff.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp


def _dot_f32(a: jnp.ndarray, b: jnp.ndarray, spec: str) -> jnp.ndarray:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bf16_matmul(x, w, x_dtype, w_dtype):
  del w_dtype
  return _dot_f32(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), 'mk,kn->mn').astype(x_dtype)


def _fwd(x, w, x_dtype, w_dtype):
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  return _bf16_matmul(xb, wb, x_dtype, w_dtype), (xb, wb)


def _bwd(x_dtype, w_dtype, residuals, dy):
  xb, wb = residuals
  dy = dy.astype(jnp.bfloat16)
  # The size-1 batch axis makes XLA materialise w.T (x.T) instead of folding the transpose
  # into the dot's dimensions, which would send the GEMM down the float32 path.
  dx = _dot_f32(dy[None], wb, 'bmn,kn->bmk')[0]
  dw = _dot_f32(xb[None], dy[None], 'bmk,bmn->kn')
  return dx.astype(x_dtype), dw.astype(w_dtype)


_bf16_matmul.defvjp(_fwd, _bwd)


def matmul(x: jnp.ndarray, w: jnp.ndarray, gemm_dtype: Any = None) -> jnp.ndarray:
  """x (M, K) @ w (K, N), returned in x's dtype.

  gemm_dtype: None (the operands' own dtype, `x @ w`) or bfloat16: the forward and both
  gradient GEMMs take bf16 operands and accumulate in float32, whatever x and w are.
  """
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f'matmul: needs x (M, K) and w (K, N), got {x.shape} and {w.shape}')
  if gemm_dtype is None:
    return x @ w
  if jnp.dtype(gemm_dtype) != jnp.bfloat16:
    raise ValueError(f'matmul: gemm_dtype must be None or bfloat16, got {gemm_dtype}')
  return _bf16_matmul(x, w, x.dtype, w.dtype)
