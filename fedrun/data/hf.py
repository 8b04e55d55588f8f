"""Hugging Face ``datasets`` data sets (``data.name: hf``): a Hub data set, or a local folder that
``datasets.load_dataset`` reads (parquet/arrow/csv files, an ``imagefolder`` layout) or that
``Dataset.save_to_disk`` wrote -- the inputs of diffusers' training scripts (``--dataset_name``,
``--dataset_config_name``, ``--train_data_dir``, ``--image_column``, ``--caption_column``).

An image column and an optional label column are read; the images are decoded with PIL by the
rules of every fedrun source (``fedrun.data.base.ImageLoader``: mode, centre crop, resize), the
held-out split is ``split_indices``' (the same for every seed), and a set too large for memory is
decoded per batch from the Arrow table (memory-mapped, not copied). ``datasets`` is imported only
when this source builds a data set: importing it costs a rank some 2.5 s.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from fedrun.data.base import ImageDataset, ImageLoader, _fits_in_memory, _map_threads, split_indices
from fedrun.data.folder import encode_labels
from fedrun.errors import DataError
from fedrun.registry import DATASETS, require

#: value types of a column that ``datasets.Image`` can read: file paths or encoded image bytes
_IMAGE_VALUE_TYPES = ("string", "large_string", "binary", "large_binary")


@dataclass
class HFParams:
    """Keys of the ``data`` section for a Hugging Face ``datasets`` data set."""

    path: Optional[str] = None
    """A Hub data set ('huggan/smithsonian_butterflies_subset'), a packaged loader ('imagefolder',
    'parquet', with data_dir/data_files), or a local folder: files ``load_dataset`` reads, or a
    folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (detected)."""
    config_name: Optional[str] = None
    """The data set's configuration (``load_dataset``'s ``name``; diffusers' --dataset_config_name)."""
    split: str = "train"
    """The split to use (its held-out share is data.heldout_fraction). A folder holding one saved
    ``Dataset`` (not a ``DatasetDict``) has no splits: it is used whole whatever this says."""
    image_column: str = "image"
    """Column of the images: an ``Image`` feature, or file paths or encoded bytes."""
    label_column: Optional[str] = None
    """Optional column of class labels (e.g. 'label'), for label-skewed partitions and
    class-conditional tasks: a ``ClassLabel`` keeps its names, other values are numbered in
    sorted order (numerically when all are numbers)."""
    grayscale: bool = False
    """Convert to one channel."""
    center_crop: bool = True
    """Crop the largest centred square before resizing."""
    data_dir: Optional[str] = None
    """``load_dataset``'s data_dir: a sub-folder of the data set, or the folder of a packaged
    loader (``path: imagefolder``, as diffusers' --train_data_dir)."""
    data_files: Optional[List[str]] = None
    """``load_dataset``'s data_files: files or glob patterns (relative to a local path); they
    form the split 'train'."""
    cache_dir: Optional[str] = None
    """Where ``datasets`` keeps downloads and prepared Arrow files (default: HF_DATASETS_CACHE)."""
    revision: Optional[str] = None
    """A Hub data set's branch, tag or commit: pin it for a reproducible run."""

    def __post_init__(self) -> None:
        require(bool(self.path), "path", "is required: a Hub data set name (owner/name) or a "
                                         "local folder")
        require(bool(self.split), "split", "must name a split, e.g. 'train'")
        require(bool(self.image_column), "image_column", "must name the column of the images")
        require(self.data_files is None or len(self.data_files) > 0, "data_files",
                "must list at least one file or pattern (or be left unset)")


@DATASETS.register("hf", params=HFParams)
def build_hf(cfg: Any, seed: int) -> Tuple[ImageDataset, ImageDataset]:
    """One split of a Hugging Face ``datasets`` data set (Hub or local), as diffusers' training
    scripts read it: an image column, optionally a label column. The held-out split is made on
    the rows before any image is decoded, so ``max_samples`` decodes only the rows it keeps."""
    datasets = _import_datasets()
    table = _load_split(datasets, cfg)
    if len(table) == 0:
        raise DataError(f"data.path '{cfg.path}': split '{cfg.split}' has no rows")
    labels, class_names = _labels(datasets, table, cfg)
    decoder = RowDecoder(_image_rows(datasets, table, cfg), cfg.image_column,
                         ImageLoader(cfg.image_size, cfg.grayscale, cfg.center_crop), cfg.path)
    train, heldout = split_indices(len(table), cfg.heldout_fraction, cfg.max_samples, seed)
    rows = np.sort(np.concatenate([train, heldout]))
    full = _rows_dataset(decoder, rows, None if labels is None else labels[rows], class_names,
                         cfg.path)
    held = np.isin(rows, heldout)
    return full.subset(np.flatnonzero(~held)), full.subset(np.flatnonzero(held))


def _rows_dataset(decoder: "RowDecoder", rows: np.ndarray, labels: Optional[np.ndarray],
                  class_names: Optional[List[str]], name: str) -> ImageDataset:
    """The images of ``rows``: decoded once and kept as uint8 when they fit in memory (the
    limits of image folders), else decoded per batch."""
    if _fits_in_memory(len(rows), decoder.loader):
        images = torch.from_numpy(np.stack(_map_threads(decoder, rows.tolist())))
        return ImageDataset.from_tensor(images, labels, class_names=class_names, name=name)
    # the "files" of this lazy ImageDataset are row numbers, which the decoder reads
    return ImageDataset.from_files(rows.tolist(), decoder, labels, class_names=class_names,
                                   name=name)


def _import_datasets():
    """``datasets``, imported here only: it costs 2.5 s, which runs on other sources skip."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"data.name 'hf' needs the Hugging Face 'datasets' package, which cannot "
                        f"be imported ({exc}): pip install 'fedrun[hf]' (or pip install datasets)"
                        ) from None
    return datasets


# --------------------------------------------------------------------------- loading
def _load_split(datasets, cfg: Any):
    """The ``datasets.Dataset`` of ``cfg.split``: from a saved folder or ``load_dataset``."""
    local = _local_folder(cfg.path)
    if local is not None and _saved_to_disk(datasets, local):
        loaded = datasets.load_from_disk(str(local))
    else:
        loaded = _load_dataset(datasets, cfg, local)
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if cfg.split not in loaded:
        raise DataError(f"data.split '{cfg.split}': data set '{cfg.path}' has no such split; its "
                        f"splits: {', '.join(loaded)}")
    return loaded[cfg.split]


def _local_folder(path: str) -> Optional[Path]:
    """``path`` as an existing local folder, None for a Hub (or packaged loader) name; a name
    that can only be a local path (absolute, ./, ~/, several slashes) must exist."""
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise DataError(f"data.path '{path}' is a file: give the folder holding it (with "
                            "data.data_files to choose files)")
        return folder
    hub_like = not folder.is_absolute() and not path.startswith((".", "~")) and path.count("/") <= 1
    if not hub_like:
        raise DataError(f"data.path '{path}' does not exist")
    return None


def _saved_to_disk(datasets, folder: Path) -> bool:
    """Whether ``folder`` was written by ``save_to_disk`` (the files ``load_from_disk`` checks)."""
    config = datasets.config
    return ((folder / config.DATASET_STATE_JSON_FILENAME).is_file()
            and (folder / config.DATASET_INFO_FILENAME).is_file()
            or (folder / config.DATASETDICT_JSON_FILENAME).is_file())


def _load_dataset(datasets, cfg: Any, local: Optional[Path]):
    """Every split of ``load_dataset(path, config_name, ...)``, its errors named by data key."""
    try:
        return datasets.load_dataset(
            str(local) if local is not None else cfg.path, cfg.config_name, data_dir=cfg.data_dir,
            data_files=list(cfg.data_files) if cfg.data_files else None, cache_dir=cfg.cache_dir,
            revision=cfg.revision)
    except ConnectionError as exc:  # not on the Hub, or the Hub cannot be reached
        raise DataError(_unreachable(datasets, cfg, exc)) from None
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        keys = [f"data.{key}={getattr(cfg, key)!r}" for key in
                ("config_name", "data_dir", "data_files", "revision") if getattr(cfg, key)]
        raise DataError(f"data.path '{cfg.path}'" + (f" ({', '.join(keys)})" if keys else "")
                        + f": datasets.load_dataset failed: {type(exc).__name__}: {exc}") from None


def _unreachable(datasets, cfg: Any, exc: Exception) -> str:
    where = Path(cfg.path).expanduser().absolute()
    message = (f"data.path '{cfg.path}' is not a local folder (no {where}) and cannot be loaded "
               f"from the Hugging Face Hub ({exc})")
    if datasets.config.HF_DATASETS_OFFLINE:  # datasets >= 2.19: HF_HUB_OFFLINE too
        return (message + ". Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): only a data set "
                "already in the cache loads (data.cache_dir, else HF_DATASETS_CACHE = "
                f"{datasets.config.HF_DATASETS_CACHE}); load it once online, or save it to a "
                "local folder (save_to_disk) and set data.path to that folder")
    return message + ". Check the name, the network, or set data.path to a local folder"


# --------------------------------------------------------------------------- columns
def _require_column(table, column: str, key: str, cfg: Any) -> None:
    if column not in table.column_names:
        raise DataError(f"data.{key}: column '{column}' is not in split '{cfg.split}' of "
                        f"'{cfg.path}'; its columns: {', '.join(table.column_names)}")


def _image_rows(datasets, table, cfg: Any):
    """The image column alone, undecoded (``{'bytes', 'path'}`` per row): fedrun decodes it
    with ImageLoader, as every source does, instead of ``datasets``' own PIL conversion."""
    column = cfg.image_column
    _require_column(table, column, "image_column", cfg)
    feature = table.features[column]
    readable = isinstance(feature, datasets.Image) or (
        isinstance(feature, datasets.Value) and feature.dtype in _IMAGE_VALUE_TYPES)
    if not readable:
        raise DataError(f"data.image_column: column '{column}' of '{cfg.path}' does not hold "
                        f"images: its feature is {feature} (expected Image, or file paths or "
                        f"encoded bytes); columns: {', '.join(table.column_names)}")
    return table.select_columns([column]).cast_column(column, datasets.Image(decode=False))


def _labels(datasets, table, cfg: Any) -> Tuple[Optional[np.ndarray], Optional[List[str]]]:
    """(int64 label per row, class names), or (None, None) without data.label_column."""
    column = cfg.label_column
    if column is None:
        return None, None
    _require_column(table, column, "label_column", cfg)
    feature = table.features[column]
    values = list(table[column])
    unlabeled = [row for row, value in enumerate(values) if value is None or (
        isinstance(feature, datasets.ClassLabel) and value < 0)]
    if unlabeled:
        raise DataError(f"data.label_column: {len(unlabeled)} row(s) of column '{column}' of "
                        f"'{cfg.path}' have no label, e.g. row {unlabeled[0]}")
    if isinstance(feature, datasets.ClassLabel):
        return np.asarray(values, dtype=np.int64), list(feature.names)
    if not isinstance(feature, datasets.Value):
        raise DataError(f"data.label_column: column '{column}' of '{cfg.path}' cannot be a class "
                        f"label: its feature is {feature} (expected ClassLabel, numbers or strings)")
    return encode_labels([str(value) for value in values])


@dataclass(frozen=True)
class RowDecoder:
    """Decodes the image of one row with ``loader`` (ImageLoader's rules): what a lazy
    ``ImageDataset`` calls on its "files", here row numbers of the memory-mapped table."""

    rows: Any  # datasets.Dataset: the image column alone, undecoded ({'bytes', 'path'})
    column: str
    loader: ImageLoader
    source: str

    @property
    def num_channels(self) -> int:
        return self.loader.num_channels

    @property
    def image_size(self) -> int:
        return self.loader.image_size

    def __call__(self, row: int) -> np.ndarray:
        value = self.rows[int(row)][self.column]
        where = f"row {row} of column '{self.column}' of '{self.source}'"
        if value is None or (value["bytes"] is None and not value["path"]):
            raise DataError(f"{where} holds no image")
        if value["bytes"] is None:  # a local file (imagefolder): errors name it
            return self.loader(value["path"])
        return self.loader(_EncodedImage(value["bytes"], where))


class _EncodedImage(io.BytesIO):
    """An image file held in a row, which ``ImageLoader`` opens like a path (PIL reads file
    objects); it reads as its row, so the loader's errors name the row."""

    def __init__(self, data: bytes, where: str):
        super().__init__(data)
        self.where = where

    def __str__(self) -> str:
        return self.where

    __repr__ = __str__
