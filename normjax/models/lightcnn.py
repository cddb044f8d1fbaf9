"""LightCNN: the study's tiny GAP classifier (`../shared/docs/study.md` section 4).

conv 1->8 -> pool -> conv 8->16 -> pool -> conv 16->32 -> GAP -> FC 32->10:
80 + 1,168 + 4,640 + 330 = 6,218 parameters. Global average pooling replaces
big FC layers (Lin et al., Network in Network, 2014).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax.models import common, pooling

CHANNELS = (8, 16, 32)  # study section 4


class LightCNN(nn.Module):
  """The conv trunk; blocks are features_0..2 (3x3 conv, pad 1, ReLU, maxpool 2 except last)."""
  trainable_blocks: int = -1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    del train  # no train-dependent layers
    first_trainable = common.first_trainable(len(CHANNELS), self.trainable_blocks)
    x = x.astype(self.dtype)
    for i, channels in enumerate(CHANNELS):
      x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                  name=common.block_name(i))(x)
      x = nn.relu(x)
      if i < len(CHANNELS) - 1:
        x = pooling.max_pool(x, 2)
      if i + 1 == first_trainable:
        x = jax.lax.stop_gradient(x)
    return x
