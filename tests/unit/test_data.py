"""Data sets: digits, image folders (crop, grayscale, corrupt files, labels), CelebA layout."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from fedrun.config import DataConfig, make_section
from fedrun.data import ImageDataset, build_datasets
from fedrun.data.base import ImageLoader
from fedrun.errors import DataError


# --------------------------------------------------------------------------- digits
def test_digits_defaults():
    train, heldout = build_datasets(DataConfig(), seed=0)
    assert len(train) + len(heldout) == 1797
    assert len(heldout) == round(0.1 * 1797)
    assert (train.num_channels, train.image_size) == (1, 16)
    batch = train.get_batch(np.arange(len(train)))
    assert batch.shape == (len(train), 1, 16, 16) and batch.dtype == torch.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    assert train.labels.dtype == np.int64 and set(train.labels.tolist()) == set(range(10))
    assert len(heldout.labels) == len(heldout)


def test_digits_native_size_is_exact_scaling():
    train, heldout = build_datasets(DataConfig(image_size=8, heldout_fraction=0.0), seed=0)
    assert len(heldout) == 0 and heldout.get_batch([]).shape == (0, 1, 8, 8)
    expected = torch.from_numpy(load_digits().images[:5].astype(np.float32) / 16 * 2 - 1)
    torch.testing.assert_close(train.get_batch(range(5))[:, 0], expected)


def test_digits_split_is_deterministic_and_the_reference_does_not_depend_on_the_seed():
    a_train, a_held = build_datasets(DataConfig(), seed=5)
    b_train, b_held = build_datasets(DataConfig(), seed=5)
    c_train, c_held = build_datasets(DataConfig(), seed=6)
    assert torch.equal(a_held.get_batch(range(len(a_held))), b_held.get_batch(range(len(b_held))))
    np.testing.assert_array_equal(a_train.labels, b_train.labels)
    # the held-out (reference) split is fixed (HELDOUT_SPLIT_SEED); without max_samples so is training
    assert torch.equal(a_held.get_batch(range(len(a_held))), c_held.get_batch(range(len(c_held))))
    assert torch.equal(a_train.get_batch(range(len(a_train))), c_train.get_batch(range(len(c_train))))


def test_digits_max_samples():
    train, heldout = build_datasets(DataConfig(max_samples=100), seed=0)
    assert (len(train), len(heldout)) == (90, 10)
    # the seed chooses the training images, never among the full reference split's
    _, reference = build_datasets(DataConfig(), seed=0)
    reference_rows = {row.numpy().tobytes() for row in reference.get_batch(range(len(reference)))}
    other, other_heldout = build_datasets(DataConfig(max_samples=100), seed=1)
    assert not torch.equal(train.get_batch(range(90)), other.get_batch(range(90)))
    assert torch.equal(heldout.get_batch(range(10)), other_heldout.get_batch(range(10)))
    for data, inside in ((train, False), (other, False), (heldout, True)):
        assert all((row.numpy().tobytes() in reference_rows) == inside
                   for row in data.get_batch(range(len(data))))


def test_digits_classes_keep_those_labels_in_both_sets_and_the_same_held_out_images():
    """data.classes: public 0-4 and private 5-9 split the digits; each keeps its classes' images
    of the unfiltered split, in training and in the reference, so no held-out image trains."""
    full_train, full_held = build_datasets(DataConfig(image_size=8), seed=0)
    public = build_datasets(DataConfig(image_size=8, classes=[0, 1, 2, 3, 4]), seed=0)
    private = build_datasets(DataConfig(image_size=8, classes=[5, 6, 7, 8, 9]), seed=0)
    for (train, held), wanted in ((public, set(range(5))), (private, set(range(5, 10)))):
        assert set(train.labels.tolist()) == wanted and set(held.labels.tolist()) == wanted
    for part in (0, 1):  # together the two filtered halves are the unfiltered set, image by image
        full = (full_train, full_held)[part]
        rows = lambda data: sorted(r.numpy().tobytes() for r in data.get_batch(range(len(data))))  # noqa: E731
        assert len(public[part]) + len(private[part]) == len(full)
        assert sorted(rows(public[part]) + rows(private[part])) == rows(full)
    assert len(private[0]) == int(np.isin(full_train.labels, range(5, 10)).sum())


@pytest.mark.parametrize("classes, says", [([], "non-empty list"), ([3, 3], "distinct"),
                                           ([-1], "labels >= 0")])
def test_digits_classes_refuses_a_bad_list(classes, says):
    from fedrun.errors import ConfigError

    with pytest.raises(ConfigError, match="data.classes") as error:
        DataConfig(classes=classes)
    assert "non-empty list of distinct labels >= 0" in str(error.value)


def test_digits_classes_refuses_a_label_no_image_has():
    with pytest.raises(DataError, match=r"config key 'data.classes': no image has label\(s\) \[10\]"):
        build_datasets(DataConfig(image_size=8, classes=[9, 10]), seed=0)


def test_get_batch_order_and_repeats():
    train, _ = build_datasets(DataConfig(), seed=0)
    batch = train.get_batch(np.array([7, 3, 7]))
    assert torch.equal(batch[0], train.get_batch([7])[0])
    assert torch.equal(batch[1], train.get_batch([3])[0])
    assert torch.equal(batch[0], batch[2])
    sub = train.subset([3, 7])
    assert torch.equal(sub.get_batch([1, 0]), train.get_batch([7, 3]))
    assert sub.labels.tolist() == [train.labels[3], train.labels[7]]
    with pytest.raises(IndexError):
        train.get_batch([len(train)])


# --------------------------------------------------------------------------- image folders
def _split_image() -> Image.Image:
    """90x30 whose centred 30x30 square is black on the left half and white on the right.

    The outer thirds are the other way round, so skipping the crop gives a different picture.
    """
    arr = np.zeros((30, 90, 3), dtype=np.uint8)
    arr[:, :30] = 255
    arr[:, 45:60] = 255
    return Image.fromarray(arr)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    (root / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(root / "a" / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), "L").save(root / "a" / "b" / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 35, 3), dtype=np.uint8)).save(root / "a" / "b" / "c.BMP")
    _split_image().save(root / "split.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _folder_cfg(root, **kw):
    return make_section("data", name="image_folder", root=str(root), heldout_fraction=0.0, **kw)


def test_folder_shapes_and_range(folder):
    train, heldout = build_datasets(_folder_cfg(folder), seed=0)
    assert len(train) == 4 and len(heldout) == 0 and train.labels is None
    batch = train.get_batch(range(4))
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    gray, _ = build_datasets(_folder_cfg(folder, grayscale=True, image_size=12), seed=0)
    assert gray.num_channels == 1 and gray.get_batch([0, 1]).shape == (2, 1, 12, 12)


def test_classes_of_an_unlabelled_folder_are_refused(folder):
    with pytest.raises(DataError, match="config key 'data.classes': data.name=image_folder has no labels"):
        build_datasets(_folder_cfg(folder, classes=[0]), seed=0)


def test_center_crop(folder):
    train, _ = build_datasets(_folder_cfg(folder), seed=0)
    img = train.get_batch([3])[0]  # sorted relative paths: a/b/c.BMP, a/b/gray.jpg, a/rgb.png, split.png
    assert abs(img.mean().item()) < 0.1
    columns = img.mean(dim=(0, 1))
    assert torch.all(columns[:7] < -0.9) and torch.all(columns[9:] > 0.9)
    assert columns[7] < 0 < columns[8]  # the boundary sits in the centre
    uncropped, _ = build_datasets(_folder_cfg(folder, center_crop=False), seed=0)
    assert uncropped.get_batch([3])[0, :, :, 0].mean() > 0.9  # the white outer third is kept


def test_missing_and_empty_root(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        build_datasets(_folder_cfg(tmp_path / "nowhere"), seed=0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no image files.*\.png"):
        build_datasets(_folder_cfg(tmp_path / "empty"), seed=0)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory"):
        build_datasets(_folder_cfg(tmp_path / "file.png"), seed=0)


def test_corrupt_file(folder):
    (folder / "bad.png").write_bytes(np.random.default_rng(0).bytes(200))
    with pytest.raises(DataError, match=r"bad\.png.*skip_corrupt=true"):
        build_datasets(_folder_cfg(folder), seed=0)
    with pytest.warns(UserWarning, match=r"bad\.png"):
        train, _ = build_datasets(_folder_cfg(folder, skip_corrupt=True), seed=0)
    assert len(train) == 4


def _truncated_png(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_truncated_png_small_folder_fails_at_build(folder):
    _truncated_png(folder / "half.png")
    with pytest.raises(DataError, match=r"half\.png"):
        build_datasets(_folder_cfg(folder), seed=0)
    with pytest.warns(UserWarning, match=r"half\.png"):
        train, _ = build_datasets(_folder_cfg(folder, skip_corrupt=True), seed=0)
    assert len(train) == 4


def test_truncated_png_lazy_dataset_fails_in_get_batch(folder):
    _truncated_png(folder / "half.png")
    files = [str(folder / "split.png"), str(folder / "half.png")]
    lazy = ImageDataset.from_files(files, ImageLoader(image_size=8))
    assert not lazy.in_memory and lazy.get_batch([0]).shape == (1, 3, 8, 8)
    with pytest.raises(DataError, match=r"half\.png"):
        lazy.get_batch([0, 1])


# --------------------------------------------------------------------------- labels
def _labelled_folder(tmp_path) -> Path:
    root = tmp_path / "lab"
    (root / "sub").mkdir(parents=True)
    for name, value in [("000001.jpg", 0), ("000002.jpg", 255), ("sub/000003.jpg", 128)]:
        Image.new("RGB", (30, 36), (value, value, value)).save(root / name)
    return root


def test_labels_csv(tmp_path):
    root = _labelled_folder(tmp_path)
    csv = tmp_path / "labels.csv"
    csv.write_text("image_id,Smiling,Male\n000001.jpg,1,-1\n000002.jpg,-1,1\nsub/000003.jpg,1,1\n")
    train, _ = build_datasets(_folder_cfg(root, labels_csv=str(csv), label_column="Smiling"), seed=0)
    # sorted paths: 000001.jpg, 000002.jpg, sub/000003.jpg; values -1 -> 0, 1 -> 1
    assert train.labels.tolist() == [1, 0, 1] and train.class_names == ["-1", "1"]
    with pytest.raises(DataError, match=r"no column 'Young'.*Smiling, Male"):
        build_datasets(_folder_cfg(root, labels_csv=str(csv), label_column="Young"), seed=0)
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(_folder_cfg(root, labels_csv=str(tmp_path / "x.csv"), label_column="Male"), seed=0)


def test_labels_missing_rows(tmp_path):
    root = _labelled_folder(tmp_path)
    csv = tmp_path / "labels.csv"
    csv.write_text("image_id,Smiling\n000001.jpg,1\n")
    with pytest.raises(DataError, match=r"2 image\(s\) have no row.*000002\.jpg"):
        build_datasets(_folder_cfg(root, labels_csv=str(csv), label_column="Smiling"), seed=0)


def test_labels_celeba_txt(tmp_path):
    root = _labelled_folder(tmp_path)
    txt = tmp_path / "list_attr_celeba.txt"
    txt.write_text("3\n5_o_Clock_Shadow Smiling Male \n"
                   "000001.jpg -1  1 -1\n000002.jpg  1 -1  1\n000003.jpg -1 -1  1\n")
    train, _ = build_datasets(_folder_cfg(root, labels_csv=str(txt), label_column="Male"), seed=0)
    assert train.labels.tolist() == [0, 1, 1]


def test_celeba_layout(tmp_path):
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    lines = []
    for i in range(6):
        Image.new("RGB", (178, 218), (40 * i, 0, 0)).save(root / "img_align_celeba" / f"{i + 1:06d}.jpg")
        lines.append(f"{i + 1:06d}.jpg,{1 if i % 2 else -1},{-1 if i < 3 else 1}")
    (root / "list_attr_celeba.csv").write_text("image_id,Smiling,Young\n" + "\n".join(lines) + "\n")
    cfg = make_section("data", name="celeba", root=str(root), image_size=8, label_column="Smiling",
                     heldout_fraction=0.5)
    train, heldout = build_datasets(cfg, seed=0)
    assert (len(train), len(heldout)) == (3, 3)
    assert train.get_batch(range(3)).shape == (3, 3, 8, 8)
    assert sorted(train.labels.tolist() + heldout.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    for seed in (1, 2):  # the held-out split is the same for every seed
        _, other = build_datasets(cfg, seed=seed)
        assert torch.equal(other.get_batch(range(3)), heldout.get_batch(range(3)))
    # The image folder itself as root works too (the attribute list is found beside it).
    direct, _ = build_datasets(make_section("data", name="celeba", root=str(root / "img_align_celeba"),
                                          image_size=8, label_column="Young"), seed=0)
    assert len(direct) == 5 and "2 classes" in direct.describe()


# --------------------------------------------------------------------------- image size vs U-Net
THREE_BLOCKS = ["model.block_out_channels=[8,16,16]", "model.norm_num_groups=4",
                "model.down_block_types=[DownBlock2D,DownBlock2D,DownBlock2D]",
                "model.up_block_types=[UpBlock2D,UpBlock2D,UpBlock2D]"]


@pytest.mark.parametrize("size, blocks", [(7, []), (9, []), (6, THREE_BLOCKS), (10, THREE_BLOCKS)])
def test_image_size_the_unet_cannot_halve_is_a_config_error(size, blocks):
    from fedrun.config import load_config
    from fedrun.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'data\.image_size'.*model\.block_out_channels"):
        load_config(None, [f"data.image_size={size}", *blocks])
    # A pretrained U-Net is not built from model.*: its own sample size rules apply.
    assert load_config(None, [f"data.image_size={size}", "model.pretrained=some/unet", *blocks])


@pytest.mark.parametrize("size, blocks", [(6, []), (8, []), (12, []), (12, THREE_BLOCKS)])
def test_image_size_the_config_accepts_runs_through_the_unet(size, blocks):
    from fedrun.config import load_config
    from fedrun.tasks.ddpm.model import build_unet

    cfg = load_config(None, [f"data.image_size={size}", *blocks])
    unet = build_unet(cfg.model, cfg.data.image_size, 1, cfg.seed)
    with torch.no_grad():
        out = unet(torch.zeros(1, 1, size, size), torch.tensor([1])).sample
    assert out.shape == (1, 1, size, size)
