"""Client partitions: coverage, determinism and the skew each method promises."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedrun.config import make_section
from fedrun.data import partition_indices, partition_summary
from fedrun.errors import DataError

METHODS = ["iid", "dirichlet", "shards", "unbalanced"]


@pytest.fixture(scope="module")
def digit_labels() -> np.ndarray:
    return load_digits().target.astype(np.int64)


def _largest_class_share(parts, labels) -> np.ndarray:
    counts = np.array(partition_summary(parts, labels)["class_counts"], dtype=float)
    return counts.max(axis=1) / counts.sum(axis=1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_clients", [1, 2, 7, 10])
def test_every_sample_once_and_no_empty_client(method, num_clients, digit_labels):
    n = len(digit_labels)
    parts = partition_indices(digit_labels, n, num_clients, make_section("partition", method=method), seed=0)
    assert len(parts) == num_clients
    assert all(len(p) >= 1 for p in parts)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_from_seed(method, digit_labels):
    extra = {"alpha": 0.3} if method == "dirichlet" else {}
    n, cfg = len(digit_labels), make_section("partition", method=method, **extra)
    a = partition_indices(digit_labels, n, 5, cfg, seed=3)
    b = partition_indices(digit_labels, n, 5, cfg, seed=3)
    c = partition_indices(digit_labels, n, 5, cfg, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_small_alpha_is_skewed(digit_labels):
    parts = partition_indices(digit_labels, len(digit_labels), 10,
                              make_section("partition", method="dirichlet", alpha=0.05), seed=0)
    assert _largest_class_share(parts, digit_labels).mean() > 0.6


def test_dirichlet_large_alpha_is_near_uniform(digit_labels):
    parts = partition_indices(digit_labels, len(digit_labels), 4,
                              make_section("partition", method="dirichlet", alpha=1000.0), seed=0)
    assert _largest_class_share(parts, digit_labels).max() < 0.2


def test_dirichlet_tiny_alpha_many_clients_still_covers_everyone():
    labels = np.repeat(np.arange(3), 10)  # 3 classes, 30 samples, 25 clients: needs the fix-up
    parts = partition_indices(labels, 30, 25, make_section("partition", method="dirichlet", alpha=0.01), seed=1)
    assert all(len(p) >= 1 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(30))


def test_shards_two_per_client_hold_at_most_two_classes():
    labels = np.repeat(np.arange(10), 20)  # class sizes are multiples of the shard size (20)
    parts = partition_indices(labels, len(labels), 5,
                              make_section("partition", method="shards", shards_per_client=2), seed=0)
    for part in parts:
        assert len(np.unique(labels[part])) <= 2
    assert sorted(len(p) for p in parts) == [40] * 5


def test_shards_more_shards_than_samples():
    labels = np.arange(5)
    parts = partition_indices(labels, 5, 4, make_section("partition", method="shards", shards_per_client=3), seed=0)
    assert all(len(p) >= 1 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(5))


def test_unbalanced_sizes():
    sizes = [len(p) for p in partition_indices(
        None, 1000, 10, make_section("partition", method="unbalanced", unbalanced_sigma=1.0), seed=0)]
    assert sum(sizes) == 1000 and max(sizes) / min(sizes) > 2
    equal = [len(p) for p in partition_indices(
        None, 1003, 10, make_section("partition", method="unbalanced", unbalanced_sigma=0.0), seed=0)]
    assert sum(equal) == 1003 and max(equal) - min(equal) <= 1


def test_iid_and_unbalanced_work_without_labels():
    for method in ("iid", "unbalanced"):
        parts = partition_indices(None, 50, 3, make_section("partition", method=method), seed=0)
        assert sum(len(p) for p in parts) == 50


@pytest.mark.parametrize("method", ["dirichlet", "shards"])
def test_label_methods_need_labels(method):
    with pytest.raises(DataError, match=f"partition.method='{method}' needs labels"):
        partition_indices(None, 100, 4, make_section("partition", method=method), seed=0)


def test_more_clients_than_samples():
    with pytest.raises(DataError, match=r"5 training samples.*num_clients=6"):
        partition_indices(None, 5, 6, make_section("partition"), seed=0)


def test_label_length_mismatch():
    with pytest.raises(DataError, match="labels"):
        partition_indices(np.zeros(3, dtype=np.int64), 5, 2, make_section("partition"), seed=0)


def test_summary_adds_up(digit_labels):
    parts = partition_indices(digit_labels, len(digit_labels), 6,
                              make_section("partition", method="dirichlet", alpha=0.5), seed=0)
    summary = partition_summary(parts, digit_labels)
    assert summary["sizes"] == [len(p) for p in parts]
    counts = np.array(summary["class_counts"])
    assert counts.shape == (6, 10)
    np.testing.assert_array_equal(counts.sum(axis=1), summary["sizes"])
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(digit_labels))
    assert partition_summary(parts, None) == {"sizes": summary["sizes"], "class_counts": None}
