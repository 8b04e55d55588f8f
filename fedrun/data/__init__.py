"""Data sets (digits, image folders, CelebA) and their partition among the clients."""

from fedrun.data.datasets import ImageDataset, build_datasets
from fedrun.data.partition import partition_indices, partition_summary

__all__ = ["ImageDataset", "build_datasets", "partition_indices", "partition_summary"]
