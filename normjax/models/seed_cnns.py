"""The seed's MNIST networks: LightCNN's baselines (study.md section 4) and its final Keras CNN (section 5).

Each is a backbone for `Classifier(backbone, head)` with blocks `features_<i>`
(so `optim.trainable_blocks` works); the head (`model.head='linear'`, dropout 0)
adds the final Dense `out`. Nets that flatten return a 1x1 "feature map", so the
Classifier's global average pooling is the identity. Flattening is in NHWC
order (Keras' channels_last order; torch flattens NCHW). Parameter counts,
weights + biases, `out` included (28x28x1 input, 10 classes):

- `mlp` (section 4: MLP 784-512-256-10, ~535k): Dense 784->512, Dense 512->256,
  ReLU, out 256->10: 401,920 + 131,328 + 2,570 = 535,818.
- `lenet` (section 4: "LeNet-like CNN with big FC layers", 80k-120k; the seed
  gives no layout, this is LeNet-5 with its first FC widened from 120 to 200):
  conv 1->6 5x5 pad 2, ReLU, maxpool 2 -> conv 6->16 5x5, ReLU, maxpool 2 ->
  FC 400->200, ReLU -> FC 200->84, ReLU -> out 84->10:
  156 + 2,416 + 80,200 + 16,884 + 850 = 100,506.
- `medium_light` (section 4: 2-conv, ~3,000; layout chosen here): conv 1->12 3x3
  pad 1, ReLU, maxpool 2 -> conv 12->24 3x3 pad 1, ReLU -> GAP -> out 24->10:
  120 + 2,616 + 250 = 2,986.
- `ultra_light` (section 4: 1 conv with 4 filters + FC, ~210): conv 1->4 3x3
  pad 1, ReLU -> maxpool 14 (28x28 -> 2x2) -> flatten 16 -> out 16->10:
  40 + 170 = 210.
- `cnn_mnist` (section 5, 130,890): Keras Conv2D 32 3x3 'valid', ReLU,
  MaxPooling2D 2 -> Conv2D 64 -> MaxPooling2D 2 -> Conv2D 64 -> Flatten ->
  Dense 128, ReLU -> out 128->10 (softmax in the loss):
  320 + 18,496 + 36,928 + 73,856 + 1,290 = 130,890. Section 5 lists a third
  pool after the last conv, but then Flatten has 64 values and the net 65,354
  parameters; only the layout without it has the 130,890 the seed reports.
  Its backbone uses Keras' default init (glorot_uniform, zero bias).

The PyTorch baselines keep flax's default init, as `lightcnn.py` does.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax.models import common, pooling

# Keras' Conv2D/Dense defaults: glorot_uniform kernels, zero biases.
_KERAS_INIT = {'kernel_init': nn.initializers.glorot_uniform(), 'bias_init': nn.initializers.zeros}


class _Backbone(nn.Module):
  """Runs `self.blocks()` in order as features_0..k-1, freezing all but the last `trainable_blocks`."""
  trainable_blocks: int = -1
  dtype: Any = jnp.float32

  def blocks(self) -> list[Callable[[jnp.ndarray], jnp.ndarray]]:
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    del train  # no train-dependent layers
    blocks = self.blocks()
    first_trainable = common.first_trainable(len(blocks), self.trainable_blocks)
    x = x.astype(self.dtype)
    for i, block in enumerate(blocks):
      x = block(x)
      if i + 1 == first_trainable:
        x = jax.lax.stop_gradient(x)
    return x if x.ndim == 4 else x[:, None, None, :]  # flat features -> 1x1 map for the GAP


def _flatten(x: jnp.ndarray) -> jnp.ndarray:
  return x.reshape(x.shape[0], -1)


def _pool(x: jnp.ndarray, size: int = 2) -> jnp.ndarray:
  return pooling.max_pool(x, size)  # 'VALID': floor, as torch and Keras


class MLP(_Backbone):
  """784-512-256 with ReLU (the head adds 256->10)."""

  def blocks(self):
    dense = lambda width, i: nn.Dense(width, dtype=self.dtype, name=common.block_name(i))
    return [lambda x: nn.relu(dense(512, 0)(_flatten(x))),
            lambda x: nn.relu(dense(256, 1)(x))]


class LeNet(_Backbone):
  """LeNet-5 with ReLU, max-pooling and a 200-unit first FC layer."""

  def blocks(self):
    conv = lambda c, pad, i: nn.Conv(c, (5, 5), padding=pad, dtype=self.dtype, name=common.block_name(i))
    dense = lambda width, i: nn.Dense(width, dtype=self.dtype, name=common.block_name(i))
    return [lambda x: _pool(nn.relu(conv(6, ((2, 2), (2, 2)), 0)(x))),
            lambda x: _pool(nn.relu(conv(16, 'VALID', 1)(x))),
            lambda x: nn.relu(dense(200, 2)(_flatten(x))),
            lambda x: nn.relu(dense(84, 3)(x))]


class MediumLight(_Backbone):
  """Two 3x3 convs (12, 24 channels); the Classifier's GAP and `out` follow."""

  def blocks(self):
    conv = lambda c, i: nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                name=common.block_name(i))
    return [lambda x: _pool(nn.relu(conv(12, 0)(x))),
            lambda x: nn.relu(conv(24, 1)(x))]


class UltraLight(_Backbone):
  """One 3x3 conv with 4 filters, max-pooled to 2x2 and flattened to 16 values for `out`."""

  def blocks(self):
    conv = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=common.block_name(0))
    return [lambda x: _flatten(_pool(nn.relu(conv(x)), size=x.shape[1] // 2))]


class CNNMnist(_Backbone):
  """The seed's Keras CNN without its head: conv32-pool-conv64-pool-conv64-flatten-dense128."""

  def blocks(self):
    conv = lambda c, i: nn.Conv(c, (3, 3), padding='VALID', dtype=self.dtype, name=common.block_name(i),
                                **_KERAS_INIT)
    dense = lambda w, i: nn.Dense(w, dtype=self.dtype, name=common.block_name(i), **_KERAS_INIT)
    return [lambda x: _pool(nn.relu(conv(32, 0)(x))),
            lambda x: _pool(nn.relu(conv(64, 1)(x))),
            lambda x: nn.relu(conv(64, 2)(x)),
            lambda x: nn.relu(dense(128, 3)(_flatten(x)))]


# model.name -> backbone class.
MODELS: dict[str, type[_Backbone]] = {
    'mlp': MLP, 'lenet': LeNet, 'medium_light': MediumLight, 'ultra_light': UltraLight,
    'cnn_mnist': CNNMnist,
}
