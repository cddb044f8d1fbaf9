"""The study's shared recipe (`../shared/docs/study.md` section 1).

Every experiment config starts from `get_config()` here and overrides a few
fields. `normjax.config_schema.validate` checks every field against the
allowed values, so a typo fails with a message naming the field.

This module is not itself an experiment: see `configs/frn_noclip.py` etc.
"""
import pathlib
from typing import Any

import ml_collections

from normjax.errors import ConfigError


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The base recipe; `arg='quick'` applies `quick()` (see below)."""
  args = parse_arg(arg, __file__, quick=False)
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # cifar10 | cifar10_jpeg | fashion_mnist | fashion_mnist_idx | mnist_idx
  config.data.name = 'cifar10'  # original python release (local or downloaded); cifar10_jpeg: JPEG copy
  config.data.tfds_dir = ''      # tfds data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.data.source = ''        # local raw files for normjax builders; '' = $NORMJAX_DATA_DIR
  config.data.image_size = 224   # study: CIFAR-10 resized to 224x224 for MobileNetV2
  config.data.val_fraction = 0.2  # study: 80% train / 20% validation
  config.data.train_subset = 0   # >0: use only this many training images (fixed by seed)
  config.data.augment = True     # study: RandomCrop(32, padding=4) + RandomHorizontalFlip
  config.data.normalize = True   # study: Normalize(mean, std) after ToTensor; False: x/255 only
  config.data.crop_padding = 4   # study: RandomCrop(32, padding=4)
  # With train.feature_cache: K precomputed augmentations per image; epoch e uses variant e mod K.
  # 0 = one per epoch (K = num_epochs), which trains exactly like the uncached run.
  config.data.augment_variants = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = 'mobilenet_v2'  # lightcnn | mobilenet_v2 | nf_mobilenet_v2 | normjax.models.seed_cnns
  config.model.width_mult = 1.0
  config.model.cifar_stem = False  # True: first strides 1, keeps resolution at 32x32
  config.model.norm = 'bn'         # backbone norm: bn | ln | gn | frn | none
  config.model.head = 'mlp'        # mlp (study head) | linear (torchvision classifier)
  config.model.head_norm = 'bn'    # bn | ln | frn | gn | none
  config.model.head_hidden = 256   # study: FC(1280->256)
  config.model.dropout = 0.5       # study head dropout
  # tunable_cnn only (models/tunable_cnn.py): '<filters>x<kernel>,...' and '<units>,...'.
  config.model.conv_layers = '32x3,64x3'
  config.model.dense_layers = '128'
  config.model.frn_learned_eps = False
  config.model.frn_dense = 'features'  # FRN on the (batch, 256) head: nu2 over the features (study) | unit (paper)
  config.model.gn_groups = 32      # Wu & He 2018 default
  # Frozen blocks' BatchNorm: eval = ImageNet running stats, never updated (cacheable);
  # train = torch's model.train() with requires_grad=False: batch stats, running stats updated.
  config.model.frozen_bn = 'eval'
  config.model.head_init = 'torch'  # torch: nn.Linear's init, as the study's heads had | flax | zeros
  config.model.pretrained = 'torchvision_v1'  # none | torchvision_v1 | torchvision_v2 | <path>
  config.model.dtype = 'float32'   # float32 | bfloat16 (compute dtype; params stay float32)
  # compute: GEMMs in model.dtype | bfloat16: MobileNetV2's 1x1-conv GEMMs (forward and both
  # gradients) take bf16 operands and accumulate in float32, torch CPU autocast's rule for a
  # linear layer, while activations stay in model.dtype (normjax/models/matmul.py).
  config.model.gemm_dtype = 'compute'

  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'adam'       # adam (torch: weight_decay is coupled L2) | adamw | sgd
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
  config.train.max_skipped_fraction = 0.1  # skip: stop once more of the steps so far were skipped
  config.train.monitor_every_steps = 100  # per-layer gradient statistics; 0 = off
  config.train.overwrite = False   # True: discard an existing run in the workdir
  # Frozen-prefix feature cache (normjax/features.py): '' off, 'auto' ($NORMJAX_CACHE_DIR or
  # ~/.cache/normjax/features), or a directory. Used only where the frozen prefix is deterministic.
  config.train.feature_cache = ''
  return quick(config) if args.quick else config


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
  config.train.feature_cache = ''  # a pipeline check: no cache written under ~/.cache
  return config


def study(head_norm: str, clip: str, arg: str | None = None,
          config_file: str = __file__) -> ml_collections.ConfigDict:
  """One of the study's runs: `head_norm` head on frozen MobileNetV2, `clip` clipping.

  arg: `quick` only; `config_file` (the calling config's __file__) names it in errors.
  """
  args = parse_arg(arg, config_file, quick=False)
  config = get_config()
  config.model.head_norm = head_norm
  config.optim.clip = clip
  # Only features.18 + the head train: compute the frozen prefix once per image and augmentation
  # (normjax/features.py). K = num_epochs variants, so training equals the online run exactly.
  config.train.feature_cache = 'auto'
  if clip == 'agc':
    config.optim.agc_lambda = agc_lambda_for_batch(config.train.batch_size)
  return quick(config) if args.quick else config


def parse_arg(arg: str | None, config_file: str, **spec: Any) -> ml_collections.ConfigDict:
  """Parses the `--config=FILE.py:ARG` suffix strictly against `spec`.

  Modelled on big_vision's configs/common.py `parse_arg(arg, lazy=False, **spec)`:
  `spec` names every allowed key with its default, or `(default, type)` (needed
  when the default is None). ARG is comma-separated `key=value` items; a bool key
  may be given bare (`quick` is quick=True). Values convert to the default's type.
  Unlike big_vision's, there is no `lazy` mode and a bare word is never the value
  of the first key: an unknown or repeated key, or a value of the wrong type,
  raises ConfigError naming the config, the key and the allowed keys.

  Returns a ConfigDict of every key in `spec` (`args.quick`, `args['lambda']`).
  """
  where = f'{_display_path(config_file)}:{arg or ""}'
  allowed = ', '.join(spec) or '(no arguments)'
  typed = {k: v if isinstance(v, tuple) else (v, type(v)) for k, v in spec.items()}
  values = {k: default for k, (default, _) in typed.items()}
  given = set()
  for item in (arg or '').split(','):
    if not item:
      continue
    key, has_value, raw = item.partition('=')
    key = key.strip()
    if key not in typed:
      raise ConfigError(f'{where}: unknown argument {key!r}; allowed: {allowed}')
    if key in given:
      raise ConfigError(f'{where}: argument {key!r} given twice')
    given.add(key)
    kind = typed[key][1]
    if not has_value and kind is not bool:
      raise ConfigError(f'{where}: argument {key!r} needs a value ({key}=...); allowed: {allowed}')
    values[key] = _convert(raw.strip(), kind, has_value, f'{where}: argument {key!r}')
  return ml_collections.ConfigDict(values, type_safe=False)


def _convert(raw: str, kind: type, has_value: bool, what: str) -> Any:
  """One ARG value as `kind`; a bare bool key is True."""
  if kind is bool:
    if not has_value:
      return True
    # bool('False') is True, so spell the accepted words out.
    if raw.lower() not in ('true', 'false', '1', '0'):
      raise ConfigError(f'{what} = {raw!r}: expected true or false (or the bare key for true)')
    return raw.lower() in ('true', '1')
  try:
    return kind(raw)
  except ValueError as e:
    raise ConfigError(f'{what} = {raw!r}: expected {_KIND_NAMES.get(kind, kind.__name__)}') from e


_KIND_NAMES = {int: 'an integer', float: 'a number', str: 'a string'}


def _display_path(config_file: str) -> str:
  """The config file relative to the working directory when inside it, as typed on the command line."""
  path = pathlib.Path(config_file)
  try:
    return path.resolve().relative_to(pathlib.Path.cwd().resolve()).as_posix()
  except ValueError:
    return str(path)


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


def scratch(model: str, clip: str, arg: str | None = None,
            config_file: str = __file__) -> ml_collections.ConfigDict:
  """MobileNetV2 CIFAR variant trained from scratch on cifar10_jpeg: `model` with `clip`.

  arg (comma-separated): batch=N (LR scales with it, AGC lambda follows it), lambda=X,
  cpu (the 2-core budget: width 0.5, 4,000 training images, 3 epochs, 10% validation), quick.
  `config_file` (the calling config's __file__) names it in errors.
  """
  # lambda=None: follow the batch size (agc_lambda_for_batch).
  args = parse_arg(arg, config_file, batch=128, cpu=False, quick=False, **{'lambda': (None, float)})
  config = get_config()
  batch = args.batch
  config.data.name = 'cifar10_jpeg'
  config.data.image_size = 32
  config.model.name = model
  config.model.cifar_stem = True
  config.model.norm = 'bn'  # ignored by nf_mobilenet_v2, which has no norm layers
  config.model.head = 'linear'
  config.model.dropout = 0.2  # torchvision mobilenet_v2 classifier dropout
  if model == 'nf_mobilenet_v2':
    config.model.head_init = 'zeros'  # NFNets' zero-initialised classifier (models/heads.py)
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
  config.optim.agc_lambda = args['lambda'] if args['lambda'] is not None else agc_lambda_for_batch(batch)
  config.train.batch_size = batch
  config.train.eval_batch_size = 500
  config.train.num_epochs = 30
  config.train.log_every_steps = 50
  config.train.monitor_every_steps = 200
  config.train.checkpoint_every_steps = 1000
  if args.cpu:  # fits a session on 2 CPU cores at ~30-100 img/s; the same for every net
    config.model.width_mult = 0.5
    config.data.train_subset = 4_000
    config.data.val_fraction = 0.1
    config.train.num_epochs = 3
  return quick(config) if args.quick else config


def seed_mnist(model: str, arg: str | None = None, config_file: str = __file__,
               num_epochs: int = 50) -> ml_collections.ConfigDict:
  """The seed's MNIST recipe (study.md section 4) for `model`, trained from scratch.

  ToTensor only ([0, 1] scaling, no augmentation), CrossEntropy, Adam, 80/20
  train/val split, 50 epochs. The seed gives no LR or batch size: Adam's default
  1e-3 and batch 64 here. arg: `quick` only; `config_file` names the config in errors.
  """
  args = parse_arg(arg, config_file, quick=False)
  config = get_config()
  config.data.name = 'mnist_idx'
  config.data.image_size = 28
  config.data.augment = False    # study section 4: ToTensor only
  config.data.normalize = False  # study section 4: ToTensor only, so pixels / 255
  config.model.name = model
  config.model.norm = 'none'     # these nets have no norm layers; the report says so
  config.model.head = 'linear'
  config.model.dropout = 0.0
  config.model.pretrained = 'none'
  config.optim.trainable_blocks = -1
  config.optim.lr = 1e-3           # not in the seed: Adam's default in torch and Keras
  config.optim.backbone_lr = 1e-3  # from scratch: one LR for all layers
  config.train.batch_size = 64     # not in the seed
  config.train.num_epochs = num_epochs
  config.train.log_every_steps = 250          # 750 steps per epoch at 48,000 / 64
  config.train.checkpoint_every_steps = 1500
  config.train.monitor_every_steps = 750
  return quick(config) if args.quick else config
