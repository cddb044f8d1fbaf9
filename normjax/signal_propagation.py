"""Signal propagation plots (SPPs): per-block activation statistics of a backbone at init.

Brock, De, Smith, ICLR 2021 ("Characterizing signal propagation to close the
performance gap in unnormalized ResNets") diagnose a network by, for each
block output, the channel-averaged squared mean and the average channel
variance over (batch, H, W) (deepmind-research nfnets/base.py `signal_metrics`).
A well-conditioned net keeps the variance near 1 through depth; an unnormalized
plain net lets it explode or vanish.
"""
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from matplotlib.figure import Figure  # the object API: importing this never sets a backend

from normjax.models import common


def _is_block(module: nn.Module, method_name: str) -> bool:
  return method_name == '__call__' and common.block_index(module.name or '') is not None


def signal_propagation(module: nn.Module, variables: Mapping[str, Any], x: jnp.ndarray,
                       train: bool = True) -> list[dict]:
  """Statistics of every top-level `features_<i>` block output of a backbone, in block order.

  Returns one dict per block: {'block': 'features_<i>', 'index': i,
  'avg_sq_mean': mean_c(mean_{n,h,w}(y)^2), 'avg_var': mean_c(var_{n,h,w}(y))}.
  `train=True` (the default) gives BatchNorm nets their batch statistics, as in the
  paper's SPPs at init; batch_stats updates are discarded.
  """
  mutable = ['intermediates'] + (['batch_stats'] if 'batch_stats' in variables else [])

  @jax.jit
  def block_stats(variables, x):
    _, state = module.apply(variables, x, train=train, capture_intermediates=_is_block,
                            mutable=mutable)
    stats = {}
    for name, captured in state.get('intermediates', {}).items():
      # Top-level blocks only: {'features_<i>': {'__call__': (y,)}}.
      if common.block_index(name) is None or '__call__' not in captured:
        continue
      y = captured['__call__'][0].astype(jnp.float32)
      channel_mean = jnp.mean(y, axis=(0, 1, 2))
      stats[common.block_index(name)] = (jnp.mean(channel_mean**2),
                                         jnp.mean(jnp.var(y, axis=(0, 1, 2))))
    return stats

  stats = block_stats(variables, x)
  if not stats:
    raise ValueError(f'signal_propagation: {type(module).__name__} has no features_<i> blocks')
  return [{'block': common.block_name(i), 'index': i, 'avg_sq_mean': float(stats[i][0]),
           'avg_var': float(stats[i][1])} for i in sorted(stats)]


def plot_signal_propagation(results: Mapping[str, list[dict]], path: str) -> None:
  """Writes a PNG with the two SPP panels (log scale), one line per named network."""
  if not results:
    raise ValueError('plot_signal_propagation: no networks to plot')
  fig = Figure(figsize=(10, 4), layout='tight')
  axes = fig.subplots(1, 2)
  for ax, key, title in ((axes[0], 'avg_sq_mean', 'Average channel squared mean'),
                         (axes[1], 'avg_var', 'Average channel variance')):
    for name, stats in results.items():
      ax.plot([s['index'] for s in stats], [s[key] for s in stats], marker='o', label=name)
    ax.set_yscale('log')
    ax.set_xlabel('block (features_<i>)')
    ax.set_title(title)
    ax.grid(True, which='both', alpha=0.3)
  axes[1].legend()
  fig.savefig(path, format='png', dpi=100)
