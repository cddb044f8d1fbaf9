"""Ports torchvision MobileNetV2 weights to an orbax checkpoint that normjax can load offline.

  python -m normjax.port --torchvision=torchvision_v1            # -> ~/.cache/normjax/torchvision_v1
  python -m normjax.port --torchvision=/path/mobilenet_v2-b0353104.pth --out=/ckpt/mnv2

The checkpoint holds {'params': ..., 'batch_stats': ...} of `mobilenet_v2(num_classes)`;
pass its directory as config.model.pretrained (or to load_pretrained_backbone).
"""
import os

from absl import app
from absl import flags
import jax
import orbax.checkpoint as ocp

from normjax import pretrained
from normjax.models.mobilenet_v2 import mobilenet_v2

_TORCHVISION = flags.DEFINE_string(
    'torchvision', None,
    f'{" | ".join(pretrained.TORCHVISION_WEIGHTS)} | path to a state_dict .pth | URL.',
    required=True)
_OUT = flags.DEFINE_string(
    'out', None, 'Output directory; default for a name: ~/.cache/normjax/<name>, where '
    'load_pretrained_backbone looks first.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Classes of the state_dict classifier.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out directory.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  source = _TORCHVISION.value
  out = _OUT.value
  if source in pretrained.TORCHVISION_WEIGHTS:
    out = out or os.path.join(pretrained.default_cache_dir(), source)
    state_dict = pretrained.named_state_dict(source)
  elif out is None:
    raise app.UsageError('--out is required unless --torchvision is a name')
  else:
    state_dict = pretrained.read_state_dict(source)
  module = mobilenet_v2(num_classes=_NUM_CLASSES.value)
  variables = pretrained.port_state_dict(state_dict, module)
  out = os.path.abspath(out)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out, variables, force=_OVERWRITE.value)
  count = lambda t: sum(x.size for x in jax.tree.leaves(t))
  print(f'Wrote {out} from {source}:')
  for collection in ('params', 'batch_stats'):
    sizes = ', '.join(f'{k} {count(v):,}' for k, v in variables[collection].items())
    print(f'  {collection}: {len(jax.tree.leaves(variables[collection]))} arrays ({sizes})')
  print(f'Use it with config.model.pretrained={out}')


if __name__ == '__main__':
  app.run(main)
