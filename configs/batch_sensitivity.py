r"""Batch-size sensitivity of the backbone norm (Wu & He 2018, Fig. 1), from scratch on a CPU budget.

  NORMJAX_DATA_DIR=../shared/data python -m normjax.main \
      --config=configs/batch_sensitivity.py:norm=bn,batch=64 --workdir=workdir/batch_sensitivity/bn_b64

MobileNetV2 CIFAR variant (stem and first stride-2 stage at stride 1, 32 px, 4x4 final map),
width 0.5, torchvision's classifier (dropout 0.2, Linear with nn.Linear's init), trained from
scratch on a fixed 10,000-image subset of cifar10_jpeg (chosen by seed 0 from the 45,000 left
after a 10% validation split of 5,000), random crop + flip, 5 epochs, SGD with Nesterov momentum
0.9, LR 0.05 x batch/64 (Goyal et al. 2017 linear scaling; 0.05 at batch 64 is the anchor's),
one epoch of linear warm-up then cosine to 0, weight decay 5e-4 coupled like torch.optim.SGD's
(added to the gradient before momentum, on every parameter: normjax.optim), batch 64 unless
`batch=` says. This is the PyTorch anchor measured on these 2 cores (BN, batch 64, 700,490
parameters: 52.12% test in 288 s, the 10k subset and torch SGD as above), plus the warm-up, which
the anchor did not have (`--config.optim.warmup_epochs=0` gives the anchor's recipe).

Arguments (comma-separated): norm=bn|gn|ln|frn|nf (default bn), batch=N (default 64), quick.
- bn: BatchNorm (torch's). gn: GroupNorm with 8 groups: Wu & He use 32 and find GN insensitive
  to the group count (their Table 3), but 32 does not divide the 8- and 16-channel layers at
  width 0.5, and every layer's width is a multiple of 8 (make_divisible). ln: LayerNorm over
  (H, W, C) of each example, Wu & He's LN (GroupNorm with one group). frn: FRN + TLU (Singh &
  Krishnan 2020) in place of every BN (it has no batch dependence at all).
- nf: the normalizer-free MobileNetV2 (models/nf.py) with AGC at lambda 0.16 for every batch size
  (base.agc_lambda_for_batch's value below batch 64; fixed, so that along the line only the batch
  size and its LR change), its classifier zero-initialised as in NFNets (model.head_init=zeros).
The sweep (5 norms x batch 64, 32, 16, 8, 4, 2; resumable) and its Wu & He figure (report.md
"Batch size" and batch_size.png, written by --report or `python -m normjax.report WORKDIR`):
  SPECS=$(for b in 64 32 16 8 4 2; do for n in bn gn ln frn nf; do
            printf 'configs/batch_sensitivity.py:norm=%s,batch=%s,' $n $b; done; done)
  NORMJAX_DATA_DIR=../shared/data nice -n 10 python -m normjax.sweep --configs="${SPECS%,}" \
      --workdir=workdir/batch_sensitivity --report
Expected (measured, README "Batch-size sensitivity", 2 CPU cores as two single-core sweeps; a run takes
6-37 min on one core): BN at batch 64 (the first command) 55.89% test, final val 56.44%; without
the warm-up (the anchor's recipe) 50.60% test, 51.16% val, against the torch anchor's 52.12%.
BN's val falls to 49-50% at batches 16-4 and 33.52% at batch 2, below GN (35.50%) and NF (37.44%);
GN and NF stay at 34-41% val at every batch size, LN at 36-39% down to batch 4 (32.00% at 2);
FRN stays at chance at LR >= 0.0125 (batch >= 16) and ends at 29.6-30.8% at batches 8-2. The
5,000-image budget (`--set=data.train_subset=5000`) is too small: GN 32.0%, LN 26.4% val at batch 64.
"""
from configs import base
from normjax.errors import ConfigError

NORMS = ('bn', 'gn', 'ln', 'frn', 'nf')
ANCHOR_LR, ANCHOR_BATCH = 0.05, 64  # the PyTorch anchor's SGD LR at its batch size
GN_GROUPS = 8  # divides every layer at width 0.5 (see above)
NF_AGC_LAMBDA = 0.16  # base.agc_lambda_for_batch below batch 64 (after Brock et al. 2021, Fig. 3)


def get_config(arg: str | None = None):
  args = base.parse_arg(arg, __file__, norm='bn', batch=ANCHOR_BATCH, quick=False)
  if args.norm not in NORMS:
    where = base._display_path(__file__)  # pylint: disable=protected-access
    raise ConfigError(f"{where}:{arg}: argument 'norm' = {args.norm!r}; allowed: {', '.join(NORMS)}")
  nf = args.norm == 'nf'
  config = base.scratch('nf_mobilenet_v2' if nf else 'mobilenet_v2', 'agc' if nf else 'none',
                        f'batch={args.batch}', __file__)
  config.model.norm = 'none' if nf else args.norm
  config.optim.agc_lambda = NF_AGC_LAMBDA  # read by nf only; fixed so only batch and LR vary by batch
  config.model.gn_groups = GN_GROUPS
  config.model.width_mult = 0.5
  config.data.train_subset = 10_000
  config.data.val_fraction = 0.1
  config.optim.lr = config.optim.backbone_lr = ANCHOR_LR * args.batch / ANCHOR_BATCH
  config.optim.weight_decay = 5e-4
  # One epoch of linear warm-up for every norm (the anchor had none): without it GN and LN diverge
  # at LR 0.05 in their first 50 steps (loss 4.9 and 11.1) and end at chance (measured, 5k images).
  config.optim.warmup_epochs = 1.0
  config.train.num_epochs = 5
  config.train.log_every_steps = 50
  config.train.monitor_every_steps = 0  # the analysis reads accuracies only
  config.train.checkpoint_every_steps = 1000
  return base.quick(config) if args.quick else config
