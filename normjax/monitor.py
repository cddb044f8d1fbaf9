"""Training-dynamics statistics recorded inside the optimizer state.

`monitored(clipper, optimizer)` is one optax transformation that runs the
clipper, then the optimizer, and keeps in its state (as init2winit's
training_metrics_grabber does) what a train step needs to log: global
gradient/param/update norms every step and per-layer window means every
`layer_stats_every` steps. Because the statistics live in the optimizer
state, the jitted train step returns them without a second pass over the
gradients, and they checkpoint with the rest of the state.

Reading them: `summarize(opt_state)` gives the last step's scalars and
`summarize_layers(opt_state)` the per-layer window means; both search the
whole opt_state, so they work on the chain `normjax.optim.make_optimizer`
returns and on wrappers around it (e.g. `optax.apply_if_finite`).
"""
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

SCALARS = ('grad_norm', 'grad_norm_clipped', 'clip_fired', 'param_norm', 'update_norm')
LAYER_STATS = ('grad_norm', 'grad_norm_clipped', 'param_norm', 'update_ratio')
AGC_STAT = 'agc_clipped_frac'
# clip_fired: the clipped gradient differs from the raw one by more than this relative norm.
CLIP_FIRED_RTOL = 1e-6

Mask = Any  # a pytree of bools shaped like params, or a callable params -> such a pytree


class MonitorState(NamedTuple):
  """A pytree of arrays only, so it works under jit and checkpoints with orbax.

  count: updates done. window: steps accumulated in the current layer window.
  scalars: {name: float32 scalar} of the last update.
  layer_sums: {stat: {layer: float32 sum over the window}}.
  """
  count: jax.Array
  window: jax.Array
  scalars: dict[str, jax.Array]
  layer_sums: dict[str, dict[str, jax.Array]]
  clipper_state: optax.OptState
  optimizer_state: optax.OptState


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """The names in a `jax.tree_util` key path, e.g. ('head', 'fc1', 'kernel')."""
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def layer_name(path: Sequence[Any]) -> str:
  """A param's module: its path without the leaf name, joined by '/' ('head/fc1')."""
  names = path_names(path)
  return '/'.join(names[:-1] if len(names) > 1 else names)


@functools.lru_cache(maxsize=None)
def _unit_size(shape: tuple[int, ...]) -> int:
  """Elements per AGC unit, probed from optax's own `unitwise_norm` so the units agree."""
  with jax.ensure_compile_time_eval():
    norm = optax.transforms.unitwise_norm(jnp.ones(shape, jnp.float32))
    return int(round(float(norm.reshape(-1)[0]) ** 2))


def _sq_norm(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(x.astype(jnp.float32)))


def _resolve_mask(mask: Mask | None, params: optax.Params) -> list[bool]:
  if mask is None:
    return [False] * len(jax.tree.leaves(params))
  tree = mask(params) if callable(mask) else mask
  return [bool(m) for m in jax.tree.leaves(tree)]


def _layers(params: optax.Params, agc_mask: list[bool]) -> tuple[list[str], list[str]]:
  """The layer of each leaf (in leaf order), and the layers with AGC-clipped params."""
  names = [layer_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  agc_layers = sorted({n for n, m in zip(names, agc_mask) if m})
  return names, agc_layers


def _per_layer(names: list[str], values: list[jax.Array]) -> dict[str, jax.Array]:
  out = {}
  for name, v in zip(names, values):
    out[name] = out[name] + v if name in out else v
  return out


def monitored(clipper: optax.GradientTransformation, optimizer: optax.GradientTransformation, *,
              layer_stats_every: int, agc_lambda: float | None, agc_eps: float,
              agc_mask: Mask | None = None) -> optax.GradientTransformation:
  """Runs `clipper` then `optimizer` and records gradient statistics in the state.

  Every step: grad_norm (global L2 before clipping), grad_norm_clipped (after),
  clip_fired (1.0 if clipping changed the gradient), param_norm (before the
  update) and update_norm. If `layer_stats_every > 0`, per layer (module path)
  it sums over a window grad_norm, grad_norm_clipped, param_norm and
  update_ratio = ||update|| / ||param|| (0 for an all-zero layer), plus, when
  `agc_lambda` is set, agc_clipped_frac: the fraction of the layer's AGC units
  (those of the params where `agc_mask` is True) with
  ||g_unit|| / max(||w_unit||, agc_eps) > agc_lambda. The window restarts at the
  first update after each multiple of `layer_stats_every`, so after update s
  with s % layer_stats_every == 0 the window covers updates s-every+1 .. s.
  """
  if layer_stats_every < 0:
    raise ValueError(f'train.monitor_every_steps must be >= 0, got {layer_stats_every}')
  track_agc = layer_stats_every > 0 and agc_lambda is not None
  stats = LAYER_STATS + ((AGC_STAT,) if track_agc else ())

  def init_fn(params):
    names, agc_layers = _layers(params, _resolve_mask(agc_mask, params))
    layer_sums = {}
    if layer_stats_every > 0:
      zeros = lambda layers: {n: jnp.zeros((), jnp.float32) for n in layers}
      layer_sums = {s: zeros(sorted(set(names))) for s in LAYER_STATS}
      if track_agc:
        layer_sums[AGC_STAT] = zeros(agc_layers)
    return MonitorState(
        count=jnp.zeros((), jnp.int32), window=jnp.zeros((), jnp.int32),
        scalars={s: jnp.zeros((), jnp.float32) for s in SCALARS}, layer_sums=layer_sums,
        clipper_state=clipper.init(params), optimizer_state=optimizer.init(params))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError('monitored: update needs params (param norms and AGC use them)')
    clipped, clipper_state = clipper.update(grads, state.clipper_state, params)
    updates, optimizer_state = optimizer.update(clipped, state.optimizer_state, params)

    g_leaves, c_leaves = jax.tree.leaves(grads), jax.tree.leaves(clipped)
    p_leaves, u_leaves = jax.tree.leaves(params), jax.tree.leaves(updates)
    g2, c2 = [_sq_norm(g) for g in g_leaves], [_sq_norm(c) for c in c_leaves]
    p2, u2 = [_sq_norm(p) for p in p_leaves], [_sq_norm(u) for u in u_leaves]
    grad_norm = jnp.sqrt(sum(g2))
    diff_norm = jnp.sqrt(sum(_sq_norm(c - g) for c, g in zip(c_leaves, g_leaves)))
    scalars = {
        'grad_norm': grad_norm,
        'grad_norm_clipped': jnp.sqrt(sum(c2)),
        'clip_fired': (diff_norm > CLIP_FIRED_RTOL * grad_norm).astype(jnp.float32),
        'param_norm': jnp.sqrt(sum(p2)),
        'update_norm': jnp.sqrt(sum(u2)),
    }

    layer_sums, window = state.layer_sums, state.window
    if layer_stats_every > 0:
      mask = _resolve_mask(agc_mask, params)
      names, _ = _layers(params, mask)
      sqrt = lambda d: {k: jnp.sqrt(v) for k, v in d.items()}
      p_norm, u_norm = sqrt(_per_layer(names, p2)), sqrt(_per_layer(names, u2))
      step = {
          'grad_norm': sqrt(_per_layer(names, g2)),
          'grad_norm_clipped': sqrt(_per_layer(names, c2)),
          'param_norm': p_norm,
          'update_ratio': {k: jnp.where(p_norm[k] > 0, u_norm[k] / p_norm[k], 0.0)
                           for k in p_norm},
      }
      if track_agc:
        clipped_units, units = [], []
        agc_names = [n for n, m in zip(names, mask) if m]
        for g, p in ((g, p) for g, p, m in zip(g_leaves, p_leaves, mask) if m):
          unit_size = _unit_size(p.shape)
          g_unit, p_unit = optax.transforms.unitwise_norm(g), optax.transforms.unitwise_norm(p)
          fired = g_unit > agc_lambda * jnp.maximum(p_unit, agc_eps)
          clipped_units.append(jnp.sum(fired, dtype=jnp.float32) / unit_size)
          units.append(p.size // unit_size)
        fired_per_layer = _per_layer(agc_names, clipped_units)
        units_per_layer = _per_layer(agc_names, units)
        step[AGC_STAT] = {k: v / units_per_layer[k] for k, v in fired_per_layer.items()}
      # A new window starts at the first update after a multiple of layer_stats_every.
      reset = state.count % layer_stats_every == 0
      layer_sums = jax.tree.map(lambda acc, v: jnp.where(reset, 0.0, acc) + v,
                                state.layer_sums, {s: step[s] for s in stats})
      window = jnp.where(reset, 0, state.window) + 1

    return updates, MonitorState(
        count=state.count + 1, window=window, scalars=scalars, layer_sums=layer_sums,
        clipper_state=clipper_state, optimizer_state=optimizer_state)

  return optax.GradientTransformation(init_fn, update_fn)


def find_state(opt_state: optax.OptState) -> MonitorState:
  """The one `MonitorState` inside `opt_state` (which may wrap it in other states)."""
  is_monitor = lambda x: isinstance(x, MonitorState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_monitor) if is_monitor(x)]
  if len(found) != 1:
    raise ValueError(f'expected exactly one MonitorState in the optimizer state, found '
                     f'{len(found)}; build the optimizer with normjax.monitor.monitored')
  return found[0]


def summarize(opt_state: optax.OptState) -> dict[str, jax.Array]:
  """The last update's scalars: grad_norm, grad_norm_clipped, clip_fired, param_norm, update_norm."""
  return dict(find_state(opt_state).scalars)


@jax.jit
def _window_means(layer_sums: dict[str, dict[str, jax.Array]],
                  window: jax.Array) -> dict[str, dict[str, jax.Array]]:
  # One dispatch for hundreds of layers when called outside jit.
  steps = jnp.maximum(window, 1).astype(jnp.float32)
  return jax.tree.map(lambda total: total / steps, layer_sums)


def summarize_layers(opt_state: optax.OptState) -> dict[str, jax.Array]:
  """{'<stat>/<layer>': mean over the current window}; {} when layer stats are off.

  Outside jit, fetch the result with one `jax.device_get` rather than a
  `float()` per key (one host transfer each).
  """
  state = find_state(opt_state)
  means = _window_means(state.layer_sums, state.window)
  return {f'{stat}/{layer}': mean
          for stat, per_layer in means.items() for layer, mean in per_layer.items()}
