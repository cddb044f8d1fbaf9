r"""Study run FRN-NoClip: MobileNetV2 (ImageNet, torchvision V1) frozen but features.18 + frn head, clip=none.

  python -m normjax.main --config=configs/frn_noclip.py --workdir=workdir/study/frn_noclip

Recipe (study.md section 1): CIFAR-10 (original python release, local or downloaded) 80/20 split, 224x224, batch 64,
Adam head 1e-3 / features.18 1e-5, 15 epochs.
Expected: the study reports 90.57% final val accuracy (its best overall).
Measured here: final val 80.36%, test 79.46% on cifar10_jpeg (a JPEG re-encoding) with
--config.data.name=cifar10_jpeg --config.data.augment_variants=4, frozen_bn=eval, seed 0;
over seeds 0-2 (--config.seed=1, 2): 80.27 ± 0.13%, test 79.39 ± 0.07% (mean ± std)
(2026-11-24, 2 CPU cores; README "Results", docs/study/report.md, docs/study_seeds/report.md).
With the default K = 15 (--config.data.name=cifar10_jpeg only, the README's first command): final
val 80.07%, test 79.26% (2026-11-25; 80.18 / 79.18 before the CPU stem conv became a patch GEMM),
54 min 44 s including the cache (2 idle CPU cores, 2026-11-24; README "Set up and run").
Quick CPU check of the pipeline (offline, cifar10_jpeg, no weights):
  python -m normjax.main --config=configs/frn_noclip.py:quick --workdir=workdir/quick/frn_noclip
"""
from configs import base


def get_config(arg: str | None = None):
  return base.study('frn', 'none', arg, __file__)
