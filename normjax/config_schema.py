"""The allowed values of every config field, checked with errors that name the field.

`configs/base.py` holds the values of the shared recipe; this module holds the
rules. `tests/test_config_schema.py` asserts both name exactly the same fields.
The names a field chooses from (models, norms, datasets, ...) are `normjax.registry`'s.
"""
import importlib.util
import json
import pathlib
import re
import sys
from typing import Any, Callable

import ml_collections

from normjax import registry
from normjax.errors import ConfigError


def _choice(*allowed: str) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v in allowed), 'one of: ' + ', '.join(allowed)


def _positive_int() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0), 'an integer > 0'


def _non_negative_int() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0), 'an integer >= 0'


def _positive_float() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0), 'a number > 0'


def _non_negative_float() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0), 'a number >= 0'


def _fraction() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, (int, float)) and 0 <= v < 1), 'a number in [0, 1)'


def _bool() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, bool)), 'True or False'


def _str() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, str)), 'a string'


def _int() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, int) and not isinstance(v, bool)), 'an integer'


def _trainable_blocks() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, int) and v >= -1), '-1 (all), 0 (none) or k > 0 (the last k blocks)'


def _pretrained() -> tuple[Callable[[Any], bool], str]:
  return ((lambda v: isinstance(v, str) and v != ''),
          'none, torchvision_v1, torchvision_v2, or a path: a normjax workdir, a ported checkpoint '
          'or a .pth file')


def _layer_list(item: str, example: str) -> tuple[Callable[[Any], bool], str]:
  pattern = re.compile(rf'({item}(,{item})*)?')
  return ((lambda v: isinstance(v, str) and pattern.fullmatch(v.replace(' ', '')) is not None),
          f'a comma-separated list like {example!r} (or empty)')


SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    'seed': _int(),
    'data.name': _choice(*registry.DATASETS),
    'data.tfds_dir': _str(),
    'data.source': _str(),
    'data.image_size': _positive_int(),
    'data.val_fraction': _fraction(),
    'data.train_subset': _non_negative_int(),
    'data.augment': _bool(),
    'data.normalize': _bool(),
    'data.crop_padding': _non_negative_int(),
    'data.augment_variants': _non_negative_int(),
    'model.name': _choice(*registry.MODELS),
    'model.width_mult': _positive_float(),
    'model.cifar_stem': _bool(),
    'model.norm': _choice(*registry.NORMS),
    'model.head': _choice('mlp', 'linear'),
    'model.head_norm': _choice(*registry.HEAD_NORMS),
    'model.head_hidden': _positive_int(),
    'model.dropout': _fraction(),
    'model.conv_layers': _layer_list(r'[1-9]\d*x[1-9]\d*', '32x3,64x5'),  # tunable_cnn
    'model.dense_layers': _layer_list(r'[1-9]\d*', '128,64'),  # tunable_cnn
    'model.frn_learned_eps': _bool(),
    'model.frn_dense': _choice(*registry.FRN_DENSE_MODES),
    'model.gn_groups': _positive_int(),
    'model.frozen_bn': _choice(*registry.FROZEN_BN_MODES),
    'model.head_init': _choice(*registry.HEAD_INITS),
    'model.pretrained': _pretrained(),
    'model.dtype': _choice('float32', 'bfloat16'),
    'model.gemm_dtype': _choice('compute', 'bfloat16'),
    'optim.name': _choice(*registry.OPTIMIZERS),
    'optim.lr': _positive_float(),
    'optim.backbone_lr': _non_negative_float(),
    'optim.trainable_blocks': _trainable_blocks(),
    'optim.momentum': _fraction(),
    'optim.nesterov': _bool(),
    'optim.weight_decay': _non_negative_float(),
    'optim.schedule': _choice(*registry.SCHEDULES),
    'optim.warmup_epochs': _non_negative_float(),
    'optim.clip': _choice(*registry.CLIPS),
    'optim.clip_norm': _positive_float(),
    'optim.agc_lambda': _positive_float(),
    'optim.agc_eps': _positive_float(),
    'train.batch_size': _positive_int(),
    'train.eval_batch_size': _positive_int(),
    'train.num_epochs': _positive_int(),
    'train.max_steps': _non_negative_int(),
    'train.log_every_steps': _positive_int(),
    'train.checkpoint_every_steps': _positive_int(),
    'train.keep_checkpoints': _positive_int(),
    'train.on_nonfinite': _choice('stop', 'skip'),
    'train.max_skipped_fraction': _fraction(),
    'train.monitor_every_steps': _non_negative_int(),
    'train.overwrite': _bool(),
    'train.feature_cache': _str(),
}

# Fields added after runs were first made, with the value that reproduces what those runs did.
# `upgrade` fills them into an older config.json, so older runs resume, report and load.
ADDED_FIELDS: dict[str, Any] = {
    'data.augment_variants': 0,          # no feature cache existed: fresh augmentation each epoch
    'data.normalize': True,              # inputs were always normalised
    'model.frozen_bn': 'eval',           # frozen blocks always used their running statistics
    'model.head_init': 'flax',           # heads used flax's default init
    'model.frn_dense': 'features',       # FRN on (N, C) always averaged over the features
    'model.conv_layers': '32x3,64x3',    # tunable_cnn's fields; no other model reads them
    'model.dense_layers': '128',
    'model.gemm_dtype': 'compute',       # GEMMs always ran in model.dtype
    'train.feature_cache': '',
    'train.max_skipped_fraction': 0.1,
}


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
  """A nested config dict from an older run with every ADDED_FIELDS field it lacks filled in."""
  out = json.loads(json.dumps(saved))
  for path, value in ADDED_FIELDS.items():
    *parents, leaf = path.split('.')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node.setdefault(leaf, value)
  return out


# Fields that may change when a run resumes: they do not change what is computed.
RESUMABLE_CHANGES = frozenset({
    'data.tfds_dir', 'data.source', 'train.num_epochs', 'train.max_steps',
    'train.log_every_steps', 'train.checkpoint_every_steps', 'train.keep_checkpoints',
    'train.overwrite', 'train.eval_batch_size', 'train.feature_cache', 'train.max_skipped_fraction',
})


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = '') -> dict[str, Any]:
  """{'data.name': 'cifar10_jpeg', ...} for a nested config."""
  out = {}
  for key, value in config.items():
    path = f'{prefix}{key}'
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, path + '.'))
    else:
      out[path] = value
  return out


def unknown_field_error(path: str) -> ConfigError:
  """The error for config.<path> not in SCHEMA, listing the fields of its section."""
  section = path.rpartition('.')[0]
  siblings = sorted(p for p in SCHEMA if p.rpartition('.')[0] == section) or sorted(SCHEMA)
  return ConfigError(f'config.{path}: unknown field; allowed: {", ".join(siblings)}')


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ConfigError naming the first unknown field or disallowed value."""
  flat = flatten(config)
  for path in flat:
    if path not in SCHEMA:
      raise unknown_field_error(path)
  for path, (ok, allowed) in SCHEMA.items():
    if path not in flat:
      raise ConfigError(f'config.{path}: missing field; expected {allowed}')
    if not ok(flat[path]):
      raise ConfigError(f'config.{path} = {flat[path]!r} is not allowed; expected {allowed}')
  return config


def split_config_specs(text: str) -> list[str]:
  """'a.py:cpu,batch=8,b.py' -> ['a.py:cpu,batch=8', 'b.py']: commas inside a spec's :arg stay."""
  specs: list[str] = []
  for item in (i.strip() for i in text.split(',')):
    if not item:
      continue
    if '.py' in item or not specs:
      specs.append(item)
    else:
      specs[-1] += ',' + item
  return specs


def config_stem(spec: str) -> str:
  """A run's directory name: 'configs/bn_clip.py' -> 'bn_clip',
  'configs/nf_agc_scratch.py:cpu,batch=8' -> 'nf_agc_scratch-cpu-batch8'."""
  path, _, arg = spec.partition(':')
  return '-'.join([pathlib.Path(path).stem] + [a.replace('=', '') for a in arg.split(',') if a])


def make_configs_importable(config_file: str) -> None:
  """Config files say `from configs import base`: put the folder holding `configs/` on sys.path."""
  root = str(pathlib.Path(config_file.partition(':')[0]).absolute().parent.parent)
  if root not in sys.path:
    sys.path.insert(0, root)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Imports a configs/*.py file and returns its validated `get_config()`.

  `spec` is a path, optionally with `:arg` as for `--config` (e.g. `configs/frn_noclip.py:quick`).
  """
  path, _, arg = spec.partition(':')
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f'--config: no such config file {path!r}')
  make_configs_importable(path)
  module_spec = importlib.util.spec_from_file_location(f'normjax_config_{file.stem}', file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return validate(module.get_config(arg) if arg else module.get_config())


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
  """Applies 'train.max_steps=20'-style overrides, parsed to the field's current type."""
  config = ml_collections.ConfigDict(config.to_dict())
  flat = flatten(config)
  for item in overrides:
    if '=' not in item:
      raise ConfigError(f'override {item!r}: expected FIELD=VALUE, e.g. train.max_steps=20')
    path, raw = item.split('=', 1)
    path = path.strip().removeprefix('config.')
    if path not in flat:
      raise unknown_field_error(path)
    current = flat[path]
    try:
      if isinstance(current, bool):
        if raw.lower() not in ('true', 'false', '1', '0'):
          raise ValueError(raw)
        value = raw.lower() in ('true', '1')
      elif isinstance(current, int):
        value = int(raw)
      elif isinstance(current, float):
        value = float(raw)
      else:
        value = raw
    except ValueError as e:
      raise ConfigError(f'config.{path} = {raw!r}: expected a {type(current).__name__}') from e
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return validate(config)
