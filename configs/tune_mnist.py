r"""The seed's Keras Tuner search (study.md section 5) as Optuna + Hyperband on MNIST, on a CPU budget.

  NORMJAX_DATA_DIR=../shared/data python -m normjax.tune \
      --config=configs/tune_mnist.py --trials=5 --workdir=workdir/tune_mnist

Each trial is a `tunable_cnn` (models/tunable_cnn.py) whose layers, dropout and LR normjax.tune
samples from the seed's space (2-5 convs of 32-256 filters, kernel 3 or 5; 2-5 dense layers of
32-256 units; dropout 0-0.5 step 0.1; Adam LR 1e-4, 5e-4 or 1e-3) and prunes with
HyperbandPruner(min_resource=1, max_resource=7, reduction_factor=3), the seed's Hyperband
(max_epochs=7, factor=3). The fields below are what the search does not change.

Recipe: real MNIST IDX files (`mnist_idx`), pixels / 255, no augmentation, Adam with a constant
LR (a trial is trained epoch by epoch, one train_and_evaluate call per epoch, so an LR schedule
must not depend on train.num_epochs). CPU budget (the seed searched 1 h 23 min on a Colab GPU):
a fixed 4,000-image training subset (data.train_subset, chosen by seed 0; 62 full batches of 64 per
epoch) and a 5% validation split (3,000 images) instead of the seed's 48,000/12,000, batch 64
(the seed's batch size is not given). Every epoch of a trial also evaluates the 10,000 test
images (train_and_evaluate ends each call with it), about as long as the epoch's training on 2
CPU cores; the search does not use that accuracy. For the seed's full data (a GPU):
`--set=data.train_subset=0 --set=data.val_fraction=0.2`.
Expected: not yet measured here (the seed's best val accuracy: 0.9887 on full MNIST).
Argument: `:quick` (base.quick's 20 steps per trial, here 2 epochs of 320 images), a CPU-minutes check:
  NORMJAX_DATA_DIR=../shared/data python -m normjax.tune --config=configs/tune_mnist.py:quick --trials=2 --workdir=workdir/quick/tune_mnist
"""
from configs import base


def get_config(arg: str | None = None):
  args = base.parse_arg(arg, __file__, quick=False)
  config = base.seed_mnist('tunable_cnn', None, __file__, num_epochs=7)  # Hyperband max_epochs=7
  config.model.head_init = 'flax'  # zero bias like Keras' Dense (torch's init draws the bias)
  config.data.train_subset = 4_000  # CPU budget (see above)
  config.data.val_fraction = 0.05    # CPU budget: 3,000 validation images
  config.optim.schedule = 'constant'  # trials resume epoch by epoch: no num_epochs-dependent decay
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 10_000  # epoch ends save anyway
  config.train.keep_checkpoints = 1
  config.train.monitor_every_steps = 0  # no per-layer statistics: the search reads val accuracy only
  if args.quick:
    config = base.quick(config)
    config.data.train_subset = 320  # 10 steps of 32 per epoch: base.quick's 20 steps make 2 epochs
  return config
