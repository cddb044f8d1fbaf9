"""On-device crop, flip, resize and normalize against NumPy / PyTorch references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from normjax.data import augment

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def images(batch=16, size=32, channels=3, seed=0):
  # Values from 1, so a 0 in a crop can only come from the padding.
  return np.random.default_rng(seed).integers(1, 256, (batch, size, size, channels), dtype=np.uint8)


def normalize(x_u8, mean=MEAN, std=STD):
  return (x_u8.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)


def numpy_crop_flip(x, offsets, flips, padding):
  """torchvision RandomCrop(padding, fill=0) + RandomHorizontalFlip with given draws."""
  _, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out = np.stack([p[top:top + h, left:left + w] for p, (top, left) in zip(padded, offsets)])
  return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


train = jax.jit(augment.train_preprocess,
                static_argnames=('image_size', 'mean', 'std', 'padding', 'augment'))
evaluate = jax.jit(augment.eval_preprocess, static_argnames=('image_size', 'mean', 'std'))
crop_flip = jax.jit(augment.crop_flip, static_argnames='padding')


@pytest.mark.parametrize('channels,image_size', [(3, 32), (3, 48), (1, 28)])
def test_shapes_and_dtypes(channels, image_size):
  x = images(4, 28 if channels == 1 else 32, channels)
  mean, std = MEAN[:channels], STD[:channels]
  out = train(x, jax.random.key(0), image_size=image_size, mean=mean, std=std, padding=4, augment=True)
  assert out.shape == (4, image_size, image_size, channels) and out.dtype == jnp.float32
  ev = evaluate(x, image_size=image_size, mean=mean, std=std)
  assert ev.shape == out.shape and ev.dtype == jnp.float32


def test_no_augment_equals_eval():
  x = images()
  out = train(x, jax.random.key(3), image_size=40, mean=MEAN, std=STD, padding=4, augment=False)
  np.testing.assert_array_equal(out, evaluate(x, image_size=40, mean=MEAN, std=STD))


@pytest.mark.parametrize('padding', [4, 2])
def test_crop_is_a_shifted_copy_with_zero_padding(padding):
  x = images(64)
  key = jax.random.key(7)
  offsets, flips = map(np.asarray, augment.sample_crop_flip(key, 64, padding))
  expected = numpy_crop_flip(x, offsets, flips, padding)
  np.testing.assert_array_equal(crop_flip(x, offsets, flips, padding), expected)
  # Zeros exactly where the window leaves the image (inputs are >= 1).
  rows_out = np.abs(offsets[:, 0] - padding)
  cols_out = np.abs(offsets[:, 1] - padding)
  zero_pixels = 32 * 32 - (32 - rows_out) * (32 - cols_out)
  np.testing.assert_array_equal((expected == 0).all(-1).sum((1, 2)), zero_pixels)
  assert zero_pixels.max() > 0
  # train_preprocess draws the same offsets and flips from the same key.
  out = train(x, key, image_size=32, mean=MEAN, std=STD, padding=padding, augment=True)
  np.testing.assert_allclose(out, normalize(expected), atol=1e-5)


def test_offsets_and_flips_cover_torchvision_ranges():
  offsets, flips = map(np.asarray, augment.sample_crop_flip(jax.random.key(0), 4000, 4))
  for axis in (0, 1):
    counts = np.bincount(offsets[:, axis], minlength=9)
    assert len(counts) == 9 and counts.min() > 350  # uniform over 0..8: ~444 each
  assert 0.47 < flips.mean() < 0.53


def test_flip():
  x = images(3)
  center = np.full((3, 2), 4)
  flipped = crop_flip(x, center, np.array([True, False, True]), 4)
  np.testing.assert_array_equal(flipped[0], x[0, :, ::-1])
  np.testing.assert_array_equal(flipped[1], x[1])
  np.testing.assert_array_equal(flipped[2], x[2, :, ::-1])


def test_same_key_same_output_other_key_differs():
  x = images()
  run = functools.partial(train, x, image_size=32, mean=MEAN, std=STD, padding=4, augment=True)
  np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(1)))
  assert not np.array_equal(run(jax.random.key(1)), run(jax.random.key(2)))


def test_normalization_numbers():
  x = np.array([0, 51, 255], np.uint8).reshape(1, 1, 1, 3)
  out = evaluate(x, image_size=1, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.5))
  np.testing.assert_allclose(out.ravel(), [-2.0, -1.2, 1.0], atol=1e-6)
  cifar = evaluate(images(2), image_size=32, mean=MEAN, std=STD)
  np.testing.assert_allclose(cifar, normalize(images(2)), atol=1e-5)


def test_resize_keeps_a_constant_image_constant():
  x = np.full((2, 32, 32, 3), 100, np.uint8)
  out = evaluate(x, image_size=224, mean=MEAN, std=STD)
  assert out.shape == (2, 224, 224, 3)
  np.testing.assert_allclose(out, np.broadcast_to(normalize(x[:, :1, :1]), out.shape), atol=1e-5)


def test_resize_matches_torch_bilinear():
  # torchvision Resize(224) on an upscale = bilinear with half-pixel centres.
  x = images(2, size=8)
  out = evaluate(x, image_size=20, mean=(0.0,) * 3, std=(1 / 255,) * 3)
  ref = torch.nn.functional.interpolate(torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2),
                                        size=(20, 20), mode='bilinear', align_corners=False)
  np.testing.assert_allclose(out, ref.permute(0, 2, 3, 1).numpy(), atol=1e-3)
