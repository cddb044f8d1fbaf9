"""Per-block gradients against torch (frozen and trained blocks), clipping against its formula,
histograms against NumPy, the CLI."""
import pathlib
import sys

import jax
import numpy as np
import pytest
import torch

from configs import base, smoke
from normjax import grad_quantities, layer_gradients, optim, pretrained, train
from normjax.models.factory import create_model

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from torch_reference import MobileNetV2 as TorchMobileNetV2  # noqa: E402
from torch_reference import randomize_  # noqa: E402


@pytest.fixture(scope='module')
def setup():
  config = base.get_config('quick')  # MobileNetV2 width 0.5, 32 px, features_18 + head trained
  config.model.head_norm = 'ln'
  config.model.dropout = 0.0
  assert config.model.frozen_bn == 'eval'
  model = create_model(config, 10)
  variables = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0)},
                         np.zeros((1, 32, 32, 3), np.float32), train=False)
  variables = jax.device_get(variables)
  rng = np.random.default_rng(0)
  # Running statistics from other images (40 train-mode passes, momentum 0.9: 1.5% of the init
  # left), so the prefix's eval mode keeps the signal alive and still differs from batch statistics.
  calibrate = create_model(config.copy_and_resolve_references(), 10)
  calibrate = calibrate.clone(backbone=calibrate.backbone.clone(trainable_blocks=-1))
  update = jax.jit(lambda v, x: calibrate.apply(v, x, train=True, mutable=['batch_stats'])[1])
  other = rng.normal(size=(64, 32, 32, 3)).astype(np.float32)
  for _ in range(40):
    variables = {**variables, **jax.device_get(update(variables, other))}
  x = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, 16).astype(np.int32)
  return config, model, variables, x, y


def test_frozen_blocks_get_torchs_gradient_through_eval_mode_batchnorms():
  """torch reference: blocks 0-17 in eval mode with requires_grad, features.18 in train mode.

  The trained blocks' gradients are training's; the frozen ones' what they would get if unfrozen.
  """
  torch.manual_seed(0)
  reference = randomize_(TorchMobileNetV2(num_classes=10, width_mult=0.5), seed=3, image_size=32)
  reference.classifier[0].p = 0.0
  reference.train()
  for block in reference.features[:18]:
    block.eval()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, size=8)
  initial = {k: v.clone() for k, v in reference.state_dict().items()}
  out = reference(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  torch.nn.functional.cross_entropy(out, torch.from_numpy(y)).backward()
  torch_grads = {k: (dict(reference.named_parameters())[k].grad if k in dict(reference.named_parameters())
                     else v) for k, v in initial.items()}

  config = base.get_config('quick')  # MobileNetV2 width 0.5, features_18 + head trained
  config.model.head, config.model.dropout = 'linear', 0.0
  assert config.model.frozen_bn == 'eval' and config.optim.trainable_blocks == 1
  template = create_model(config, 10)
  variables = pretrained.port_state_dict(initial, template)
  want = pretrained.port_state_dict(torch_grads, template)['params']
  got = grad_quantities.gradient(config, variables, x, y.astype(np.int32), jax.random.key(0), 'eval', 'all')
  blocks = {name: want['backbone'][name] for name in ('features_0', 'features_9', 'features_17', 'features_18')}
  for name, block in {**blocks, 'head': want['head']}.items():
    wants = jax.tree.leaves(block)
    # Scale of the block: features_17's last BN bias feeds a batch-statistics BN through a 1x1
    # conv, so its true gradient is 0 and both frameworks return only rounding noise.
    scale = max(np.abs(w).max() for w in wants)
    assert scale > 0
    mine = got['head'] if name == 'head' else got['backbone'][name]
    for g, w in zip(jax.tree.leaves(mine), wants):
      np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-3 * scale)


def test_global_norm_clipping_scales_only_the_trained_blocks_by_one_factor(setup):
  config, _, variables, x, y = setup
  config = config.copy_and_resolve_references()
  config.optim.clip, config.optim.clip_norm = 'global_norm', 0.05
  g = grad_quantities.gradient(config, variables, x, y, jax.random.key(4), 'eval', 'all')
  after = layer_gradients.clipped(config, variables['params'], g)
  labels = jax.tree.leaves(optim.param_labels(variables['params'], config.optim.trainable_blocks))
  before, after = jax.tree.leaves(g), jax.tree.leaves(after)
  norm = np.sqrt(sum(float((b ** 2).sum()) for lab, b in zip(labels, before) if lab != 'frozen'))
  assert norm > 0.05
  for lab, b, a in zip(labels, before, after):
    factor = 1.0 if lab == 'frozen' else 0.05 / norm
    np.testing.assert_allclose(a, np.asarray(b) * factor, rtol=1e-5, atol=1e-12)


def test_distribution_against_numpy():
  rng = np.random.default_rng(2)
  g = np.concatenate([rng.normal(scale=1e-3, size=1000), np.zeros(7), [1e-20]])
  d = layer_gradients.distribution(g)
  assert d['zeros'] == 7 and d['counts'].sum() == 1001  # 1e-20 lands in the first bin
  assert d['counts'][0] >= 1
  logs = np.log10(np.abs(g[g != 0]))
  np.testing.assert_allclose(d['percentiles'], np.percentile(logs, layer_gradients.PERCENTILES))
  assert d['l2'] == pytest.approx(np.linalg.norm(g))


def test_cli_on_a_trained_run(tmp_path, tfds_dir, shared_data_dir):
  c = smoke.get_config()  # LightCNN on Fashion-MNIST
  c.data.tfds_dir, c.data.source = str(tfds_dir), str(shared_data_dir)
  c.data.train_subset, c.data.val_fraction = 320, 0.01
  c.optim.trainable_blocks = 1  # features_0, features_1 frozen
  c.optim.clip, c.optim.clip_norm = 'global_norm', 1e-3
  c.train.batch_size, c.train.max_steps, c.train.monitor_every_steps = 32, 4, 0
  workdir = tmp_path / 'run'
  train.train_and_evaluate(c, str(workdir))
  assert layer_gradients.main([str(workdir), '--batches=1', f'--out={tmp_path}']) == 0
  saved = np.load(tmp_path / 'layer_gradients.npz')
  blocks = saved['run/blocks'].tolist()
  assert blocks == ['backbone/features_0', 'backbone/features_1', 'backbone/features_2', 'head/out']
  before, after = saved['run/before/percentiles'], saved['run/after/percentiles']
  np.testing.assert_array_equal(before[:2], after[:2])  # frozen: never clipped
  # Clipping to 1e-3 moves the trained blocks' medians down by one shared log10 factor (one batch:
  # one clipping factor).
  shift = before[2:, 2] - after[2:, 2]
  assert np.all(shift > 0) and shift.max() - shift.min() < 1e-4
  assert (tmp_path / 'layer_gradients.png').stat().st_size > 0
  assert '(frozen)' in (tmp_path / 'layer_gradients.md').read_text()
