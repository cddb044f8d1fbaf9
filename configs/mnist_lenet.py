r"""The seed's "LeNet-like CNN with big FC layers" baseline (100,506 params) on MNIST.

  NORMJAX_DATA_DIR=../shared/data python -m normjax.main \
      --config=configs/mnist_lenet.py --workdir=workdir/mnist_lenet

Recipe (study.md section 4, configs/base.py seed_mnist): real MNIST IDX files
(`mnist_idx`), 80/20 train/val split, ToTensor only ([0, 1] scaling:
data.normalize=False, no augmentation), CrossEntropy, Adam, 50 epochs. The seed
gives no LR or batch size: Adam's default 1e-3 and batch 64 here.
Layout (models/seed_cnns.py; the seed gives none): LeNet-5 with ReLU, max-pooling
and a 200-unit first FC layer.
Expected: 99.14% test accuracy, 100,506 params (measured here on 2 shared CPU cores, README "The
seed's MNIST table"; the seed's comparison table: ~99%).
Argument: `:quick` (base.quick: 1,024 training images, 20 steps), a CPU-minute pipeline check:
  NORMJAX_DATA_DIR=../shared/data python -m normjax.main --config=configs/mnist_lenet.py:quick --workdir=workdir/quick/mnist_lenet
"""
from configs import base


def get_config(arg: str | None = None):
  return base.seed_mnist('lenet', arg, __file__)
