"""torchvision's ImageNet MobileNetV2 weights, ported to normjax's Flax MobileNetV2.

Key mapping (normjax.models.mobilenet_v2 names modules after torchvision's keys):
  features.<i>[.conv.<m>].<j>.weight (O, I, kh, kw)
      -> params/backbone/features_<i>[/conv_<m>]/<j>/kernel (kh, kw, I, O)
  depthwise weight (C, 1, 3, 3)  -> DepthwiseConv kernel (3, 3, 1, C) (the same transpose)
  BN weight, bias                -> params .../scale, .../bias
  BN running_mean, running_var   -> batch_stats .../mean, .../var
  BN num_batches_tracked         -> dropped (flax does not count steps)
  classifier.1.weight (classes, 1280), .bias -> params/head/out/kernel (1280, classes), bias

BatchNorm: torch eps 1e-5 and momentum 0.1 are flax epsilon 1e-5 and momentum 0.9
(running = 0.9 * running + 0.1 * batch), which `normjax.models.norms.make_norm('bn')`
uses. torch's running_var tracks the unbiased (n-1) batch variance; it is copied as is,
and normjax's BN tracks the unbiased estimate too, so fine-tuning continues the same
statistic.

Files are read without torch (normjax.torch_checkpoint: a restricted unpickler, sha256 checked
against torchvision's `<name>-<hex>.pth` file names). A named spec (TORCHVISION_WEIGHTS) is
found offline first: the ported checkpoint ~/.cache/normjax/<spec>, then
$NORMJAX_DATA_DIR/torchvision/<file>, then torch's hub cache ($TORCH_HOME/hub/checkpoints/<file>),
then a download into that cache. Every problem with a spec or its file is a WeightsError.

Only width_mult=1.0 weights exist; a model with another width fails with the shape
mismatches listed. `cifar_stem` changes strides, not shapes, so ImageNet weights load
into it (they then see features at a different scale than in pretraining).
"""
import os
import re
from typing import Any, Mapping
import urllib.parse

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from normjax import checkpoint, torch_checkpoint
from normjax.errors import WeightsError
from normjax.models.classifier import Classifier
from normjax.models.mobilenet_v2 import mobilenet_v2
from normjax.rundir import RunDir

# normjax.data.pipeline.ENV_DATA_DIR, not imported from there: that module imports tfds.
ENV_DATA_DIR = 'NORMJAX_DATA_DIR'

# torchvision.models.MobileNet_V2_Weights (torchvision/models/mobilenetv2.py).
TORCHVISION_WEIGHTS = {
    # IMAGENET1K_V1: original recipe, ImageNet acc@1 71.878.
    'torchvision_v1': 'https://download.pytorch.org/models/mobilenet_v2-b0353104.pth',
    # IMAGENET1K_V2: torchvision's improved training recipe, ImageNet acc@1 72.154.
    'torchvision_v2': 'https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth',
}

_TORCH_LEAF = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
               ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
               ('batch_stats', 'var'): 'running_var'}


def default_cache_dir() -> str:
  """Where ported checkpoints of the named specs live: ~/.cache/normjax/<spec>."""
  return os.path.join(os.path.expanduser('~'), '.cache', 'normjax')


def torch_key(collection: str, path: tuple[str, ...]) -> str:
  """The torchvision state_dict key of a flax variable, e.g.

  ('params', ('backbone', 'features_2', 'conv_0', '0', 'kernel')) -> 'features.2.conv.0.0.weight'.
  """
  top, *modules, leaf = path
  if top == 'head':
    modules = ['classifier', '1']  # torchvision: classifier = Sequential(Dropout, Linear)
  else:
    modules = [re.sub(r'^(features|conv)_(\d+)$', r'\1.\2', m) for m in modules]
  return '.'.join(modules + [_TORCH_LEAF[collection, leaf]])


def _to_flax(value: np.ndarray) -> np.ndarray:
  """torch layout -> flax layout: conv OIHW -> HWIO, Linear (out, in) -> (in, out)."""
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value.T if value.ndim == 2 else value


def torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of a flax variable shape (inverse of `_to_flax`)."""
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(reversed(flax_shape))


def _variable_shapes(module: Classifier) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened {(collection, *path): shape} of the module's variables, without computing them."""
  variables = jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  return {k: v.shape for k, v in traverse_util.flatten_dict(variables).items()}


def _as_numpy(value: Any) -> np.ndarray:
  """A state_dict value as float32 numpy: numpy arrays (torch_checkpoint) or torch tensors."""
  if hasattr(value, 'detach'):  # a torch.Tensor, converted without importing torch
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def port_state_dict(state_dict: Mapping[str, Any], module: Classifier) -> dict[str, Any]:
  """Maps a torchvision MobileNetV2 state_dict (numpy arrays or torch tensors) onto `module`'s
  variables.

  Raises one WeightsError listing every missing key, every unexpected key and every
  shape mismatch (torch shape vs the torch shape `module` expects).
  """
  expected = {torch_key(k[0], k[1:]): (k, shape) for k, shape in _variable_shapes(module).items()}
  given = {k: v for k, v in state_dict.items() if not k.endswith('.num_batches_tracked')}
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  flat, mismatched = {}, []
  for key in sorted(set(given) & set(expected)):
    path, shape = expected[key]
    value = _to_flax(_as_numpy(given[key]))
    if value.shape != shape:
      mismatched.append(f'  {key}: torch shape {tuple(given[key].shape)}, expected '
                        f'{torch_shape(shape)} (flax {path[-1]} {shape})')
    flat[path] = jnp.asarray(value)
  if missing or unexpected or mismatched:
    lines = ['torchvision MobileNetV2 state_dict does not match normjax MobileNetV2:']
    if missing:
      lines += [f'missing keys ({len(missing)}):'] + [f'  {k}' for k in missing]
    if unexpected:
      lines += [f'unexpected keys ({len(unexpected)}):'] + [f'  {k}' for k in unexpected]
    if mismatched:
      lines += [f'shape mismatches ({len(mismatched)}):'] + mismatched
    raise WeightsError('\n'.join(lines))
  return traverse_util.unflatten_dict(flat)


def read_state_dict(path_or_url: str) -> dict[str, np.ndarray]:
  """A torch state_dict, read without torch, from a file or an http(s) URL.

  A URL is downloaded once into torch's hub cache (<hub_dir>/checkpoints/<file name>), where
  torch.hub.load_state_dict_from_url would put it. A torchvision-style name
  `<name>-<hex>.pth` must match the file's sha256 (torch_checkpoint.check_hash).
  """
  if path_or_url.startswith(('http://', 'https://')):
    path = _hub_checkpoint(path_or_url)
    if not os.path.isfile(path):
      torch_checkpoint.download(path_or_url, path)
    return torch_checkpoint.load_state_dict(path)
  return torch_checkpoint.load_state_dict(path_or_url)


def load_torchvision_mobilenet_v2(path_or_url: str,
                                  num_classes: int = 1000) -> tuple[Classifier, dict[str, Any]]:
  """torchvision's `mobilenet_v2` (width 1.0, BN) as (normjax module, ported variables)."""
  module = mobilenet_v2(num_classes=num_classes)
  return module, port_state_dict(read_state_dict(path_or_url), module)


def _hub_checkpoint(url: str) -> str:
  """The file torch.hub.load_state_dict_from_url caches `url` in."""
  name = os.path.basename(urllib.parse.urlparse(url).path)
  return os.path.join(torch_checkpoint.hub_dir(), 'checkpoints', name)


def named_state_dict(spec: str, cache_dir: str | None = None,
                     ported_dir: str | None = None) -> dict[str, np.ndarray]:
  """The state_dict of a TORCHVISION_WEIGHTS name, from the first of
  $NORMJAX_DATA_DIR/torchvision/<file>, torch's hub cache file, a download into that cache.

  A file that is found but corrupt is an error, not skipped. When nothing works, one
  WeightsError lists every place looked at (`ported_dir` first: the ported checkpoint the
  caller looked for) and what to do; cache_dir names where `python -m normjax.port` would
  write that checkpoint.
  """
  url = TORCHVISION_WEIGHTS[spec]
  name = os.path.basename(urllib.parse.urlparse(url).path)
  looked = []
  if ported_dir is not None:
    looked.append(f'ported checkpoint {ported_dir}: no such directory')
  data_dir = os.environ.get(ENV_DATA_DIR)
  if data_dir:
    data_file = os.path.join(data_dir, 'torchvision', name)
    if os.path.isfile(data_file):
      return torch_checkpoint.load_state_dict(data_file)
    looked.append(f'${ENV_DATA_DIR}/torchvision: {data_file}: no such file')
  else:
    data_file = os.path.join('$' + ENV_DATA_DIR, 'torchvision', name)
    looked.append(f'${ENV_DATA_DIR}/torchvision: ${ENV_DATA_DIR} is not set')
  hub_file = _hub_checkpoint(url)
  if os.path.isfile(hub_file):
    return torch_checkpoint.load_state_dict(hub_file)
  looked.append(f'torch hub cache: {hub_file}: no such file')
  try:
    torch_checkpoint.download(url, hub_file)
  except WeightsError as e:
    looked.append(str(e))
    out = os.path.join(cache_dir or default_cache_dir(), spec)
    raise WeightsError(
        f'Cannot get pretrained weights {spec!r} (file {name}). Looked, in order, at:\n'
        + ''.join(f'  {i}. {line}\n' for i, line in enumerate(looked, 1))
        + f'Download {url} on a machine with internet and either\n'
        f'  put it at {hub_file} (torch hub cache; $TORCH_HOME moves it) or at {data_file}, or\n'
        f'  pass its path as the pretrained spec, or\n'
        f'  run `python -m normjax.port --torchvision={spec} --out={out}` where the file or the\n'
        f'  internet is available and copy that directory to {out}.') from None
  return torch_checkpoint.load_state_dict(hub_file)


def _replace_backbone(variables: Mapping[str, Any], params: Any, batch_stats: Any,
                      source: str) -> dict[str, Any]:
  """`variables` with the backbone's params and batch_stats replaced, after a structure check."""
  model_stats = (variables.get('batch_stats') or {}).get('backbone', {})
  if batch_stats and not model_stats:
    raise WeightsError(f'pretrained {source} has BatchNorm statistics but the model has no '
                       f'batch_stats: use the bn backbone norm with pretrained weights.')
  problems = []
  for collection, new, target in (('params', params, variables['params']['backbone']),
                                  ('batch_stats', batch_stats, model_stats)):
    target = traverse_util.flatten_dict(target, sep='/')
    new = traverse_util.flatten_dict(new, sep='/')
    problems += [f'  missing {collection}/backbone/{k} {target[k].shape}'
                 for k in sorted(set(target) - set(new))]
    problems += [f'  unexpected {collection}/backbone/{k} {new[k].shape}'
                 for k in sorted(set(new) - set(target))]
    problems += [f'  {collection}/backbone/{k}: pretrained {new[k].shape}, model {target[k].shape}'
                 for k in sorted(set(new) & set(target)) if new[k].shape != target[k].shape]
  if problems:
    raise WeightsError(
        f'pretrained backbone {source} does not fit the model (torchvision weights need '
        f'width_mult=1.0):\n' + '\n'.join(problems))
  cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  out = dict(variables)
  out['params'] = {**variables['params'], 'backbone': cast(params)}
  if model_stats:
    out['batch_stats'] = {**variables['batch_stats'], 'backbone': cast(batch_stats)}
  return out


def _restore_orbax(path: str) -> dict[str, Any]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  # slow import
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(os.path.abspath(path))
  except Exception as e:  # orbax raises many types for unreadable directories
    first = str(e).splitlines()[0] if str(e) else ''
    raise WeightsError(f'cannot read {path} as a checkpoint written by `python -m normjax.port`: '
                       f'{type(e).__name__}: {first}') from None


def _num_classes(state_dict: Mapping[str, Any]) -> int:
  weight = state_dict.get('classifier.1.weight')
  return 1000 if weight is None else weight.shape[0]


def load_pretrained_backbone(spec: str, variables: Mapping[str, Any], *,
                             cache_dir: str | None = None) -> dict[str, Any]:
  """Returns `variables` with params/batch_stats['backbone'] replaced by pretrained ones.

  spec: 'torchvision_v1' | 'torchvision_v2' (see TORCHVISION_WEIGHTS), a directory
  written by `python -m normjax.port`, a normjax run's workdir (its latest checkpoint:
  self-pretraining), or a torch state_dict file (.pth).
  A named spec is looked up, offline first, as: the ported checkpoint <cache_dir>/<spec>
  (cache_dir defaults to ~/.cache/normjax), $NORMJAX_DATA_DIR/torchvision/<file>, torch's
  hub cache file, then a download into that cache (see named_state_dict).
  The head is left as it is. Every problem with the spec or its files is a WeightsError.
  """
  if spec in TORCHVISION_WEIGHTS:
    ported = os.path.join(cache_dir or default_cache_dir(), spec)
    if os.path.isdir(ported):
      spec = ported
    else:
      state_dict = named_state_dict(spec, cache_dir, ported_dir=ported)
      ported = port_state_dict(state_dict, mobilenet_v2(_num_classes(state_dict)))
      return _replace_backbone(variables, ported['params']['backbone'],
                               ported['batch_stats']['backbone'], spec)
  if RunDir(spec).checkpoints.is_dir():  # a normjax run: its latest backbone
    restored = jax.device_get(checkpoint.restore_latest(spec)[1])
  elif os.path.isdir(spec):
    restored = _restore_orbax(spec)
  elif os.path.isfile(spec):
    state_dict = read_state_dict(spec)
    restored = port_state_dict(state_dict, mobilenet_v2(_num_classes(state_dict)))
  else:
    raise WeightsError(
        f'pretrained spec {spec!r} is neither one of {sorted(TORCHVISION_WEIGHTS)}, a checkpoint '
        f'directory written by `python -m normjax.port`, a normjax workdir, nor a torch state_dict file.')
  try:
    params = restored['params']['backbone']
    batch_stats = (restored.get('batch_stats') or {}).get('backbone', {})
  except (KeyError, TypeError, AttributeError) as e:
    raise WeightsError(f'{spec}: expected params/backbone and batch_stats/backbone, found '
                       f'top-level keys {sorted(restored)}') from e
  return _replace_backbone(variables, params, batch_stats, spec)
