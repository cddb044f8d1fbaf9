r"""Study run FRN-AGC (normjax extension): MobileNetV2 (ImageNet, torchvision V1) frozen but features.18 + frn head, clip=agc.

  python -m normjax.main --config=configs/frn_agc.py --workdir=workdir/study/frn_agc

Recipe (study.md section 1): CIFAR-10 (original python release, local or downloaded) 80/20 split, 224x224, batch 64,
Adam head 1e-3 / features.18 1e-5, 15 epochs, unit-wise AGC lambda 0.16 with the classifier excluded.
Expected: not in the study; normjax's extension.
Quick CPU check of the pipeline (offline, cifar10_jpeg, no weights):
  python -m normjax.main --config=configs/frn_agc.py:quick --workdir=workdir/quick/frn_agc
"""
from configs import base


def get_config(arg: str | None = None):
  return base.study('frn', 'agc', arg, __file__)
