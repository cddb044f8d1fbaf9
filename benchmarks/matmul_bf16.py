r"""The three GEMMs of a 1x1 conv (forward, input gradient, weight gradient) on CPU, per setting.

  python benchmarks/matmul_bf16.py [--batch=64] [--repeats=9]

Shapes: MobileNetV2's 1x1 convs, M = batch * H * W rows (CIFAR stem 32 px: expansions at 32x32,
16x16 and 8x8; the 224 px network's last conv at 7x7). Settings, each the jitted VJP of one matmul:
  fp32            x @ w in float32 (normjax's default, config.model.gemm_dtype = compute)
  bf16 autodiff   x @ w with bf16 operands, jax's own VJP (what normjax did before
                  normjax/models/matmul.py)
  bf16 matmul     normjax.models.matmul.matmul(x, w, bfloat16): bf16 operands, float32
                  accumulation, float32 activations (config.model.gemm_dtype = bfloat16)
Each figure is the median over --repeats calls, after a compile call, in ms; the ratio is fp32's
time over the setting's.
"""
import argparse
import os
import sys
from typing import Any, Callable

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
# pylint: disable=g-import-not-at-top,g-bad-import-order
from normjax import startup  # noqa: E402

if __name__ == '__main__':
  startup.reexec_for_cpu()
_HUGE_PAGES = startup.prepare_process()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from normjax.models.matmul import matmul  # noqa: E402
from timing import median_ms  # noqa: E402
# pylint: enable=g-import-not-at-top,g-bad-import-order

# (H*W, in channels, out channels) of MobileNetV2 1x1 convs.
SHAPES = ((32 * 32, 96, 16), (32 * 32, 24, 144), (32 * 32, 144, 24), (16 * 16, 192, 32),
          (8 * 8, 384, 64), (8 * 8, 576, 96), (7 * 7, 320, 1280))


def _vjp_program(multiply: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray], dtype: Any):
  """jit of (x, w, dy) -> (y, dx, dw) with x, w, dy cast to dtype first."""
  def program(x, w, dy):
    y, pullback = jax.vjp(multiply, x.astype(dtype), w.astype(dtype))
    return (y, *pullback(dy.astype(y.dtype)))
  return jax.jit(program)


SETTINGS = {
    'fp32': _vjp_program(lambda x, w: x @ w, jnp.float32),
    'bf16 autodiff': _vjp_program(lambda x, w: x @ w, jnp.bfloat16),
    'bf16 matmul': _vjp_program(lambda x, w: matmul(x, w, jnp.bfloat16), jnp.float32),
}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=9)
  args = parser.parse_args(argv)
  print(f'jax {jax.__version__} ({jax.devices()[0].device_kind}), {os.cpu_count()} cores, glibc '
        f'malloc huge pages: {_HUGE_PAGES}; ms per forward + both gradients (median of '
        f'{args.repeats}); ratio = fp32 / setting')
  print('| M x K x N | ' + ' | '.join(SETTINGS) + ' | ' +
        ' | '.join(f'{s} ratio' for s in SETTINGS if s != 'fp32') + ' |')
  print('|---|' + '---|' * (2 * len(SETTINGS) - 1))
  totals = dict.fromkeys(SETTINGS, 0.0)
  for pixels, k, n in SHAPES:
    m = args.batch * pixels
    keys = jax.random.split(jax.random.key(0), 3)
    x, w, dy = (jax.random.normal(key, shape) for key, shape in zip(keys, ((m, k), (k, n), (m, n))))
    ms = {name: median_ms(program, x, w, dy, repeats=args.repeats) for name, program in SETTINGS.items()}
    for name in SETTINGS:
      totals[name] += ms[name]
    print(f'| {m} x {k} x {n} | ' + ' | '.join(f'{ms[s]:.2f}' for s in SETTINGS) + ' | ' +
          ' | '.join(f'{ms["fp32"] / ms[s]:.2f}' for s in SETTINGS if s != 'fp32') + ' |', flush=True)
  print('| all shapes | ' + ' | '.join(f'{totals[s]:.2f}' for s in SETTINGS) + ' | ' +
        ' | '.join(f'{totals["fp32"] / totals[s]:.2f}' for s in SETTINGS if s != 'fp32') + ' |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
