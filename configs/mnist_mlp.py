r"""The seed's MLP baseline 784-512-256-10 (535,818 params) on MNIST.

  NORMJAX_DATA_DIR=../shared/data python -m normjax.main \
      --config=configs/mnist_mlp.py --workdir=workdir/mnist_mlp

Recipe (study.md section 4, configs/base.py seed_mnist): real MNIST IDX files
(`mnist_idx`), 80/20 train/val split, ToTensor only ([0, 1] scaling:
data.normalize=False, no augmentation), CrossEntropy, Adam, 50 epochs. The seed
gives no LR or batch size: Adam's default 1e-3 and batch 64 here.
Expected: 98.18% test accuracy, 535,818 params (measured here on 2 shared CPU cores, README "The
seed's MNIST table"; the seed's comparison table: ~98%).
Argument: `:quick` (base.quick: 1,024 training images, 20 steps), a CPU-minute pipeline check:
  NORMJAX_DATA_DIR=../shared/data python -m normjax.main --config=configs/mnist_mlp.py:quick --workdir=workdir/quick/mnist_mlp
"""
from configs import base


def get_config(arg: str | None = None):
  return base.seed_mnist('mlp', arg, __file__)
