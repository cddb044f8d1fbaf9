r"""Smoke test: LightCNN on 2,000 real Fashion-MNIST images for 2 epochs (< 1 minute on 2 CPU cores).

  NORMJAX_DATA_DIR=../shared/data python -m normjax.main --config=configs/smoke.py --workdir=workdir/smoke

Expected: test accuracy 0.5217 on the real Fashion-MNIST test set, 62 steps, 13 s on 2 CPU
cores with the data already prepared (measured 2026-11-24, torch head init; 0.549 before
model.head_init existed). It checks the whole pipeline, not a result.
Argument: `:quick` (base.quick: 20 steps).
"""
from configs import base


def get_config(arg: str | None = None):
  args = base.parse_arg(arg, __file__, quick=False)
  config = base.get_config()
  config.data.name = 'fashion_mnist_idx'
  config.data.image_size = 28
  config.data.augment = False  # study section 4: ToTensor only
  config.data.train_subset = 2000
  config.model.name = 'lightcnn'
  config.model.head = 'linear'
  config.model.dropout = 0.0
  config.model.pretrained = 'none'
  config.optim.trainable_blocks = -1
  config.optim.lr = 3e-3
  config.optim.backbone_lr = 3e-3  # trained from scratch: one LR for all layers
  config.train.batch_size = 64
  config.train.num_epochs = 2
  config.train.log_every_steps = 10
  config.train.monitor_every_steps = 10
  config.train.checkpoint_every_steps = 20
  return base.quick(config) if args.quick else config
