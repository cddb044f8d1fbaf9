"""The original study (study.md section 1): its six runs, their reported numbers and its recipe.

`study_run` maps a normjax run to the study run it reproduces; `study_deviations` lists
where its config departs from the study's recipe. Plain data: no JAX, no matplotlib.
"""
import dataclasses

from normjax.runs import Run


@dataclasses.dataclass(frozen=True)
class StudyRun:
  """A run of the original study and the numbers its report gives (study.md section 1)."""
  final_val: float | None = None   # final validation accuracy, %
  epoch1_val: float | None = None  # validation accuracy after epoch 1, %
  grad_norm: str | None = None     # global gradient norm, start -> end of training


# study.md section 1, "Results reported"; the two other runs' numbers were not given.
STUDY_RUNS = {
    'FRN-NoClip': StudyRun(final_val=90.57, grad_norm='~44 -> <29'),
    'BN-Clip': StudyRun(final_val=90.71, epoch1_val=75.16, grad_norm='15.46 -> 0.29'),
    'LN-NoClip': StudyRun(final_val=90.22, grad_norm='~44 -> <29'),
    'BN-NoClip': StudyRun(final_val=89.64, epoch1_val=73.73),
    'FRN-Clip': StudyRun(),
    'LN-Clip': StudyRun(),
}

# The study's recipe (study.md section 1) on every field whose change changes its numbers;
# a run mapped to a study run lists, in a footnote, every field where it differs.
STUDY_RECIPE = {
    'data.name': 'cifar10',          # original CIFAR-10 (cifar10_jpeg is a JPEG re-encoding)
    'data.image_size': 224,          # resized to 224x224
    'data.train_subset': 0,          # the full 80% train split
    'data.val_fraction': 0.2,        # 80% train / 20% validation
    'data.augment': True,            # RandomCrop(32, padding=4) + RandomHorizontalFlip
    'data.crop_padding': 4,
    'model.width_mult': 1.0,         # torchvision MobileNetV2
    'model.cifar_stem': False,       # torchvision's ImageNet strides
    'model.pretrained': 'torchvision_v1',  # ImageNet weights (torchvision pretrained=True)
    # The study's Colab code most likely called model.train() with requires_grad=False on the
    # frozen blocks: their BatchNorms used batch statistics and updated running ones.
    'model.frozen_bn': 'train',
    'model.head_init': 'torch',      # nn.Linear layers
    'model.head_hidden': 256,        # FC(1280->256)
    'model.dropout': 0.5,
    'model.frn_dense': 'features',   # the study's FRN averaged nu2 over the head's features
    'model.dtype': 'float32',
    'model.gemm_dtype': 'compute',   # float32 GEMMs
    'optim.name': 'adam',
    'optim.lr': 1e-3,                # head LR
    'optim.backbone_lr': 1e-5,       # features.18 LR
    'optim.trainable_blocks': 1,     # only features.18 fine-tuned
    'optim.weight_decay': 0.0,
    'optim.schedule': 'constant',
    'optim.warmup_epochs': 0.0,
    'train.batch_size': 64,
    'train.num_epochs': 15,
    'train.max_steps': 0,
}


def study_run(run: Run) -> str | None:
  """The study run this run reproduces ('BN-Clip', ...) judged by model, head and clipping."""
  norm = run.cfg('model.head_norm')
  clip = run.cfg('optim.clip')
  if (run.cfg('model.name') != 'mobilenet_v2' or run.cfg('model.norm') != 'bn'
      or run.cfg('model.head') != 'mlp' or norm not in ('bn', 'ln', 'frn')):
    return None
  if clip == 'none':
    return f'{norm.upper()}-NoClip'
  if clip == 'global_norm' and run.cfg('optim.clip_norm') == 1.0:  # study: max_norm=1.0
    return f'{norm.upper()}-Clip'
  return None


def augment_variants(run: Run) -> int | None:
  """K, the augmentations per image a cached run drew from; None for an online run (fresh each epoch)."""
  if not run.cfg('train.feature_cache') or not run.cfg('data.augment', True):
    return None
  if run.cfg('model.frozen_bn') == 'train':  # 'auto' trains such a run online
    return None
  return run.cfg('data.augment_variants') or run.cfg('train.num_epochs')


def study_deviations(run: Run) -> list[str]:
  """The study recipe fields this run changes, as 'field=value (study: value)'."""
  out = []
  for field, want in STUDY_RECIPE.items():
    got = run.cfg(field)
    if got is not None and got != want:
      note = ', a JPEG re-encoding of CIFAR-10' if got == 'cifar10_jpeg' else ''
      out.append(f'{field}={got} (study: {want}{note})')
  k = augment_variants(run)
  if k is not None and k < run.cfg('train.num_epochs', 0):
    out.append(f'data.augment_variants={k}: the frozen-feature cache holds {k} augmentations per '
               f'image, reused every {k} epochs (study: a fresh draw every epoch)')
  return out
