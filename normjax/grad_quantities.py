r"""Which gradient norm did the study report? Candidate quantities, measured side by side.

  python -m normjax.grad_quantities --config=configs/frn_noclip.py [--workdir=RUN] [--batches=4]

The study saw its global gradient norm fall from about 44 to under 29 (FRN, LN) and from
15.46 to 0.29 (BN-Clip). normjax logs the global L2 norm of the trainable parameters'
gradients of the mean cross-entropy, which on the same weights starts near 3. This tool
evaluates, on the first training batches of the run's data order, the quantities a PyTorch
notebook may have meant:

  global_l2      sqrt(sum_p ||g_p||^2): torch's clip_grad_norm_ return value (normjax's grad_norm)
  sum_of_norms   sum_p ||g_p||: a per-parameter loop that forgot the square and the root

each over
  trainable      only features.18 + head have gradients (requires_grad=False elsewhere)
  all            every parameter has a gradient, frozen only by the optimizer's param groups,
                 so torch's clip_grad_norm_(model.parameters()) counts the whole backbone

and each with the frozen BatchNorms in `eval` (running statistics) or `train` mode (batch
statistics, torch's model.train()). A sum-reduced loss multiplies every value by the batch
size. At initialisation it compares torch's and flax's head init; with --workdir it also
measures the run's latest checkpoint, the end of training.
"""
import argparse
import pathlib
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from normjax import checkpoint, config_schema, features, metrics_io, optim, pretrained, startup
from normjax.data import augment, pipeline
from normjax.models.classifier import Classifier
from normjax.models.factory import create_model

SCOPES = ('trainable', 'all')
FROZEN_BN = ('eval', 'train')


def norms(grads: Any, mask: Any) -> dict[str, float]:
  """global_l2 and sum_of_norms of the gradients where `mask` is True."""
  per_param = [jnp.sqrt(jnp.sum(jnp.square(g))) for g, m in
               zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if m]
  per_param = jnp.stack(per_param)
  return {'global_l2': float(jnp.sqrt(jnp.sum(per_param ** 2))), 'sum_of_norms': float(jnp.sum(per_param)),
          'tensors': int(per_param.size)}


# Images per backward pass through a frozen eval-mode prefix: at 224 px a whole batch of 64
# needs more than 8 GB of activations; eval-mode blocks treat images independently, so chunks are exact.
PREFIX_CHUNK = 8


def gradient(config: ml_collections.ConfigDict, variables: dict[str, Any], images: jax.Array,
             labels: jax.Array, dropout_key: jax.Array, frozen_bn: str, scope: str,
             num_classes: int = 10) -> Any:
  """The gradient of the mean cross-entropy with respect to every parameter.

  scope 'trainable' stops gradients at the frozen prefix, as normjax trains; 'all' lets them
  flow through every block (a model frozen only by its optimizer). For 'all' with
  frozen_bn='train' every block trains, whose BatchNorms then use batch statistics, which is
  that mode's forward. With 'eval' the frozen prefix runs as `Classifier.prefix` (eval mode)
  and the rest from its output, both built with every block trainable so that no
  stop_gradient cuts the path: the trained part gives the gradient at the prefix output,
  which is pulled back through the prefix PREFIX_CHUNK images at a time.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.frozen_bn = frozen_bn
  first = features.first_trainable(config) if config.model.name == 'mobilenet_v2' else 0
  if scope == 'all':
    config.optim.trainable_blocks = -1
  model = create_model(config, num_classes)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  if scope == 'all' and frozen_bn == 'eval' and first > 0:
    return _through_eval_prefix(model, first, params, batch_stats, images, labels, dropout_key)

  def loss_fn(params, batch_stats, images, labels, dropout_key):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                            mutable=['batch_stats'], rngs={'dropout': dropout_key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return jax.jit(jax.grad(loss_fn))(params, batch_stats, images, labels, dropout_key)


def _through_eval_prefix(model: Classifier, first: int, params: Any, batch_stats: Any, images: jax.Array,
                         labels: jax.Array, dropout_key: jax.Array) -> Any:
  def prefix(params, images):
    return model.apply({'params': params, 'batch_stats': batch_stats}, images, first,
                       method=Classifier.prefix)

  def tail_loss(params, prefix_out):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, prefix_out, train=True,
                            start_block=first, mutable=['batch_stats'], rngs={'dropout': dropout_key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def pull_back(params, images, cotangent):
    return jax.vjp(lambda p: prefix(p, images), params)[1](cotangent)[0]

  prefix_out = jax.jit(prefix)(params, images)
  grads, cotangent = jax.jit(jax.grad(tail_loss, argnums=(0, 1)))(params, prefix_out)
  for i in range(0, len(images), PREFIX_CHUNK):
    chunk = slice(i, i + PREFIX_CHUNK)
    grads = jax.tree.map(jnp.add, grads, pull_back(params, images[chunk], cotangent[chunk]))
  return grads


def measure(config: ml_collections.ConfigDict, variables: dict[str, Any],
            batches: Sequence[tuple[jax.Array, jax.Array, jax.Array]]) -> list[dict[str, Any]]:
  """Rows (frozen_bn, scope, quantity...) averaged over `batches`, plus the first batch's value."""
  labels = optim.param_labels(variables['params'], config.optim.trainable_blocks)
  masks = {'trainable': jax.tree.map(lambda l: l != 'frozen', labels),
           'all': jax.tree.map(lambda l: True, labels)}
  rows = []
  for frozen_bn in FROZEN_BN:
    for scope in SCOPES:
      values = [norms(gradient(config, variables, x, y, k, frozen_bn, scope), masks[scope])
                for x, y, k in batches]
      rows.append({'frozen_bn': frozen_bn, 'scope': scope, 'tensors': values[0]['tensors'],
                   **{f'{q}_first': values[0][q] for q in ('global_l2', 'sum_of_norms')},
                   **{f'{q}_mean': float(np.mean([v[q] for v in values]))
                      for q in ('global_l2', 'sum_of_norms')}})
  return rows


def first_batches(config: ml_collections.ConfigDict, splits: pipeline.Splits,
                  count: int) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
  """The first `count` training batches of the run, augmented with the train step's keys."""
  order = pipeline.train_batch_indices(len(splits.train), config.train.batch_size, config.seed, 0)
  rng = jax.random.PRNGKey(config.seed)
  out = []
  for step in range(count):
    aug_key, dropout_key = jax.random.split(jax.random.fold_in(rng, step))
    x = augment.train_preprocess(splits.train.images[order[step]], aug_key,
                                 image_size=config.data.image_size, mean=splits.mean,
                                 std=splits.std, padding=config.data.crop_padding,
                                 augment=config.data.augment)
    out.append((x, jnp.asarray(splits.train.labels[order[step]]), dropout_key))
  return out


def initial_variables(config: ml_collections.ConfigDict, head_init: str, num_classes: int) -> dict[str, Any]:
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.head_init = head_init
  model = create_model(config, num_classes)
  size = config.data.image_size
  rng = jax.random.PRNGKey(config.seed)
  variables = model.init({'params': rng, 'dropout': rng}, jnp.zeros((1, size, size, 3)), train=False)
  if config.model.pretrained != 'none':
    variables = pretrained.load_pretrained_backbone(config.model.pretrained, variables)
  return variables


def markdown(results: dict[str, list[dict[str, Any]]], batch_size: int) -> str:
  lines = ['| weights | frozen BN | gradients of | tensors | global L2 (first / mean) | '
           'sum of per-tensor norms (first / mean) |', '|---|---|---|---|---|---|']
  for name, rows in results.items():
    for r in rows:
      lines.append(f"| {name} | {r['frozen_bn']} | {r['scope']} | {r['tensors']} | "
                   f"{r['global_l2_first']:.3g} / {r['global_l2_mean']:.3g} | "
                   f"{r['sum_of_norms_first']:.3g} / {r['sum_of_norms_mean']:.3g} |")
  lines.append(f'\nMean cross-entropy over the batch; a sum-reduced loss multiplies every value '
               f'by the batch size ({batch_size}).')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m normjax.grad_quantities',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='configs/<name>.py[:arg]')
  parser.add_argument('--workdir', default='', help='a finished run: also measure its latest checkpoint')
  parser.add_argument('--batches', type=int, default=4, help='training batches to average over')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  parser.add_argument('--out', default='', help='write the results as JSON here')
  parser.add_argument('--skip_init', action='store_true', help='only the --workdir checkpoint')
  args = parser.parse_args(argv)
  startup.prepare_process()
  config = config_schema.apply_overrides(config_schema.load_config(args.config), args.set)
  splits = pipeline.load_splits(config.data, config.seed)
  batches = first_batches(config, splits, args.batches)
  results = {} if args.skip_init else {
      f'init, {h} head init': measure(config, initial_variables(config, h, splits.num_classes), batches)
      for h in ('torch', 'flax')}
  if args.workdir:
    step, state = checkpoint.restore_latest(args.workdir)
    variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
    results[f'{pathlib.Path(args.workdir).name} step {step}'] = measure(config, variables, batches)
  text = markdown(results, config.train.batch_size)
  print(text)
  if args.out:
    metrics_io.write_json_atomic(pathlib.Path(args.out), {'config': args.config, 'sets': args.set,
                                                          'batches': args.batches, 'results': results})
  return 0


if __name__ == '__main__':
  startup.reexec_for_cpu()
  sys.exit(main())
