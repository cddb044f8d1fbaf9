r"""Study run LN-Clip: MobileNetV2 (ImageNet, torchvision V1) frozen but features.18 + ln head, clip=global_norm.

  python -m normjax.main --config=configs/ln_clip.py --workdir=workdir/study/ln_clip

Recipe (study.md section 1): CIFAR-10 (original python release, local or downloaded) 80/20 split, 224x224, batch 64,
Adam head 1e-3 / features.18 1e-5, 15 epochs, clip_by_global_norm 1.0.
Expected: the study gives no number for this run.
Measured here: final val 80.12%, test 79.38% on cifar10_jpeg (a JPEG re-encoding) with
--config.data.name=cifar10_jpeg --config.data.augment_variants=4, frozen_bn=eval, one seed
(2026-11-24, 2 CPU cores; README "Results", docs/study/report.md).
Quick CPU check of the pipeline (offline, cifar10_jpeg, no weights):
  python -m normjax.main --config=configs/ln_clip.py:quick --workdir=workdir/quick/ln_clip
"""
from configs import base


def get_config(arg: str | None = None):
  return base.study('ln', 'global_norm', arg, __file__)
