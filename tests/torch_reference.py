"""torchvision's MobileNetV2, re-typed in plain torch (torchvision is not installable here).

Module and state_dict names are torchvision's (torchvision/models/mobilenetv2.py and
torchvision.ops.misc.Conv2dNormActivation): `features.<i>...`, `features.<i>.conv.<m>...`,
`classifier.1`. Shared by the port tests and benchmarks/mobilenet_v2_speed.py.
`cifar_stem` mirrors normjax's CIFAR variant (stem and first stride-2 stage at stride 1).
"""
import torch
from torch import nn

# torchvision/models/mobilenetv2.py: inverted_residual_setting (t, c, n, s).
SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
            [6, 160, 3, 2], [6, 320, 1, 1]]


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
  """torchvision.models._utils._make_divisible, verbatim."""
  if min_value is None:
    min_value = divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class Conv2dNormActivation(nn.Sequential):
  """torchvision.ops.misc.Conv2dNormActivation(norm_layer=BatchNorm2d, activation_layer=ReLU6)."""

  def __init__(self, inp: int, oup: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
    padding = (kernel_size - 1) // 2
    super().__init__(
        nn.Conv2d(inp, oup, kernel_size, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):

  def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
    super().__init__()
    hidden_dim = int(round(inp * expand_ratio))
    self.use_res_connect = stride == 1 and inp == oup
    layers = []
    if expand_ratio != 1:
      layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1))
    layers.extend([
        Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
        nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
    ])
    self.conv = nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.use_res_connect:
      return x + self.conv(x)
    return self.conv(x)


class MobileNetV2(nn.Module):

  def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, cifar_stem: bool = False):
    super().__init__()
    input_channel = _make_divisible(32 * width_mult, 8)
    self.last_channel = _make_divisible(1280 * max(1.0, width_mult), 8)
    features = [Conv2dNormActivation(3, input_channel, stride=1 if cifar_stem else 2)]
    for stage, (t, c, n, s) in enumerate(SETTINGS):
      output_channel = _make_divisible(c * width_mult, 8)
      if cifar_stem and stage == 1:
        s = 1
      for i in range(n):
        features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
        input_channel = output_channel
    features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1))
    self.features = nn.Sequential(*features)
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out')
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.zeros_(m.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.features(x)
    x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
    return self.classifier(torch.flatten(x, 1))


@torch.no_grad()
def randomize_(model: MobileNetV2, seed: int = 0, image_size: int = 64) -> MobileNetV2:
  """Gives every BN a non-identity affine map and realistic, non-trivial running statistics.

  Running stats come from one train-mode pass over random images (momentum 1, so each
  layer's stats match what it sees and activations stay well scaled through 19 blocks),
  then are perturbed so they are not exactly batch statistics. Returns `model` in eval mode.
  """
  g = torch.Generator().manual_seed(seed)
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  for bn in bns:
    bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
    bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.2)
    bn.momentum = 1.0
  model.classifier[1].weight.normal_(0, 0.05, generator=g)
  model.classifier[1].bias.normal_(0, 0.1, generator=g)
  model.train()
  model(torch.randn(8, 3, image_size, image_size, generator=g))
  for bn in bns:
    bn.momentum = 0.1  # torch default
    bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=g) * 0.05)
    bn.running_var.mul_(torch.rand(bn.running_var.shape, generator=g) * 0.5 + 0.75)
    bn.running_var.clamp_(min=1e-2)  # a dead channel would otherwise divide by sqrt(eps)
  return model.eval()
