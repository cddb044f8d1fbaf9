r"""Study run BN-AGC (normjax extension): MobileNetV2 (ImageNet, torchvision V1) frozen but features.18 + bn head, clip=agc.

  python -m normjax.main --config=configs/bn_agc.py --workdir=workdir/study/bn_agc

Recipe (study.md section 1): CIFAR-10 (original python release, local or downloaded) 80/20 split, 224x224, batch 64,
Adam head 1e-3 / features.18 1e-5, 15 epochs, unit-wise AGC lambda 0.16 with the classifier excluded.
Expected: not in the study; normjax's extension.
Quick CPU check of the pipeline (offline, cifar10_jpeg, no weights):
  python -m normjax.main --config=configs/bn_agc.py:quick --workdir=workdir/quick/bn_agc
"""
from configs import base


def get_config(arg: str | None = None):
  return base.study('bn', 'agc', arg, __file__)
