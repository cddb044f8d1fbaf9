r"""Depthwise 3x3 convolution on CPU, forward and both gradients, per implementation.

  python benchmarks/depthwise_speed.py [--batch=16] [--repeats=9]

Shapes: the 17 depthwise convs of MobileNetV2 at 224 px (input H = W, channels, stride, and how
many blocks of the network have that shape). Implementations, each the jitted VJP of one call,
(x, kernel, dy) -> (y, dx, dkernel), all in normjax.models.depthwise:
  C++ kernels    depthwise_conv2d_native: normjax/csrc/depthwise.cc (what CPU runs by default)
  tap sums       depthwise_conv2d_taps: 9 shifted multiply-adds and a chunked kernel gradient,
                 in XLA (the CPU fallback where no C++ compiler is found; NORMJAX_NATIVE=0)
  grouped conv   depthwise_conv2d_xla: lax.conv_general_dilated, feature_group_count = C (what
                 accelerators run)
Each figure is the median over --repeats calls, after a compile call, in ms; a ratio is the
implementation's time over the C++ kernels'. The last line sums the network's 17 convs.
"""
import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
# pylint: disable=g-import-not-at-top,g-bad-import-order
from normjax import startup  # noqa: E402

if __name__ == '__main__':
  startup.reexec_for_cpu()
_HUGE_PAGES = startup.prepare_process()

import jax  # noqa: E402

from normjax import native  # noqa: E402
from normjax.models import depthwise  # noqa: E402
from timing import median_ms  # noqa: E402
# pylint: enable=g-import-not-at-top,g-bad-import-order

# (H = W, channels, stride, blocks): torchvision's MobileNetV2 inverted residual settings
# (t, c, n, s) = (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
# (6, 160, 3, 2), (6, 320, 1, 1) after the stride-2 stem, at 224 px.
SHAPES = ((112, 32, 1, 1), (112, 96, 2, 1), (56, 144, 1, 1), (56, 144, 2, 1), (28, 192, 1, 2),
          (28, 192, 2, 1), (14, 384, 1, 4), (14, 576, 1, 2), (14, 576, 2, 1), (7, 960, 1, 3))
IMPLEMENTATIONS = {'C++ kernels': depthwise.depthwise_conv2d_native,
                   'tap sums': depthwise.depthwise_conv2d_taps,
                   'grouped conv': depthwise.depthwise_conv2d_xla}


def _vjp_program(conv, stride: int):
  def program(x, kernel, dy):
    y, pullback = jax.vjp(lambda x, w: conv(x, w, stride=stride, padding=1), x, kernel)
    return (y, *pullback(dy))
  return jax.jit(program)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=9)
  args = parser.parse_args(argv)
  if not native.load():
    raise SystemExit('normjax\'s C++ CPU kernels could not be built (see the log above)')
  print(f'jax {jax.__version__} ({jax.devices()[0].device_kind}), {os.cpu_count()} cores, glibc '
        f'malloc huge pages: {_HUGE_PAGES}; ms per forward + both gradients (median of '
        f'{args.repeats}), batch {args.batch}; ratio = implementation / C++ kernels')
  others = [name for name in IMPLEMENTATIONS if name != 'C++ kernels']
  print('| N x H x W x C, stride (blocks) | ' + ' | '.join(IMPLEMENTATIONS) + ' | ' +
        ' | '.join(f'{name} ratio' for name in others) + ' |')
  print('|---|' + '---|' * (len(IMPLEMENTATIONS) + len(others)))
  totals = dict.fromkeys(IMPLEMENTATIONS, 0.0)
  for size, channels, stride, blocks in SHAPES:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (args.batch, size, size, channels))
    kernel = jax.random.normal(keys[1], (3, 3, 1, channels))
    dy = jax.random.normal(keys[2], (args.batch, (size - 1) // stride + 1, (size - 1) // stride + 1,
                                     channels))
    ms = {name: median_ms(_vjp_program(conv, stride), x, kernel, dy, repeats=args.repeats)
          for name, conv in IMPLEMENTATIONS.items()}
    for name in IMPLEMENTATIONS:
      totals[name] += blocks * ms[name]
    print(f'| {args.batch} x {size} x {size} x {channels}, {stride} ({blocks}) | ' +
          ' | '.join(f'{ms[name]:.2f}' for name in IMPLEMENTATIONS) + ' | ' +
          ' | '.join(f'{ms[name] / ms["C++ kernels"]:.2f}' for name in others) + ' |', flush=True)
  print('| the network (17 convs) | ' + ' | '.join(f'{totals[name]:.2f}' for name in IMPLEMENTATIONS) +
        ' | ' + ' | '.join(f'{totals[name] / totals["C++ kernels"]:.2f}' for name in others) + ' |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
