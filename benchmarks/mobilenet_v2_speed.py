"""Images/s of a MobileNetV2 train step (Adam, cross-entropy) and of eval: normjax vs PyTorch.

  python benchmarks/mobilenet_v2_speed.py --batch=64 --size=32 --steps=5 --windows=5

Both run the same network (torchvision's MobileNetV2, BN, Dropout + Linear head, all
parameters trainable) on the same fixed batch. normjax's step is jitted with the
state donated; torch uses channels_last and all cores. Timed windows of the two
frameworks alternate so that load from other processes hits both alike; the
median window is reported. On a shared machine the figures move with other
processes' load (normjax splits each op over all cores, so a busy core slows it
more than torch, whose small ops mostly run on one thread); compare the ratio
within one run.
"""
import functools
import os
import statistics
import sys
import time

# Before torch loads OpenMP: spinning OpenMP workers slow torch ~10x when other
# processes share the cores (measured 19 vs 172 train img/s on 2 busy cores).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

# The repo (normjax, without `pip install -e .`) and tests/ (the torch reference network).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, 'tests')]
# pylint: disable=g-import-not-at-top,g-bad-import-order
from normjax.models.classifier import Classifier  # noqa: E402
from normjax.models.heads import LinearHead  # noqa: E402
from normjax.models.mobilenet_v2 import MobileNetV2Features  # noqa: E402
from normjax.models.norms import make_norm  # noqa: E402
from torch_reference import MobileNetV2 as TorchMobileNetV2  # noqa: E402
# pylint: enable=g-import-not-at-top,g-bad-import-order

_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size (study: 64).')
_SIZE = flags.DEFINE_integer('size', 32, 'Image height and width.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Steps per timed window.')
_WINDOWS = flags.DEFINE_integer('windows', 5, 'Timed windows per framework and mode.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps first (after compilation).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'normjax compute dtype.')
_WIDTH = flags.DEFINE_float('width_mult', 1.0, 'MobileNetV2 width multiplier.')
_CIFAR_STEM = flags.DEFINE_bool('cifar_stem', False, 'Stride-1 stem for 32x32 inputs.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 10, 'Classes (CIFAR-10: 10).')
_TORCH = flags.DEFINE_bool('torch', True, 'Also time the PyTorch reference.')


def _normjax_steps(x: np.ndarray, labels: np.ndarray):
  """(train_step, eval_step) closures over normjax state; each call runs one step."""
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[_DTYPE.value]
  model = Classifier(
      backbone=MobileNetV2Features(norm=functools.partial(make_norm, 'bn', dtype=dtype),
                                   width_mult=_WIDTH.value, cifar_stem=_CIFAR_STEM.value,
                                   dtype=dtype),
      head=LinearHead(_NUM_CLASSES.value, dtype=dtype))
  tx = optax.adam(1e-3)
  x, labels = jnp.asarray(x), jnp.asarray(labels)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  state = (variables['params'], variables['batch_stats'], tx.init(variables['params']))

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, x, labels, rng):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                                    mutable=['batch_stats'], rngs={'dropout': rng})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  eval_fn = jax.jit(functools.partial(model.apply, train=False))
  rng = jax.random.key(1)

  def train():
    nonlocal state
    state, loss = train_step(state, x, labels, rng)
    return loss

  def evaluate():
    return eval_fn({'params': state[0], 'batch_stats': state[1]}, x)

  return train, evaluate


def _torch_steps(x: np.ndarray, labels: np.ndarray):
  model = TorchMobileNetV2(_NUM_CLASSES.value, _WIDTH.value, _CIFAR_STEM.value)
  model = model.to(memory_format=torch.channels_last)
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(
      memory_format=torch.channels_last)
  labels = torch.from_numpy(labels)

  def train():
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), labels)
    loss.backward()
    opt.step()
    return loss

  def evaluate():
    model.eval()
    with torch.inference_mode():
      return model(x)

  return train, evaluate


def _window(step, n: int, sync) -> float:
  """Images/s over n steps."""
  start = time.perf_counter()
  for _ in range(n):
    out = step()
  sync(out)
  return n * _BATCH.value / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
  del argv
  threads = os.cpu_count()
  torch.set_num_threads(threads)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((_BATCH.value, _SIZE.value, _SIZE.value, 3), dtype=np.float32)
  labels = rng.integers(0, _NUM_CLASSES.value, _BATCH.value)
  frameworks = {'normjax': (_normjax_steps(x, labels), jax.block_until_ready)}
  if _TORCH.value:
    frameworks['torch'] = (_torch_steps(x, labels), lambda out: out.item() if out.ndim == 0
                           else out.sum().item())
  print(f'MobileNetV2 width {_WIDTH.value} cifar_stem={_CIFAR_STEM.value}, batch {_BATCH.value}, '
        f'{_SIZE.value}x{_SIZE.value}, normjax {_DTYPE.value} (jax {jax.__version__}, '
        f'{jax.default_backend()}), torch {torch.__version__} fp32 channels_last, '
        f'{threads} threads; median of {_WINDOWS.value} windows x {_STEPS.value} steps', flush=True)
  print(f'{"":8s}{"normjax img/s":>15s}{"torch img/s":>13s}{"ratio":>8s}')
  for mode in (0, 1):  # train, eval
    for steps, sync in frameworks.values():
      _window(steps[mode], _WARMUP.value, sync)  # includes normjax's compilation
    rates = {name: [] for name in frameworks}
    for _ in range(_WINDOWS.value):
      for name, (steps, sync) in frameworks.items():
        rates[name].append(_window(steps[mode], _STEPS.value, sync))
    med = {name: statistics.median(r) for name, r in rates.items()}
    ratio = med['normjax'] / med['torch'] if 'torch' in med else float('nan')
    torch_rate = med.get('torch', float('nan'))
    print(f'{("train", "eval")[mode]:8s}{med["normjax"]:15.1f}{torch_rate:13.1f}{ratio:8.2f}',
          flush=True)


if __name__ == '__main__':
  from normjax import startup  # pylint: disable=g-import-not-at-top
  startup.reexec_for_cpu()  # as normjax's entry points do
  app.run(main)
