"""On-device preprocessing: random crop and flip, resize, normalize.

Pure jit-able functions of uint8 NHWC batches and a PRNG key, so a train step
can augment on the accelerator and the same (key, batch) always gives the same
input. The study's torchvision recipe, in order: RandomCrop(32, padding=4),
RandomHorizontalFlip(), Resize(224), ToTensor(), Normalize(mean, std).
"""
from typing import Sequence

import jax
import jax.numpy as jnp


def sample_crop_flip(rng: jax.Array, batch_size: int,
                     padding: int) -> tuple[jax.Array, jax.Array]:
  """Per-example crop offsets (batch, 2) as (top, left) in [0, 2*padding], and flips.

  torchvision RandomCrop draws top and left uniformly over all positions of the
  padded image; RandomHorizontalFlip flips with p=0.5 (its default).
  """
  crop_key, flip_key = jax.random.split(rng)
  offsets = jax.random.randint(crop_key, (batch_size, 2), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
  return offsets, flips


def crop_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array,
              padding: int) -> jax.Array:
  """Zero-pads by `padding`, crops back to the input size at `offsets`, flips.

  One gather: row i of output b is padded row offsets[b, 0] + i, and column j
  is padded column offsets[b, 1] + j, or + (width - 1 - j) where flipped.
  """
  batch, height, width, _ = images.shape
  # torchvision RandomCrop(padding=4) pads with fill=0 (black) by default.
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows = offsets[:, 0, None] + jnp.arange(height)
  cols = jnp.where(flips[:, None], jnp.arange(width)[::-1], jnp.arange(width))
  cols = cols + offsets[:, 1, None]
  return padded[jnp.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]


def eval_preprocess(images_u8: jax.Array, *, image_size: int, mean: Sequence[float],
                    std: Sequence[float]) -> jax.Array:
  """Bilinear resize to `image_size` (if needed), then (x/255 - mean) / std, float32."""
  x = images_u8.astype(jnp.float32)
  batch, height, width, channels = x.shape
  if (height, width) != (image_size, image_size):
    x = jax.image.resize(x, (batch, image_size, image_size, channels), 'bilinear')
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (x / 255.0 - mean) / std


def train_preprocess(images_u8: jax.Array, rng: jax.Array, *, image_size: int,
                     mean: Sequence[float], std: Sequence[float], padding: int,
                     augment: bool) -> jax.Array:
  """Random crop with zero padding and random flip (if `augment`), then eval_preprocess."""
  if augment:
    offsets, flips = sample_crop_flip(rng, images_u8.shape[0], padding)
    images_u8 = crop_flip(images_u8, offsets, flips, padding)
  return eval_preprocess(images_u8, image_size=image_size, mean=mean, std=std)
