"""The seed's MNIST nets (models/seed_cnns.py): parameter counts, layouts against torch, training."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch import nn

from configs import base
from normjax import optim
from normjax.models import factory

# Each net's parameters, layer by layer (weights + biases; 28x28x1 input, 10 classes).
PARAMS = {
    'mlp': (784 * 512 + 512) + (512 * 256 + 256) + (256 * 10 + 10),
    # conv 5x5 1->6 (pad 2) -> pool 14x14 -> conv 5x5 6->16 -> 10x10 -> pool 5x5 -> 400.
    'lenet': (5 * 5 * 1 * 6 + 6) + (5 * 5 * 6 * 16 + 16) + (400 * 200 + 200) + (200 * 84 + 84) + (84 * 10 + 10),
    'medium_light': (3 * 3 * 1 * 12 + 12) + (3 * 3 * 12 * 24 + 24) + (24 * 10 + 10),
    # conv 3x3 1->4 (pad 1) -> 28x28x4 -> pool 14 -> 2x2x4 = 16.
    'ultra_light': (3 * 3 * 1 * 4 + 4) + (16 * 10 + 10),
    # Keras 'valid': 28 -> conv 26 -> pool 13 -> conv 11 -> pool 5 -> conv 3: 3*3*64 = 576.
    'cnn_mnist': (3 * 3 * 1 * 32 + 32) + (3 * 3 * 32 * 64 + 64) + (3 * 3 * 64 * 64 + 64)
                 + (576 * 128 + 128) + (128 * 10 + 10),
}
# The counts the module docstring, the configs and study.md state.
STATED = {'mlp': 535_818, 'lenet': 100_506, 'medium_light': 2_986, 'ultra_light': 210,
          'cnn_mnist': 130_890}
BACKBONE_OUTPUT = {'mlp': (1, 1, 256), 'lenet': (1, 1, 84), 'medium_light': (14, 14, 24),
                   'ultra_light': (1, 1, 16), 'cnn_mnist': (1, 1, 128)}
NAMES = sorted(PARAMS)


class FlattenNHWC(nn.Module):
  """Flatten in channels-last order, as Keras' Flatten (and normjax) do."""

  def forward(self, x):
    return x.permute(0, 2, 3, 1).flatten(1)


def torch_reference(name):
  """Each layout as the docstring of models/seed_cnns.py describes it, in plain torch."""
  return {
      'mlp': lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256),
                                   nn.ReLU(), nn.Linear(256, 10)),
      'lenet': lambda: nn.Sequential(
          nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
          nn.MaxPool2d(2), FlattenNHWC(), nn.Linear(400, 200), nn.ReLU(), nn.Linear(200, 84), nn.ReLU(),
          nn.Linear(84, 10)),
      'medium_light': lambda: nn.Sequential(
          nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(12, 24, 3, padding=1),
          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)),
      'ultra_light': lambda: nn.Sequential(
          nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(14), FlattenNHWC(), nn.Linear(16, 10)),
      # The seed's Keras model (channels_last, 'valid' convs, MaxPooling2D(2)).
      'cnn_mnist': lambda: nn.Sequential(
          nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
          nn.Conv2d(64, 64, 3), nn.ReLU(), FlattenNHWC(), nn.Linear(576, 128), nn.ReLU(), nn.Linear(128, 10)),
  }[name]()


@functools.cache
def make(name, trainable_blocks=-1):
  """(config, model, initial params), built once per net for all tests."""
  config = base.seed_mnist(name)
  config.optim.trainable_blocks = trainable_blocks
  model = factory.create_model(config, num_classes=10)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 28, 28, 1)), train=False)['params'])
  return config, model, init(jax.random.PRNGKey(0))


def count(tree):
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(tree))


def fixed_batch(n=16):
  rng = np.random.default_rng(0)
  return rng.random((n, 28, 28, 1), np.float32), rng.integers(0, 10, n).astype(np.int32)


@pytest.mark.parametrize('name', NAMES)
def test_parameter_count_matches_the_layer_arithmetic(name):
  assert PARAMS[name] == STATED[name]
  _, _, params = make(name)
  assert count(params) == PARAMS[name]
  assert sum(p.numel() for p in torch_reference(name).parameters()) == PARAMS[name]
  # Blocks are features_0..k-1 (optim.trainable_blocks), the classifier is the head's `out`.
  blocks = list(params['backbone'])
  assert blocks == [f'features_{i}' for i in range(len(blocks))]
  assert list(params['head']) == ['out'] and params['head']['out']['kernel'].shape[1] == 10


@pytest.mark.parametrize('name', NAMES)
def test_output_shapes(name):
  _, model, params = make(name)
  x, _ = fixed_batch(3)
  assert model.apply({'params': params}, x, train=False).shape == (3, 10)
  features = model.backbone.apply({'params': params['backbone']}, x, train=False)
  assert features.shape == (3, *BACKBONE_OUTPUT[name])


@pytest.mark.parametrize('name', NAMES)
def test_logits_equal_the_torch_layout_with_the_same_weights(name):
  _, model, params = make(name)
  reference = torch_reference(name)
  layers = [params['backbone'][k] for k in params['backbone']] + [params['head']['out']]
  torch_layers = [m for m in reference if isinstance(m, (nn.Conv2d, nn.Linear))]
  assert len(layers) == len(torch_layers)
  with torch.no_grad():
    for flax_layer, torch_layer in zip(layers, torch_layers):
      kernel = np.asarray(flax_layer['kernel'])
      # flax conv kernels are HWIO and dense kernels (in, out); torch's are OIHW and (out, in).
      kernel = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T
      torch_layer.weight.copy_(torch.from_numpy(kernel.copy()))
      torch_layer.bias.copy_(torch.from_numpy(np.array(flax_layer['bias'])))
  x, _ = fixed_batch(4)
  expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy()
  np.testing.assert_allclose(model.apply({'params': params}, x, train=False), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', NAMES)
def test_one_adam_step_lowers_the_loss_on_a_fixed_batch(name):
  config, model, params = make(name)
  x, y = fixed_batch()

  def loss_fn(p):
    logits = model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = optim.make_optimizer(config, params)  # the configs' Adam 1e-3, all blocks trainable

  @jax.jit
  def step(p):
    before, grads = jax.value_and_grad(loss_fn)(p)
    updates, _ = tx.update(grads, tx.init(p), p)
    return before, loss_fn(optax.apply_updates(p, updates))

  before, after = step(params)
  assert np.isfinite(before) and after < before - 1e-4, (before, after)


@pytest.mark.parametrize('name', ['lenet', 'cnn_mnist', 'mlp'])
def test_trainable_blocks_freezes_the_earlier_blocks(name):
  config, model, params = make(name, trainable_blocks=1)
  x, y = fixed_batch()

  def loss_fn(p):
    logits = model.apply({'params': p}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grads = jax.jit(jax.grad(loss_fn))(params)['backbone']
  last = f'features_{len(grads) - 1}'
  for block, g in grads.items():
    norm = sum(float(jnp.sum(jnp.square(v))) for v in jax.tree_util.tree_leaves(g))
    assert (norm > 0) if block == last else (norm == 0), (block, norm)
  labels = optim.param_labels(params, config.optim.trainable_blocks)['backbone']
  assert {k: v['kernel'] for k, v in labels.items()} == {
      k: 'backbone' if k == last else 'frozen' for k in grads}
