"""Data sources and their partition among the clients.

One module per source, each registering a builder ``(data section, seed) -> (train, held-out)``
in ``fedrun.registry.DATASETS`` under its ``data.name`` (``digits``, ``image_folder``,
``celeba``, ``hf``), with its own keys as a ``Params`` dataclass; the partitioners
(``partition.method``) are in ``partition``.
"""

from __future__ import annotations

from typing import Any, Tuple

from fedrun.data.base import ImageDataset
from fedrun.data.partition import partition_indices, partition_summary
from fedrun.registry import DATASETS, load_plugins


def build_datasets(cfg: Any, seed: int) -> Tuple[ImageDataset, ImageDataset]:
    """(train, held-out) of the ``data`` section ``cfg``; deterministic from ``seed``.

    The held-out set does not depend on ``seed`` (``fedrun.data.base.split_indices``);
    ``max_samples`` keeps ``round(heldout_fraction * max_samples)`` of it and a seeded choice of
    training images."""
    load_plugins()  # the built-in sources register on import (no-op once loaded)
    return DATASETS.get(cfg.name, "data.name")(cfg, seed)


__all__ = ["ImageDataset", "build_datasets", "partition_indices", "partition_summary"]
