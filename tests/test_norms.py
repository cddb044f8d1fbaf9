"""Norm layers against NumPy reference formulas and torch's BatchNorm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from normjax.models import norms

SHAPES = [(8, 12), (4, 5, 3, 12)]  # 2D (N, C) and 4D (N, H, W, C)


def _data(shape, seed=0, scale=3.0, shift=1.5):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * scale + shift).astype(np.float32)


def _init(norm, x):
  return jax.tree.map(np.asarray, norm(name='n').init(jax.random.key(0), x))


def _random_params(variables, seed=1):
  """Non-trivial scale/bias/tau so the reference checks more than identity affine."""
  rng = np.random.default_rng(seed)
  params = {k: (rng.normal(size=v.shape) * 0.5 + (1.0 if k == 'scale' else 0.0)).astype(np.float32)
            for k, v in variables['params'].items()}
  return {**variables, 'params': params}


def ref_frn(x, scale, bias, tau, eps):
  axes = (1,) if x.ndim == 2 else (1, 2)
  nu2 = np.mean(x.astype(np.float64) ** 2, axis=axes, keepdims=True)
  return np.maximum(scale * x / np.sqrt(nu2 + eps) + bias, tau)


def ref_gn(x, scale, bias, groups, eps):
  n, c = x.shape[0], x.shape[-1]
  xg = x.astype(np.float64).reshape(n, -1, groups, c // groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = xg.var(axis=(1, 3), keepdims=True)
  y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
  return y * scale + bias


def ref_ln(x, scale, bias, eps):
  x = x.astype(np.float64)
  mean = x.mean(axis=-1, keepdims=True)
  var = x.var(axis=-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def ref_bn_train(x, scale, bias, eps):
  axes = tuple(range(x.ndim - 1))
  x = x.astype(np.float64)
  return (x - x.mean(axis=axes)) / np.sqrt(x.var(axis=axes) + eps) * scale + bias


@pytest.mark.parametrize('shape', SHAPES)
def test_frn_matches_reference(shape):
  x = _data(shape)
  norm = norms.make_norm('frn', train=True)
  variables = _init(norm, x)
  assert set(variables['params']) == {'scale', 'bias', 'tau'}
  variables = _random_params(variables)
  y = norm(name='n').apply(variables, x)
  p = variables['params']
  np.testing.assert_allclose(y, ref_frn(x, p['scale'], p['bias'], p['tau'], 1e-6),
                             rtol=1e-5, atol=1e-5)
  # TLU is active: some outputs sit exactly at tau.
  assert np.any(np.asarray(y) == np.broadcast_to(p['tau'], y.shape))


@pytest.mark.parametrize('shape', SHAPES)
def test_frn_learned_eps(shape):
  x = _data(shape) * 1e-3  # small activations: eps matters
  norm = norms.make_norm('frn', train=True, frn_learned_eps=True)
  variables = _init(norm, x)
  assert variables['params']['eps'].shape == ()
  np.testing.assert_allclose(variables['params']['eps'], 1e-4)
  variables = _random_params(variables)
  eps_l = np.float32(-0.02)  # |eps_l|: a negative learned value still gives a positive eps
  variables['params']['eps'] = eps_l
  y = norm(name='n').apply(variables, x)
  p = variables['params']
  np.testing.assert_allclose(y, ref_frn(x, p['scale'], p['bias'], p['tau'], 1e-6 + 0.02),
                             rtol=1e-5, atol=1e-6)
  # eps gets a gradient, so it is learned.
  grad = jax.grad(lambda e: norm(name='n').apply(
      {'params': {**p, 'eps': e}}, x).sum())(eps_l)
  assert np.abs(grad) > 0


@pytest.mark.parametrize('shape', SHAPES)
def test_gn_matches_reference(shape):
  x = _data(shape)
  norm = norms.make_norm('gn', train=True, gn_groups=3)
  variables = _init(norm, x)
  variables = _random_params(variables)
  y = norm(name='n').apply(variables, x)
  p = variables['params']
  np.testing.assert_allclose(y, ref_gn(x, p['scale'], p['bias'], 3, 1e-5), rtol=1e-4, atol=1e-5)


def test_gn_groups_must_divide_channels():
  norm = norms.make_norm('gn', train=True, gn_groups=5)
  with pytest.raises(ValueError, match=r'model\.gn_groups=5 does not divide .* 12'):
    norm(name='n').init(jax.random.key(0), jnp.ones((2, 12)))


@pytest.mark.parametrize('shape', SHAPES)
def test_ln_matches_reference(shape):
  x = _data(shape)
  norm = norms.make_norm('ln', train=True)
  variables = _init(norm, x)
  variables = _random_params(variables)
  y = norm(name='n').apply(variables, x)
  p = variables['params']
  np.testing.assert_allclose(y, ref_ln(x, p['scale'], p['bias'], 1e-5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('shape', SHAPES)
def test_bn_train_and_eval_match_reference(shape):
  x = _data(shape)
  n = x.size // x.shape[-1]
  axes = tuple(range(x.ndim - 1))
  norm_train = norms.make_norm('bn', train=True)
  variables = _init(norm_train, x)
  assert set(variables['params']) == {'scale', 'bias'}
  assert set(variables['batch_stats']) == {'mean', 'var'}
  # init leaves the running stats at torch's initial values.
  np.testing.assert_array_equal(variables['batch_stats']['mean'], 0.0)
  np.testing.assert_array_equal(variables['batch_stats']['var'], 1.0)
  variables = _random_params(variables)
  p = variables['params']
  y, updates = norm_train(name='n').apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, ref_bn_train(x, p['scale'], p['bias'], 1e-5), rtol=1e-4,
                             atol=1e-5)
  ra = updates['batch_stats']
  np.testing.assert_allclose(ra['mean'], 0.1 * x.mean(axis=axes), rtol=1e-5)
  np.testing.assert_allclose(ra['var'], 0.9 + 0.1 * x.var(axis=axes) * n / (n - 1), rtol=1e-5)
  y_eval = norms.make_norm('bn', train=False)(name='n').apply(
      {'params': p, 'batch_stats': ra}, x)
  expected = (x - ra['mean']) / np.sqrt(ra['var'] + 1e-5) * p['scale'] + p['bias']
  np.testing.assert_allclose(y_eval, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('shape', SHAPES)
def test_bn_matches_torch_over_train_steps_then_eval(shape):
  c = shape[-1]
  torch_bn = torch.nn.BatchNorm1d(c) if len(shape) == 2 else torch.nn.BatchNorm2d(c)
  rng = np.random.default_rng(3)
  scale = (rng.normal(size=c) * 0.3 + 1.0).astype(np.float32)
  bias = rng.normal(size=c).astype(np.float32)
  with torch.no_grad():
    torch_bn.weight.copy_(torch.from_numpy(scale))
    torch_bn.bias.copy_(torch.from_numpy(bias))
  to_torch = (lambda a: torch.from_numpy(a)) if len(shape) == 2 else (
      lambda a: torch.from_numpy(a).permute(0, 3, 1, 2))
  from_torch = (lambda t: t.detach().numpy()) if len(shape) == 2 else (
      lambda t: t.detach().permute(0, 2, 3, 1).numpy())

  norm_train = norms.make_norm('bn', train=True)
  variables = _init(norm_train, np.zeros(shape, np.float32))
  params, stats = {'scale': scale, 'bias': bias}, variables['batch_stats']
  apply_train = jax.jit(lambda s, x: norm_train(name='n').apply(
      {'params': params, 'batch_stats': s}, x, mutable=['batch_stats']))
  torch_bn.train()
  for step in range(4):
    x = _data(shape, seed=10 + step, shift=step)
    y, updates = apply_train(stats, x)
    stats = updates['batch_stats']
    np.testing.assert_allclose(y, from_torch(torch_bn(to_torch(x))), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats['mean'], torch_bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], torch_bn.running_var.numpy(), rtol=1e-5, atol=1e-6)

  torch_bn.eval()
  x = _data(shape, seed=99)
  y_eval = norms.make_norm('bn', train=False)(name='n').apply(
      {'params': params, 'batch_stats': stats}, x)
  np.testing.assert_allclose(y_eval, from_torch(torch_bn(to_torch(x))), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('shape', SHAPES)
def test_bn_train_gradients_match_torch(shape):
  """The custom VJP's gradients wrt input, scale and bias equal torch autograd's."""
  c = shape[-1]
  x = _data(shape, seed=5)
  rng = np.random.default_rng(6)
  scale = (rng.normal(size=c) * 0.3 + 1.0).astype(np.float32)
  bias = rng.normal(size=c).astype(np.float32)
  cotangent = rng.normal(size=shape).astype(np.float32)
  norm_train = norms.make_norm('bn', train=True)
  stats = _init(norm_train, x)['batch_stats']

  def loss(x, scale, bias):
    y, _ = norm_train(name='n').apply({'params': {'scale': scale, 'bias': bias},
                                       'batch_stats': stats}, x, mutable=['batch_stats'])
    return jnp.sum(y * cotangent)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
  to_nchw = (lambda a: a) if len(shape) == 2 else (lambda a: np.moveaxis(a, -1, 1))
  torch_bn = torch.nn.BatchNorm1d(c) if len(shape) == 2 else torch.nn.BatchNorm2d(c)
  with torch.no_grad():
    torch_bn.weight.copy_(torch.from_numpy(scale))
    torch_bn.bias.copy_(torch.from_numpy(bias))
  tx = torch.from_numpy(to_nchw(x).copy()).requires_grad_()
  (torch_bn(tx) * torch.from_numpy(to_nchw(cotangent).copy())).sum().backward()
  dx = tx.grad.numpy() if len(shape) == 2 else np.moveaxis(tx.grad.numpy(), 1, -1)
  np.testing.assert_allclose(grads[0], dx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads[1], torch_bn.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads[2], torch_bn.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


def _two_pass_float64(x):
  axes = tuple(range(x.ndim - 1))
  x = x.astype(np.float64)
  mean = x.mean(axis=axes)
  return mean, np.square(x - mean).mean(axis=axes)


@pytest.mark.parametrize('shift, std, shift0_fails', [(1.5, 3.0, False), (1e3, 1e-1, True)])
def test_bn_train_statistics_match_float64_two_pass(shift, std, shift0_fails):
  """Batch mean and variance within float32 rounding of a float64 two-pass reference.

  Mean 1e3 with std 0.1 is the hard case: E[x^2] - E[x]^2 (a one-pass formula with shift 0,
  flax's use_fast_variance) cancels a 1e6 to 1e-2 in float32 and misses by over 100%.
  """
  shape = (16, 8, 8, 6)
  x = _data(shape, seed=7, scale=std, shift=shift)
  c, axes = shape[-1], (0, 1, 2)
  mean, var = jax.jit(lambda x: norms.batch_norm_train(x, jnp.ones(c), jnp.zeros(c), 1e-5)[1:])(x)
  ref_mean, ref_var = _two_pass_float64(x)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6 * std)
  np.testing.assert_allclose(var, ref_var, rtol=1e-5)
  shift0 = jax.jit(lambda x: jnp.mean(x * x, axis=axes) - jnp.square(jnp.mean(x, axis=axes)))(x)
  assert (np.max(np.abs(shift0 - ref_var) / ref_var) > 1e-5) == shift0_fails


@pytest.mark.parametrize('shape', SHAPES)
def test_bn_train_custom_vjp_matches_autodiff(shape):
  """The custom VJP equals autodiff of the plain formula, with cotangents on all three outputs."""
  c = shape[-1]
  rng = np.random.default_rng(8)
  x = _data(shape, seed=8)
  scale = (rng.normal(size=c) * 0.3 + 1.0).astype(np.float32)
  bias = rng.normal(size=c).astype(np.float32)
  cotangents = [rng.normal(size=s).astype(np.float32) for s in (shape, (c,), (c,))]

  def loss(bn):
    return lambda *args: sum(jnp.sum(out * ct) for out, ct in zip(bn(*args, 1e-5), cotangents))

  grads = jax.jit(jax.grad(loss(norms.batch_norm_train), argnums=(0, 1, 2)))(x, scale, bias)
  plain = norms._batch_norm_train  # pylint: disable=protected-access
  expected = jax.jit(jax.grad(loss(plain), argnums=(0, 1, 2)))(x, scale, bias)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bn_train_needs_two_values_per_channel():
  norm = norms.make_norm('bn', train=True)
  with pytest.raises(ValueError, match='more than 1 value per channel'):
    norm(name='n').init(jax.random.key(0), jnp.ones((1, 4)))


@pytest.mark.parametrize('name', ['bn', 'gn', 'frn', 'ln'])
def test_bfloat16_input_uses_float32_statistics(name):
  # A large common offset: bf16 statistics (or E[x^2]-E[x]^2) would lose the signal.
  shape = (4, 3, 3, 8)
  x = _data(shape, scale=1.0, shift=0.0) + 64.0
  x_bf16 = jnp.asarray(x, jnp.bfloat16)
  x_ref = np.asarray(x_bf16, np.float32)  # the same values the layer sees
  norm32 = norms.make_norm(name, train=True, gn_groups=2)
  norm16 = norms.make_norm(name, train=True, gn_groups=2, dtype=jnp.bfloat16)
  variables = norm32(name='n').init(jax.random.key(0), x_ref)
  y32 = norm32(name='n').apply(variables, x_ref, mutable=['batch_stats'])[0]
  y16, updates = norm16(name='n').apply(variables, x_bf16, mutable=['batch_stats'])
  assert y16.dtype == jnp.bfloat16
  # Only the final cast to bf16 rounds: relative error ~2^-8.
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=1e-2, atol=2e-2)
  if name == 'bn':
    assert updates['batch_stats']['var'].dtype == jnp.float32
    np.testing.assert_allclose(updates['batch_stats']['mean'],
                               0.1 * x_ref.mean(axis=(0, 1, 2)), rtol=1e-5)


def test_none_is_identity_and_unknown_name_raises():
  x = _data((2, 3))
  identity = norms.make_norm('none', train=True)
  variables = _init(identity, x)
  assert variables == {}
  y = identity(name='n').apply(variables, x)
  np.testing.assert_array_equal(y, x)
  with pytest.raises(ValueError, match=r"norm: unknown name 'batchnorm'; allowed: bn, ln, gn, "
                                       r"frn, none"):
    norms.make_norm('batchnorm', train=True)
