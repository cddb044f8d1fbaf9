r"""normjax against PyTorch on CPU: one table, every row timed side by side in one process.

  OMP_WAIT_POLICY=PASSIVE python benchmarks/compare.py [--rows=lightcnn,cifar,...] [--windows=5]

Rows (the shapes the study and its extensions train):
  lightcnn   LightCNN train step, 28 px MNIST-sized, batch 64, Adam (configs/lightcnn_mnist.py)
  cifar      MobileNetV2 CIFAR stem, 32 px, batch 64, train step, SGD+Nesterov (configs/bn_scratch.py)
  full224    MobileNetV2 224 px, batch 16, every block trains, Linear head, Adam
  eval224    MobileNetV2 224 px, batch 32, eval forward (loss and correctness per example)
  study      the frozen-prefix study step, online (configs/frn_noclip.py, batch 64): blocks 0-17 in
             eval mode without gradient, features.18 + the FRN MLP head trained with Adam
  cached     the study's cached head phase: features.18 + head on precomputed 7x7x320 inputs
Columns: normjax fp32 and bf16 (config.model.dtype), torch fp32 and bf16 (autocast), torch
channels_last on all cores; img/s is the median of --windows timed windows, and the ratios are
normjax's over the best torch setting of the row. Every timed window of every setting of a row
alternates with the others', so load from other processes hits all of them alike.

What is timed is what training runs: normjax's jitted, donated `normjax.steps.build_programs`
train/eval step of the row's config (uint8 images in, augmentation and resize on device,
metrics accumulated in the state; `train.monitor_every_steps` = 0, i.e. without the periodic
per-layer statistics). torch runs the same network (tests/torch_reference.py's torchvision
MobileNetV2, a LightCNN, the study's head with FRN), the same preprocessing and optimizer, as
a torch user would: channels_last, `model.train()` / `inference_mode`, `zero_grad(set_to_none)`.
Weights are random (speed does not depend on their values).

Where the time goes (XLA CPU, jax 0.10.2, 2 shared Sapphire Rapids cores): share of thunk time
per op class in a jax.profiler trace of the 224 px batch-16 fp32 full train step, ops assigned
to layers by their HLO op_name metadata (`jax.jit(f).lower(...).compile().as_text()`):
  op class               before   after   what it was
  depthwise 3x3 fwd        47%     12%    mostly not the forward: the kernel gradient's 9 per-tap
                                          reductions made XLA materialize every tap of the padded
                                          input (recomputing its producer BN + ReLU6 each time),
                                          and these fusions carry the forward's metadata
  depthwise 3x3 bwd         7%     16%    the per-tap YNNPACK reduces; now a loop over
                                          L2-sized batch chunks (normjax/models/depthwise.py)
  BN + ReLU6 fwd           19%     29%    mean, then (x - mean) written out for the variance's
                                          YNNPACK reduce, then the ReLU6 output (kept for the
                                          depthwise backward)
  BN + ReLU6 bwd           15%     13%    autodiff of the two-pass formula saved full-size
                                          intermediates; now a custom VJP (normjax/models/norms.py)
  1x1 conv fwd / bwd      6% / 4%  13% / 5%  YNNPACK GEMMs: PointwiseConv is a matmul and both
                                          its gradients are GEMMs too
  stem 3x3 conv fwd + bwd   1%      4%    YNNPACK convolution (an im2col GEMM measured no faster)
  optimizer (Adam)         <1%      2%
The two changes, each measured in one process against torch fp32 (the other windows alternating):
the BatchNorm VJP makes a 1x1 conv + BN + ReLU6 train layer 1.4-1.5x faster (16x56x56x144 and
64x16x16x384); the chunked kernel gradient takes the full224 step from 0.62x to 0.82x of torch.
Train-mode BatchNorm used to write x - mean out and keep it to the backward: XLA CPU fuses a
subtract into a YNNPACK reduce only when nothing else uses it, and the forward variance and the
backward's sum(dy * (x - mean)) shared one. With a subtract of their own each (normjax/models/
norms.py) the compiled temp buffer shrinks from 1236 to 833 MiB (full224; cifar 1208 to 817). That
is the gain: XLA maps the temp buffer afresh every step, and its page faults were ~45% of the
step's CPU time (316k to 213k minor faults per full224 step). Measured with old-BN and new-BN
normjax fp32 runners side by side in compare.py's alternating windows (one process, 5 windows):
full224 16.0 -> 17.8 img/s (1.11x), cifar 61.8 -> 68.6 img/s (1.11x), every new window faster
than every old one. Two separate runs of `nice -n 5 env OMP_WAIT_POLICY=PASSIVE python
benchmarks/compare.py --rows=full224,cifar --windows=5`, before and after, read best ratio 0.72 ->
0.70 (full224) and 0.86 -> 0.82 (cifar): torch's own page faults vary between processes (torch fp32
cifar 67.7 vs 82.4 img/s), so ratios from separate runs do not show a 1.1x change. A one-pass
shifted variance (sums of x - s and (x - s)^2, s = x[0, 0, 0, :]) is no faster than this two-pass
(1.15x vs 1.15x of the old step in one process): as one two-output reduce, XLA's own emitter
makes the statistics 4.5x slower; as two YNNPACK reduces, it reads x twice, like two-pass.
bf16 (config.model.dtype) is slower than fp32 here: in the CIFAR-stem step ~20% of the thunk time
is standalone bf16 <-> f32 converts between fusions (XLA CPU computes elementwise ops in f32), and
the bf16 GEMMs are no faster than fp32's (1x1 conv fwd 375 vs 191 ms/step, separate traces):
XLA converts both bf16 operands to f32 copies and runs an f32 GEMM. Asking for an f32 result
(`preferred_element_type`) keeps the operands bf16 and makes a bare GEMM 1.2x faster, but the
bf16 steps slower (cifar train 0.84x, eval224 0.93x, one process), so PointwiseConv does not.
XLA flags tried as compile
options on the same step in one process, none faster than the defaults: xla_cpu_enable_fast_math
(0.96x, full224), xla_cpu_experimental_ynn_fusion_type without REDUCE (0.8x: XLA's own
reductions are slower than YNNPACK's), xla_cpu_use_xnnpack=false (0.8x, cifar),
xla_cpu_use_onednn=true (0.8x, cifar). So normjax sets no XLA flag.
Folding eval-mode BatchNorm into the preceding conv's kernel and a bias (the frozen prefix, eval224)
measured 0.98-0.99x of the unfolded model on the cache build, eval224 and study steps, their
windows alternating in one process: XLA CPU already fuses eval BN + ReLU6 (+ the next pad) into
one loop fusion after each GEMM or depthwise sum (identical fusion layout in the compiled HLO), so
folding saves a few flops per element, never a pass over the activations. It is not in normjax.
glibc malloc (normjax/cpu_malloc.py): XLA CPU's per-step temp buffers were unmapped on free and
page-faulted in again every step. With mallopt M_ARENA_MAX=1, M_MMAP_MAX=0 and a 2 GiB trim threshold
set at runtime (normjax.main/sweep/tune do so on CPU, before jax starts its threads), the normjax
fp32 step, 5 steps after warm-up in separate processes run A/B/A/B interleaved (2 shared cores):
full224 1409/922 -> 657/613 ms and 213k -> 0 minor faults per step; cifar 955/961 -> 720/709 ms
(209k -> 0); cached 51 -> 41 ms (8.6k -> 0). Without M_ARENA_MAX=1 (XLA's threads' own arenas), or
set after jax initialized its backend, faults stay at 213k and the step time is unchanged.
"""
import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

# Before torch loads OpenMP: spinning OpenMP workers slow torch ~10x when other processes
# share the cores (benchmarks/mobilenet_v2_speed.py).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

# The repo (normjax and configs without `pip install -e .`) and tests/ (the torch MobileNetV2).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, 'tests')]
# pylint: disable=g-import-not-at-top,g-bad-import-order
from normjax import startup  # noqa: E402

# As normjax's entry points do, before jax and torch start their threads: the malloc tunables
# (normjax/cpu_malloc.py) are part of the training code path, and torch, in this process too,
# runs under them alike.
if __name__ == '__main__':
  startup.reexec_for_cpu()
_HUGE_PAGES = startup.prepare_process()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from configs import base  # noqa: E402
from normjax import features, parallel, steps  # noqa: E402
from torch_reference import MobileNetV2 as TorchMobileNetV2  # noqa: E402
# pylint: enable=g-import-not-at-top,g-bad-import-order

# CIFAR-10 channel statistics (any fixed values time the same).
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
CIFAR_SIZE, MNIST_SIZE = 32, 28  # stored image sizes; 224 px rows resize on the fly like training
STEPS_PER_EPOCH = 625  # only shapes schedules; every row uses a constant LR


def _config(row: str):
  """The normjax config of a row (random init, no periodic per-layer monitor)."""
  if row == 'lightcnn':
    config = base.seed_mnist('lightcnn')
  elif row == 'cifar':
    config = base.scratch('mobilenet_v2', 'none')
    config.train.batch_size = 64
  elif row in ('study', 'cached'):
    config = base.study('frn', 'none')
    config.train.feature_cache = 'auto' if row == 'cached' else ''
  else:  # full224, eval224: torchvision's MobileNetV2 fine-tuned end to end
    config = base.get_config()
    config.optim.trainable_blocks = -1
    config.model.head = 'linear'
    config.model.dropout = 0.2  # torchvision mobilenet_v2 classifier
    config.train.batch_size = 16 if row == 'full224' else 32
  config.model.pretrained = 'none'
  config.train.monitor_every_steps = 0
  return config


def _inputs(row: str, config, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A fixed batch: uint8 NHWC images as stored, or the frozen prefix's cached 7x7x320 output."""
  batch = config.train.batch_size
  labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
  if row == 'cached':
    return rng.standard_normal((batch, 7, 7, 320), dtype=np.float32), labels
  size, channels = (MNIST_SIZE, 1) if row == 'lightcnn' else (CIFAR_SIZE, 3)
  return rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8), labels


def _normjax_step(row: str, dtype: str, images: np.ndarray, labels: np.ndarray) -> Callable[[], Any]:
  """One call runs one normjax step of `row` (the training loop's own jitted programs)."""
  config = _config(row)
  config.model.dtype = dtype
  size = config.data.image_size
  channels = images.shape[-1] if row != 'cached' else 3
  mean, std = (MEAN, STD) if channels == 3 else ((0.0,), (1.0,))
  programs = steps.build_programs(config, NUM_CLASSES, (size, size, channels), mean, std,
                                  STEPS_PER_EPOCH, parallel.make_mesh())
  if row == 'cached' and not features.enabled(config):
    raise RuntimeError('the cached row needs a config whose frozen prefix is cacheable')
  key = jax.random.key(0)
  holder = {'state': programs.init(key)}
  images, labels = jax.device_put(images), jax.device_put(labels)
  if row == 'eval224':
    mask = jax.device_put(np.ones(labels.shape, bool))
    return lambda: programs.eval_step(holder['state'], images, labels, mask)['loss']

  def train():
    holder['state'] = programs.train_step(holder['state'], images, labels, key)
    return holder['state'].step

  return train


class TorchLightCNN(nn.Module):
  """normjax.models.lightcnn.LightCNN with its linear head (study.md section 4)."""

  def __init__(self):
    super().__init__()
    self.features = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
    self.classifier = nn.Linear(32, NUM_CLASSES)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(self.features(x).mean((2, 3)))


class TorchFRN(nn.Module):
  """normjax.models.norms.FRN on (N, C) with dense='features' (the study head's norm)."""

  def __init__(self, features_: int, eps: float = 1e-6):  # normjax FRN_EPSILON
    super().__init__()
    self.scale = nn.Parameter(torch.ones(features_))
    self.bias = nn.Parameter(torch.zeros(features_))
    self.tau = nn.Parameter(torch.zeros(features_))
    self.eps = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    nu2 = x.square().mean(1, keepdim=True)
    return torch.maximum(self.scale * x * torch.rsqrt(nu2 + self.eps) + self.bias, self.tau)


def _torch_preprocess(images: torch.Tensor, config) -> torch.Tensor:
  """normjax.data.augment.train_preprocess in torch: crop + flip, resize, normalize (NCHW)."""
  x = images.permute(0, 3, 1, 2).float()
  if config.data.augment:
    pad = config.data.crop_padding
    top, left = np.random.randint(0, 2 * pad + 1, 2)
    h, w = x.shape[2:]
    x = nn.functional.pad(x, (pad, pad, pad, pad))[:, :, top:top + h, left:left + w]
    flip = torch.rand(x.shape[0]) < 0.5  # torchvision RandomHorizontalFlip(p=0.5)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
  size = config.data.image_size
  if x.shape[2:] != (size, size):
    x = nn.functional.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
  x = x / 255.0
  if config.data.normalize:
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
  return x.contiguous(memory_format=torch.channels_last)


def _torch_step(row: str, bf16: bool, images: np.ndarray, labels: np.ndarray) -> Callable[[], Any]:
  """One call runs one torch step of `row`, channels_last, bf16 under CPU autocast if asked."""
  config = _config(row)
  torch.manual_seed(0)
  autocast = lambda: torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16)
  x_np = torch.from_numpy(images)
  y = torch.from_numpy(labels).long()
  loss_fn = nn.functional.cross_entropy
  if row == 'lightcnn':
    model: nn.Module = TorchLightCNN()
    params = [{'params': model.parameters(), 'lr': config.optim.lr}]
  elif row in ('study', 'cached'):
    net = TorchMobileNetV2(NUM_CLASSES)
    head = nn.Sequential(nn.Linear(1280, config.model.head_hidden), TorchFRN(config.model.head_hidden),
                         nn.ReLU(), nn.Dropout(config.model.dropout),
                         nn.Linear(config.model.head_hidden, NUM_CLASSES))
    prefix, last = net.features[:18].eval().requires_grad_(False), net.features[18]
    model = nn.ModuleDict({'prefix': prefix, 'last': last, 'head': head})
    params = [{'params': head.parameters(), 'lr': config.optim.lr},
              {'params': last.parameters(), 'lr': config.optim.backbone_lr}]
  else:
    model = TorchMobileNetV2(NUM_CLASSES, config.model.width_mult, config.model.cifar_stem)
    params = [{'params': model.parameters(), 'lr': config.optim.lr}]
  model = model.to(memory_format=torch.channels_last)
  if config.optim.name == 'sgd':
    opt = torch.optim.SGD(params, momentum=config.optim.momentum, nesterov=config.optim.nesterov)
  else:
    opt = torch.optim.Adam(params)

  def forward(x: torch.Tensor) -> torch.Tensor:
    if row == 'study':
      with torch.no_grad():
        x = model['prefix'](x)
    if row in ('study', 'cached'):
      return model['head'](model['last'](x).mean((2, 3)))
    return model(x)

  if row == 'eval224':
    model.eval()

    def evaluate():
      with torch.inference_mode(), autocast():
        logits = forward(_torch_preprocess(x_np, config)).float()
        loss = loss_fn(logits, y, reduction='none')
        return loss + (logits.argmax(-1) == y).float()

    return evaluate

  if row != 'study':
    model.train()
  else:
    model['last'].train()
    model['head'].train()
  cached = x_np.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

  def train():
    opt.zero_grad(set_to_none=True)
    with autocast():
      x = cached if row == 'cached' else _torch_preprocess(x_np, config)
      loss = loss_fn(forward(x).float(), y)
    loss.backward()
    opt.step()
    return loss

  return train


def _sync(out: Any) -> None:
  if isinstance(out, torch.Tensor):
    out.sum().item()
  else:
    jax.block_until_ready(out)


def _window(step: Callable[[], Any], n: int) -> float:
  """Seconds for n steps, synchronised at the end."""
  start = time.perf_counter()
  out = None
  for _ in range(n):
    out = step()
  _sync(out)
  return time.perf_counter() - start


ROWS = {
    'lightcnn': 'LightCNN train, 28 px, batch 64',
    'cifar': 'MobileNetV2 CIFAR stem train, 32 px, batch 64',
    'full224': 'MobileNetV2 full train, 224 px, batch 16',
    'eval224': 'MobileNetV2 eval forward, 224 px, batch 32',
    'study': 'study step online (features.18 + head), 224 px, batch 64',
    'cached': 'cached head phase (features.18 + head), 7x7x320, batch 64',
}
SETTINGS = ('normjax fp32', 'normjax bf16', 'torch fp32', 'torch bf16')


def _measure(row: str, windows: int, window_s: float) -> dict[str, float]:
  """Median img/s of each setting; the settings' timed windows alternate."""
  rng = np.random.default_rng(0)
  images, labels = _inputs(row, _config(row), rng)
  runners = {
      'normjax fp32': _normjax_step(row, 'float32', images, labels),
      'normjax bf16': _normjax_step(row, 'bfloat16', images, labels),
      'torch fp32': _torch_step(row, False, images, labels),
      'torch bf16': _torch_step(row, True, images, labels),
  }
  steps_per_window = {}
  for name, step in runners.items():
    _window(step, 2)  # compilation (normjax) and first-call allocation (both)
    # Steps per window: about window_s seconds, from one timed step.
    steps_per_window[name] = max(1, round(window_s / _window(step, 1)))
  rates = {name: [] for name in runners}
  for _ in range(windows):
    for name, step in runners.items():
      n = steps_per_window[name]
      rates[name].append(n * len(labels) / _window(step, n))
  return {name: statistics.median(r) for name, r in rates.items()}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rows', default=','.join(ROWS), help=f'comma-separated, of {", ".join(ROWS)}')
  parser.add_argument('--windows', type=int, default=5, help='timed windows per setting (median)')
  parser.add_argument('--window_s', type=float, default=2.0, help='seconds per timed window (about)')
  args = parser.parse_args(argv)
  rows = args.rows.split(',')
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    parser.error(f'unknown rows {unknown}; allowed: {", ".join(ROWS)}')
  threads = os.cpu_count()
  torch.set_num_threads(threads)
  print(f'jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} '
        f'channels_last, {threads} cores; img/s = median of {args.windows} alternating windows '
        f'of ~{args.window_s:g} s; ratio = normjax / best torch; glibc malloc huge pages: {_HUGE_PAGES}',
        flush=True)
  header = ['row', *SETTINGS, 'fp32 ratio', 'bf16 ratio', 'best ratio']
  print('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header), flush=True)
  for row in rows:
    med = _measure(row, args.windows, args.window_s)
    best_torch = max(med['torch fp32'], med['torch bf16'])
    best_nj = max(med['normjax fp32'], med['normjax bf16'])
    cells = [ROWS[row], *(f'{med[s]:.1f}' for s in SETTINGS),
             f'{med["normjax fp32"] / best_torch:.2f}', f'{med["normjax bf16"] / best_torch:.2f}',
             f'{best_nj / best_torch:.2f}']
    print('| ' + ' | '.join(cells) + ' |', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
