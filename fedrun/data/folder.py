"""Folders of images (``data.name: image_folder``, searched recursively) and CelebA
(``data.name: celeba``: img_align_celeba/ with its attribute table), centre-cropped and resized;
labels for label-skewed partitions from a CSV or CelebA's whitespace table."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from fedrun.data.base import (ImageDataset, ImageLoader, _check_headers, _decode_all, _drop_bad,
                              _fits_in_memory, list_image_files, split_indices)
from fedrun.errors import DataError
from fedrun.registry import DATASETS, require



@dataclass
class FolderParams:
    """Keys of the ``data`` section for image folders and CelebA."""

    root: Optional[str] = None
    """Folder of images (searched recursively); CelebA: the folder holding img_align_celeba/."""
    grayscale: bool = False
    """Convert to one channel."""
    center_crop: bool = True
    """Crop the largest centred square before resizing (CelebA: 178x178)."""
    labels_csv: Optional[str] = None
    """Optional CSV (or CelebA's whitespace list_attr_celeba.txt) giving a label per file."""
    label_column: Optional[str] = None
    """Column of labels_csv used as the label (e.g. 'Smiling' for CelebA)."""
    filename_column: str = "image_id"
    """Column of labels_csv holding the file name (relative to root, or the base name)."""
    skip_corrupt: bool = False
    """Skip unreadable image files (listed in a warning) instead of stopping with an error."""

    def __post_init__(self) -> None:
        require(bool(self.root), "root", "is required for a folder of images")
        if self.labels_csv is not None:
            require(bool(self.label_column), "label_column", "is required with data.labels_csv")


_CELEBA_ATTR_FILES = ("list_attr_celeba.csv", "list_attr_celeba.txt")


@DATASETS.register("image_folder", params=FolderParams)
@DATASETS.register("celeba", params=FolderParams)
def build_folder(cfg: Any, seed: int) -> Tuple[ImageDataset, ImageDataset]:
    """The split is made on the file listing (before any file is opened): unreadable files
    skipped with ``skip_corrupt`` leave their side of the split one image short."""
    root = _check_root(cfg.root)
    image_root = _celeba_image_root(root) if cfg.name == "celeba" else root
    listing = list_image_files(image_root)
    train, heldout = split_indices(len(listing), cfg.heldout_fraction, cfg.max_samples, seed)
    chosen = np.sort(np.concatenate([train, heldout]))
    rel_paths = [listing[i] for i in chosen]
    is_heldout = dict(zip(rel_paths, np.isin(chosen, heldout)))
    rel_paths = _drop_bad(image_root, rel_paths, _check_headers(image_root, rel_paths), cfg.skip_corrupt)
    labels, class_names = _folder_labels(cfg, root, image_root, rel_paths)
    loader = ImageLoader(cfg.image_size, cfg.grayscale, cfg.center_crop)
    if _fits_in_memory(len(rel_paths), loader):
        images, ok = _decode_all([str(image_root / p) for p in rel_paths], loader, cfg.skip_corrupt,
                                 image_root)
        rel_paths = [rel_paths[i] for i in ok]
        labels = None if labels is None else labels[ok]
        full = ImageDataset.from_tensor(images, labels, class_names=class_names, name=cfg.name)
    else:
        full = ImageDataset.from_files([str(image_root / p) for p in rel_paths], loader, labels,
                                       class_names=class_names, name=cfg.name)
    held = np.array([is_heldout[p] for p in rel_paths], dtype=bool)
    return full.subset(np.flatnonzero(~held)), full.subset(np.flatnonzero(held))


def _check_root(root: Optional[str]) -> Path:
    if not root:
        raise DataError("data.root is required for image folders")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data.root '{root}' does not exist")
    if not path.is_dir():
        raise DataError(f"data.root '{root}' is not a directory")
    return path


def _celeba_image_root(root: Path) -> Path:
    """The folder holding the CelebA images: root, root/img_align_celeba (Kaggle nests it twice)."""
    image_root = root
    for _ in range(2):
        if (image_root / "img_align_celeba").is_dir():
            image_root = image_root / "img_align_celeba"
    return image_root


# --------------------------------------------------------------------------- labels
def _folder_labels(cfg: Any, root: Path, image_root: Path,
                   rel_paths: List[str]) -> Tuple[Optional[np.ndarray], Optional[List[str]]]:
    """(int64 labels, class names) from the labels file, or (None, None) without one."""
    table = _labels_file(cfg, root, image_root)
    if table is None:
        return None, None
    by_name = read_label_column(table, cfg.label_column, cfg.filename_column)
    values = _match_labels(by_name, rel_paths, table)
    return encode_labels(values)


def _labels_file(cfg: Any, root: Path, image_root: Path) -> Optional[Path]:
    if cfg.labels_csv is not None:
        path = Path(cfg.labels_csv).expanduser()
        # A relative path is taken from the working directory, else from data.root.
        for candidate in (path, root / path):
            if candidate.is_file():
                return candidate
        raise DataError(f"data.labels_csv '{cfg.labels_csv}' does not exist")
    if cfg.name != "celeba" or not cfg.label_column:
        return None
    places = [root, root / "Anno", image_root, root.parent, root.parent / "Anno"]
    for place in places:
        for name in _CELEBA_ATTR_FILES:
            if (place / name).is_file():
                return place / name
    raise DataError(f"data.label_column='{cfg.label_column}' needs CelebA's attribute list: none of "
                    f"{', '.join(_CELEBA_ATTR_FILES)} found in {', '.join(str(p) for p in places)}; "
                    "set data.labels_csv")


def read_label_column(path: Path, label_column: str, filename_column: str) -> Dict[str, str]:
    """{file name as written in the table: label string} for one column of a labels file.

    Formats: a comma CSV with a header; a whitespace table with a header; CelebA's
    ``list_attr_celeba.txt`` (a count line, then attribute names without a file name header,
    then ``000001.jpg -1 1 ...``). A header one field shorter than the rows means that the first
    field of each row is the file name.
    """
    header, rows = _read_table(path)
    if rows and len(rows[0]) == len(header) + 1:
        name_at, columns = 0, [None] + header
    elif filename_column in header:
        name_at, columns = header.index(filename_column), header
    else:
        raise DataError(f"labels file '{path}' has no file name column '{filename_column}' "
                        f"(data.filename_column); columns: {', '.join(header)}")
    if label_column not in columns:
        available = [c for c in columns if c is not None and c != filename_column]
        raise DataError(f"labels file '{path}' has no column '{label_column}' (data.label_column); "
                        f"available columns: {', '.join(available)}")
    label_at = columns.index(label_column)
    out = {}
    for line_no, row in enumerate(rows, start=1):
        if len(row) != len(columns):
            raise DataError(f"labels file '{path}': data row {line_no} has {len(row)} fields, "
                            f"expected {len(columns)}")
        out[row[name_at].strip()] = row[label_at].strip()
    return out


def _read_table(path: Path) -> Tuple[List[str], List[List[str]]]:
    """(header, rows) of a comma CSV or whitespace table, CelebA's count line skipped."""
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels file '{path}': {exc}") from None
    if lines and lines[0].strip().isdigit():
        lines = lines[1:]  # CelebA's .txt files start with the number of rows
    if not lines:
        raise DataError(f"labels file '{path}' is empty")
    if "," in lines[0]:
        table = list(csv.reader(lines))
        return [h.strip() for h in table[0]], table[1:]
    return lines[0].split(), [ln.split() for ln in lines[1:]]


def _match_labels(by_name: Dict[str, str], rel_paths: List[str], table: Path) -> List[str]:
    """The label of each image, matched by relative path, else by base name."""
    by_path = {_norm(name): value for name, value in by_name.items()}
    by_base: Dict[str, Optional[str]] = {}
    for name, value in by_path.items():
        base = name.rsplit("/", 1)[-1]
        # A base name listed twice with different labels cannot identify an image.
        by_base[base] = value if by_base.get(base, value) == value else None
    values, missing = [], []
    for rel in rel_paths:
        value = by_path.get(rel)
        if value is None:
            value = by_base.get(rel.rsplit("/", 1)[-1])
        if value is None:
            missing.append(rel)
        values.append(value)
    if missing:
        raise DataError(f"{len(missing)} image(s) have no row in labels file '{table}' "
                        f"(matched by relative path or base name), e.g. '{missing[0]}'")
    return values


def _norm(name: str) -> str:
    name = name.replace("\\", "/")
    return name[2:] if name.startswith("./") else name


def encode_labels(values: List[str]) -> Tuple[np.ndarray, List[str]]:
    """Map the distinct label strings (sorted, numerically when all are numbers) to 0..k-1."""
    distinct = sorted(set(values))
    try:
        distinct.sort(key=float)
    except ValueError:
        pass  # not all numeric: keep the string order
    code = {v: i for i, v in enumerate(distinct)}
    return np.array([code[v] for v in values], dtype=np.int64), distinct
