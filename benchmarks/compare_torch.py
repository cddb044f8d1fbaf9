r"""The torch side of benchmarks/compare.py: a process of its own that times torch steps on request.

  python benchmarks/compare_torch.py --row=ROW --config=CONFIG.json --inputs=BATCH.npz

compare.py starts it once per row and writes the row's config and batch for it. It builds the
torch fp32 and bf16 (autocast) runners and answers `ready` with its version and the seconds of
one step of each. Then, for every line `SETTING STEPS` on stdin, it runs that many steps and
answers their seconds (synchronised at the end), until stdin closes. It inherits compare.py's
environment, the malloc tunables included. torch and jax never share a process, as in training
(benchmarks/compare.py's docstring says what that changed).
"""
import argparse
import json
import os
import sys
import time
from typing import Callable

# Before torch loads OpenMP: spinning OpenMP workers slow torch ~10x when other processes
# share the cores (benchmarks/mobilenet_v2_speed.py).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

# tests/ holds the torch MobileNetV2 (torchvision's layout).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))
# pylint: disable=g-import-not-at-top,g-bad-import-order
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from torch_reference import MobileNetV2 as TorchMobileNetV2  # noqa: E402
# pylint: enable=g-import-not-at-top,g-bad-import-order

SETTINGS = {'torch fp32': False, 'torch bf16': True}  # name -> bf16 autocast


class TorchLightCNN(nn.Module):
  """normjax.models.lightcnn.LightCNN with its linear head (study.md section 4)."""

  def __init__(self, num_classes: int):
    super().__init__()
    self.features = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
    self.classifier = nn.Linear(32, num_classes)

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


def _preprocess(images: torch.Tensor, config, batch) -> torch.Tensor:
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
    mean, std = (torch.tensor(batch[k], dtype=torch.float32)[:, None, None] for k in ('mean', 'std'))
    x = (x - mean) / std
  return x.contiguous(memory_format=torch.channels_last)


def _step(row: str, config: ml_collections.ConfigDict, bf16: bool,
          batch) -> Callable[[], torch.Tensor]:
  """One call runs one torch step of `row`, channels_last, bf16 under CPU autocast if asked.

  `batch`: compare.py's inputs.npz (images, labels, and the mean, std and class count they use).
  """
  num_classes = int(batch['num_classes'])
  torch.manual_seed(0)
  autocast = lambda: torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16)
  x_np = torch.from_numpy(batch['images'])
  y = torch.from_numpy(batch['labels']).long()
  loss_fn = nn.functional.cross_entropy
  if row == 'lightcnn':
    model: nn.Module = TorchLightCNN(num_classes)
    params = [{'params': model.parameters(), 'lr': config.optim.lr}]
  elif row in ('study', 'cached'):
    net = TorchMobileNetV2(num_classes)
    head = nn.Sequential(nn.Linear(1280, config.model.head_hidden), TorchFRN(config.model.head_hidden),
                         nn.ReLU(), nn.Dropout(config.model.dropout),
                         nn.Linear(config.model.head_hidden, num_classes))
    prefix, last = net.features[:18].eval().requires_grad_(False), net.features[18]
    model = nn.ModuleDict({'prefix': prefix, 'last': last, 'head': head})
    params = [{'params': head.parameters(), 'lr': config.optim.lr},
              {'params': last.parameters(), 'lr': config.optim.backbone_lr}]
  else:
    model = TorchMobileNetV2(num_classes, config.model.width_mult, config.model.cifar_stem)
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
        logits = forward(_preprocess(x_np, config, batch)).float()
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
      x = cached if row == 'cached' else _preprocess(x_np, config, batch)
      loss = loss_fn(forward(x).float(), y)
    loss.backward()
    opt.step()
    return loss

  return train


def _window(step: Callable[[], torch.Tensor], n: int) -> float:
  """Seconds for n steps, synchronised at the end."""
  start = time.perf_counter()
  out = None
  for _ in range(n):
    out = step()
  out.sum().item()
  return time.perf_counter() - start


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--row', required=True)
  parser.add_argument('--config', required=True, help='the row\'s normjax config as JSON')
  parser.add_argument('--inputs', required=True, help='.npz with images and labels')
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  with open(args.config) as f:
    config = ml_collections.ConfigDict(json.load(f))
  batch = dict(np.load(args.inputs))
  runners = {name: _step(args.row, config, bf16, batch)
             for name, bf16 in SETTINGS.items()}
  one_step = {}
  for name, step in runners.items():
    _window(step, 2)  # first-call allocation
    one_step[name] = _window(step, 1)
  print('ready', json.dumps({'torch': torch.__version__, 'one_step': one_step}), flush=True)
  for line in sys.stdin:
    name, n = line.rsplit(maxsplit=1)
    print(_window(runners[name], int(n)), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
