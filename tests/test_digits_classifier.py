"""The shipped digits classifier: the yardstick for generated digits and their FID/KID features."""

import torch

from fedrun.config import DataConfig
from fedrun.data import build_datasets
from fedrun.digits_classifier import DigitsClassifier, heldout_accuracy, load_digits_classifier


def test_shipped_weights_reach_97_percent_on_heldout_digits():
    _, heldout = build_datasets(DataConfig(image_size=16), seed=0)
    assert len(heldout) == 180
    assert heldout_accuracy(load_digits_classifier(), heldout) >= 0.97


def test_features_and_other_resolutions():
    model = load_digits_classifier()
    _, heldout = build_datasets(DataConfig(image_size=32), seed=0)
    images = heldout.get_batch(list(range(len(heldout))))  # 32x32: resized inside
    with torch.no_grad():
        assert model.features(images).shape == (180, DigitsClassifier.num_features)
        accuracy = float((model(images).argmax(1) == torch.as_tensor(heldout.labels)).float().mean())
    assert accuracy >= 0.9
