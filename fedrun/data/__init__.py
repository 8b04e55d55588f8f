"""Data sources and their partition among the clients.

One module per source, each registering a builder ``(data section, seed) -> (train, held-out)``
in ``fedrun.registry.DATASETS`` under its ``data.name`` (``digits``, ``image_folder``,
``celeba``, ``hf``), with its own keys as a ``Params`` dataclass; the partitioners
(``partition.method``) are in ``partition``.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from fedrun.data.base import ImageDataset
from fedrun.data.partition import partition_indices, partition_summary
from fedrun.registry import DATASETS, load_plugins


def build_datasets(cfg: Any, seed: int) -> Tuple[ImageDataset, ImageDataset]:
    """(train, held-out) of the ``data`` section ``cfg``; deterministic from ``seed``.

    The held-out set does not depend on ``seed`` (``fedrun.data.base.split_indices``);
    ``max_samples`` keeps ``round(heldout_fraction * max_samples)`` of it and a seeded choice of
    training images."""
    load_plugins()  # the built-in sources register on import (no-op once loaded)
    train, heldout = DATASETS.get(cfg.name, "data.name")(cfg, seed)
    classes = getattr(cfg, "classes", None)
    return (train, heldout) if classes is None else keep_classes(train, heldout, classes, cfg.name)


def keep_classes(train: ImageDataset, heldout: ImageDataset, classes, source: str
                 ) -> Tuple[ImageDataset, ImageDataset]:
    """``data.classes``: the images of those labels only, in both sets (the held-out images are
    the same split, filtered)."""
    from fedrun.errors import DataError

    if train.labels is None:
        raise DataError(f"config key 'data.classes': data.name={source} has no labels "
                        "(the digits have them; an image folder needs data.labels_csv)")
    present = set(train.labels.tolist()) | set(heldout.labels.tolist() if heldout.labels is not None else [])
    missing = sorted(set(classes) - present)
    if missing:
        raise DataError(f"config key 'data.classes': no image has label(s) {missing} in "
                        f"data.name={source} (labels present: {sorted(present)})")
    kept = [data.subset(np.flatnonzero(np.isin(data.labels, list(classes)))) if data.labels is not None
            else data for data in (train, heldout)]
    return kept[0], kept[1]


__all__ = ["ImageDataset", "build_datasets", "partition_indices", "partition_summary"]
