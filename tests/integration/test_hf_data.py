"""data.name=hf: a Hugging Face ``datasets`` data set made here from the digits (a ClassLabel
column with names), written as the Hub's parquet layout that ``load_dataset(path)`` reads, with
``save_to_disk``, and as an imagefolder; read back offline; then a short federated run on it, in
this process and under torchrun with 2 ranks (bit-identical final weights)."""

import os

# datasets reads these once, when it is imported: set them first
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
import sys
import time

import datasets  # the test extra installs it (setup.cfg): these tests run, never skip
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import run_cli, tiny
from fedrun.config import load_config, make_section
from fedrun.data import build_datasets, partition_indices, partition_summary
from fedrun.data.base import ImageLoader, split_indices
from fedrun.data.digits import load_digits_arrays
from fedrun.errors import ConfigError, DataError

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
N_TRAIN, N_TEST = 300, 40


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The first 340 digits as uint8 8x8 images, split train (300) / test (40), on disk three
    ways: parquet files in the Hub's layout, a saved DatasetDict, a saved Dataset (train)."""
    root = tmp_path_factory.mktemp("hf")
    images, labels = load_digits_arrays()
    pixels = np.round(images[:N_TRAIN + N_TEST] * 255.0 / 16.0).astype(np.uint8)
    labels = labels[:N_TRAIN + N_TEST]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=NAMES)})
    splits = {"train": slice(0, N_TRAIN), "test": slice(N_TRAIN, None)}
    table = datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {"image": [Image.fromarray(p) for p in pixels[rows]], "label": labels[rows].tolist()},
            features=features)
        for split, rows in splits.items()})
    (root / "parquet" / "data").mkdir(parents=True)
    for split, part in table.items():
        part.to_parquet(str(root / "parquet" / "data" / f"{split}-00000-of-00001.parquet"))
    table.save_to_disk(str(root / "saved"))
    table["train"].save_to_disk(str(root / "saved_train"))
    return {"root": root, "parquet": root / "parquet", "saved": root / "saved",
            "saved_train": root / "saved_train", "cache": root / "cache",
            "pixels": pixels, "labels": labels}


def _build(source, path=None, seed=0, **keys):
    values = dict(name="hf", path=str(path or source["parquet"]), image_size=8, grayscale=True,
                  label_column="label", cache_dir=str(source["cache"]))
    return build_datasets(make_section("data", **{**values, **keys}), seed)


def _expected(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, 8, 8) as fedrun's float32 [-1, 1] batches (N, 1, 8, 8); at the images' own size
    ImageLoader's crop and resize leave them unchanged."""
    return torch.from_numpy(pixels[:, None]).to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)


def _everything(data) -> torch.Tensor:
    return data.get_batch(np.arange(len(data)))


# --------------------------------------------------------------------------- reading
def test_parquet_folder_gives_the_train_split_its_labels_and_class_names(source):
    train, heldout = _build(source)
    assert (len(train), len(heldout)) == (270, 30)
    assert (train.num_channels, train.image_size) == (1, 8)
    assert train.class_names == NAMES and heldout.class_names == NAMES
    train_rows, heldout_rows = split_indices(N_TRAIN, 0.1, None, seed=0)
    for data, rows in ((train, train_rows), (heldout, heldout_rows)):
        assert torch.equal(_everything(data), _expected(source["pixels"][rows]))
        np.testing.assert_array_equal(data.labels, source["labels"][rows])


def test_saved_to_disk_reads_the_same_data(source):
    train, heldout = _build(source)
    for path in (source["saved"], source["saved_train"]):
        other_train, other_heldout = _build(source, path)
        assert torch.equal(_everything(other_train), _everything(train))
        assert torch.equal(_everything(other_heldout), _everything(heldout))
        np.testing.assert_array_equal(other_train.labels, train.labels)
        assert other_train.class_names == NAMES


def test_split_and_color_keys(source):
    train, heldout = _build(source, split="test", grayscale=False, heldout_fraction=0.0)
    assert (len(train), len(heldout)) == (N_TEST, 0)
    batch = _everything(train)
    assert batch.shape == (N_TEST, 3, 8, 8)
    assert torch.equal(batch, _expected(source["pixels"][N_TRAIN:]).expand(-1, 3, -1, -1))
    np.testing.assert_array_equal(train.labels, source["labels"][N_TRAIN:])


def test_heldout_split_does_not_depend_on_the_seed_and_max_samples(source):
    a_train, a_held = _build(source, seed=0)
    b_train, b_held = _build(source, seed=1)
    assert torch.equal(_everything(a_held), _everything(b_held))
    assert torch.equal(_everything(a_train), _everything(b_train))  # no max_samples: all the rest
    small = {seed: _build(source, seed=seed, max_samples=100) for seed in (0, 1)}
    assert [(len(t), len(h)) for t, h in small.values()] == [(90, 10), (90, 10)]
    assert torch.equal(_everything(small[0][1]), _everything(small[1][1]))
    assert not torch.equal(_everything(small[0][0]), _everything(small[1][0]))
    train_rows, heldout_rows = split_indices(N_TRAIN, 0.1, 100, seed=0)  # decoded: these rows only
    for data, rows in zip(small[0], (train_rows, heldout_rows)):
        assert torch.equal(_everything(data), _expected(source["pixels"][rows]))
        np.testing.assert_array_equal(data.labels, source["labels"][rows])
    # the held-out images of max_samples are images of the full held-out split
    full_heldout = {row.numpy().tobytes() for row in _everything(a_held)}
    assert all(row.numpy().tobytes() in full_heldout for row in _everything(small[0][1]))


def test_lazy_decoding_per_batch_equals_in_memory(source, monkeypatch):
    in_memory, _ = _build(source)
    import fedrun.data.base

    monkeypatch.setattr(fedrun.data.base, "IN_MEMORY_MAX_FILES", 10)  # 270 images: too many
    lazy, _ = _build(source)
    assert in_memory.in_memory and not lazy.in_memory
    rows = np.array([5, 0, 269, 5])
    assert torch.equal(lazy.get_batch(rows), in_memory.get_batch(rows))
    np.testing.assert_array_equal(lazy.labels, in_memory.labels)


def test_imagefolder_layout_decodes_with_image_loader_rules(tmp_path, source):
    """Class sub-folders of non-square RGB files (diffusers' --train_data_dir): labels named by
    the folders, each image centre-cropped and resized exactly as ImageLoader does."""
    rng = np.random.default_rng(0)
    files = []
    for kind in ("cats", "dogs"):
        (tmp_path / "photos" / kind).mkdir(parents=True)
        for i in range(4):
            files.append(tmp_path / "photos" / kind / f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(files[-1])
    train, heldout = _build(source, tmp_path / "photos", grayscale=False, heldout_fraction=0.0)
    assert train.class_names == ["cats", "dogs"] and sorted(train.labels.tolist()) == [0] * 4 + [1] * 4
    loader = ImageLoader(image_size=8)
    expected = {_expected_rgb(loader(str(f))): int("dogs" in str(f)) for f in files}
    got = {row.numpy().tobytes(): int(label) for row, label in zip(_everything(train), train.labels)}
    assert got == expected


def _expected_rgb(array: np.ndarray) -> bytes:
    return torch.from_numpy(array).to(torch.float32).mul_(2.0 / 255.0).sub_(1.0).numpy().tobytes()


def test_dirichlet_partition_uses_the_labels(source):
    train, _ = _build(source)
    skewed = partition_indices(train.labels, len(train), 4,
                               make_section("partition", method="dirichlet", alpha=0.05), seed=0)
    counts = partition_summary(skewed, train.labels)["class_counts"]
    # alpha 0.05: most classes go (almost) whole to one client, so some client lacks some class
    assert any(0 in client for client in counts) and sum(map(sum, counts)) == len(train)
    unlabelled, _ = _build(source, label_column=None)
    assert unlabelled.labels is None
    with pytest.raises(DataError, match="needs labels"):
        partition_indices(None, len(unlabelled), 4, make_section("partition", method="dirichlet"), 0)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("keys, message", [
    ({"image_column": "pixels"}, r"data\.image_column: column 'pixels' is not in .*: image, label"),
    ({"label_column": "digit"}, r"data\.label_column: column 'digit' is not in .*: image, label"),
    ({"image_column": "label"}, r"data\.image_column: column 'label' .* does not hold images"),
    ({"split": "validation"}, r"data\.split 'validation'.*its splits: train, test"),
    ({"config_name": "large"}, r"data\.config_name='large'.*BuilderConfig 'large' not found"),
], ids=["image_column", "label_column", "not_images", "split", "config_name"])
def test_bad_keys_are_errors_naming_them(source, keys, message):
    with pytest.raises(DataError, match=message):
        _build(source, **keys)


def test_missing_local_path_is_an_error_naming_it(source, tmp_path):
    with pytest.raises(DataError, match=r"data\.path '.*nowhere' does not exist"):
        _build(source, tmp_path / "nowhere")


def test_uncached_hub_dataset_offline_fails_at_once_saying_why(source):
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"'huggan/smithsonian_butterflies_subset' is not a local "
                                        r"folder.*Offline \(HF_HUB_OFFLINE"):
        _build(source, "huggan/smithsonian_butterflies_subset")
    assert time.perf_counter() - started < 10  # no network retries


def test_path_is_required():
    with pytest.raises(ConfigError, match=r"config key 'data\.path': is required"):
        make_section("data", name="hf")


def test_unreadable_image_bytes_name_their_row(source, tmp_path):
    raw = source["pixels"][0].tobytes()  # pixels without a file format: not an image file
    good = _png_bytes(source["pixels"][0])
    table = datasets.Dataset.from_dict({"image": [good, good, raw]},
                                       features=datasets.Features({"image": datasets.Value("binary")}))
    table.save_to_disk(str(tmp_path / "bytes"))
    with pytest.raises(DataError, match=r"row 2 of column 'image' of '.*bytes'"):
        _build(source, tmp_path / "bytes", label_column=None, heldout_fraction=0.0)


def _png_bytes(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_without_datasets_installed_the_error_says_how_to_install(source, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(DataError, match=r"pip install 'fedrun\[hf\]'"):
        _build(source)


# --------------------------------------------------------------------------- training
def _run_keys(source, cache):
    return ["data.name=hf", f"data.path={source['parquet']}", "data.grayscale=true",
            "data.label_column=label", f"data.cache_dir={cache}", "num_clients=4",
            "partition.method=dirichlet", "partition.alpha=0.3", "rounds=2", "local_steps=2",
            "checkpoint.every=1", "sample.every=0"]


@pytest.fixture(scope="module")
def one_process_run(source, tmp_path_factory):
    from fedrun.engine import simulator

    out = tmp_path_factory.mktemp("hf_runs") / "ws1"
    simulator.run(load_config(None, tiny(out, *_run_keys(source, source["cache"]))))
    return out


def _final_weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "round_00002" / "model.safetensors"))


def test_fedrun_train_on_an_hf_dataset(one_process_run, source):
    assert _final_weights(one_process_run)
    # TINY's max_samples=240: 24 held out, 216 training images split by their labels
    counts = json.loads((one_process_run / "partition.json").read_text())["class_counts"]
    assert len(counts) == 4 and sum(map(sum, counts)) == 216 and len(counts[0]) == 10


@pytest.mark.slow
def test_two_torchrun_ranks_equal_one_process(one_process_run, source, tmp_path):
    # a fresh cache: both ranks prepare the parquet files' Arrow cache at the same time
    out = tmp_path / "ws2"
    proc = run_cli(["train", *tiny(out, *_run_keys(source, tmp_path / "cache"))], torchrun_nproc=2,
                   env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _final_weights(one_process_run), _final_weights(out)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
