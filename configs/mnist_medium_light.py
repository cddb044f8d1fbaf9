r"""The seed's "medium-light" 2-conv baseline (2,986 params) on MNIST.

  NORMJAX_DATA_DIR=../shared/data python -m normjax.main \
      --config=configs/mnist_medium_light.py --workdir=workdir/mnist_medium_light

Recipe (study.md section 4, configs/base.py seed_mnist): real MNIST IDX files
(`mnist_idx`), 80/20 train/val split, ToTensor only ([0, 1] scaling:
data.normalize=False, no augmentation), CrossEntropy, Adam, 50 epochs. The seed
gives no LR or batch size: Adam's default 1e-3 and batch 64 here.
Layout (models/seed_cnns.py; the seed gives only "2 convs, ~3,000 params"):
conv 1->12, pool, conv 12->24, global average pooling, FC 24->10.
Expected: 95.37% test accuracy, 2,986 params (measured here on 2 shared CPU cores, README "The
seed's MNIST table"; the seed's table: below LightCNN's 98.61%).
Argument: `:quick` (base.quick: 1,024 training images, 20 steps), a CPU-minute pipeline check:
  NORMJAX_DATA_DIR=../shared/data python -m normjax.main --config=configs/mnist_medium_light.py:quick --workdir=workdir/quick/mnist_medium_light
"""
from configs import base


def get_config(arg: str | None = None):
  return base.seed_mnist('medium_light', arg, __file__)
