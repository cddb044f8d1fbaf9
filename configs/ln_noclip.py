r"""Study run LN-NoClip: MobileNetV2 (ImageNet, torchvision V1) frozen but features.18 + ln head, clip=none.

  python -m normjax.main --config=configs/ln_noclip.py --workdir=workdir/study/ln_noclip

Recipe (study.md section 1): CIFAR-10 (original python release, local or downloaded) 80/20 split, 224x224, batch 64,
Adam head 1e-3 / features.18 1e-5, 15 epochs.
Expected: the study reports 90.22% final val accuracy.
Measured here: final val 80.07%, test 79.41% on cifar10_jpeg (a JPEG re-encoding) with
--config.data.name=cifar10_jpeg --config.data.augment_variants=4, frozen_bn=eval, one seed
(2026-11-24, 2 CPU cores; README "Results", docs/study/report.md).
Quick CPU check of the pipeline (offline, cifar10_jpeg, no weights):
  python -m normjax.main --config=configs/ln_noclip.py:quick --workdir=workdir/quick/ln_noclip
"""
from configs import base


def get_config(arg: str | None = None):
  return base.study('ln', 'none', arg, __file__)
