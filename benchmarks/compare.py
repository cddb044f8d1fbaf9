r"""normjax against PyTorch on CPU: one table, rows timed side by side, each framework in its process.

  OMP_WAIT_POLICY=PASSIVE python benchmarks/compare.py [--rows=lightcnn,cifar,...] [--windows=5]

Rows (the shapes the study and its extensions train):
  lightcnn   LightCNN train step, 28 px MNIST-sized, batch 64, Adam (configs/lightcnn_mnist.py)
  cifar      MobileNetV2 CIFAR stem, 32 px, batch 64, train step, SGD+Nesterov (configs/bn_scratch.py)
  full224    MobileNetV2 224 px, batch 16, every block trains, Linear head, Adam
  eval224    MobileNetV2 224 px, batch 32, eval forward (loss and correctness per example)
  study      the frozen-prefix study step, online (configs/frn_noclip.py, batch 64): blocks 0-17 in
             eval mode without gradient, features.18 + the FRN MLP head trained with Adam
  cached     the study's cached head phase: features.18 + head on precomputed 7x7x320 inputs
Columns: normjax fp32 and bf16 (config.model.dtype), normjax bf16 GEMM (float32 activations,
config.model.gemm_dtype = bfloat16: MobileNetV2's 1x1-conv GEMMs take bf16 operands, float32
accumulation; on the LightCNN row, which has none, it is fp32 again), torch fp32 and bf16
(autocast), torch channels_last on all cores; img/s is the median of --windows timed windows, and
the ratios are normjax fp32's and normjax's best setting's over the best torch setting of the row.
normjax runs in this process, torch in
benchmarks/compare_torch.py's, started per row with the same environment (malloc tunables
included). Every timed window of every setting of a row alternates with the others', never
overlapping, so load from other processes hits all of them alike.

What is timed is what training runs: normjax's jitted, donated `normjax.steps.build_programs`
train/eval step of the row's config (uint8 images in, augmentation and resize on device,
metrics accumulated in the state; `train.monitor_every_steps` = 0, i.e. without the periodic
per-layer statistics). torch runs the same network (tests/torch_reference.py's torchvision
MobileNetV2, a LightCNN, the study's head with FRN), the same preprocessing and optimizer, as
a torch user would: channels_last, `model.train()` / `inference_mode`, `zero_grad(set_to_none)`.
Weights are random (speed does not depend on their values).

Hardware: `lscpu` on 2026-11-25 reports the development machine's 2 cores as an AMD EPYC (family
26: AVX-512 with AVX512-BF16, no AMX) under KVM. The figures below dated before that were taken
on the same 2-core machine, then described (from the project brief, not lscpu) as Sapphire Rapids.

Where the time goes (XLA CPU, jax 0.10.2, 2 shared cores, before 2026-11-25): share of thunk time
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
bf16 GEMMs (2026-11-25, second session): XLA CPU hands a bf16 dot to YNNPACK's bf16 GEMM only
when it asks for a float32 result and is canonical (the lhs contracts its last dimension, the
rhs its first); every other bf16 dot, a bf16-result dot and autodiff's two gradient dots among
them, gets float32 copies of its operands. Until then the bf16 step ran its GEMMs in float32 on
converted copies, and standalone bf16 <-> f32 converts were ~20% of its thunk time, so it was
slower than fp32. normjax/models/matmul.py writes all three GEMMs of a 1x1 conv in the bf16
kernel's form (benchmarks/matmul_bf16.py times them). Asking for an f32 result in the forward
alone, as tried earlier, made the steps slower (cifar train 0.84x, eval224 0.93x).
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
glibc malloc (normjax/cpu_malloc.py), re-measured 2026-11-25 on the idle AMD EPYC cores, kernel
6.18 with transparent huge pages (THP) in madvise mode; normjax fp32 CIFAR-stem train step, 6-8
steps after warm-up, each setting in separate processes, run twice: XLA CPU allocates one ~0.8 GB
temp buffer per step from an XLA thread's malloc arena. A non-main arena's heap holds at most
64 MiB, so glibc maps the block with mmap and unmaps it on free (M_MMAP_MAX=0 does not stop that
fallback), and the next step faults it in again.
  untuned                                         102-119 img/s  211k faults/step  0.6k ctx switches
  mallopt M_ARENA_MAX=1, M_MMAP_MAX=0, trim 2 GiB  63-100 img/s  26-105k          9-11k
    (normjax's setting until 2026-11-25: every thread in the main arena, which grows with brk
    and keeps freed memory, but XLA's threads then contend for its lock)
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1           160-179 img/s   740-830          0.5-0.6k
    (normjax's setting now: malloc madvises huge pages, so a fault maps 2 MiB; the unmap stays)
  hugetlb=1 + mmap_max=0 + trim_threshold         141-147; hugetlb=1 + arena_max=1: 83-86; + 2: 149
On full224 the same switch took the step from 13.1 (mallopt) to 38.1 img/s. The kernel still
zeroes every fresh huge page: clear_page was 16% of a perf profile (torch and normjax in one
process); 0.2 cores of system time in the normjax step alone.
Tunables are read when a process starts, so entry points re-execute themselves with the tunable
(`normjax.startup.reexec_for_cpu`, this script too). Reproduce the comparison with
benchmarks/train_throughput.py (faults/step, system cores), NORMJAX_TUNE_MALLOC=0 for untuned.
Since 2026-11-25 torch runs in a process of its own, as training never has torch beside it. In
scratch runs (one process each, CIFAR stem, 5-step windows) the normjax step measured 178 img/s
alone against 102 and 135 beside torch fp32 / bf16 in its process; but the full table did not
move with the split beyond the run-to-run spread (best ratios 1.28 / 0.59 / 0.68 / 0.80 / 0.82 /
1.68 in one process; 1.28 / 0.66-0.69 / 0.59-0.69 / 0.61-0.65 / 0.67-1.01 / 1.49-1.64 in two). The same
normjax step varies from process to process by up to 1.3x (CIFAR stem, back-to-back windows:
142-149 in one process, 178-190 in the next, identical settings), more than between settings, so
one table's ratios carry that uncertainty; README gives the tables of separate runs.
Where the time goes now (2026-11-25, CIFAR-stem fp32 train step, huge pages, one jax.profiler
trace of 5 steps; thunk time 494 ms/step over both threads, classes from the HLO op_name):
depthwise backward 30.5% (the kernel gradient's chunk loop alone 28%: per step 1,386 YNNPACK
reduces and 1,280 pad/slice fusions, small enough that per-thunk overhead counts), 1x1 GEMMs
21.7% (backward 14.3), BatchNorm backward 12.8%, depthwise forward 8.6%, ReLU6 backward selects
and residual adds 8.2%, BatchNorm statistics 4.7% and apply + ReLU6 4.0%, optimizer and
parameter copies 4.5%, the stem conv 0.8%.
C++ depthwise kernels (2026-11-25, third session; normjax/csrc/depthwise.cc, built on first use
by normjax/native.py): the forward, input gradient and kernel gradient each read their inputs
once and write their output once, vectorized over channels, on XLA's thread pool. Per call
(benchmarks/depthwise_speed.py, forward + both gradients, the 224 px network's 17 convs, batch
16) see README. In the train step, A/B in one process (the same step built twice, C++ against
tap sums, 5-7 alternating windows): full224 bf16 GEMM 1.37x and 1.21x (two processes), cifar
bf16 GEMM 1.20x. Where no gradient is taken, the C++ forward was slower: eval224 fp32 0.84x,
the online study step 0.81x. XLA fuses the tap sum with the eval-mode BatchNorm + ReLU6 before
and after it (and the bf16 convert of the next GEMM's operand), which a custom call cannot
join, so it costs a write and a read of both activations more. So the kernels' custom VJP has
the tap sum as its plain forward and the C++ forward only in its differentiated forward (eval224
1.03x). In the study step the frozen prefix was still differentiated (its params are, though
their gradient is cut), 0.91x; the train step now holds frozen params constant with
stop_gradient (normjax/steps.py), so the prefix runs the plain forward: 1.00x.
The stem conv as a GEMM over its 27-channel input patches (PatchConv in
normjax/models/mobilenet_v2.py) instead of XLA CPU's convolution, A/B the same way, bf16 GEMM:
study 1.10x, eval224 1.18x, full224 1.03x, cifar 1.00x (fp32 1.00x). Alone, at batch 64 and
224 px: forward 59 -> 34 ms, forward + kernel gradient 108 -> 46 ms; with bf16 operands no
faster (35 / 84 ms). In the study step's profile before it, the stem conv was 17.6% of the
thunk time.
Where the time goes after the C++ kernels (full224 bf16 GEMM step, before PatchConv, one
jax.profiler trace of 5 steps, 285 ms of thunk time per step): 1x1 GEMM backward 23.9%,
BatchNorm + ReLU6 backward 20.3%, depthwise backward (C++) 12.6%, depthwise forward (C++) 9.9%,
BatchNorm + ReLU6 forward 9.0%, 1x1 GEMM forward 7.1%, bf16 converts 6.0%, stem conv 6.1%.
Each timed window starts cold for normjax (2026-11-25, CIFAR stem fp32, one process, one step
timed at a time): back to back, or after a 0.01-0.2 s pause, a step takes 0.54-0.60 s of user and
0.03-0.09 s of system CPU time (185-194 img/s); after a 1 s pause, the same 0.6 s of user time
but 0.45-0.49 s of system time (103-109 img/s), with no more page faults than usual. So the
first step of each window (which follows ~2 s of the other settings' windows) runs at about half
speed, and normjax's figures here read ~10% below its steady training rate. The likely cause,
not verified, is this VM's virtio-balloon free page reporting: the per-step temp buffer that
glibc unmaps is handed back to the host when idle, and faulting it in again costs the host's
work. A training loop runs its steps back to back and does not pay it; compare.py keeps the
windows as they are, for both frameworks.
Max pooling (normjax/models/pooling.py): flax's max_pool differentiates through XLA's
select-and-scatter, a scatter with generated indices on CPU; an elementwise custom VJP takes the
LightCNN train step from 8.8k to 14.7-14.9k img/s (separate processes, twice each).
Tried on the 2026-11-25 machine, not faster (CIFAR stem fp32, hugetlb=1, separate processes):
xla_cpu_prefer_vector_width=512 (152 vs 179 img/s), the concurrency-optimized scheduler (139),
YNNPACK ELTWISE fusions (52-91), YNNPACK DOT fusion (145); the depthwise kernel gradient's chunk
at 8, 32 or 1024 MiB instead of 2 MiB (145-157 vs 168-173), its 9 taps as one stacked reduce
(139-142 vs 139-183), or each tap's product over the valid region of the unpadded chunk, without
the per-chunk pad (136-159 vs 179-180).
"""
import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

# The repo: normjax and configs without `pip install -e .`.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
# pylint: disable=g-import-not-at-top,g-bad-import-order
from normjax import startup  # noqa: E402

# As normjax's entry points do, before jax starts its threads: the malloc tunables
# (normjax/cpu_malloc.py) are part of the training code path; the torch process inherits them.
if __name__ == '__main__':
  startup.reexec_for_cpu()
_HUGE_PAGES = startup.prepare_process()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from normjax import features, parallel, steps  # noqa: E402
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


def _statistics(row: str, images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """The per-channel mean and std that both frameworks normalize the row's images with."""
  return (MEAN, STD) if row == 'cached' or images.shape[-1] == 3 else ((0.0,), (1.0,))


def _normjax_step(row: str, setting: str, images: np.ndarray, labels: np.ndarray) -> Callable[[], Any]:
  """One call runs one normjax step of `row` (the training loop's own jitted programs)."""
  config = _config(row)
  config.model.dtype, config.model.gemm_dtype = NORMJAX_SETTINGS[setting]
  if config.model.name != 'mobilenet_v2':
    config.model.gemm_dtype = 'compute'  # the LightCNN row has no 1x1 conv
  size = config.data.image_size
  mean, std = _statistics(row, images)
  programs = steps.build_programs(config, NUM_CLASSES, (size, size, len(mean)), mean, std,
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


def _window(step: Callable[[], Any], n: int) -> float:
  """Seconds for n steps, synchronised at the end."""
  start = time.perf_counter()
  out = None
  for _ in range(n):
    out = step()
  jax.block_until_ready(out)
  return time.perf_counter() - start


ROWS = {
    'lightcnn': 'LightCNN train, 28 px, batch 64',
    'cifar': 'MobileNetV2 CIFAR stem train, 32 px, batch 64',
    'full224': 'MobileNetV2 full train, 224 px, batch 16',
    'eval224': 'MobileNetV2 eval forward, 224 px, batch 32',
    'study': 'study step online (features.18 + head), 224 px, batch 64',
    'cached': 'cached head phase (features.18 + head), 7x7x320, batch 64',
}
# normjax setting -> (config.model.dtype, config.model.gemm_dtype).
NORMJAX_SETTINGS = {'normjax fp32': ('float32', 'compute'), 'normjax bf16': ('bfloat16', 'compute'),
                    'normjax bf16 GEMM': ('float32', 'bfloat16')}
SETTINGS = (*NORMJAX_SETTINGS, 'torch fp32', 'torch bf16')


class _TorchProcess:
  """benchmarks/compare_torch.py for one row, in a process of its own; runs torch windows on request."""

  def __init__(self, row: str, config, images: np.ndarray, labels: np.ndarray, tmp: str):
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      f.write(config.to_json())
    mean, std = _statistics(row, images)
    np.savez(os.path.join(tmp, 'inputs.npz'), images=images, labels=labels, mean=mean, std=std,
             num_classes=NUM_CLASSES)
    self._proc = subprocess.Popen(
        [sys.executable, os.path.join(_ROOT, 'benchmarks', 'compare_torch.py'), f'--row={row}',
         f'--config={tmp}/config.json', f'--inputs={tmp}/inputs.npz'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    kind, ready = self._proc.stdout.readline().split(' ', 1)
    if kind != 'ready':
      raise RuntimeError(f'compare_torch.py for {row} did not start: {kind} {ready}')
    ready = json.loads(ready)
    self.version, self.one_step = ready['torch'], ready['one_step']

  def window(self, setting: str, n: int) -> float:
    self._proc.stdin.write(f'{setting} {n}\n')
    self._proc.stdin.flush()
    return float(self._proc.stdout.readline())

  def close(self) -> None:
    self._proc.stdin.close()
    self._proc.wait(timeout=60)


def _measure(row: str, windows: int, window_s: float) -> tuple[dict[str, float], str]:
  """Median img/s of each setting (the settings' timed windows alternate) and torch's version."""
  rng = np.random.default_rng(0)
  config = _config(row)
  images, labels = _inputs(row, config, rng)
  normjax = {name: _normjax_step(row, name, images, labels) for name in NORMJAX_SETTINGS}
  seconds = {}  # setting -> seconds of one step, after warm-up
  for name, step in normjax.items():
    _window(step, 2)  # compilation and first-call allocation
    seconds[name] = _window(step, 1)
  with tempfile.TemporaryDirectory() as tmp:
    torch_side = _TorchProcess(row, config, images, labels, tmp)
    try:
      seconds.update(torch_side.one_step)
      run = {**{name: functools.partial(_window, step) for name, step in normjax.items()},
             **{name: functools.partial(torch_side.window, name) for name in torch_side.one_step}}
      # Steps per window: about window_s seconds, from one timed step.
      steps_per_window = {name: max(1, round(window_s / s)) for name, s in seconds.items()}
      rates = {name: [] for name in SETTINGS}
      for _ in range(windows):
        for name in SETTINGS:
          n = steps_per_window[name]
          rates[name].append(n * len(labels) / run[name](n))
    finally:
      torch_side.close()
  return {name: statistics.median(r) for name, r in rates.items()}, torch_side.version


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
  print(f'jax {jax.__version__} ({jax.devices()[0].device_kind}) in this process, torch '
        f'channels_last on {os.cpu_count()} cores in its own; img/s = median of {args.windows} '
        f'alternating windows of ~{args.window_s:g} s; ratio = normjax / best torch; glibc malloc '
        f'huge pages: {_HUGE_PAGES}', flush=True)
  header = ['row', *SETTINGS, 'fp32 ratio', 'best ratio']
  print('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header), flush=True)
  for row in rows:
    med, torch_version = _measure(row, args.windows, args.window_s)
    best_torch = max(med['torch fp32'], med['torch bf16'])
    best_nj = max(med[name] for name in NORMJAX_SETTINGS)
    cells = [ROWS[row], *(f'{med[s]:.1f}' for s in SETTINGS),
             f'{med["normjax fp32"] / best_torch:.2f}', f'{best_nj / best_torch:.2f}']
    print('| ' + ' | '.join(cells) + ' |', flush=True)
  print(f'torch {torch_version}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
