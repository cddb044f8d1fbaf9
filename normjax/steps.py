"""The jitted programs of a run: its state, one train step, one eval step, and their builder.

Shared by the training loop (normjax.train), the benchmarks and the tests. The metric
window is part of the state (checkpointed with it), so a resumed run logs exactly what an
uninterrupted one does.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics

from normjax import features, monitor, optim, parallel
from normjax.data import augment
from normjax.models.factory import create_model


def _average(values: jax.Array, weights: jax.Array) -> clu_metrics.Average:
  weights = jnp.broadcast_to(weights, jnp.shape(values))
  return clu_metrics.Average(total=jnp.sum(jnp.where(weights, values, 0.0)).astype(jnp.float32),
                             count=jnp.sum(weights).astype(jnp.int32))


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average
  accuracy: clu_metrics.Accuracy
  grad_norm: clu_metrics.Average
  grad_norm_clipped: clu_metrics.Average
  clip_fired: clu_metrics.Average
  param_norm: clu_metrics.Average
  update_norm: clu_metrics.Average
  nonfinite: clu_metrics.Average  # fraction of steps with a NaN/inf loss or gradient


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  metrics: TrainMetrics         # the current logging window, checkpointed for exact resume
  first_nonfinite: jax.Array    # first step in the window with a NaN/inf, or -1


def _accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> clu_metrics.Accuracy:
  correct = (jnp.argmax(logits, -1) == labels)
  return clu_metrics.Accuracy(total=jnp.sum(correct & mask).astype(jnp.float32),
                              count=jnp.sum(mask).astype(jnp.int32))


def _variables(params, batch_stats) -> dict:
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}


def init_state(model, tx, image_shape: tuple[int, ...], rng: jax.Array) -> TrainState:
  variables = model.init({'params': rng, 'dropout': rng}, jnp.zeros((1, *image_shape)), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    metrics=TrainMetrics.empty(), first_nonfinite=-jnp.ones((), jnp.int32))


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array, *,
               model, tx, preprocess, skip_nonfinite: bool, frozen: Any = None,
               start_block: int = 0) -> TrainState:
  """One optimizer step; metrics accumulate into state.metrics (no host sync).

  `frozen`: True for each param of the frozen blocks (a pytree like state.params), or None.
  `start_block` > 0: `images` are cached features entering that backbone block.
  """
  step_key = jax.random.fold_in(key, state.step)
  aug_key, dropout_key = jax.random.split(step_key)
  x = preprocess(images, aug_key)

  def loss_fn(params):
    if frozen is not None:
      # Frozen params as constants: their gradient is zero either way (the backbone cuts it after
      # the last frozen block), and nothing in those blocks is differentiated, so custom-VJP ops
      # there run their plain forward (the depthwise conv's, normjax/models/depthwise.py).
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    logits, updated = model.apply(_variables(params, state.batch_stats), x, train=True,
                                  start_block=start_block, mutable=['batch_stats'],
                                  rngs={'dropout': dropout_key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updated.get('batch_stats', {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  stats = monitor.summarize(opt_state)
  finite = jnp.isfinite(loss) & jnp.isfinite(stats['grad_norm'])
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params, batch_stats, opt_state = keep((params, batch_stats, opt_state),
                                          (state.params, state.batch_stats, state.opt_state))
  step = state.step + 1
  metrics = TrainMetrics.empty().replace(
      loss=_average(loss, finite), accuracy=_accuracy(logits, labels, jnp.broadcast_to(finite, labels.shape)),
      nonfinite=_average((~finite).astype(jnp.float32), jnp.ones((), bool)),
      **{k: _average(stats[k], finite) for k in
         ('grad_norm', 'grad_norm_clipped', 'clip_fired', 'param_norm', 'update_norm')})
  first = jnp.where((state.first_nonfinite < 0) & ~finite, step, state.first_nonfinite)
  return state.replace(step=step, params=params, batch_stats=batch_stats, opt_state=opt_state,
                       metrics=state.metrics.merge(metrics), first_nonfinite=first)


def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array, *,
              model, preprocess, start_block: int = 0) -> dict[str, jax.Array]:
  """Per-example masked loss and correctness, left sharded like the batch.

  Summing on the host instead of in the step keeps eval free of device collectives
  (on CPU with more fake devices than cores, XLA's in-process all-reduce can starve).
  """
  logits = model.apply(_variables(state.params, state.batch_stats), preprocess(images), train=False,
                       start_block=start_block)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {'loss': jnp.where(mask, loss, 0.0), 'correct': jnp.where(mask, correct, 0.0)}


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted programs of one config on one mesh (shared by the loop and the benchmarks)."""
  model: Any
  tx: Any
  abstract_state: TrainState
  shardings: Any
  init: Callable[[jax.Array], TrainState]                   # rng -> state
  train_step: Callable[..., TrainState]                      # (state, images, labels, rng) -> state; donates
  eval_step: Callable[..., dict[str, jax.Array]]             # (state, images, labels, mask) -> per example
  reset_window: Callable[[TrainState], TrainState]           # empties the logged metric window; donates


def build_programs(config: ml_collections.ConfigDict, num_classes: int, image_shape: tuple[int, int, int],
                   mean: tuple[float, ...], std: tuple[float, ...], steps_per_epoch: int,
                   mesh: jax.sharding.Mesh) -> Programs:
  """Model, optimizer and the train/eval steps jitted with the batch sharded over `mesh`.

  With train.feature_cache set, the steps take the frozen prefix's cached output
  (normjax.features) instead of uint8 images: no preprocessing, the backbone starts at the
  first trainable block.
  """
  model = create_model(config, num_classes)
  abstract_params = jax.eval_shape(
      lambda r: model.init({'params': r, 'dropout': r}, jnp.zeros((1, *image_shape)), train=False),
      jax.random.PRNGKey(0))['params']
  tx = optim.make_optimizer(config, abstract_params, steps_per_epoch=steps_per_epoch)
  init = functools.partial(init_state, model, tx, image_shape)
  abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = parallel.state_sharding(abstract_state, mesh)
  data, repl = parallel.data_sharding(mesh), parallel.replicated(mesh)
  norm_stats = dict(mean=mean, std=std, image_size=image_shape[0])
  if features.enabled(config):
    start_block = features.first_trainable(config)
    train_preprocess, eval_preprocess = (lambda x, _: x), (lambda x: x)
  else:
    start_block = 0
    train_preprocess = functools.partial(augment.train_preprocess, padding=config.data.crop_padding,
                                         augment=config.data.augment, **norm_stats)
    eval_preprocess = functools.partial(augment.eval_preprocess, **norm_stats)
  frozen = jax.tree.map(lambda label: label == 'frozen',
                        optim.param_labels(abstract_params, config.optim.trainable_blocks))
  train_fn = functools.partial(train_step, model=model, tx=tx, preprocess=train_preprocess,
                               skip_nonfinite=config.train.on_nonfinite == 'skip', frozen=frozen,
                               start_block=start_block)
  eval_fn = functools.partial(eval_step, model=model, preprocess=eval_preprocess,
                              start_block=start_block)
  return Programs(
      model=model, tx=tx, abstract_state=abstract_state, shardings=shardings,
      init=jax.jit(init, out_shardings=shardings),
      train_step=jax.jit(train_fn, in_shardings=(shardings, data, data, repl), out_shardings=shardings,
                         donate_argnums=0),
      eval_step=jax.jit(eval_fn, in_shardings=(shardings, data, data, data), out_shardings=data),
      reset_window=jax.jit(_reset_window, out_shardings=shardings, donate_argnums=0))


def _reset_window(state: TrainState) -> TrainState:
  return state.replace(metrics=TrainMetrics.empty(), first_nonfinite=-jnp.ones((), jnp.int32))
