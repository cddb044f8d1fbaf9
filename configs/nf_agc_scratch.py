r"""Normalizer-free MobileNetV2 (CIFAR variant) + AGC, from scratch on cifar10_jpeg.

  python -m normjax.main --config=configs/nf_agc_scratch.py --workdir=workdir/nf_vs_bn/nf_agc_b128
  python -m normjax.main --config=configs/nf_agc_scratch.py:batch=8 --workdir=workdir/nf_vs_bn/nf_agc_b8
  python -m normjax.main --config=configs/nf_agc_scratch.py:cpu,batch=64,lambda=0.04 --workdir=...

Classifier zero-initialised as in NFNets (model.head_init=zeros).
SGD+Nesterov, cosine LR, 30 epochs; AGC lambda follows the batch size
(base.agc_lambda_for_batch) unless `lambda=` is given. Compare with
configs/bn_scratch.py at the same arg. Arguments (comma-separated): batch=N (default 128;
LR 0.1 x N/256), lambda=X, cpu (width 0.5, 4,000 images, 3 epochs, 10% validation),
quick (base.quick: 20 steps).
Expected: see README "NF+AGC vs BN" for the measured accuracies (JPEG CIFAR-10; measured with
flax's head init, `--config.model.head_init=flax` repeats them).
"""
from configs import base


def get_config(arg: str | None = None):
  return base.scratch('nf_mobilenet_v2', 'agc', arg, __file__)
