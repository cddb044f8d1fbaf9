"""Classifier heads on globally pooled features.

Every head names its final Dense `out`, so the optimizer can find the final
classifier layer (AGC excludes it, as in Brock et al. 2021).
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax import registry

ModuleDef = Callable[..., nn.Module]
NormFactory = Callable[..., ModuleDef]  # norm(train=...) -> ModuleDef, e.g. partial(make_norm, 'bn')


def dense(features: int, fan_in: int, init: str, dtype: Any, name: str) -> nn.Dense:
  """nn.Dense initialised like torch's nn.Linear (`init='torch'`), flax's default (`'flax'`) or 0.

  torch nn.Linear.reset_parameters: kaiming_uniform_(a=sqrt(5)) gives weights
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (gain sqrt(2/(1+5)) times sqrt(3/fan_in)), and the bias
  is U(-1/sqrt(fan_in), 1/sqrt(fan_in)). flax's default: lecun_normal weights, zero bias.
  `'zeros'`: zero weights and bias, the NFNets classifier (deepmind-research nfnets/nfnet.py:
  `hk.Linear(num_classes, w_init=jnp.zeros)`, haiku's bias init is zeros), so every logit is 0
  at init. Only the final classifier may start at 0: a zero hidden layer would get no gradient.
  """
  if init == 'flax':
    return nn.Dense(features, dtype=dtype, name=name)
  if init == 'zeros':
    return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros, name=name)
  if init != 'torch':
    raise ValueError(f'model.head_init = {init!r}; allowed: {", ".join(registry.HEAD_INITS)}')
  bound = 1.0 / fan_in ** 0.5

  def uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nn.Dense(features, dtype=dtype, kernel_init=uniform, bias_init=uniform, name=name)


class MLPHead(nn.Module):
  """The study's head: FC(C->hidden) -> Norm -> ReLU -> Dropout -> FC(hidden->classes)."""
  num_classes: int
  norm: NormFactory
  hidden: int = 256  # study: FC(1280->256)
  dropout: float = 0.5
  init_style: str = 'torch'  # the study's heads were torch nn.Linear layers
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = dense(self.hidden, x.shape[-1], self.init_style, self.dtype, 'fc1')(x)
    x = self.norm(train=train)(name='norm')(x)
    x = nn.relu(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return dense(self.num_classes, self.hidden, self.init_style, self.dtype, 'out')(x)


class LinearHead(nn.Module):
  """torchvision's classifier: Dropout -> Linear (`classifier.1` is `out` here)."""
  num_classes: int
  dropout: float = 0.2  # torchvision mobilenet_v2: nn.Dropout(p=0.2)
  init_style: str = 'torch'  # not `init`: that name is flax's Module.init
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return dense(self.num_classes, x.shape[-1], self.init_style, self.dtype, 'out')(x)
