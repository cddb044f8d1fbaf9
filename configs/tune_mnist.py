r"""The seed's Keras Tuner search (study.md section 5) as Optuna + Hyperband on MNIST, on a CPU budget.

  NORMJAX_DATA_DIR=../shared/data nice -n 5 python -m normjax.tune \
      --config=configs/tune_mnist.py --trials=15 --workdir=workdir/tune_mnist

Each trial is a `tunable_cnn` (models/tunable_cnn.py) whose layers, dropout and LR normjax.tune
samples from the seed's space (2-5 convs of 32-256 filters, kernel 3 or 5; 2-5 dense layers of
32-256 units; dropout 0-0.5 step 0.1; Adam LR 1e-4, 5e-4 or 1e-3) and prunes with
HyperbandPruner(min_resource=1, max_resource=7, reduction_factor=3), the seed's Hyperband
(max_epochs=7, factor=3). The fields below are what the search does not change.

Recipe: real MNIST IDX files (`mnist_idx`), pixels / 255, no augmentation, Adam with a constant
LR (a trial is trained epoch by epoch, one train_and_evaluate call per epoch, so an LR schedule
must not depend on train.num_epochs), batch 64 (the seed's batch size is not given).
CPU budget (the seed searched 1 h 23 min on a Colab GPU, 48,000 train / 12,000 val images): a
fixed 4,000-image training subset (data.train_subset, chosen by seed 0; 62 full batches of 64 per
epoch), a 5% validation split (3,000 images), and --trials=15 (the command above), three times
the 5 models one iteration of the seed's Keras Tuner Hyperband trains. A trial's epoch evaluates
val only; a complete trial is evaluated on the 10,000 test images once, after its last epoch.
Measured per epoch call (one train_and_evaluate: data load, compile, 62 steps, val) for conv
128x3,128x5,128x3 + dense 128,128,128, in process CPU seconds on 2 cores shared with other jobs:
31-36 s, against 41-43 s when every epoch also evaluated test (before this change). Estimate, not
measured: ~3.5 epochs per trial (Optuna's Hyperband with max 7, factor 3 has two brackets) at 1-2x
that net's cost on average over the space (its largest nets cost ~4x) gives 30-60 CPU-minutes for
15 trials: 15-30 min on two free cores, 30-60 min beside one busy niced job. Here the cores were
so loaded that wall time ran 2.5-5x the CPU time.
For the seed's full data (a GPU): `--set=data.train_subset=0 --set=data.val_fraction=0.2`.
Expected, as measured (2026-11-24, 2 shared CPU cores, the command above): 15 trials (10 complete, 5 pruned)
in 52 min 53 s, best val accuracy 0.9727 (test 0.9745), docs/tune_mnist/trials.md. The seed's best:
0.9887 on full MNIST (12x the training images).
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
