"""The rules every backbone shares: its blocks are named `features_<i>`, the last k of them train.

`optim.trainable_blocks` is -1 (all blocks train), 0 (none) or k (the last k). Backbones
cut the gradient after the last frozen block, `optim.param_labels` freezes the params of
the blocks before the first trainable one, and the feature cache computes those blocks
once; all three take the block names and the first trainable block from here.
No JAX: the report sorts and shortens block names without it.
"""
import re

from normjax.errors import ConfigError

_BLOCK = re.compile(r'features_(\d+)')


def block_name(index: int) -> str:
  """The name of backbone block `index` (torchvision's `features.<index>`)."""
  return f'features_{index}'


def block_index(name: str) -> int | None:
  """i for a block named 'features_<i>'; None for any other name."""
  match = _BLOCK.fullmatch(name)
  return None if match is None else int(match.group(1))


def first_trainable(num_blocks: int, trainable_blocks: int) -> int:
  """Index of the first of `num_blocks` blocks that trains: 0 for -1 (all), num_blocks for 0 (none)."""
  if not -1 <= trainable_blocks <= num_blocks:
    raise ConfigError(f'optim.trainable_blocks must be -1 (all), 0 (none) or 1..{num_blocks} '
                      f'(the backbone has {num_blocks} blocks), got {trainable_blocks}')
  return 0 if trainable_blocks == -1 else num_blocks - trainable_blocks
