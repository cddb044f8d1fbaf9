"""`create_model(config, num_classes)`: every normjax network, chosen by `config.model`."""
import functools

import jax.numpy as jnp
import ml_collections

from normjax.models import heads, seed_cnns, tunable_cnn
from normjax.models.classifier import Classifier
from normjax.models.lightcnn import LightCNN
from normjax.models.mobilenet_v2 import MobileNetV2Features
from normjax.models.nf import NFMobileNetV2Features
from normjax.models.norms import make_norm

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _norm_factory(name: str, model_cfg: ml_collections.ConfigDict, dtype):
  return functools.partial(make_norm, name, dtype=dtype, gn_groups=model_cfg.gn_groups,
                           frn_learned_eps=model_cfg.frn_learned_eps, frn_dense=model_cfg.frn_dense)


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> Classifier:
  """Backbone + head from config.model; frozen blocks from config.optim.trainable_blocks."""
  m = config.model
  dtype = DTYPES[m.dtype]
  trainable = config.optim.trainable_blocks
  if m.name == 'lightcnn':
    backbone = LightCNN(trainable_blocks=trainable, dtype=dtype)
  elif m.name == 'mobilenet_v2':
    backbone = MobileNetV2Features(norm=_norm_factory(m.norm, m, dtype), width_mult=m.width_mult,
                                   cifar_stem=m.cifar_stem, trainable_blocks=trainable,
                                   frozen_bn=m.frozen_bn, dtype=dtype)
  elif m.name == 'nf_mobilenet_v2':
    backbone = NFMobileNetV2Features(width_mult=m.width_mult, cifar_stem=m.cifar_stem,
                                     trainable_blocks=trainable, dtype=dtype)
  elif m.name in seed_cnns.MODELS:
    backbone = seed_cnns.MODELS[m.name](trainable_blocks=trainable, dtype=dtype)
  elif m.name == 'tunable_cnn':
    backbone = tunable_cnn.from_config(m, trainable_blocks=trainable, dtype=dtype)
  else:
    raise ValueError(f'config.model.name = {m.name!r}; allowed: lightcnn, mobilenet_v2, nf_mobilenet_v2, '
                     f'{", ".join(seed_cnns.MODELS)}, tunable_cnn')
  if m.head == 'mlp':
    head = heads.MLPHead(num_classes, norm=_norm_factory(m.head_norm, m, dtype), hidden=m.head_hidden,
                         dropout=m.dropout, init=m.head_init, dtype=dtype)
  else:
    head = heads.LinearHead(num_classes, dropout=m.dropout, init=m.head_init, dtype=dtype)
  return Classifier(backbone=backbone, head=head)
