"""The study's shared recipe (`../shared/docs/study.md` section 1).

Every experiment config starts from `get_config()` here and overrides a few
fields. `normjax.config_schema.validate` checks every field against the
allowed values, so a typo fails with a message naming the field.

This module is not itself an experiment: see `configs/frn_noclip.py` etc.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The base recipe; `arg='quick'` applies `quick()` (see below)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # cifar10 | cifar10_jpeg | fashion_mnist | fashion_mnist_idx
  config.data.name = 'cifar10'  # tfds original (downloads); cifar10_jpeg is the offline JPEG copy
  config.data.tfds_dir = ''      # tfds data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.data.source = ''        # local raw files for normjax builders; '' = $NORMJAX_DATA_DIR
  config.data.image_size = 224   # study: CIFAR-10 resized to 224x224 for MobileNetV2
  config.data.val_fraction = 0.2  # study: 80% train / 20% validation
  config.data.train_subset = 0   # >0: use only this many training images (fixed by seed)
  config.data.augment = True     # study: RandomCrop(32, padding=4) + RandomHorizontalFlip
  config.data.crop_padding = 4   # study: RandomCrop(32, padding=4)
  # With train.feature_cache: K precomputed augmentations per image; epoch e uses variant e mod K.
  # 0 = one per epoch (K = num_epochs), which trains exactly like the uncached run.
  config.data.augment_variants = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = 'mobilenet_v2'  # lightcnn | mobilenet_v2 | nf_mobilenet_v2
  config.model.width_mult = 1.0
  config.model.cifar_stem = False  # True: first strides 1, keeps resolution at 32x32
  config.model.norm = 'bn'         # backbone norm: bn | gn | frn | none
  config.model.head = 'mlp'        # mlp (study head) | linear (torchvision classifier)
  config.model.head_norm = 'bn'    # bn | ln | frn | gn | none
  config.model.head_hidden = 256   # study: FC(1280->256)
  config.model.dropout = 0.5       # study head dropout
  config.model.frn_learned_eps = False
  config.model.gn_groups = 32      # Wu & He 2018 default
  # Frozen blocks' BatchNorm: eval = ImageNet running stats, never updated (cacheable);
  # train = torch's model.train() with requires_grad=False: batch stats, running stats updated.
  config.model.frozen_bn = 'eval'
  config.model.head_init = 'torch'  # torch: nn.Linear's init, as the study's heads had | flax
  config.model.pretrained = 'torchvision_v1'  # none | torchvision_v1 | torchvision_v2 | <path>
  config.model.dtype = 'float32'   # float32 | bfloat16 (compute dtype; params stay float32)

  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'adam'       # adam | sgd
  config.optim.lr = 1e-3           # study: head LR 1e-3
  config.optim.backbone_lr = 1e-5  # study: features.18 LR 1e-5
  config.optim.trainable_blocks = 1  # -1 all (full fine-tuning), 0 none, k = last k backbone blocks
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.weight_decay = 0.0
  config.optim.schedule = 'constant'  # constant | cosine
  config.optim.warmup_epochs = 0.0
  config.optim.clip = 'none'       # none | global_norm | agc
  config.optim.clip_norm = 1.0     # study: clip_grad_norm max_norm=1.0
  config.optim.agc_lambda = 0.01   # Brock et al. 2021: 0.01-0.16 by batch size
  config.optim.agc_eps = 1e-3      # Brock et al. 2021: floor on ||W|| in AGC

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 64     # study: batch size 64 (global, over all devices)
  config.train.eval_batch_size = 256
  config.train.num_epochs = 15     # study: 15 epochs
  config.train.max_steps = 0       # >0: stop after this many steps (quick tests)
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 500
  config.train.keep_checkpoints = 2
  config.train.on_nonfinite = 'stop'  # stop | skip
  config.train.monitor_every_steps = 100  # per-layer gradient statistics; 0 = off
  config.train.overwrite = False   # True: discard an existing run in the workdir
  # Frozen-prefix feature cache (normjax/features.py): '' off, 'auto' ($NORMJAX_CACHE_DIR or
  # ~/.cache/normjax/features), or a directory. Used only where the frozen prefix is deterministic.
  config.train.feature_cache = ''
  return quick(config) if arg == 'quick' else config


def quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any experiment to a CPU-minutes check of the whole pipeline (offline data, no weights).

  Use it as `--config=configs/<name>.py:quick`. Numbers from it say nothing about the study.
  """
  config.data.name = 'cifar10_jpeg' if config.data.name == 'cifar10' else config.data.name
  config.data.image_size = min(config.data.image_size, 32)
  config.data.train_subset = 1024
  config.model.pretrained = 'none'
  config.model.width_mult = min(config.model.width_mult, 0.5)
  config.train.batch_size = min(config.train.batch_size, 32)
  config.train.num_epochs = 1
  config.train.max_steps = 20
  config.train.log_every_steps = 5
  config.train.monitor_every_steps = 10
  config.train.checkpoint_every_steps = 10
  return config


def study(head_norm: str, clip: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """One of the study's runs: `head_norm` head on frozen MobileNetV2, `clip` clipping."""
  config = get_config()
  config.model.head_norm = head_norm
  config.optim.clip = clip
  if clip == 'agc':
    config.optim.agc_lambda = 0.16  # Brock et al. 2021: lambda 0.01-0.16, larger for small batches (64 here)
  return quick(config) if arg == 'quick' else config


def parse_arg(arg: str | None) -> dict[str, str]:
  """'cpu,batch=8' -> {'cpu': '', 'batch': '8'}: the `--config=file.py:ARG` suffix."""
  items = [a for a in (arg or '').split(',') if a]
  return dict((a.split('=', 1) + [''])[:2] for a in items)


def agc_lambda_for_batch(batch_size: int) -> float:
  """AGC threshold by batch size, after Brock et al. 2021 (Sec. 4.1, Fig. 3).

  The paper uses 0.01 at batch 4096 and finds smaller batches tolerate larger
  thresholds (up to the 0.16 it tried); the steps between are normjax's
  interpolation, which the lambda sweep in README checks.
  """
  if batch_size >= 4096:
    return 0.01
  if batch_size >= 1024:
    return 0.02
  if batch_size >= 256:
    return 0.04
  return 0.08 if batch_size >= 64 else 0.16


def scratch(model: str, clip: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """MobileNetV2 CIFAR variant trained from scratch on cifar10_jpeg: `model` with `clip`.

  arg (comma-separated): batch=N (LR scales with it, AGC lambda follows it), lambda=X,
  cpu (the 2-core budget: width 0.5, 4,000 training images, 3 epochs, 10% validation), quick.
  """
  args = parse_arg(arg)
  config = get_config()
  batch = int(args.get('batch', 128))
  config.data.name = 'cifar10_jpeg'
  config.data.image_size = 32
  config.model.name = model
  config.model.cifar_stem = True
  config.model.norm = 'bn'  # ignored by nf_mobilenet_v2, which has no norm layers
  config.model.head = 'linear'
  config.model.dropout = 0.2  # torchvision mobilenet_v2 classifier dropout
  config.model.pretrained = 'none'
  config.optim.name = 'sgd'
  config.optim.nesterov = True
  config.optim.momentum = 0.9
  config.optim.lr = 0.1 * batch / 256  # Goyal et al. 2017 linear scaling; NFNets use 0.1 per 256
  config.optim.backbone_lr = config.optim.lr  # from scratch: one LR for all layers
  config.optim.weight_decay = 4e-5  # Sandler et al. 2018 (MobileNetV2) weight decay
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 1.0
  config.optim.trainable_blocks = -1
  config.optim.clip = clip
  config.optim.agc_lambda = float(args.get('lambda', agc_lambda_for_batch(batch)))
  config.train.batch_size = batch
  config.train.eval_batch_size = 500
  config.train.num_epochs = 30
  config.train.log_every_steps = 50
  config.train.monitor_every_steps = 200
  config.train.checkpoint_every_steps = 1000
  if 'cpu' in args:  # fits a session on 2 CPU cores at ~30-100 img/s; the same for every net
    config.model.width_mult = 0.5
    config.data.train_subset = 4_000
    config.data.val_fraction = 0.1
    config.train.num_epochs = 3
  return quick(config) if 'quick' in args else config
