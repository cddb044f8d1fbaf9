r"""Grad-CAM heatmaps (Selvaraju et al., ICCV 2017) of a run's classifier.

  python -m normjax.gradcam WORKDIR [--images=N] [--layer=NAME] [--split=test] [--out=DIR]

For each image, with A the feature map of `layer` (N, H, W, C) and y^c the
logit of the predicted (top) class:

  alpha_c = mean_{h,w} dy^c / dA_{hwc}               (the paper's eq. 1)
  cam     = ReLU(sum_c alpha_c A_c)                  (eq. 2)

scaled to [0, 1] by its maximum (all zeros where no location has positive
evidence) and upsampled bilinearly to the model's input size. The model runs in
eval mode (running BN statistics, no dropout) on the run's latest checkpoint.

The layer: by default the Classifier's backbone output, the last conv feature
map before global pooling (after features_18's ReLU6 in MobileNetV2, after the
last conv's ReLU in LightCNN). `--layer=NAME` names another backbone submodule
(`features_13`, or a path below it such as `features_13/conv_1`), and the map is
that module's return value (for LightCNN's `features_2` that is the conv output
before its ReLU). The map and its gradient come from one flax method
interceptor that returns the named module's output plus a zero tensor and
records it: d(logit)/d(zero tensor) is the gradient w.r.t. the map, with no
change to the model code and for any submodule (capture_intermediates would
give the value but not the gradient).

Output: WORKDIR/gradcam/gradcam_<split>_<layer>.png, one row per image (image,
heatmap, overlay; true and predicted class names), and a .npz with the
heatmaps. The N images are a few per class: the first of each class in the
split's order, then the second, and so on.
"""
import argparse
import math
import os
import pathlib
import sys
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
import numpy as np

from normjax import landscape, runs, startup
from normjax.rundir import RunDir

BACKBONE = 'backbone'  # Classifier's backbone attribute: its output is the default map
DEFAULT_IMAGES = 20


@flax.struct.dataclass
class GradCAM:
  """Per image: the map, its gradient's channel means, the raw and upsampled heatmaps."""
  features: jax.Array   # A, (N, h, w, C)
  weights: jax.Array    # alpha, (N, C)
  cam: jax.Array        # ReLU(sum_c alpha_c A_c) / max, (N, h, w), in [0, 1]
  heatmap: jax.Array    # cam upsampled to the input size, (N, H, W), in [0, 1]
  logits: jax.Array     # (N, classes)
  target: jax.Array     # the class explained, (N,)


def layer_path(layer: str | None) -> tuple[str, ...]:
  """'' / 'backbone' -> ('backbone',); 'features_13/conv_1' -> ('backbone', 'features_13', 'conv_1')."""
  if not layer or layer == BACKBONE:
    return (BACKBONE,)
  names = tuple(n for n in layer.split('/') if n)
  return names if names[0] == BACKBONE else (BACKBONE, *names)


def _layer_names(variables: dict[str, Any]) -> list[str]:
  return sorted(variables['params'].get(BACKBONE, {}), key=runs.natural_key)


def _apply_capturing(model: nn.Module, variables: dict[str, Any], x: jax.Array,
                     path: tuple[str, ...], delta: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Logits, and the output of the submodule at `path` (with `delta` added before it goes on)."""
  captured = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and tuple(context.module.path) == path:
      captured.append(out)
      if delta is not None:
        out = out + delta.astype(out.dtype)
    return out

  with nn.intercept_methods(interceptor):
    logits = model.apply(variables, x, train=False)
  if len(captured) != 1:
    found = 'never' if not captured else f'{len(captured)} times'
    raise ValueError(f'layer {"/".join(path[1:]) or BACKBONE!r} was called {found}; backbone '
                     f'submodules: {", ".join(_layer_names(variables))}')
  return logits, captured[0]


@jax.jit
def _scaled_relu_cam(features: jax.Array, weights: jax.Array) -> jax.Array:
  """eq. 2, then divided by each image's maximum (all zeros where nothing is positive)."""
  cam = jax.nn.relu(jnp.einsum('nhwc,nc->nhw', features.astype(jnp.float32), weights))
  peak = cam.max(axis=(1, 2), keepdims=True)
  return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)


def grad_cam(model: nn.Module, variables: dict[str, Any], x: jax.Array, layer: str | None = None,
             target: jax.Array | None = None) -> GradCAM:
  """Grad-CAM of preprocessed inputs x (N, H, W, C); `target` classes default to the argmax."""
  path = layer_path(layer)
  shape = jax.eval_shape(lambda v, x: _apply_capturing(model, v, x, path, None)[1], variables, x)
  if len(shape.shape) != 4:
    raise ValueError(f'layer {"/".join(path)} gives shape {shape.shape}, not a (N, H, W, C) feature map')

  @jax.jit
  def run(variables, x, target):
    def selected_logit(delta):
      logits, a = _apply_capturing(model, variables, x, path, delta)
      cls = jax.lax.stop_gradient(jnp.argmax(logits, -1) if target is None else target)
      # Examples are independent in eval mode, so the gradient of the sum is per example.
      return jnp.take_along_axis(logits, cls[:, None], 1).sum(), (logits, a, cls)

    grads, (logits, a, cls) = jax.grad(selected_logit, has_aux=True)(jnp.zeros(shape.shape, shape.dtype))
    weights = grads.astype(jnp.float32).mean(axis=(1, 2))  # eq. 1: global average of the gradient
    cam = _scaled_relu_cam(a, weights)
    heatmap = jax.image.resize(cam, (cam.shape[0], *x.shape[1:3]), 'bilinear')
    return GradCAM(features=a, weights=weights, cam=cam, heatmap=jnp.clip(heatmap, 0.0, 1.0),
                   logits=logits, target=cls)

  return run(variables, x, None if target is None else jnp.asarray(target, jnp.int32))


def few_per_class(labels: np.ndarray, n: int) -> np.ndarray:
  """n indices: the first example of each class (in order), then the second of each, ..."""
  classes = np.unique(labels)
  per_class = [np.flatnonzero(labels == c) for c in classes]
  picked = []
  for rank in range(max(len(p) for p in per_class)):
    picked += [int(p[rank]) for p in per_class if rank < len(p)]
    if len(picked) >= n:
      break
  return np.asarray(picked[:n], np.int64)


def plot_grid(images_u8: np.ndarray, heatmaps: np.ndarray, true: Sequence[str], pred: Sequence[str],
              prob: np.ndarray, indices: np.ndarray, path: str | os.PathLike, title: str) -> None:
  """One (image | heatmap | overlay) triple per image; two triples per row beyond 8 images."""
  n = len(images_u8)
  groups = 1 if n <= 8 else 2
  rows = math.ceil(n / groups)
  fig = Figure(figsize=(6.6 * groups, 2.3 * rows + 0.5), layout='constrained')
  axes = np.asarray(fig.subplots(rows, 3 * groups, squeeze=False))
  size = heatmaps.shape[1]
  extent = (0, size, size, 0)  # the image is drawn at the model's input size, under the heatmap
  gray = images_u8.shape[-1] == 1
  for k in range(rows * groups):
    r, g = k % rows, k // rows
    trio = axes[r, 3 * g:3 * g + 3]
    for ax in trio:
      ax.set_axis_off()
    if k >= n:
      continue
    image = images_u8[k, ..., 0] if gray else images_u8[k]
    cmap = 'gray' if gray else None
    trio[0].imshow(image, cmap=cmap, extent=extent)
    trio[0].set_title(f'#{indices[k]} true: {true[k]}', fontsize='small')
    trio[1].imshow(heatmaps[k], cmap='jet', vmin=0, vmax=1, extent=extent)
    trio[1].set_title('Grad-CAM', fontsize='small')
    trio[2].imshow(image, cmap=cmap, extent=extent)
    trio[2].imshow(heatmaps[k], cmap='jet', vmin=0, vmax=1, alpha=0.45, extent=extent)
    ok = true[k] == pred[k]
    trio[2].set_title(f'pred: {pred[k]} ({100 * prob[k]:.0f}%)', fontsize='small',
                      color='tab:green' if ok else 'tab:red')
  fig.suptitle(title, fontsize='medium')
  fig.savefig(path, dpi=110)


def run_gradcam(workdir: str | os.PathLike, *, images: int = DEFAULT_IMAGES, layer: str | None = None,
                split: str = 'test', out: str | os.PathLike | None = None,
                run: landscape.LoadedRun | None = None) -> pathlib.Path:
  """Grad-CAM of `images` examples of a run's split; returns the PNG's path."""
  run = run or landscape.load_run(workdir, use_feature_cache=False)
  data = run.split(split)
  indices = few_per_class(data.labels, images)
  images_u8 = data.images[indices]
  x = jax.jit(run.preprocess)(images_u8)
  result = jax.device_get(grad_cam(run.model, run.variables, x, layer))
  probs = np.asarray(jax.nn.softmax(result.logits, -1))
  target = np.asarray(result.target)
  names = run.splits.class_names
  tag = (layer or BACKBONE).replace('/', '-')
  out = pathlib.Path(out) if out else RunDir(run.workdir).gradcam
  out.mkdir(parents=True, exist_ok=True)
  png = out / f'gradcam_{split}_{tag}.png'
  title = (f'{run.name} (step {run.step}): Grad-CAM of the predicted class at '
           f'{(layer or BACKBONE)} ({result.features.shape[1]}x{result.features.shape[2]} map), '
           f'{split} split')
  plot_grid(images_u8, np.asarray(result.heatmap), [names[i] for i in data.labels[indices]],
            [names[i] for i in target], probs[np.arange(len(target)), target], indices, png, title)
  np.savez(png.with_suffix('.npz'), indices=indices, labels=data.labels[indices], predicted=target,
           cam=np.asarray(result.cam), heatmap=np.asarray(result.heatmap),
           weights=np.asarray(result.weights))
  return png


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m normjax.gradcam', description=__doc__.split('\n')[0])
  parser.add_argument('workdir', help='run directory')
  parser.add_argument('--images', type=int, default=DEFAULT_IMAGES, help='images (a few per class)')
  parser.add_argument('--layer', default=None,
                      help='backbone submodule (default: the backbone output, before pooling)')
  parser.add_argument('--split', choices=landscape.SPLITS, default='test')
  parser.add_argument('--out', default=None, help='output directory (default: WORKDIR/gradcam)')
  args = parser.parse_args(argv)
  startup.prepare_process()
  png = run_gradcam(args.workdir, images=args.images, layer=args.layer, split=args.split, out=args.out)
  print(f'wrote {png} and {png.with_suffix(".npz")}')
  return 0


if __name__ == '__main__':
  startup.reexec_for_cpu()
  sys.exit(main())
