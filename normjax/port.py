"""Ports torchvision MobileNetV2 weights to an orbax checkpoint that normjax can load offline.

  python -m normjax.port --torchvision=torchvision_v1  # -> ~/.cache/normjax/torchvision_v1
  python -m normjax.port --torchvision=/path/mobilenet_v2-b0353104.pth --out=/ckpt/mnv2

A name is read from $NORMJAX_DATA_DIR/torchvision/<file>, else torch's hub cache, else
downloaded into that cache (pretrained.named_state_dict); no torch is needed. The checkpoint
holds {'params': ..., 'batch_stats': ...} of `mobilenet_v2(num_classes)`; pass its directory
as config.model.pretrained (or to load_pretrained_backbone). A missing, corrupt or
mismatched weight file prints `normjax.port: error: ...` and exits 2.
"""
import os
import sys

from absl import app
from absl import flags
import jax
import orbax.checkpoint as ocp

from normjax import pretrained
from normjax.errors import WeightsError
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
  named = source in pretrained.TORCHVISION_WEIGHTS
  if _OUT.value is None and not named:
    raise app.UsageError('--out is required unless --torchvision is a name')
  out = os.path.abspath(_OUT.value or os.path.join(pretrained.default_cache_dir(), source))
  if os.path.exists(out) and not _OVERWRITE.value:
    raise app.UsageError(f'--out={out} exists; pass --overwrite to replace it')
  try:
    state_dict = (pretrained.named_state_dict(source) if named
                  else pretrained.read_state_dict(source))
    variables = pretrained.port_state_dict(state_dict,
                                           mobilenet_v2(num_classes=_NUM_CLASSES.value))
  except WeightsError as e:
    print(f'normjax.port: error: {e}', file=sys.stderr)
    sys.exit(2)
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
