"""configs/batch_sensitivity.py: the PyTorch anchor's recipe, its norms and their networks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from normjax import config_schema
from normjax.errors import ConfigError
from normjax.models import factory, norms

NORMS = ('bn', 'gn', 'ln', 'frn', 'nf')


def load(arg: str):
  return config_schema.load_config(f'configs/batch_sensitivity.py:{arg}')


def init(config, x):
  model = factory.create_model(config, num_classes=10)
  return model, model.init({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}, x, train=False)


def num_params(variables) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables['params']))


def test_bn_at_batch_64_is_the_anchor_recipe_plus_one_warmup_epoch():
  c = load('norm=bn')
  assert (c.model.name, c.model.norm, c.model.width_mult, c.model.cifar_stem) == ('mobilenet_v2', 'bn', 0.5, True)
  assert (c.model.head, c.model.dropout, c.model.head_init) == ('linear', 0.2, 'torch')
  assert (c.data.name, c.data.image_size, c.data.train_subset, c.data.augment) == ('cifar10_jpeg', 32, 10_000, True)
  assert (c.optim.name, c.optim.nesterov, c.optim.momentum, c.optim.lr, c.optim.backbone_lr) == (
      'sgd', True, 0.9, 0.05, 0.05)
  # The anchor had no warm-up; the sweep adds one epoch for every norm (GN and LN diverge without).
  assert (c.optim.schedule, c.optim.warmup_epochs, c.optim.weight_decay, c.optim.clip) == ('cosine', 1.0, 5e-4, 'none')
  assert (c.train.batch_size, c.train.num_epochs, c.train.max_steps, c.optim.trainable_blocks) == (64, 5, 0, -1)
  # The anchor's torch model has 700,490 parameters.
  _, variables = init(c, jnp.zeros((2, 32, 32, 3)))
  assert num_params(variables) == 700_490


@pytest.mark.parametrize('batch', [2, 4, 8, 16, 32, 64])
def test_lr_scales_linearly_with_batch_and_nothing_else_changes(batch):
  for norm in NORMS:
    c, anchor = load(f'norm={norm},batch={batch}'), load(f'norm={norm}')
    assert c.train.batch_size == batch and c.optim.lr == c.optim.backbone_lr == pytest.approx(0.05 * batch / 64)
    diffs = {k for k, v in config_schema.flatten(c).items() if config_schema.flatten(anchor)[k] != v}
    assert diffs <= {'train.batch_size', 'optim.lr', 'optim.backbone_lr'}, diffs
    assert c.train.num_epochs == 5  # the same epochs at every batch size


def test_norm_argument_builds_its_network():
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
  for norm in NORMS:
    c = load(f'norm={norm},batch=8')
    model, variables = init(c, x)
    flat = traverse_util.flatten_dict(variables['params'], sep='/')
    assert ('batch_stats' in variables) == (norm == 'bn')
    if norm == 'nf':
      assert (c.model.name, c.optim.clip, c.optim.agc_lambda, c.model.head_init) == (
          'nf_mobilenet_v2', 'agc', 0.16, 'zeros')
      np.testing.assert_array_equal(model.apply(variables, x, train=False), 0.0)  # zero-init classifier
    else:
      assert (c.model.name, c.model.norm, c.optim.clip) == ('mobilenet_v2', norm, 'none')
      assert np.all(np.isfinite(model.apply(variables, x, train=False)))
    if norm == 'frn':
      assert 'backbone/features_1/conv_0/1/tau' in flat


def test_backbone_ln_is_wu_he_layer_norm_over_h_w_c():
  """Wu & He 2018 Fig. 2: LN normalises each example over (H, W, C), i.e. GroupNorm with one group."""
  c = load('norm=ln')
  block = factory._backbone_norm_factory(c.model, jnp.float32)(train=True)  # pylint: disable=protected-access
  module = block(name='n')
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 4, 4, 16)) * jnp.arange(1, 17) + jnp.arange(16)
  y = module.apply(module.init(jax.random.PRNGKey(0), x), x)
  flat = np.asarray(x).reshape(3, -1)
  expected = (flat - flat.mean(1, keepdims=True)) / np.sqrt(flat.var(1, keepdims=True) + norms.GN_EPSILON)
  np.testing.assert_allclose(np.asarray(y).reshape(3, -1), expected, rtol=1e-4, atol=1e-5)
  # GN's 8 groups divide every layer of the width-0.5 net (the model above built with them).
  assert load('norm=gn').model.gn_groups == 8


def test_bad_norm_names_the_argument_and_the_choices():
  with pytest.raises(ConfigError) as e:
    load('norm=batchnorm')
  assert str(e.value) == ("configs/batch_sensitivity.py:norm=batchnorm: argument 'norm' = 'batchnorm'; "
                          'allowed: bn, gn, ln, frn, nf')
