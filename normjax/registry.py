"""The names a config may choose, each listed once: models, norms, datasets and the other choices.

Plain tuples, no JAX or tfds, so `normjax.config_schema` checks a config without importing
them. The modules that implement the names take their errors' lists from here, and
`tests/test_config_schema.py` checks that `models/factory.py` BACKBONES and `data/pipeline.py`
DATASETS implement exactly MODELS and DATASETS.
"""

# model.name: models/factory.py BACKBONES builds each.
MODELS = ('lightcnn', 'mobilenet_v2', 'nf_mobilenet_v2', 'mlp', 'lenet', 'medium_light', 'ultra_light',
          'cnn_mnist', 'tunable_cnn')

# models/norms.py make_norm's names; model.norm, the backbone's, chooses from them too (there
# models/factory.py builds ln as Wu & He's LayerNorm over H, W and C).
NORMS = ('bn', 'ln', 'gn', 'frn', 'none')
# model.head_norm: every norm, the study's three (BN, LN, FRN) first.
HEAD_NORMS = ('bn', 'ln', 'frn', *(n for n in NORMS if n not in ('bn', 'ln', 'frn')))
FRN_DENSE_MODES = ('features', 'unit')  # model.frn_dense
FROZEN_BN_MODES = ('eval', 'train')  # model.frozen_bn
HEAD_INITS = ('torch', 'flax', 'zeros')  # model.head_init

# data.name: data/pipeline.py DATASETS says how to prepare each.
DATASETS = ('cifar10', 'cifar10_jpeg', 'fashion_mnist', 'fashion_mnist_idx', 'mnist_idx')

# optim.py's choices.
OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('constant', 'cosine')
CLIPS = ('none', 'global_norm', 'agc')
