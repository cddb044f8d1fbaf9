"""The frozen-feature cache: exact equivalence with online training, resume, keys, disk, lock."""
import json
import pathlib
import shutil
import threading

import jax
import numpy as np
import pytest

from normjax import checkpoint, errors, features, train
from normjax.data import pipeline
from configs import base


def _config(tmp_path: pathlib.Path, **overrides):
  config = base.get_config('quick')  # cifar10_jpeg, 32 px, MobileNetV2 width 0.5, no weights
  config.data.train_subset = 192
  config.train.batch_size = 32
  config.train.eval_batch_size = 64
  config.train.num_epochs = 2
  config.train.max_steps = 0
  config.train.monitor_every_steps = 0
  config.train.log_every_steps = 3
  config.train.checkpoint_every_steps = 100
  # The study's setting: features_18 + an FRN head, Adam. (Params whose true gradient is zero,
  # such as a bias feeding a BatchNorm, would turn float noise into +-lr Adam steps.)
  config.model.head_norm = 'frn'
  config.optim.trainable_blocks = 1
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _params(workdir: pathlib.Path):
  return checkpoint.restore_latest(workdir)[1]


def test_cached_training_equals_online_training(tmp_path, shared_data_dir, tfds_dir):
  common = {'data.source': str(shared_data_dir), 'data.tfds_dir': str(tfds_dir)}
  online = train.train_and_evaluate(_config(tmp_path, **common), str(tmp_path / 'online'))
  cached = train.train_and_evaluate(
      _config(tmp_path, **common, **{'train.feature_cache': str(tmp_path / 'cache')}),
      str(tmp_path / 'cached'))
  a, b = _params(tmp_path / 'online'), _params(tmp_path / 'cached')
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                       {'params': a['params'], 'batch_stats': a['batch_stats']},
                       {'params': b['params'], 'batch_stats': b['batch_stats']})
  worst = max(jax.tree.leaves(diffs))
  print(f'max |online - cached| after 2 epochs: {worst:.3g}')
  assert worst <= 1e-5
  assert int(a['step']) == int(b['step']) == 12
  assert abs(online['test_accuracy'] - cached['test_accuracy']) <= 1 / 10000 * 2


@pytest.fixture(scope='module')
def small(shared_data_dir, tfds_dir, tmp_path_factory):
  """A quick config, its model and variables and its splits: what features.prepare takes."""
  from normjax.models.factory import create_model
  config = _config(tmp_path_factory.mktemp('cfg'), **{
      'data.source': str(shared_data_dir), 'data.tfds_dir': str(tfds_dir),
      'data.augment_variants': 2, 'data.train_subset': 100, 'train.batch_size': 16})
  splits = pipeline.load_splits(config.data, config.seed)
  splits = pipeline.Splits(splits.name, splits.train, splits.val.take(np.arange(40)),
                           splits.test.take(np.arange(24)), splits.class_names, splits.mean, splits.std)
  model = create_model(config, splits.num_classes)
  variables = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0)},
                         np.zeros((1, 32, 32, 3), np.float32), train=False)
  return config, model, variables, splits


def _with(config, **fields):
  config = config.copy_and_resolve_references()
  for path, value in fields.items():
    section, leaf = path.split('.')
    config[section][leaf] = value
  return config


def test_cache_holds_the_prefix_output_of_each_variant(small, tmp_path):
  config, model, variables, splits = small
  config = _with(config, **{'train.feature_cache': str(tmp_path)})
  store = features.prepare(config, model, variables, splits)
  first = features.first_trainable(config)
  # Val rows: the prefix of the un-augmented image, computed here directly.
  from normjax.data import augment
  x = augment.eval_preprocess(splits.val.images[:8], image_size=32, mean=splits.mean, std=splits.std)
  want = model.apply(variables, x, first, method='prefix')
  np.testing.assert_allclose(store.val[:8], want, rtol=1e-5, atol=1e-6)
  assert store.val.shape[0] == 40 and store.test.shape[0] == 24
  assert len(store.train_variants) == 2 and store.train_images(3) is store.train_variants[1]
  # Variants differ (different crops/flips) but both are complete: no all-zero rows.
  assert not np.allclose(store.train_variants[0], store.train_variants[1])
  assert (np.abs(np.asarray(store.train_variants[1])).reshape(100, -1).max(1) > 0).all()


def test_killed_build_resumes_to_the_same_cache(small, tmp_path, monkeypatch):
  config, model, variables, splits = small
  clean = features.prepare(_with(config, **{'train.feature_cache': str(tmp_path / 'clean')}),
                           model, variables, splits)
  killed = _with(config, **{'train.feature_cache': str(tmp_path / 'killed')})
  real_fill, calls = features._Builder.fill, []

  def dying_fill(self, name, n, chunks, progress):
    if name == 'train_v1':  # die inside the second variant, after its first chunk
      real_fill(self, name, n, chunks[:1] + [lambda: (_ for _ in ()).throw(KeyboardInterrupt())],
                progress)
    calls.append(name)
    real_fill(self, name, n, chunks, progress)

  monkeypatch.setattr(features._Builder, 'fill', dying_fill)
  with pytest.raises(KeyboardInterrupt):
    features.prepare(killed, model, variables, splits)
  assert calls == ['train_v0']
  monkeypatch.setattr(features._Builder, 'fill', real_fill)
  manifest = json.loads(next((tmp_path / 'killed').glob('*/manifest.json')).read_text())
  assert manifest['train_v1'] == [0] and 'val' not in manifest
  resumed = features.prepare(killed, model, variables, splits)
  for a, b in zip(clean.train_variants + [clean.val, clean.test],
                  resumed.train_variants + [resumed.val, resumed.test]):
    np.testing.assert_array_equal(a, b)


def test_other_weights_size_or_dtype_never_reuse_a_cache(small, tmp_path):
  config, model, variables, splits = small
  config = _with(config, **{'train.feature_cache': str(tmp_path)})
  features.prepare(config, model, variables, splits)
  other_weights = jax.tree.map(lambda a: a * 1.5, variables)
  features.prepare(config, model, other_weights, splits)
  features.prepare(_with(config, **{'model.dtype': 'bfloat16'}), model, variables, splits)
  assert len(list(tmp_path.glob('*/key.json'))) == 3
  # A directory whose key.json says something else is refused, not used.
  directory = features.prepare(config, model, variables, splits).directory
  key = json.loads((directory / 'key.json').read_text())
  key['data']['image_size'] = 224
  (directory / 'key.json').write_text(json.dumps(key))
  with pytest.raises(errors.FeatureCacheError, match='another key'):
    features.prepare(config, model, variables, splits)


def test_not_enough_disk_is_refused_up_front(small, tmp_path, monkeypatch):
  config, model, variables, splits = small
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(features.shutil, 'disk_usage', lambda _: usage._replace(free=1000))
  with pytest.raises(errors.FeatureCacheError, match=r'needs 0\.\d\d GB more .* only 0\.00 GB are free'):
    features.prepare(_with(config, **{'train.feature_cache': str(tmp_path)}), model, variables, splits)
  assert not list(tmp_path.glob('*/*.npy'))


def test_a_second_builder_waits_for_the_lock_then_reads(small, tmp_path):
  config, model, variables, splits = small
  config = _with(config, **{'train.feature_cache': str(tmp_path)})
  first = features.prepare(config, model, variables, splits)
  (first.directory / 'manifest.json').unlink()  # force a rebuild, then hold the lock
  import fcntl
  holder = open(first.directory / 'lock', 'a+')
  fcntl.flock(holder, fcntl.LOCK_EX)
  result = {}
  thread = threading.Thread(target=lambda: result.update(store=features.prepare(config, model, variables, splits)))
  thread.start()
  thread.join(timeout=3)
  assert thread.is_alive() and not (first.directory / 'manifest.json').exists()  # blocked
  fcntl.flock(holder, fcntl.LOCK_UN)
  holder.close()
  thread.join(timeout=120)
  np.testing.assert_array_equal(result['store'].val, first.val)


@pytest.mark.parametrize('fields, why', [
    ({'model.frozen_bn': 'train'}, "frozen_bn='train'"),
    ({'optim.trainable_blocks': -1}, 'no block is frozen'),
    ({'model.name': 'lightcnn'}, 'only mobilenet_v2'),
])
def test_uncacheable_runs_train_online_under_auto_and_fail_with_a_directory(small, fields, why):
  assert not features.enabled(_with(small[0], **{'train.feature_cache': 'auto', **fields}))
  config = _with(small[0], **{'train.feature_cache': '/tmp/cache', **fields})
  with pytest.raises(errors.ConfigError, match=why):
    features.enabled(config)
  assert features.enabled(_with(small[0], **{'train.feature_cache': 'auto'}))
  assert not features.enabled(_with(small[0], **{'train.feature_cache': ''}))


def test_key_covers_every_input_of_the_prefix(small):
  config = small[0]
  base_key = features.cache_key(config, 'w')
  changes = {'data.image_size': 64, 'data.augment': False, 'data.crop_padding': 2,
             'data.normalize': False, 'data.name': 'cifar10', 'data.val_fraction': 0.1,
             'data.train_subset': 50, 'model.dtype': 'bfloat16', 'model.width_mult': 1.0,
             'model.cifar_stem': True, 'optim.trainable_blocks': 2, 'seed': 1,
             'train.batch_size': 8}
  for path, value in changes.items():
    changed = _with(config, **{path: value}) if '.' in path else config.copy_and_resolve_references()
    if '.' not in path:
      changed[path] = value
    assert features.cache_key(changed, 'w') != base_key, path
  assert features.cache_key(config, 'other weights') != base_key
  # Fields that do not change the prefix's output share the cache.
  for path, value in {'model.head_norm': 'ln', 'optim.clip': 'agc', 'optim.lr': 0.1,
                      'train.num_epochs': 7, 'data.augment_variants': 3}.items():
    assert features.cache_key(_with(config, **{path: value}), 'w') == base_key, path
