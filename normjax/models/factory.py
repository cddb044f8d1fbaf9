"""`create_model(config, num_classes)`: every normjax network, chosen by `config.model`."""
import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from normjax.errors import ConfigError
from normjax.models import heads, seed_cnns, tunable_cnn
from normjax.models.classifier import Classifier
from normjax.models.lightcnn import LightCNN
from normjax.models.mobilenet_v2 import MobileNetV2Features
from normjax.models.nf import NFMobileNetV2Features
from normjax.models.norms import make_norm

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# (config.model, trainable_blocks, dtype) -> backbone.
BackboneBuilder = Callable[[ml_collections.ConfigDict, int, Any], nn.Module]


def _norm_factory(name: str, model_cfg: ml_collections.ConfigDict, dtype):
  return functools.partial(make_norm, name, dtype=dtype, gn_groups=model_cfg.gn_groups,
                           frn_learned_eps=model_cfg.frn_learned_eps, frn_dense=model_cfg.frn_dense)


def _backbone_norm_factory(model_cfg: ml_collections.ConfigDict, dtype):
  """model.norm in a conv backbone; `ln` is Wu & He 2018's LayerNorm (their Fig. 2): statistics
  over (H, W, C) of each example, i.e. GroupNorm with one group, not make_norm's per-pixel
  LayerNorm over C alone (the heads' LN on (N, C) features)."""
  if model_cfg.norm == 'ln':
    return functools.partial(make_norm, 'gn', dtype=dtype, gn_groups=1)
  return _norm_factory(model_cfg.norm, model_cfg, dtype)


def _seed_cnn(name: str) -> BackboneBuilder:
  return lambda m, trainable, dtype: seed_cnns.MODELS[name](trainable_blocks=trainable, dtype=dtype)


# model.name -> its backbone, in normjax.registry.MODELS's order (tests/test_config_schema.py checks).
BACKBONES: dict[str, BackboneBuilder] = {
    'lightcnn': lambda m, trainable, dtype: LightCNN(trainable_blocks=trainable, dtype=dtype),
    'mobilenet_v2': lambda m, trainable, dtype: MobileNetV2Features(
        norm=_backbone_norm_factory(m, dtype), width_mult=m.width_mult, cifar_stem=m.cifar_stem,
        trainable_blocks=trainable, frozen_bn=m.frozen_bn, dtype=dtype,
        gemm_dtype=DTYPES.get(m.gemm_dtype)),
    'nf_mobilenet_v2': lambda m, trainable, dtype: NFMobileNetV2Features(
        width_mult=m.width_mult, cifar_stem=m.cifar_stem, trainable_blocks=trainable, dtype=dtype),
    **{name: _seed_cnn(name) for name in seed_cnns.MODELS},
    'tunable_cnn': lambda m, trainable, dtype: tunable_cnn.from_config(m, trainable_blocks=trainable,
                                                                       dtype=dtype),
}


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> Classifier:
  """Backbone + head from config.model; frozen blocks from config.optim.trainable_blocks."""
  m = config.model
  dtype = DTYPES[m.dtype]
  if m.name not in BACKBONES:
    raise ValueError(f'config.model.name = {m.name!r}; allowed: {", ".join(BACKBONES)}')
  if m.gemm_dtype != 'compute' and m.name != 'mobilenet_v2':
    raise ConfigError(f'config.model.gemm_dtype = {m.gemm_dtype!r} applies to the 1x1 convs of '
                      f'model.name = mobilenet_v2 only, not {m.name!r}; use gemm_dtype = compute')
  backbone = BACKBONES[m.name](m, config.optim.trainable_blocks, dtype)
  if m.head == 'mlp':
    if m.head_init == 'zeros':
      raise ConfigError("config.model.head_init = 'zeros' zero-initialises every head layer, and the "
                        "MLP head's hidden layer would then get no gradient; use model.head=linear "
                        "(the NFNets classifier) or head_init torch | flax")
    head = heads.MLPHead(num_classes, norm=_norm_factory(m.head_norm, m, dtype), hidden=m.head_hidden,
                         dropout=m.dropout, init_style=m.head_init, dtype=dtype)
  else:
    head = heads.LinearHead(num_classes, dropout=m.dropout, init_style=m.head_init, dtype=dtype)
  return Classifier(backbone=backbone, head=head)
