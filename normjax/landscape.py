r"""Loss landscapes along filter-normalised random directions (Li et al., NeurIPS 2018).

  python -m normjax.landscape WORKDIR [--dims=1|2] [--points=N] [--span=S] [--split=val]
      [--examples=N] [--include_bn_bias] [--seed=K] [--chunk=K] [--batch_size=B]
  python -m normjax.landscape --compare WORKDIR... [same flags] [--out=DIR]

A run's restored weights theta (its latest checkpoint) are moved along one or
two random directions d1, d2 and the loss and accuracy of the model at
theta + a*d1 + b*d2 are measured for (a, b) on a grid over [-span, span],
in eval mode (running BatchNorm statistics, no dropout), on the first
`--examples` examples of `--split` (in the split's stored order, so the set is
fixed). Directions ("Visualizing the Loss Landscape of Neural Nets", Sec. 4,
and the paper's code, tomgoldstein/loss-landscape net_plotter.py):

- Gaussian, then filter-normalised: every filter of d gets the norm of the
  same filter of theta. A filter is one output unit: kernel[..., o] for a
  conv HWIO kernel, a depthwise (kh, kw, 1, C) kernel and a Dense (in, out)
  kernel alike (flax puts the output axis last).
- Only over the params the run's optimizer updates
  (`optim.param_labels(...) != 'frozen'`); frozen params get zero.
- Params with <= 1 dimension (biases, norm scales/offsets, FRN's tau) get
  zero, as the paper's `ignore='biasbn'`. With --include_bn_bias they get the
  weight itself, d = theta, as the paper's code does (`d.copy_(w)`), so the
  direction has their norm. BatchNorm running statistics are never moved.
- Direction k is drawn from fold_in(PRNGKey(seed), k): the 1-D direction is
  the 2-D surface's first axis, so a 2-D grid's b=0 row is the 1-D curve.

Output, in WORKDIR/landscape/: `<name>.npz` (grid, loss, accuracy, `done`
mask and a JSON `meta`), `<name>.png`. The name encodes the arguments, e.g.
`surface_2d_p21_s1.0_val_n2000_seed0_biasbn0`. The npz is rewritten
atomically after every chunk of grid points, so an interrupted computation
resumes where it stopped; a file made from another checkpoint or other
directions is recomputed.

Sharpness (`sharpness(workdir)`, the --compare table): along the 1-D
direction, S = (L(-0.5) + L(+0.5)) / 2 - L(0), the mean rise of the loss
(nats) half-way to the end of a filter-normalised step, linearly interpolated
when +-0.5 is not a grid point. It is one random direction: compare runs with
the same --seed and examples, and read it as a rough figure, not a Hessian
eigenvalue.

The grid evaluation (`compute_surface`) takes `apply_fn(params, inputs)` and a
re-iterable of (inputs, labels, mask) batches, so a caller can pass inputs that
are already preprocessed, or cached features of the frozen prefix with an
apply_fn that runs only the rest: frozen params have zero direction, so that
is exact.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from matplotlib import colormaps, colors
from matplotlib.figure import Figure
import ml_collections
import numpy as np
import optax

from normjax import checkpoint, config_schema, metrics_io, optim, startup
from normjax import features as features_lib
from normjax.data import augment, pipeline
from normjax.models.factory import create_model
from normjax.rundir import RunDir

SHARPNESS_MD = 'sharpness.md'
COMPARE_1D_PNG = 'compare_1d.png'
COMPARE_2D_PNG = 'compare_2d.png'
DEFAULT_POINTS = 21        # a 0.1 step on [-1, 1]; Li et al. use 51 (GPU budget)
DEFAULT_SPAN = 1.0         # Li et al. Figs. 1-6 plot alpha in [-1, 1]
DEFAULT_EXAMPLES = 2000
DEFAULT_CHUNK = 8          # grid points per vmapped call
SHARPNESS_ALPHA = 0.5
FILTER_EPS = 1e-10         # net_plotter.normalize_direction: w.norm() / (d.norm() + 1e-10)
SPLITS = ('train', 'val', 'test')

PerExample = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
Batches = Iterable[tuple[Any, Any, Any]]


def classification(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example cross-entropy and correctness (steps.eval_step's loss)."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return loss, (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


# ----------------------------------------------------------------------------- directions


def trained_mask(params: Any, trainable_blocks: int) -> Any:
  """True for the params the run's optimizer updates (its labels other than 'frozen')."""
  return jax.tree.map(lambda label: label != 'frozen', optim.param_labels(params, trainable_blocks))


def filter_normalize(direction: jax.Array, weight: jax.Array) -> jax.Array:
  """Scales each filter d[..., o] to the norm of w[..., o] (Li et al. Sec. 4)."""
  axes = tuple(range(direction.ndim - 1))
  d_norm = jnp.sqrt(jnp.sum(jnp.square(direction), axis=axes, keepdims=True))
  w_norm = jnp.sqrt(jnp.sum(jnp.square(weight), axis=axes, keepdims=True))
  return direction * (w_norm / (d_norm + FILTER_EPS))


def random_direction(key: jax.Array, params: Any, mask: Any = None,
                     include_bn_bias: bool = False) -> Any:
  """A filter-normalised Gaussian direction; zero where `mask` is False and on <=1-D params.

  With include_bn_bias, <=1-D params get d = w (the paper code's `d.copy_(w)`).
  Leaf i draws from fold_in(key, i), so masking one leaf never changes another.
  """
  leaves, treedef = jax.tree.flatten(params)
  keep = (True,) * len(leaves) if mask is None else tuple(bool(m) for m in treedef.flatten_up_to(mask))
  return jax.tree.unflatten(treedef, _direction_leaves(key, tuple(leaves), keep, include_bn_bias))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _direction_leaves(key: jax.Array, leaves: tuple[jax.Array, ...], keep: tuple[bool, ...],
                      include_bn_bias: bool) -> list[jax.Array]:
  out = []
  for i, (w, trained) in enumerate(zip(leaves, keep)):
    w = jnp.asarray(w, jnp.float32)
    if not trained:
      d = jnp.zeros_like(w)
    elif w.ndim <= 1:
      d = w if include_bn_bias else jnp.zeros_like(w)
    else:
      d = filter_normalize(jax.random.normal(jax.random.fold_in(key, i), w.shape, jnp.float32), w)
    out.append(d)
  return out


def make_directions(params: Any, mask: Any, dims: int, seed: int,
                    include_bn_bias: bool = False) -> tuple[Any, ...]:
  """`dims` directions; direction k from fold_in(PRNGKey(seed), k)."""
  base = jax.random.PRNGKey(seed)
  return tuple(random_direction(jax.random.fold_in(base, k), params, mask, include_bn_bias)
               for k in range(dims))


def _global_norm(tree: Any) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


# ----------------------------------------------------------------------------- evaluation


def perturb(params: Any, directions: Sequence[Any], coords: jax.Array,
            active: Sequence[bool] | None = None) -> Any:
  """params + sum_k coords[k] * directions[k]; leaves not `active` are returned as they are.

  Leaving inactive leaves untouched keeps them unbatched under vmap, so a frozen
  prefix runs once per batch, not once per grid point.
  """
  leaves, treedef = jax.tree.flatten(params)
  dir_leaves = [treedef.flatten_up_to(d) for d in directions]
  active = [True] * len(leaves) if active is None else active
  out = []
  for i, p in enumerate(leaves):
    if active[i]:
      p = p + sum(coords[k] * dl[i] for k, dl in enumerate(dir_leaves)).astype(p.dtype)
    out.append(p)
  return jax.tree.unflatten(treedef, out)


def active_leaves(directions: Sequence[Any]) -> tuple[bool, ...]:
  """Per leaf: does any direction move it."""
  per_dir = [[bool(np.any(np.asarray(x) != 0)) for x in jax.tree.leaves(d)] for d in directions]
  return tuple(any(col) for col in zip(*per_dir))


def make_chunk_evaluator(apply_fn: Callable[[Any, Any], jax.Array], active: Sequence[bool],
                         per_example: PerExample = classification
                         ) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """jit((params, directions, coords (K, dims), inputs, labels, mask) -> (loss sums, correct sums)).

  Both sums have shape (K,): one per grid point of the chunk.
  """

  def point(params, directions, coord, inputs, labels, mask):
    outputs = apply_fn(perturb(params, directions, coord, active), inputs)
    loss, correct = per_example(outputs, labels)
    return (jnp.sum(jnp.where(mask, loss, 0.0)), jnp.sum(jnp.where(mask, correct, 0.0)))

  return jax.jit(jax.vmap(point, in_axes=(None, None, 0, None, None, None)))


def evaluate_points(evaluator: Callable[..., Any], params: Any, directions: Sequence[Any],
                    coords: np.ndarray, batches: Batches) -> tuple[np.ndarray, np.ndarray]:
  """Mean loss and accuracy at each of coords (K, dims), over every batch."""
  loss = np.zeros(len(coords), np.float64)
  correct = np.zeros(len(coords), np.float64)
  count = 0
  coords = jnp.asarray(coords, jnp.float32)
  for inputs, labels, mask in batches:
    l, c = evaluator(params, directions, coords, inputs, labels, mask)
    loss += np.asarray(l, np.float64)
    correct += np.asarray(c, np.float64)
    count += int(np.sum(mask))
  if not count:
    raise ValueError('no examples to evaluate the landscape on (the batches are empty)')
  return loss / count, correct / count


@dataclasses.dataclass
class Surface:
  """A grid of loss/accuracy values: 1-D (xs only) or 2-D (values[i, j] at (xs[i], ys[j]))."""
  xs: np.ndarray
  ys: np.ndarray | None
  loss: np.ndarray
  accuracy: np.ndarray
  done: np.ndarray
  meta: dict[str, Any]

  @classmethod
  def empty(cls, xs: np.ndarray, ys: np.ndarray | None, meta: dict[str, Any]) -> 'Surface':
    shape = (len(xs),) if ys is None else (len(xs), len(ys))
    return cls(np.asarray(xs, np.float64), None if ys is None else np.asarray(ys, np.float64),
               np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape, bool), dict(meta))

  @property
  def dims(self) -> int:
    return 1 if self.ys is None else 2

  @property
  def complete(self) -> bool:
    return bool(self.done.all())

  def coords(self) -> np.ndarray:
    """Every grid point, (P, dims), in the flat (row-major) order of the value arrays."""
    if self.ys is None:
      return self.xs[:, None]
    a, b = np.meshgrid(self.xs, self.ys, indexing='ij')
    return np.stack([a.ravel(), b.ravel()], axis=1)

  def centre(self) -> tuple[float, float]:
    """(loss, accuracy) at the grid point nearest the origin (the trained weights)."""
    i = int(np.argmin(np.sum(np.square(self.coords()), axis=1)))
    return float(self.loss.ravel()[i]), float(self.accuracy.ravel()[i])

  def save(self, path: str | os.PathLike) -> None:
    """Writes a temp file then renames it: a kill leaves the old or the new file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
      np.savez(f, xs=self.xs, ys=np.zeros(0) if self.ys is None else self.ys, dims=self.dims,
               loss=self.loss, accuracy=self.accuracy, done=self.done,
               meta=np.asarray(json.dumps(self.meta, sort_keys=True)))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'Surface':
    with np.load(path, allow_pickle=False) as z:
      ys = None if int(z['dims']) == 1 else z['ys']
      return cls(z['xs'], ys, z['loss'], z['accuracy'], z['done'], json.loads(str(z['meta'])))


def _same_meta(a: dict[str, Any], b: dict[str, Any]) -> bool:
  """Same grid inputs: every key but the bookkeeping ones, direction norms to 1e-6."""
  ignore = {'workdir', 'run', 'direction_norms'}
  if {k: v for k, v in a.items() if k not in ignore} != {k: v for k, v in b.items() if k not in ignore}:
    return False
  return np.allclose(a.get('direction_norms', []), b.get('direction_norms', []), rtol=1e-6, atol=0)


def compute_surface(apply_fn: Callable[[Any, Any], jax.Array], batches: Batches, params: Any,
                    directions: Sequence[Any], xs: np.ndarray, ys: np.ndarray | None = None, *,
                    path: str | os.PathLike | None = None, meta: dict[str, Any] | None = None,
                    chunk_size: int = DEFAULT_CHUNK, per_example: PerExample = classification,
                    max_chunks: int | None = None,
                    on_chunk: Callable[[Surface, int], None] | None = None,
                    log: Callable[[str], None] | None = None) -> Surface:
  """Loss and accuracy at params + x*d1 (+ y*d2) on the grid xs (x ys).

  apply_fn(params, inputs) -> outputs; `batches` is re-iterable (iterated once
  per chunk) and yields (inputs, labels, mask); per_example(outputs, labels) ->
  (loss, correct). With `path` the surface resumes from and is saved there after
  every chunk (a file with other `meta` is recomputed). max_chunks stops after
  that many chunks (the surface is then partial); on_chunk(surface, chunks_done)
  runs after each chunk is saved.
  """
  if len(directions) != (1 if ys is None else 2):
    raise ValueError(f'{len(directions)} directions for a {1 if ys is None else 2}-D grid')
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
  meta = dict(meta or {})
  meta['direction_norms'] = [_global_norm(d) for d in directions]
  surface = None
  if path is not None and pathlib.Path(path).exists():
    old = Surface.load(path)
    shapes_match = (np.array_equal(old.xs, np.asarray(xs, np.float64)) and
                    (old.ys is None) == (ys is None) and
                    (ys is None or np.array_equal(old.ys, np.asarray(ys, np.float64))))
    if shapes_match and _same_meta(old.meta, meta):
      surface = old
    elif log:
      log(f'{path}: made from another checkpoint, grid or directions; recomputing it')
  if surface is None:
    surface = Surface.empty(xs, ys, meta)
  coords = surface.coords()
  todo = np.flatnonzero(~surface.done.ravel())
  if len(todo) == 0:
    return surface
  evaluator = make_chunk_evaluator(apply_fn, active_leaves(directions), per_example)
  n_chunks = math.ceil(len(todo) / chunk_size)
  t0 = time.time()
  for c in range(n_chunks):
    if max_chunks is not None and c >= max_chunks:
      break
    idx = todo[c * chunk_size:(c + 1) * chunk_size]
    # Pad the last chunk to full size (repeating its first point) so it compiles once.
    padded = np.concatenate([idx, np.full(chunk_size - len(idx), idx[0])])
    loss, acc = evaluate_points(evaluator, params, directions, coords[padded], batches)
    np.put(surface.loss, idx, loss[:len(idx)])  # flat indices into the (row-major) grid
    np.put(surface.accuracy, idx, acc[:len(idx)])
    np.put(surface.done, idx, True)
    if path is not None:
      surface.save(path)
    if log:
      elapsed = time.time() - t0
      log(f'chunk {c + 1}/{n_chunks}: {int(surface.done.sum())}/{surface.done.size} points, '
          f'{elapsed:.1f} s, ETA {elapsed / (c + 1) * (n_chunks - c - 1):.0f} s')
    if on_chunk is not None:
      on_chunk(surface, c + 1)
  return surface


# ----------------------------------------------------------------------------- a run


@dataclasses.dataclass
class LoadedRun:
  """A run's config, model and latest restored weights, for evaluation."""
  workdir: pathlib.Path
  name: str
  config: ml_collections.ConfigDict
  step: int
  model: Any
  params: Any
  batch_stats: Any
  splits: pipeline.Splits
  # A run trained from the frozen-feature cache is evaluated from it too: val/test inputs are
  # the cached prefix outputs and the model starts at block `start_block`.
  features: 'features_lib.FeatureStore | None' = None
  start_block: int = 0

  @property
  def variables(self) -> dict[str, Any]:
    if self.batch_stats:
      return {'params': self.params, 'batch_stats': self.batch_stats}
    return {'params': self.params}

  def apply_fn(self, params: Any, x: jax.Array) -> jax.Array:
    """Logits in eval mode (running BN statistics, no dropout) on preprocessed inputs."""
    variables = {**self.variables, 'params': params}
    return self.model.apply(variables, x, train=False, start_block=self.start_block)

  def preprocess(self, images_u8: jax.Array) -> jax.Array:
    """The run's eval preprocessing (resize, normalize); cached features need none."""
    if self.features is not None:
      return images_u8
    return augment.eval_preprocess(images_u8, image_size=self.config.data.image_size,
                                   mean=self.splits.mean, std=self.splits.std)

  def split(self, name: str) -> pipeline.ArraySplit:
    if name not in SPLITS:
      raise ValueError(f'split {name!r}; allowed: {", ".join(SPLITS)}')
    if self.features is not None:
      if name == 'train':
        raise ValueError(f'{self.workdir} trained from the feature cache, whose training inputs '
                         'are augmented; use --split=val or --split=test')
      return pipeline.ArraySplit(getattr(self.features, name), getattr(self.splits, name).labels)
    return getattr(self.splits, name)


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The run's config.json, with fields added to normjax since the run was made filled in."""
  path = RunDir(workdir).config
  if not path.exists():
    raise FileNotFoundError(f'{workdir}: no config.json; is it a normjax run directory?')
  return ml_collections.ConfigDict(config_schema.upgrade(metrics_io.read_json(path)))


def load_run(workdir: str | os.PathLike, use_feature_cache: bool = True) -> LoadedRun:
  """Config, data splits, model and the latest checkpoint's params/batch_stats.

  A run trained from the frozen-feature cache is evaluated from it unless `use_feature_cache`
  is False (Grad-CAM needs gradients with respect to images, so it runs the whole network).
  """
  workdir = pathlib.Path(workdir).absolute()
  config = read_run_config(workdir)
  step, restored = checkpoint.restore_latest(workdir)
  splits = pipeline.load_splits(config.data, config.seed)
  model = create_model(config, splits.num_classes)
  batch_stats = restored.get('batch_stats') or {}
  store, start_block = None, 0
  if use_feature_cache and features_lib.enabled(config):
    store = features_lib.prepare(config, model, {'params': restored['params'], 'batch_stats': batch_stats},
                                 splits)
    start_block = features_lib.first_trainable(config)
  return LoadedRun(workdir=workdir, name=workdir.name, config=config, step=int(step), model=model,
                   params=restored['params'], batch_stats=batch_stats, splits=splits,
                   features=store, start_block=start_block)


class ImageBatches:
  """Re-iterable (preprocessed inputs, labels, mask) batches of a fixed set of uint8 images."""

  def __init__(self, split: pipeline.ArraySplit, batch_size: int,
               preprocess: Callable[[jax.Array], jax.Array]):
    self.split, self.batch_size = split, batch_size
    self._preprocess = jax.jit(preprocess)

  def __iter__(self):
    for images, labels, mask in pipeline.eval_batches(self.split, self.batch_size):
      yield self._preprocess(images), labels, mask

  def __len__(self) -> int:
    return math.ceil(len(self.split) / self.batch_size)


def surface_name(dims: int, points: int, span: float, split: str, examples: int, seed: int,
                 include_bn_bias: bool) -> str:
  """'surface_2d_p21_s1.0_val_n2000_seed0_biasbn0': every argument that changes the values."""
  return (f'surface_{dims}d_p{points}_s{float(span)!r}_{split}_n{examples}_seed{seed}_'
          f'biasbn{int(include_bn_bias)}')


def grid_axis(points: int, span: float) -> np.ndarray:
  if points < 2 or span <= 0:
    raise ValueError(f'need points >= 2 and span > 0, got points={points}, span={span}')
  return np.linspace(-span, span, points)


def _examples(run: LoadedRun, split: str, examples: int) -> pipeline.ArraySplit:
  data = run.split(split)
  n = len(data) if examples <= 0 else min(examples, len(data))
  return data.take(np.arange(n))


def run_landscape(workdir: str | os.PathLike, *, dims: int = 1, points: int = DEFAULT_POINTS,
                  span: float = DEFAULT_SPAN, split: str = 'val', examples: int = DEFAULT_EXAMPLES,
                  seed: int = 0, include_bn_bias: bool = False, chunk_size: int = DEFAULT_CHUNK,
                  batch_size: int | None = None, max_chunks: int | None = None,
                  on_chunk: Callable[[Surface, int], None] | None = None, plot: bool = True,
                  run: LoadedRun | None = None,
                  log: Callable[[str], None] | None = print) -> tuple[Surface, pathlib.Path]:
  """Computes (or resumes, or loads) a run's surface; writes its npz and, when complete, its PNG."""
  if dims not in (1, 2):
    raise ValueError(f'dims must be 1 or 2, got {dims}')
  run = run or load_run(workdir)
  data = _examples(run, split, examples)
  xs = grid_axis(points, span)
  mask = trained_mask(run.params, run.config.optim.trainable_blocks)
  directions = make_directions(run.params, mask, dims, seed, include_bn_bias)
  name = surface_name(dims, points, span, split, len(data), seed, include_bn_bias)
  path = RunDir(run.workdir).landscape / f'{name}.npz'
  meta = {'workdir': str(run.workdir), 'run': run.name, 'step': run.step, 'dims': dims,
          'points': points, 'span': float(span), 'split': split, 'examples': len(data),
          'seed': seed, 'include_bn_bias': bool(include_bn_bias),
          'trained_params': int(sum(np.size(p) for p, m in zip(jax.tree.leaves(run.params),
                                                               jax.tree.leaves(mask)) if m))}
  batches = ImageBatches(data, batch_size or run.config.train.eval_batch_size, run.preprocess)
  if log:
    log(f'{run.name} step {run.step}: {name}, {len(xs) ** dims} points, {len(data)} {split} examples')
  surface = compute_surface(run.apply_fn, batches, run.params, directions, xs,
                            xs if dims == 2 else None, path=path, meta=meta, chunk_size=chunk_size,
                            max_chunks=max_chunks, on_chunk=on_chunk, log=log)
  if plot and surface.complete:
    plot_surface(surface, path.with_suffix('.png'), f'{run.name} (step {run.step})')
  return surface, path


# ----------------------------------------------------------------------------- sharpness


def sharpness_of(surface: Surface, alpha: float = SHARPNESS_ALPHA) -> dict[str, float] | None:
  """{'centre', 'minus', 'plus', 'sharpness'} from a complete 1-D surface (2-D: its b=0 row)."""
  if not surface.complete or surface.xs.max() < alpha or surface.xs.min() > -alpha:
    return None
  if surface.dims == 1:
    line = surface.loss
  else:
    j = int(np.argmin(np.abs(surface.ys)))
    if surface.ys[j] != 0:
      return None
    line = surface.loss[:, j]
  at = lambda t: float(np.interp(t, surface.xs, line))
  centre, minus, plus = at(0.0), at(-alpha), at(alpha)
  return {'centre': centre, 'minus': minus, 'plus': plus, 'sharpness': (minus + plus) / 2 - centre}


def sharpness(workdir: str | os.PathLike, name: str | None = None) -> float | None:
  """S = (L(-0.5) + L(+0.5)) / 2 - L(0) along the run's 1-D surface; None if there is none.

  `name` picks a surface file (stem); otherwise the default-argument 1-D surface
  (surface_1d_p21_s1.0_val_n*_seed0_biasbn0), else the newest complete 1-D one.
  """
  folder = RunDir(workdir).landscape
  if name is not None:
    candidates = [folder / f'{name}.npz']
  else:
    found = sorted(folder.glob('surface_1d_*.npz'), key=lambda p: p.stat().st_mtime, reverse=True)
    pattern = surface_name(1, DEFAULT_POINTS, DEFAULT_SPAN, 'val', 0, 0, False).replace('_n0_', '_n*_')
    default = sorted(folder.glob(f'{pattern}.npz'),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    candidates = default + [p for p in found if p not in default]
  for path in candidates:
    if path.exists():
      value = sharpness_of(Surface.load(path))
      if value is not None:
        return value['sharpness']
  return None


# ----------------------------------------------------------------------------- plots


def _loss_levels(values: np.ndarray, n: int = 16) -> np.ndarray:
  """Log-spaced contour levels: the basin and the walls both get lines."""
  lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
  lo = max(lo, 1e-6)
  if hi <= lo * (1 + 1e-6):
    hi = lo * 1.01 + 1e-6
  return np.geomspace(lo, hi, n)


def _contour(ax: Any, surface: Surface, values: np.ndarray, levels: np.ndarray, cmap: str,
             log: bool, label_fmt: str) -> Any:
  a, b = np.meshgrid(surface.xs, surface.ys, indexing='ij')
  norm = colors.LogNorm(levels[0], levels[-1]) if log else None
  filled = ax.contourf(a, b, values, levels=levels, cmap=cmap, norm=norm, extend='both')
  lines = ax.contour(a, b, values, levels=levels[::3], colors='k', linewidths=0.5)
  ax.clabel(lines, fontsize='x-small', fmt=label_fmt)
  ax.plot([0], [0], marker='*', color='w', markeredgecolor='k', markersize=10)
  ax.set_aspect('equal')
  ax.set_xlabel('alpha (direction 1)')
  ax.set_ylabel('beta (direction 2)')
  return filled


def _subtitle(meta: dict[str, Any]) -> str:
  return (f"{meta.get('examples')} {meta.get('split')} examples, seed {meta.get('seed')}, "
          f"{'with' if meta.get('include_bn_bias') else 'no'} bias/norm directions")


def plot_surface(surface: Surface, path: str | os.PathLike, title: str) -> None:
  """1-D: loss and accuracy vs alpha; 2-D: loss (log levels) and accuracy contours."""
  if surface.dims == 1:
    fig = Figure(figsize=(10, 4), layout='constrained')
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(surface.xs, surface.loss, marker='o', markersize=3, linewidth=1.3)
    ax_acc.plot(surface.xs, 100 * surface.accuracy, marker='o', markersize=3, linewidth=1.3,
                color='tab:orange')
    for ax, label in ((ax_loss, 'loss (cross-entropy)'), (ax_acc, 'accuracy (%)')):
      ax.axvline(0, color='k', linewidth=0.6, alpha=0.5)
      ax.set_xlabel('alpha (filter-normalised direction)')
      ax.set_title(label, fontsize='medium')
      ax.grid(alpha=0.3)
  else:
    fig = Figure(figsize=(11, 5), layout='constrained')
    ax_loss, ax_acc = fig.subplots(1, 2)
    filled = _contour(ax_loss, surface, surface.loss, _loss_levels(surface.loss), 'viridis',
                      True, '%.3g')
    fig.colorbar(filled, ax=ax_loss, shrink=0.85, format='%.3g')
    ax_loss.set_title('loss (cross-entropy, log-spaced levels)', fontsize='medium')
    acc = 100 * surface.accuracy
    lo, hi = math.floor(np.nanmin(acc)), math.ceil(np.nanmax(acc))
    step = max(1, math.ceil((hi - lo) / 15))  # whole percents over the data's range
    acc_levels = np.arange(lo, hi + step, step)
    filled = _contour(ax_acc, surface, 100 * surface.accuracy, acc_levels, 'magma', False, '%.0f')
    fig.colorbar(filled, ax=ax_acc, shrink=0.85)
    ax_acc.set_title('accuracy (%)', fontsize='medium')
  fig.suptitle(f'{title}: {_subtitle(surface.meta)}', fontsize='medium')
  fig.savefig(path, dpi=110)


def run_names(workdirs: Sequence[pathlib.Path]) -> list[str]:
  """Directory names, or paths below the common parent where two names collide."""
  names = [p.name for p in workdirs]
  if len(set(names)) == len(names):
    return names
  parent = pathlib.Path(os.path.commonpath([str(p) for p in workdirs]))
  return [p.relative_to(parent).as_posix() or p.name for p in workdirs]


def plot_compare_1d(named: list[tuple[str, Surface]], path: pathlib.Path) -> None:
  fig = Figure(figsize=(11, 4.6), layout='constrained')
  ax_loss, ax_acc = fig.subplots(1, 2)
  palette = colormaps['tab10' if len(named) <= 10 else 'tab20']
  for i, (name, s) in enumerate(named):
    style = dict(color=palette(i % palette.N), marker='o', markersize=3, linewidth=1.3)
    ax_loss.plot(s.xs, s.loss, label=name, **style)
    ax_acc.plot(s.xs, 100 * s.accuracy, label=name, **style)
  for ax, label in ((ax_loss, 'loss (cross-entropy)'), (ax_acc, 'accuracy (%)')):
    ax.axvline(0, color='k', linewidth=0.6, alpha=0.5)
    ax.set_xlabel('alpha (filter-normalised direction)')
    ax.set_title(label, fontsize='medium')
    ax.grid(alpha=0.3)
  fig.legend(*ax_loss.get_legend_handles_labels(), loc='outside lower center',
             ncols=min(3, len(named)), fontsize='small')
  fig.suptitle(f'1-D loss landscapes: {_subtitle(named[0][1].meta)}', fontsize='medium')
  fig.savefig(path, dpi=110)


def plot_compare_2d(named: list[tuple[str, Surface]], path: pathlib.Path) -> None:
  """One loss-contour panel per run, on shared levels so the colours compare across runs."""
  ncols = min(3, len(named))
  nrows = math.ceil(len(named) / ncols)
  fig = Figure(figsize=(4.4 * ncols + 0.8, 4.2 * nrows + 0.5), layout='constrained')
  axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
  levels = _loss_levels(np.concatenate([s.loss.ravel() for _, s in named]))
  filled = None
  for ax, (name, s) in zip(axes, named):
    filled = _contour(ax, s, s.loss, levels, 'viridis', True, '%.3g')
    ax.set_title(f'{name} (centre loss {s.centre()[0]:.3g})', fontsize='medium')
  for ax in axes[len(named):]:
    ax.set_axis_off()
  fig.colorbar(filled, ax=list(axes[:len(named)]), shrink=0.85, format='%.3g', label='loss')
  fig.suptitle(f'2-D loss landscapes: {_subtitle(named[0][1].meta)}', fontsize='medium')
  fig.savefig(path, dpi=110)


def sharpness_table(named: list[tuple[str, Surface]]) -> list[str]:
  lines = ['| run | step | centre loss | L(-0.5) | L(+0.5) | sharpness | centre acc % | surface |',
           '|---|---|---|---|---|---|---|---|']
  for name, s in named:
    sh = sharpness_of(s)
    cells = (['n/a'] * 4 if sh is None else
             [f"{sh['centre']:.4f}", f"{sh['minus']:.4f}", f"{sh['plus']:.4f}", f"{sh['sharpness']:.4f}"])
    lines.append(f"| {name} | {s.meta.get('step')} | {' | '.join(cells)} | "
                 f"{100 * s.centre()[1]:.2f} | {s.meta.get('surface', '')} |")
  return lines


def compare(workdirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *,
            dims: int = 1, log: Callable[[str], None] | None = print,
            **kwargs: Any) -> pathlib.Path:
  """Each run's 1-D surface (and 2-D with dims=2), computed or resumed as needed; plots and a table.

  Writes compare_1d.png, compare_2d.png (dims=2) and sharpness.md into `out`
  (default: <first workdir's parent>/landscape); returns the sharpness.md path.
  """
  paths = [pathlib.Path(w).absolute() for w in workdirs]
  out = pathlib.Path(out) if out else paths[0].parent / RunDir.LANDSCAPE
  out.mkdir(parents=True, exist_ok=True)
  names = run_names(paths)
  one_d, two_d = [], []
  for name, workdir in zip(names, paths):
    run = load_run(workdir)
    for d, acc in ((1, one_d), (2, two_d))[:dims]:
      surface, path = run_landscape(workdir, dims=d, run=run, log=log, **kwargs)
      surface.meta['surface'] = path.stem
      acc.append((name, surface))
  plot_compare_1d(one_d, out / COMPARE_1D_PNG)
  if dims == 2:
    plot_compare_2d(two_d, out / COMPARE_2D_PNG)
  lines = ['# Loss-landscape sharpness', '',
           'Sharpness S = (L(-0.5) + L(+0.5)) / 2 - L(0): the mean rise of the cross-entropy '
           '(nats) at alpha = +-0.5 along one filter-normalised random direction (Li et al. 2018) '
           'of the trained parameters, relative to the trained weights (eval mode). One random '
           'direction: a rough figure; compare runs at the same seed and examples.', '',
           *sharpness_table(one_d), '']
  md = out / SHARPNESS_MD
  md.write_text('\n'.join(lines))
  if log:
    log('\n'.join(lines))
  return md


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m normjax.landscape',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+', metavar='WORKDIR',
                      help='run directory (several with --compare)')
  parser.add_argument('--compare', action='store_true',
                      help='plot several runs side by side + sharpness table')
  parser.add_argument('--dims', type=int, choices=(1, 2), default=1)
  parser.add_argument('--points', type=int, default=DEFAULT_POINTS, help='grid points per axis')
  parser.add_argument('--span', type=float, default=DEFAULT_SPAN, help='grid covers [-span, span]')
  parser.add_argument('--split', choices=SPLITS, default='val')
  parser.add_argument('--examples', type=int, default=DEFAULT_EXAMPLES,
                      help='the first N examples of the split (0: all)')
  parser.add_argument('--include_bn_bias', action='store_true',
                      help='also move biases and norm params (d = w, as the paper code)')
  parser.add_argument('--seed', type=int, default=0, help='direction seed')
  parser.add_argument('--chunk', type=int, default=DEFAULT_CHUNK, help='grid points per vmapped call')
  parser.add_argument('--batch_size', type=int, default=0,
                      help='examples per call (0: train.eval_batch_size)')
  parser.add_argument('--out', default=None, help='--compare output directory '
                      '(default: <first workdir parent>/landscape)')
  args = parser.parse_args(argv)
  startup.prepare_process()
  kwargs = dict(points=args.points, span=args.span, split=args.split, examples=args.examples,
                seed=args.seed, include_bn_bias=args.include_bn_bias, chunk_size=args.chunk,
                batch_size=args.batch_size or None)
  if args.compare:
    md = compare(args.workdirs, args.out, dims=args.dims, **kwargs)
    print(f'wrote {md}')
    return 0
  if len(args.workdirs) != 1:
    parser.error('one WORKDIR (or --compare for several)')
  surface, path = run_landscape(args.workdirs[0], dims=args.dims, **kwargs)
  loss, acc = surface.centre()
  print(f'wrote {path} and {path.with_suffix(".png")}; centre loss {loss:.4f}, accuracy {100 * acc:.2f}%')
  sh = sharpness_of(surface)
  if sh is not None:
    print(f'sharpness (L(-0.5) + L(+0.5)) / 2 - L(0) = {sh["sharpness"]:.4f}')
  return 0


if __name__ == '__main__':
  startup.reexec_for_cpu()
  sys.exit(main())
