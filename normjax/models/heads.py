"""Classifier heads on globally pooled features.

Every head names its final Dense `out`, so the optimizer can find the final
classifier layer (AGC excludes it, as in Brock et al. 2021).
"""
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Callable[..., nn.Module]
NormFactory = Callable[..., ModuleDef]  # norm(train=...) -> ModuleDef, e.g. partial(make_norm, 'bn')


class MLPHead(nn.Module):
  """The study's head: FC(C->hidden) -> Norm -> ReLU -> Dropout -> FC(hidden->classes)."""
  num_classes: int
  norm: NormFactory
  hidden: int = 256  # study: FC(1280->256)
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x)
    x = self.norm(train=train)(name='norm')(x)
    x = nn.relu(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='out')(x)


class LinearHead(nn.Module):
  """torchvision's classifier: Dropout -> Linear (`classifier.1` is `out` here)."""
  num_classes: int
  dropout: float = 0.2  # torchvision mobilenet_v2: nn.Dropout(p=0.2)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='out')(x)
