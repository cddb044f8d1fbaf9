r"""Study run FRN-Clip: MobileNetV2 (ImageNet, torchvision V1) frozen but features.18 + frn head, clip=global_norm.

  python -m normjax.main --config=configs/frn_clip.py --workdir=workdir/study/frn_clip

Recipe (study.md section 1): CIFAR-10 (original python release, local or downloaded) 80/20 split, 224x224, batch 64,
Adam head 1e-3 / features.18 1e-5, 15 epochs, clip_by_global_norm 1.0.
Expected: the study gives no number for this run.
Quick CPU check of the pipeline (offline, cifar10_jpeg, no weights):
  python -m normjax.main --config=configs/frn_clip.py:quick --workdir=workdir/quick/frn_clip
"""
from configs import base


def get_config(arg: str | None = None):
  return base.study('frn', 'global_norm', arg, __file__)
