"""normjax's C++ depthwise kernels against torch, and how normjax.native builds and loads them."""
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from normjax import native
from normjax.models import depthwise
from normjax.models.depthwise import depthwise_conv2d, depthwise_conv2d_native, depthwise_conv2d_xla

# (N, H, W, C), kernel size, stride, padding: odd and even sizes, strides 1 and 2, channel counts
# that are and are not a multiple of the vector width, and more output rows (4 * 17) than the
# kernel gradient's 32 partial-sum blocks.
CASES = [((2, 7, 9, 5), 3, 1, 1), ((2, 7, 9, 5), 3, 2, 1), ((1, 8, 6, 3), 3, 2, 1),
         ((2, 11, 5, 4), 3, 2, 0), ((1, 9, 10, 6), 5, 1, 2), ((3, 13, 13, 8), 5, 2, 2),
         ((4, 17, 17, 32), 3, 1, 1), ((2, 16, 16, 48), 3, 2, 1)]


def _inputs(shape, k, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape, np.float32), rng.standard_normal((k, k, 1, shape[-1]), np.float32))


def _torch_forward_and_grads(x, kernel, cotangent, stride, padding):
  """torch's grouped conv2d (NCHW, OIHW) and its autograd gradients, back in NHWC / HWIO."""
  xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  kt = torch.tensor(kernel.transpose(3, 2, 0, 1), requires_grad=True)
  y = torch.nn.functional.conv2d(xt, kt, stride=stride, padding=padding, groups=x.shape[-1])
  y.backward(torch.tensor(cotangent.transpose(0, 3, 1, 2)))
  return (y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
          kt.grad.numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize('shape,k,stride,padding', CASES)
def test_native_equals_torch_forward_and_gradients(shape, k, stride, padding):
  x, kernel = _inputs(shape, k)
  conv = lambda x, w: depthwise_conv2d_native(x, w, stride=stride, padding=padding)
  y, vjp = jax.vjp(conv, x, kernel)
  cotangent = np.random.default_rng(1).standard_normal(y.shape, np.float32)
  dx, dk = jax.jit(vjp)(cotangent)
  y_ref, dx_ref, dk_ref = _torch_forward_and_grads(x, kernel, cotangent, stride, padding)
  assert y.shape == y_ref.shape and dx.shape == x.shape and dk.shape == kernel.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-4)


def test_native_kernel_gradient_does_not_depend_on_the_thread_count():
  """Fixed partial-sum blocks, added in order: bitwise the same in every call."""
  x, kernel = _inputs((8, 28, 28, 64), 3, seed=3)
  grad = jax.jit(jax.grad(lambda w: jnp.sum(depthwise_conv2d_native(x, w, stride=1, padding=1) ** 2)))
  first = np.asarray(grad(kernel))
  for _ in range(3):
    np.testing.assert_array_equal(grad(kernel), first)


def test_independent_native_calls_in_one_program():
  """Calls that XLA may run at once on its thread pool give what each gives alone (bitwise)."""
  xs, kernel = [_inputs((4, 20, 20, 16), 3, seed=s)[0] for s in range(4)], _inputs((1, 1, 1, 16), 3)[1]
  grads = lambda xs: jax.grad(lambda xs, w: sum(jnp.sum(depthwise_conv2d_native(x, w, stride=1, padding=1) ** 2)
                                                for x in xs), argnums=(0, 1))(xs, kernel)
  (dxs, dk), alone = jax.jit(grads)(xs), [jax.jit(grads)([x]) for x in xs]
  for dx, ((dx_alone,), dk_alone) in zip(dxs, alone):
    np.testing.assert_array_equal(dx, dx_alone)
  np.testing.assert_allclose(dk, sum(dk_alone for _, dk_alone in alone), rtol=1e-6, atol=1e-5)


def test_undifferentiated_call_is_the_tap_sum_and_equals_torch():
  """Without a gradient (eval, frozen blocks) the forward is XLA's tap sum, which fuses with its
  neighbours; the C++ forward runs only under differentiation."""
  x, kernel = _inputs((2, 7, 9, 5), 3)
  conv = lambda x, w: depthwise_conv2d_native(x, w, stride=2, padding=1)
  assert 'normjax_depthwise' not in jax.jit(conv).lower(x, kernel).as_text()
  forward_and_grads = lambda x, w, g: (lambda y, pullback: (y, pullback(g)))(*jax.vjp(conv, x, w))
  vjp_text = jax.jit(forward_and_grads).lower(
      x, kernel, np.zeros((2, 4, 5, 5), np.float32)).as_text()
  assert all(f'normjax_depthwise_{name}' in vjp_text for name in ('forward', 'input_grad', 'kernel_grad'))
  y_ref = _torch_forward_and_grads(x, kernel, np.zeros((2, 4, 5, 5), np.float32), 2, 1)[0]
  np.testing.assert_allclose(jax.jit(conv)(x, kernel), y_ref, rtol=1e-5, atol=1e-5)


def test_native_under_vmap_equals_each_call():
  """The loss landscape vmaps the model over parameter sets."""
  x, _ = _inputs((2, 9, 9, 8), 3)
  kernels = np.random.default_rng(4).standard_normal((3, 3, 3, 1, 8), np.float32)
  batched = jax.vmap(lambda w: depthwise_conv2d_native(x, w, stride=2, padding=1))(kernels)
  for w, y in zip(kernels, batched):
    np.testing.assert_allclose(y, depthwise_conv2d_xla(x, w, stride=2, padding=1), rtol=1e-5, atol=1e-5)


def test_native_bfloat16_computes_in_float32_and_rounds_once():
  x, kernel = (jnp.asarray(a, jnp.bfloat16) for a in _inputs((2, 9, 9, 16), 3))
  y = depthwise_conv2d_native(x, kernel, stride=1, padding=1)
  assert y.dtype == jnp.bfloat16
  ref = depthwise_conv2d_xla(x.astype(jnp.float32), kernel.astype(jnp.float32), stride=1, padding=1)
  np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=2**-8, atol=1e-6)
  grads = jax.grad(lambda x, w: depthwise_conv2d_native(x, w, stride=2, padding=1).astype(
      jnp.float32).sum(), argnums=(0, 1))(x, kernel)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


def test_kernel_rejects_inconsistent_shapes():
  """The C++ handler checks the shapes it is given and names what it expects."""
  x, kernel = _inputs((1, 5, 5, 4), 3)
  call = jax.jit(lambda x, w: depthwise._ffi('normjax_depthwise_forward', (1, 3, 3, 4), x, w, 1, 1))
  with pytest.raises(Exception, match=r'normjax depthwise: shapes must be x \(n, h, w, c\)'):
    jax.block_until_ready(call(x, kernel))


def test_native_rejects_mismatched_kernel():
  with pytest.raises(ValueError, match=r'needs kernel \(kh, kw, 1, 4\), got \(3, 3, 1, 5\)'):
    depthwise_conv2d_native(jnp.zeros((1, 5, 5, 4)), jnp.zeros((3, 3, 1, 5)), stride=1, padding=1)


def test_dispatch_on_cpu_uses_the_kernels_else_the_tap_sums(monkeypatch):
  x, kernel = _inputs((1, 5, 5, 2), 3)
  conv = lambda x, w: depthwise_conv2d(x, w, stride=2, padding=1)
  jaxpr = lambda: str(jax.make_jaxpr(lambda x, w: jax.vjp(conv, x, w)[1](jnp.ones((1, 3, 3, 2))))(x, kernel))
  assert 'normjax_depthwise_kernel_grad' in jaxpr()
  monkeypatch.setattr(native, 'load', lambda: False)
  assert 'normjax_depthwise' not in jaxpr() and '_depthwise_taps' in jaxpr()
  with pytest.raises(RuntimeError, match="normjax's C\\+\\+ CPU kernels are not available"):
    depthwise_conv2d_native(x, kernel, stride=1, padding=1)


@pytest.fixture
def fresh_load():
  """native.load() decided anew in the test, and again (normally) after it."""
  native.load.cache_clear()
  yield native.load
  native.load.cache_clear()


def test_opt_out_turns_the_kernels_off(fresh_load, monkeypatch):
  monkeypatch.setenv(native.OPT_OUT, '0')
  assert fresh_load() is False


def test_missing_compiler_turns_the_kernels_off_and_says_why(fresh_load, monkeypatch, tmp_path):
  monkeypatch.setenv('CXX', 'no-such-compiler-normjax')
  monkeypatch.setenv('NORMJAX_NATIVE_DIR', str(tmp_path))
  warnings = []
  monkeypatch.setattr(native.logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  assert fresh_load() is False
  assert warnings == ["no C++ compiler (no-such-compiler-normjax; set $CXX): normjax's C++ CPU kernels "
                      'are off (slower depthwise convolutions on CPU)']
  assert not list(tmp_path.iterdir())


def test_failed_build_raises_with_the_command_and_leaves_no_library(tmp_path):
  with pytest.raises(RuntimeError, match=r"building normjax's CPU kernels failed: false -O3"):
    native.build('false', tmp_path)
  assert not list(tmp_path.glob('*/*.so'))


def test_build_is_cached_by_digest(tmp_path, monkeypatch):
  compiler = os.environ.get('CXX', 'c++')
  library = native.build(compiler, tmp_path)
  assert library.name == 'libnormjax_cpu.so' and library.stat().st_size > 0
  mtime = library.stat().st_mtime_ns
  assert native.build(compiler, tmp_path) == library and library.stat().st_mtime_ns == mtime
  # Other sources (here: the same text plus a comment) build into another directory.
  source = tmp_path / 'edited.cc'
  source.write_text(native.SOURCES[0].read_text() + '\n// edited\n')
  monkeypatch.setattr(native, 'SOURCES', (pathlib.Path(source),))
  other = native.build(compiler, tmp_path)
  assert other.parent != library.parent and other.exists()


@pytest.mark.parametrize('trainable_blocks,forwards', [(-1, 17), (3, 2), (1, 0)])
def test_train_step_runs_the_cpp_forward_only_in_trained_blocks(trainable_blocks, forwards):
  """The step holds frozen params constant (normjax.steps), so a frozen block's depthwise conv
  runs its fusable tap sum: MobileNetV2 has a depthwise conv in features_1..17, none in 18."""
  from configs import base
  from normjax import parallel, steps
  config = base.scratch('mobilenet_v2', 'none')
  config.model.width_mult = 0.25
  config.optim.trainable_blocks = trainable_blocks
  config.train.monitor_every_steps = 0
  programs = steps.build_programs(config, 10, (32, 32, 3), (0.5,) * 3, (0.25,) * 3, 10, parallel.make_mesh())
  batch = config.train.batch_size
  text = programs.train_step.lower(programs.abstract_state, jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.uint8),
                                   jax.ShapeDtypeStruct((batch,), jnp.int32), jax.random.key(0)).as_text()
  assert text.count('normjax_depthwise_forward') == forwards
  assert text.count('normjax_depthwise_kernel_grad') == forwards
