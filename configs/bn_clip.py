r"""Study run BN-Clip: MobileNetV2 (ImageNet, torchvision V1) frozen but features.18 + bn head, clip=global_norm.

  python -m normjax.main --config=configs/bn_clip.py --workdir=workdir/study/bn_clip

Recipe (study.md section 1): CIFAR-10 (original python release, local or downloaded) 80/20 split, 224x224, batch 64,
Adam head 1e-3 / features.18 1e-5, 15 epochs, clip_by_global_norm 1.0.
Expected: the study reports 90.71% final val accuracy (75.16% after epoch 1).
Measured here: final val 80.77%, test 80.19% on cifar10_jpeg (a JPEG re-encoding) with
--config.data.name=cifar10_jpeg --config.data.augment_variants=4, frozen_bn=eval, seed 0;
over seeds 0-2 (--config.seed=1, 2): 80.88 ± 0.25%, test 80.14 ± 0.14% (mean ± std)
(2026-11-24, 2 CPU cores; README "Results", docs/study/report.md, docs/study_seeds/report.md).
Quick CPU check of the pipeline (offline, cifar10_jpeg, no weights):
  python -m normjax.main --config=configs/bn_clip.py:quick --workdir=workdir/quick/bn_clip
"""
from configs import base


def get_config(arg: str | None = None):
  return base.study('bn', 'global_norm', arg, __file__)
