r"""The seed's final Keras CNN (study.md section 5; 130,890 params) on MNIST, 15 epochs.

  NORMJAX_DATA_DIR=../shared/data python -m normjax.main \
      --config=configs/cnn_mnist.py --workdir=workdir/cnn_mnist

Model (models/seed_cnns.py `cnn_mnist`): conv32-pool-conv64-pool-conv64-flatten-
dense128-dense10, Keras 'valid' 3x3 convs and 2x2 max-pools, Keras init in the
backbone. Recipe: real MNIST IDX files (`mnist_idx`), 80/20 train/val split,
pixels / 255 (data.normalize=False), no augmentation, Adam 1e-3 (Keras' default),
15 epochs (section 5). The seed gives no batch size: 64 here (Keras' fit()
default would be 32).
Expected: 99.23% test accuracy (best val 99.27%), 130,890 params, measured here on 2 shared CPU
cores (README "The seed's MNIST table"); the seed reports train accuracy 0.9987 after 15 epochs.
Argument: `:quick` (base.quick: 1,024 training images, 20 steps), a CPU-minute pipeline check:
  NORMJAX_DATA_DIR=../shared/data python -m normjax.main --config=configs/cnn_mnist.py:quick --workdir=workdir/quick/cnn_mnist
"""
from configs import base


def get_config(arg: str | None = None):
  config = base.seed_mnist('cnn_mnist', arg, __file__, num_epochs=15)  # section 5: 15 epochs
  config.model.head_init = 'flax'  # zero bias like Keras' Dense (torch's init draws the bias)
  return config
