r"""BatchNorm MobileNetV2 (the same CIFAR variant) from scratch on cifar10_jpeg: the NF+AGC baseline.

  python -m normjax.main --config=configs/bn_scratch.py --workdir=workdir/nf_vs_bn/bn_b128
  python -m normjax.main --config=configs/bn_scratch.py:cpu,batch=8 --workdir=workdir/nf_vs_bn/bn_b8
  python -m normjax.main --config=configs/bn_scratch.py --config.optim.clip=global_norm --workdir=...

Identical to configs/nf_agc_scratch.py except for normalization (BN) and
clipping (none by default; global_norm via override).
Arguments (comma-separated, as for configs/nf_agc_scratch.py): batch=N, lambda=X
(AGC threshold, used only with optim.clip=agc), cpu (the 2-core budget), quick.
Expected: see README "NF+AGC vs BN" for the measured accuracies (JPEG CIFAR-10).
"""
from configs import base


def get_config(arg: str | None = None):
  return base.scratch('mobilenet_v2', 'none', arg, __file__)
