"""Image grids as PNG files, for samples people look at."""

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps float images in [-1, 1] (or uint8 as is) to uint8 in [0, 255]."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None,
               padding: int = 2, pad_value: int = 255) -> np.ndarray:
  """Tiles images into one picture.

  Args:
    images: `[N, H, W, C]` with C in {1, 3}, float in [-1, 1] or uint8.
    columns: images per row; defaults to `ceil(sqrt(N))`.
    padding: pixels between tiles and around the border.
    pad_value: grey level of the padding.

  Returns:
    uint8 `[rows * (H + p) + p, columns * (W + p) + p, C]`.
  """
  images = to_uint8(images)
  if images.ndim != 4:
    raise ValueError(f'Expected images [N, H, W, C], got {images.shape}.')
  num, height, width, channels = images.shape
  columns = columns or math.ceil(math.sqrt(num))
  rows = math.ceil(num / columns)
  grid = np.full((rows * (height + padding) + padding,
                  columns * (width + padding) + padding, channels),
                 pad_value, np.uint8)
  for i in range(num):
    top = padding + (i // columns) * (height + padding)
    left = padding + (i % columns) * (width + padding)
    grid[top:top + height, left:left + width] = images[i]
  return grid


def save_png(picture: np.ndarray, path: str, scale: int = 1) -> str:
  """Writes a uint8 `[H, W, C]` picture as PNG, optionally enlarged.

  Args:
    picture: uint8 `[H, W, 1]` or `[H, W, 3]`.
    path: output file; its folder is created.
    scale: integer enlargement with nearest-neighbour sampling.

  Returns:
    `path`.
  """
  picture = np.asarray(picture)
  if picture.shape[-1] == 1:
    picture = picture[..., 0]
  image = Image.fromarray(picture)
  if scale > 1:
    image = image.resize((image.width * scale, image.height * scale),
                         Image.NEAREST)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image.save(path)
  return path


def side_by_side(left: np.ndarray, right: np.ndarray,
                 gap: int = 8) -> np.ndarray:
  """Places two uint8 pictures `[H, W, C]` next to each other."""
  height = max(left.shape[0], right.shape[0])
  channels = left.shape[2]
  out = np.full((height, left.shape[1] + gap + right.shape[1], channels), 255,
                np.uint8)
  out[:left.shape[0], :left.shape[1]] = left
  out[:right.shape[0], left.shape[1] + gap:] = right
  return out
