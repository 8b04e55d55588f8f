"""What every data source shares: ``ImageDataset`` (batches as float32 tensors in [-1, 1], shape
(B, C, H, W); small sets in memory, large folders decoded per batch), image decoding, and the
held-out split, which does not depend on the run's seed. Everything is deterministic, so that
every rank builds the same data set without communicating.
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from fedrun.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# Folders up to this many files are decoded once and kept as uint8 (20k 64x64 RGB = 245 MB) ...
IN_MEMORY_MAX_FILES = 20_000
# ... unless that would exceed this many bytes (large image_size): every rank holds its own copy.
IN_MEMORY_MAX_BYTES = 1 << 30
_MAX_LISTED = 10


@dataclass(frozen=True)
class ImageLoader:
    """Decodes one file into a (C, S, S) uint8 array: mode conversion, optional centre crop, resize."""

    image_size: int
    grayscale: bool = False
    center_crop: bool = True

    @property
    def num_channels(self) -> int:
        return 1 if self.grayscale else 3

    def __call__(self, path: str) -> np.ndarray:
        """Decode ``path``; any decoder failure becomes a DataError naming the file."""
        try:
            with Image.open(path) as img:
                img = _to_mode(img, "L" if self.grayscale else "RGB")
                if self.center_crop:
                    img = _center_square(img)
                img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
                arr = np.asarray(img, dtype=np.uint8)
        except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
            raise DataError(f"cannot decode image file '{path}': {exc}") from None
        return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    if img.mode.startswith("I;16"):
        # 16-bit greyscale: PIL's convert would clip at 255 instead of rescaling.
        img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257.0).round().astype(np.uint8))
    return img if img.mode == mode else img.convert(mode)


def _center_square(img: Image.Image) -> Image.Image:
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return img.crop((left, top, left + side, top + side))


class ImageDataset:
    """N images, float32 in [-1, 1], shape (C, H, W), optional int64 labels.

    Backed either by a tensor (float32 already in [-1, 1], or uint8 0..255) or by a list of files
    decoded on demand with ``loader``. Use ``from_tensor`` / ``from_files`` to build one.
    """

    def __init__(self, *, num_channels: int, image_size: int, images: Optional[torch.Tensor] = None,
                 files: Optional[Sequence[str]] = None, loader: Optional[ImageLoader] = None,
                 labels: Optional[np.ndarray] = None, class_names: Optional[List[str]] = None,
                 name: str = "images") -> None:
        if (images is None) == (files is None):
            raise ValueError("ImageDataset needs exactly one of images / files")
        if files is not None and loader is None:
            raise ValueError("ImageDataset(files=...) needs a loader")
        self.num_channels = num_channels
        self.image_size = image_size
        self.name = name
        self.class_names = class_names
        self._images = images
        self._files = list(files) if files is not None else None
        self._loader = loader
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and len(self.labels) != len(self):
            raise ValueError(f"{len(self.labels)} labels for {len(self)} images")

    @classmethod
    def from_tensor(cls, images: torch.Tensor, labels: Optional[np.ndarray] = None,
                    **kwargs) -> "ImageDataset":
        """In-memory data set from a (N, C, S, S) float32 [-1, 1] or uint8 tensor."""
        return cls(num_channels=images.shape[1], image_size=images.shape[-1], images=images,
                   labels=labels, **kwargs)

    @classmethod
    def from_files(cls, files: Sequence[str], loader: ImageLoader,
                   labels: Optional[np.ndarray] = None, **kwargs) -> "ImageDataset":
        """Lazy data set: each ``get_batch`` decodes its files with ``loader``."""
        return cls(num_channels=loader.num_channels, image_size=loader.image_size, files=files,
                   loader=loader, labels=labels, **kwargs)

    def __len__(self) -> int:
        return len(self._images) if self._images is not None else len(self._files)

    @property
    def in_memory(self) -> bool:
        return self._images is not None

    @property
    def files(self) -> Optional[List[str]]:
        """The image files of a lazy data set (None when in memory)."""
        return self._files

    def get_batch(self, indices) -> torch.Tensor:
        """(B, C, H, W) float32 in [-1, 1], in the order of ``indices`` (repeats allowed)."""
        idx = _as_index(indices, len(self))
        if self._images is not None:
            batch = self._images[torch.from_numpy(idx)]
            return batch if batch.dtype == torch.float32 else _uint8_to_unit(batch)
        arrays = _map_threads(self._loader, [self._files[i] for i in idx])
        if not arrays:
            return torch.empty((0, self.num_channels, self.image_size, self.image_size))
        return _uint8_to_unit(torch.from_numpy(np.stack(arrays)))

    def subset(self, indices) -> "ImageDataset":
        """A new data set holding the given images (and labels), in that order."""
        idx = _as_index(indices, len(self))
        return ImageDataset(
            num_channels=self.num_channels, image_size=self.image_size, name=self.name,
            images=None if self._images is None else self._images[torch.from_numpy(idx)],
            files=None if self._files is None else [self._files[i] for i in idx],
            loader=self._loader, class_names=self.class_names,
            labels=None if self.labels is None else self.labels[idx])

    def describe(self) -> str:
        """One line: name, size, shape, labels, storage."""
        c, s = self.num_channels, self.image_size
        if self.labels is None:
            labels = "unlabeled"
        else:
            labels = f"{len(self.class_names) if self.class_names else len(np.unique(self.labels))} classes"
        storage = "in memory" if self.in_memory else "decoded from disk per batch"
        return f"{self.name}: {len(self)} images {c}x{s}x{s}, {labels}, {storage}"

    def __repr__(self) -> str:
        return f"ImageDataset({self.describe()})"


def _as_index(indices, length: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    # Negative indices would silently wrap around; they are always a caller bug here.
    if idx.size and (idx.min() < 0 or idx.max() >= length):
        raise IndexError(f"index out of range for a data set of {length} images")
    return idx


def _uint8_to_unit(batch: torch.Tensor) -> torch.Tensor:
    return batch.to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)


# --------------------------------------------------------------------------- thread pool
_POOL: Dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """One decode pool per process: keyed by pid because a forked child inherits dead threads."""
    with _POOL_LOCK:
        pool = _POOL.get(os.getpid())
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                      thread_name_prefix="fedrun-decode")
            _POOL[os.getpid()] = pool
        return pool


def _map_threads(fn, items: list) -> list:
    """``[fn(x) for x in items]``, in threads when worth it (PIL releases the GIL while decoding)."""
    if len(items) < 4:
        return [fn(x) for x in items]
    return list(_pool().map(fn, items))


# --------------------------------------------------------------------------- building
#: Seed of the held-out (reference) split, fixed whatever the run's ``seed``: FID/KID of every
#: run is measured against the same images, and the shipped digits classifier
#: (``fedrun.eval.classifier``) is trained only on images outside the digits' reference split.
HELDOUT_SPLIT_SEED = 0


def split_indices(n: int, fraction: float, max_samples: Optional[int],
                  seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted (train, heldout) indices of ``n`` items.

    The reference split is the first ``round(fraction * n)`` items of a permutation seeded by
    ``HELDOUT_SPLIT_SEED`` alone. Without ``max_samples`` the held-out set is that split and
    training gets every other item; with ``max_samples = m < n`` the held-out set is the first
    ``round(fraction * m)`` items of the same permutation and training a ``seed``-chosen
    ``m - round(fraction * m)`` of the items outside the reference split, so no seed and no
    ``max_samples`` ever trains on a reference item of the same ``fraction``.
    """
    perm = np.random.default_rng([HELDOUT_SPLIT_SEED, 7]).permutation(n)
    n_reference = int(round(fraction * n))
    if max_samples is None or max_samples >= n:
        return np.sort(perm[n_reference:]), np.sort(perm[:n_reference])
    n_heldout = int(round(fraction * max_samples))
    pool = perm[n_reference:]
    chosen = np.random.default_rng([seed, 3]).permutation(len(pool))[:max_samples - n_heldout]
    return np.sort(pool[chosen]), np.sort(perm[:n_heldout])


def list_image_files(root: Path) -> List[str]:
    """Sorted relative POSIX paths of the image files under ``root`` (recursive).

    Hidden files and folders (``.git``, macOS ``._x.jpg`` resource forks) are skipped: they are
    never images of the data set and the resource forks would all count as corrupt.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in filenames
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise DataError(f"no image files found under '{root}' (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}, any case)")
    return sorted(found)


def _check_header(path: str) -> Optional[str]:
    try:
        with Image.open(path):
            return None  # only the header is read: cheap even for 200k files
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError, ...
        return f"{type(exc).__name__}: {exc}"


def _check_headers(image_root: Path, rel_paths: List[str]) -> Dict[str, str]:
    """{relative path: reason} for the files whose header PIL cannot read."""
    reasons = _map_threads(_check_header, [str(image_root / p) for p in rel_paths])
    return {p: r for p, r in zip(rel_paths, reasons) if r is not None}


def _drop_bad(image_root: Path, rel_paths: List[str], bad: Dict[str, str],
              skip: bool) -> List[str]:
    """Raise on unreadable files, or (``skip``) warn and drop them."""
    if not bad:
        return rel_paths
    listing = "; ".join(f"{image_root / p} ({r})" for p, r in list(bad.items())[:_MAX_LISTED])
    more = f"; ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    if not skip:
        raise DataError(f"{len(bad)} unreadable image file(s) under '{image_root}': {listing}{more}. "
                        "Remove them or set data.skip_corrupt=true to skip them")
    warnings.warn(f"skipping {len(bad)} unreadable image file(s): {listing}{more}", stacklevel=3)
    kept = [p for p in rel_paths if p not in bad]
    if not kept:
        raise DataError(f"every image file under '{image_root}' is unreadable")
    return kept


def _fits_in_memory(n: int, loader: ImageLoader) -> bool:
    nbytes = n * loader.num_channels * loader.image_size ** 2
    return n <= IN_MEMORY_MAX_FILES and nbytes <= IN_MEMORY_MAX_BYTES


def _decode_all(files: List[str], loader: ImageLoader, skip: bool,
                image_root: Path) -> Tuple[torch.Tensor, np.ndarray]:
    """Decode every file once: (uint8 tensor, indices of the files kept)."""

    def decode(path: str):
        try:
            return loader(path), None
        except DataError as exc:
            return None, str(exc)

    results = _map_threads(decode, files)
    rel_paths = [Path(f).relative_to(image_root).as_posix() for f in files]
    _drop_bad(image_root, rel_paths, {p: err for p, (_, err) in zip(rel_paths, results) if err}, skip)
    ok = np.array([i for i, (arr, _) in enumerate(results) if arr is not None], dtype=np.int64)
    return torch.from_numpy(np.stack([results[i][0] for i in ok])), ok


