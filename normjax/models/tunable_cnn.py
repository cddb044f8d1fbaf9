"""A CNN whose layers come from the config: the seed's Keras Tuner search space (study.md section 5).

`model.name='tunable_cnn'` with two string fields, so that `--config.model.x=` and
`normjax.sweep --set` overrides can spell any architecture:

- `model.conv_layers`: comma-separated `<filters>x<kernel>` items, e.g. `'32x3,64x5'` (a 3x3
  conv with 32 filters, then a 5x5 conv with 64).
- `model.dense_layers`: comma-separated units, e.g. `'128,64'`.
- `model.dropout`: the rate after every dense layer.

Layout (use `model.head='linear'`):
- conv i (`features_i`): Conv 'same' padding (so 5 convs fit a 28x28 image), ReLU, then a
  2x2 max-pool while the map is at least 2 px on its shorter side (28 -> 14 -> 7 -> 3 -> 1;
  a conv on a 1 px map is not pooled).
- Flatten (NHWC, Keras' channels_last order).
- dense j (`features_<n_conv + j>`): Dense, ReLU, Dropout(model.dropout). The last dense
  layer's dropout is the linear head's (LinearHead: Dropout, then the final Dense `out`),
  so each dense layer is followed by exactly one dropout.

The backbone uses Keras' default init (glorot_uniform kernels, zero biases), as the seed's
Keras models did. Parameters: conv k*k*c_in*f + f each, dense n_in*u + u each, `out` u*10 + 10;
tests/test_tune.py checks two architectures against hand counts.
"""
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from normjax.models import common, pooling

# Keras' Conv2D/Dense defaults: glorot_uniform kernels, zero biases.
_KERAS_INIT = {'kernel_init': nn.initializers.glorot_uniform(), 'bias_init': nn.initializers.zeros}
_CONV_ITEM = re.compile(r'([1-9]\d*)x([1-9]\d*)')
_DENSE_ITEM = re.compile(r'[1-9]\d*')


def parse_conv_layers(text: str) -> tuple[tuple[int, int], ...]:
  """'32x3,64x5' -> ((32, 3), (64, 5)); '' -> ()."""
  out = []
  for item in filter(None, text.replace(' ', '').split(',')):
    match = _CONV_ITEM.fullmatch(item)
    if match is None:
      raise ValueError(f'model.conv_layers item {item!r}: expected <filters>x<kernel>, e.g. 32x3')
    out.append((int(match.group(1)), int(match.group(2))))
  return tuple(out)


def parse_dense_layers(text: str) -> tuple[int, ...]:
  """'128,64' -> (128, 64); '' -> ()."""
  out = []
  for item in filter(None, text.replace(' ', '').split(',')):
    if _DENSE_ITEM.fullmatch(item) is None:
      raise ValueError(f'model.dense_layers item {item!r}: expected a number of units, e.g. 128')
    out.append(int(item))
  return tuple(out)


def format_conv_layers(layers: tuple[tuple[int, int], ...]) -> str:
  return ','.join(f'{f}x{k}' for f, k in layers)


def format_dense_layers(units: tuple[int, ...]) -> str:
  return ','.join(str(u) for u in units)


class TunableCNN(nn.Module):
  """Convs (each ReLU, pooled while >= 2 px), flatten, dense layers (ReLU, dropout); blocks features_<i>."""
  conv_layers: tuple[tuple[int, int], ...] = ((32, 3), (64, 3))
  dense_layers: tuple[int, ...] = (128,)
  dropout: float = 0.0
  trainable_blocks: int = -1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    n_blocks = len(self.conv_layers) + len(self.dense_layers)
    first_trainable = common.first_trainable(n_blocks, self.trainable_blocks)
    x = x.astype(self.dtype)
    i = 0
    for filters, kernel in self.conv_layers:
      x = nn.relu(nn.Conv(filters, (kernel, kernel), padding='SAME', dtype=self.dtype,
                          name=common.block_name(i), **_KERAS_INIT)(x))
      if min(x.shape[1:3]) >= 2:
        x = pooling.max_pool(x, 2)  # 'VALID': floor, as Keras' MaxPooling2D
      i += 1
      if i == first_trainable:
        x = jax.lax.stop_gradient(x)
    x = x.reshape(x.shape[0], -1)
    for j, units in enumerate(self.dense_layers):
      x = nn.relu(nn.Dense(units, dtype=self.dtype, name=common.block_name(i), **_KERAS_INIT)(x))
      if j + 1 < len(self.dense_layers):  # the last one's dropout is the head's
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
      i += 1
      if i == first_trainable:
        x = jax.lax.stop_gradient(x)
    return x[:, None, None, :]  # a 1x1 map: the Classifier's global average pooling is the identity


def from_config(model_cfg: ml_collections.ConfigDict, *, trainable_blocks: int, dtype: Any) -> TunableCNN:
  """TunableCNN from config.model's conv_layers, dense_layers and dropout."""
  return TunableCNN(conv_layers=parse_conv_layers(model_cfg.conv_layers),
                    dense_layers=parse_dense_layers(model_cfg.dense_layers),
                    dropout=model_cfg.dropout, trainable_blocks=trainable_blocks, dtype=dtype)
