"""Config files and the schema: every field named, every bad value refused with its field."""
import pathlib

import pytest

from configs import base
from normjax import config_schema
from normjax.errors import ConfigError

CONFIGS = sorted(p for p in pathlib.Path('configs').glob('*.py') if p.stem not in ('__init__', 'base'))


def test_schema_names_exactly_the_base_fields():
  assert set(config_schema.flatten(base.get_config())) == set(config_schema.SCHEMA)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_every_config_validates_and_documents_its_command(path):
  config = config_schema.load_config(str(path))
  module_doc = path.read_text().split('"""')[1]
  assert f'--config=configs/{path.name}' in module_doc
  assert 'Expected' in module_doc
  assert config.train.batch_size > 0


def test_quick_mode_shrinks_to_offline_cpu_budget():
  config = base.study('frn', 'none', 'quick')
  assert config.data.name == 'cifar10_jpeg' and config.model.pretrained == 'none'
  assert config.train.max_steps == 20 and config.data.image_size == 32
  config_schema.validate(config)


def test_study_recipe_constants():
  config = base.study('bn', 'global_norm')
  assert (config.optim.lr, config.optim.backbone_lr, config.optim.clip_norm) == (1e-3, 1e-5, 1.0)
  assert (config.train.batch_size, config.train.num_epochs, config.data.image_size) == (64, 15, 224)
  assert config.optim.trainable_blocks == 1 and config.model.head_hidden == 256


@pytest.mark.parametrize('field,value,message', [
    ('model.name', 'resnet', 'config.model.name = \'resnet\' is not allowed; expected one of: lightcnn, mobilenet_v2, nf_mobilenet_v2'),
    ('data.name', 'mnist', 'config.data.name = \'mnist\' is not allowed; expected one of: cifar10, cifar10_jpeg, fashion_mnist, fashion_mnist_idx, mnist_idx'),
    ('model.head_norm', 'batch', 'expected one of: bn, ln, frn, gn, none'),
    ('train.batch_size', 0, 'config.train.batch_size = 0 is not allowed; expected an integer > 0'),
    ('optim.lr', -1e-3, 'config.optim.lr = -0.001 is not allowed; expected a number > 0'),
    ('optim.clip', 'norm', 'expected one of: none, global_norm, agc'),
    ('train.on_nonfinite', 'ignore', 'expected one of: stop, skip'),
])
def test_bad_values_name_field_and_allowed_values(field, value, message):
  config = base.get_config()
  section, leaf = field.split('.')
  config[section][leaf] = value
  with pytest.raises(ConfigError, match=None) as e:
    config_schema.validate(config)
  assert message in str(e.value)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('name,model,epochs', [
    ('lightcnn_mnist', 'lightcnn', 50), ('mnist_mlp', 'mlp', 50), ('mnist_lenet', 'lenet', 50),
    ('mnist_medium_light', 'medium_light', 50), ('mnist_ultra_light', 'ultra_light', 50),
    ('cnn_mnist', 'cnn_mnist', 15),
])
def test_seed_mnist_configs_follow_the_seed_recipe(name, model, epochs):
  config = config_schema.load_config(f'configs/{name}.py')
  assert (config.data.name, config.data.image_size, config.model.name) == ('mnist_idx', 28, model)
  # study.md section 4: ToTensor only (no Normalize, no augmentation), 80/20 split, Adam.
  assert config.data.normalize is False and config.data.augment is False
  assert config.data.val_fraction == 0.2 and config.data.train_subset == 0
  assert (config.optim.name, config.optim.lr, config.optim.backbone_lr) == ('adam', 1e-3, 1e-3)
  assert (config.optim.clip, config.optim.weight_decay, config.optim.trainable_blocks) == ('none', 0.0, -1)
  assert (config.train.batch_size, config.train.num_epochs, config.train.max_steps) == (64, epochs, 0)
  assert (config.model.head, config.model.dropout, config.model.pretrained) == ('linear', 0.0, 'none')


def test_unknown_field_is_named_with_its_siblings():
  config = base.get_config()
  config.train.bacth_size = 32
  with pytest.raises(ConfigError) as e:
    config_schema.validate(config)
  assert str(e.value).startswith('config.train.bacth_size: unknown field; allowed: ')
  assert 'train.batch_size' in str(e.value)


def test_overrides_parse_to_the_field_type():
  config = config_schema.apply_overrides(base.get_config(), ['train.max_steps=7', 'optim.lr=0.5',
                                                             'data.augment=false', 'model.norm=gn'])
  assert (config.train.max_steps, config.optim.lr, config.data.augment, config.model.norm) == (7, 0.5, False, 'gn')
  with pytest.raises(ConfigError, match='config.train.max_steps = \'x\': expected a int'):
    config_schema.apply_overrides(base.get_config(), ['train.max_steps=x'])
  with pytest.raises(ConfigError, match='config.train.nope: unknown field'):
    config_schema.apply_overrides(base.get_config(), ['train.nope=1'])
  with pytest.raises(ConfigError, match='expected FIELD=VALUE'):
    config_schema.apply_overrides(base.get_config(), ['train.max_steps'])


def test_missing_config_file():
  with pytest.raises(ConfigError, match="--config: no such config file 'configs/nope.py'"):
    config_schema.load_config('configs/nope.py')


def test_load_config_passes_the_colon_argument():
  config = config_schema.load_config('configs/nf_agc_scratch.py:cpu,batch=8')
  assert (config.train.batch_size, config.model.width_mult, config.data.train_subset) == (8, 0.5, 4_000)
  assert config.optim.agc_lambda == 0.16 and config.optim.lr == 0.1 * 8 / 256


def test_split_config_specs_keeps_commas_inside_arguments():
  assert config_schema.split_config_specs('configs/a.py:cpu,batch=8,configs/b.py,configs/c.py:quick') == [
      'configs/a.py:cpu,batch=8', 'configs/b.py', 'configs/c.py:quick']


def test_older_config_json_is_upgraded_with_what_older_runs_did():
  from normjax import checkpoint, config_schema
  config = config_schema.load_config('configs/frn_noclip.py')
  assert set(config_schema.ADDED_FIELDS) <= set(config_schema.SCHEMA)
  saved = config.to_dict()
  del saved['data']['normalize'], saved['model']['frn_dense'], saved['train']['max_skipped_fraction']
  # Fields whose old behaviour is today's default: the run resumes.
  assert checkpoint.config_diffs(saved, config) == []
  assert config_schema.upgrade(saved)['data']['normalize'] is True
  # A run made before head_init existed had flax's init: resuming it as torch init is refused.
  del saved['model']['head_init']
  assert checkpoint.config_diffs(saved, config) == ["model.head_init: 'flax' -> 'torch'"]


def test_registries_are_the_single_source_of_names():
  import subprocess
  import sys
  from normjax import registry
  from normjax.data import pipeline
  from normjax.models import factory, norms
  assert tuple(factory.BACKBONES) == registry.MODELS
  assert tuple(pipeline.DATASETS) == registry.DATASETS
  assert set(registry.HEAD_NORMS) == set(registry.NORMS)
  for name in registry.NORMS:
    norms.make_norm(name, train=False)  # every registered norm is built
  # The schema checks a config without importing JAX (the registry is plain tuples).
  code = 'import sys, normjax.config_schema; print("jax" in sys.modules)'
  assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        check=True).stdout.strip() == 'False'
