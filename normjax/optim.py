"""Optax chains for fine-tuning: per-group learning rates, frozen blocks and gradient clipping.

`make_optimizer(config, params)` returns
  monitored(clipper, multi_transform({'head', 'backbone', 'frozen'}, param_labels))
so the opt_state is a `normjax.monitor.MonitorState` whose statistics a train
step reads with `normjax.monitor.summarize` / `summarize_layers`.
Groups are chosen by a predicate on the param path, as in nfnets' optim.
"""
import jax
import ml_collections
import optax

from normjax import monitor, registry
from normjax.errors import ConfigError
from normjax.models import common


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ConfigError(f'{field}: unknown value {value!r}; allowed: {", ".join(allowed)}')


def param_labels(params: optax.Params, trainable_blocks: int) -> optax.Params:
  """Labels every param 'frozen' | 'backbone' | 'head'.

  params['head'] is 'head'. params['backbone'] has top-level blocks
  `features_<i>`; trainable_blocks -1 makes all of them 'backbone', 0 none,
  k the last k by index, and the rest are 'frozen'.
  """
  backbone = params.get('backbone', {})
  indices = []
  for key in backbone:
    index = common.block_index(key)
    if index is None:
      raise ValueError(f'backbone block {key!r} is not named features_<i>; optim.trainable_blocks '
                       'needs block indices')
    indices.append(index)
  indices.sort()
  trainable = set(indices[common.first_trainable(len(indices), trainable_blocks):])

  def label(path, _):
    names = monitor.path_names(path)
    if names[0] == 'head':
      return 'head'
    if names[0] == 'backbone':
      return 'backbone' if common.block_index(names[1]) in trainable else 'frozen'
    raise ValueError(f'param {"/".join(names)!r} is neither under backbone nor head')

  return jax.tree_util.tree_map_with_path(label, params)


def agc_mask(params: optax.Params, trainable_blocks: int) -> optax.Params:
  """True where AGC applies: trainable params except the final classifier layer.

  Brock et al. 2021 (NFNets) do not clip the final linear layer; it is
  params['head']['out'] in every normjax head.
  """
  labels = param_labels(params, trainable_blocks)
  return jax.tree_util.tree_map_with_path(
      lambda path, lab: lab != 'frozen' and monitor.path_names(path)[:2] != ('head', 'out'),
      labels)


def learning_rate_schedule(base_lr: float, config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """optim.schedule with a linear warmup from 0 over optim.warmup_epochs.

  cosine decays to 0 at train.max_steps if > 0, else num_epochs * steps_per_epoch.
  """
  optim = config.optim
  _check_choice('optim.schedule', optim.schedule, registry.SCHEDULES)
  total = config.train.max_steps or config.train.num_epochs * steps_per_epoch
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  if optim.schedule == 'cosine':
    if warmup >= total:
      raise ConfigError(f'optim.warmup_epochs={optim.warmup_epochs} gives {warmup} warmup steps, '
                       f'not fewer than the {total} training steps the cosine decays over')
    if warmup == 0:
      return optax.cosine_decay_schedule(base_lr, decay_steps=total)
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps=warmup,
                                              decay_steps=total)
  if warmup == 0:
    return optax.constant_schedule(base_lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base_lr, warmup), optax.constant_schedule(base_lr)], [warmup])


def make_clipper(config: ml_collections.ConfigDict,
                 params: optax.Params) -> optax.GradientTransformation:
  """optim.clip over the trainable params: none | global_norm | agc.

  global_norm clips the global L2 norm of the trainable grads to optim.clip_norm
  (torch's clip_grad_norm_ over parameters with requires_grad). agc is
  optax.adaptive_grad_clip(optim.agc_lambda, eps=optim.agc_eps): optax's
  default units are the last axis (output channels) of Dense (in, out) and
  conv HWIO kernels, including depthwise (kh, kw, 1, C), and the whole vector
  for biases and norm scales, as in nfnets. It skips params['head']['out'].
  """
  optim = config.optim
  _check_choice('optim.clip', optim.clip, registry.CLIPS)
  if optim.clip == 'none':
    return optax.identity()
  if optim.clip == 'global_norm':
    trainable = jax.tree.map(lambda lab: lab != 'frozen',
                             param_labels(params, optim.trainable_blocks))
    return optax.masked(optax.clip_by_global_norm(optim.clip_norm), trainable)
  return optax.masked(optax.adaptive_grad_clip(optim.agc_lambda, eps=optim.agc_eps),
                      agc_mask(params, optim.trainable_blocks))


def _base_optimizer(config: ml_collections.ConfigDict,
                    learning_rate: optax.Schedule) -> optax.GradientTransformation:
  optim = config.optim
  _check_choice('optim.name', optim.name, registry.OPTIMIZERS)
  if optim.name == 'adamw':  # decoupled weight decay (Loshchilov & Hutter 2019), torch.optim.AdamW
    return optax.adamw(learning_rate, weight_decay=optim.weight_decay)
  if optim.name == 'adam':
    if optim.weight_decay > 0:
      # torch.optim.Adam(weight_decay=wd) adds wd * param to the gradient (coupled L2).
      return optax.chain(optax.add_decayed_weights(optim.weight_decay), optax.adam(learning_rate))
    return optax.adam(learning_rate)
  if optim.nesterov and optim.momentum <= 0:
    raise ConfigError('optim.nesterov needs optim.momentum > 0 (as torch.optim.SGD)')
  sgd = optax.sgd(learning_rate, momentum=optim.momentum or None, nesterov=optim.nesterov)
  if optim.weight_decay > 0:
    # torch SGD adds weight_decay * param to the gradient before momentum.
    return optax.chain(optax.add_decayed_weights(optim.weight_decay), sgd)
  return sgd


def make_optimizer(config: ml_collections.ConfigDict, params: optax.Params, *,
                   steps_per_epoch: int = 1) -> optax.GradientTransformation:
  """monitored(clipper, multi_transform(head: optim.lr, backbone: optim.backbone_lr, frozen: 0))."""
  optim = config.optim
  labels = param_labels(params, optim.trainable_blocks)
  schedule = lambda lr: learning_rate_schedule(lr, config, steps_per_epoch)
  optimizer = optax.multi_transform(
      {'head': _base_optimizer(config, schedule(optim.lr)),
       'backbone': _base_optimizer(config, schedule(optim.backbone_lr)),
       'frozen': optax.set_to_zero()},
      labels)
  is_agc = optim.clip == 'agc'
  return monitor.monitored(
      make_clipper(config, params), optimizer,
      layer_stats_every=config.train.monitor_every_steps,
      agc_lambda=optim.agc_lambda if is_agc else None, agc_eps=optim.agc_eps,
      agc_mask=agc_mask(params, optim.trainable_blocks) if is_agc else None)
