"""Every model: a backbone feature map, global average pooling, then a head."""
import flax.linen as nn
import jax.numpy as jnp


class Classifier(nn.Module):
  """params are {'backbone': ..., 'head': ...}; logits are float32 whatever the compute dtype."""
  backbone: nn.Module
  head: nn.Module

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    f = self.backbone(x, train=train)
    f = f.mean(axis=(1, 2))  # global average pooling over H, W
    return self.head(f, train=train).astype(jnp.float32)
