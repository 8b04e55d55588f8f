"""Image grids: many samples as one PNG (training grids, ``fedrun sample``, the LoRA demo)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1] -> one (rows*H, cols*W, 3) uint8 picture, upscaled ``scale``x."""
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    if c == 1:
        pixels = np.repeat(pixels, 3, axis=3)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top: top + h, left: left + w] = pixels[i]
    return grid


def save_grid(images: np.ndarray, path: Path, min_side: int = 256,
              columns: int | None = None) -> np.ndarray:
    """Write a PNG grid of ``images`` (square by default, or ``columns`` wide, e.g. one row per
    prompt); small images are upscaled (nearest) so the PNG is legible."""
    from PIL import Image

    side = images.shape[1]
    columns = columns or int(math.ceil(math.sqrt(len(images))))
    scale = max(1, min_side // (side * columns))
    grid = make_grid(images, columns=columns, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid).save(tmp, format="PNG")
    tmp.replace(path)
    return grid
