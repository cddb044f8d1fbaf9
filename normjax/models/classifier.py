"""Every model: a backbone feature map, global average pooling, then a head."""
import flax.linen as nn
import jax.numpy as jnp


class Classifier(nn.Module):
  """params are {'backbone': ..., 'head': ...}; logits are float32 whatever the compute dtype.

  `start_block` > 0 feeds `x` to backbone block `start_block` (the input is then the cached
  output of the blocks before it; only MobileNetV2Features supports it).
  """
  backbone: nn.Module
  head: nn.Module

  def __call__(self, x: jnp.ndarray, train: bool, start_block: int = 0) -> jnp.ndarray:
    f = self.backbone(x, train=train, start=start_block) if start_block else self.backbone(x, train=train)
    f = f.mean(axis=(1, 2))  # global average pooling over H, W
    return self.head(f, train=train).astype(jnp.float32)

  def prefix(self, x: jnp.ndarray, stop_block: int) -> jnp.ndarray:
    """The backbone's blocks before `stop_block`, in eval mode: what the feature cache stores."""
    return self.backbone(x, train=False, stop=stop_block)
