r"""Study run GN-NoClip (the study's suggested next step): MobileNetV2 (ImageNet, torchvision V1) frozen but features.18 + gn head, clip=none.

  python -m normjax.main --config=configs/gn_noclip.py --workdir=workdir/study/gn_noclip

Recipe (study.md section 1): CIFAR-10 (original python release, local or downloaded) 80/20 split, 224x224, batch 64,
Adam head 1e-3 / features.18 1e-5, 15 epochs.
Expected: not in the study (its suggested GroupNorm follow-up).
Quick CPU check of the pipeline (offline, cifar10_jpeg, no weights):
  python -m normjax.main --config=configs/gn_noclip.py:quick --workdir=workdir/quick/gn_noclip
"""
from configs import base


def get_config(arg: str | None = None):
  return base.study('gn', 'none', arg, __file__)
