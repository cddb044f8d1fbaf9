r"""The seed's "ultra-light" baseline, 1 conv with 4 filters + FC (210 params), on MNIST.

  NORMJAX_DATA_DIR=../shared/data python -m normjax.main \
      --config=configs/mnist_ultra_light.py --workdir=workdir/mnist_ultra_light

Recipe (study.md section 4, configs/base.py seed_mnist): real MNIST IDX files
(`mnist_idx`), 80/20 train/val split, ToTensor only ([0, 1] scaling:
data.normalize=False, no augmentation), CrossEntropy, Adam, 50 epochs. The seed
gives no LR or batch size: Adam's default 1e-3 and batch 64 here.
Layout (models/seed_cnns.py): conv 1->4 3x3, max-pool to 2x2, FC 16->10.
Expected: 84.42% test accuracy, 210 params (measured here on 2 shared CPU cores, README "The
seed's MNIST table"; the seed's table: it underfits).
Argument: `:quick` (base.quick: 1,024 training images, 20 steps), a CPU-minute pipeline check:
  NORMJAX_DATA_DIR=../shared/data python -m normjax.main --config=configs/mnist_ultra_light.py:quick --workdir=workdir/quick/mnist_ultra_light
"""
from configs import base


def get_config(arg: str | None = None):
  return base.seed_mnist('ultra_light', arg, __file__)
