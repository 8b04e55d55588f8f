"""The second quality measure beside FID (``fedrun/eval/features.py``): the confident-sample rate
and the class coverage against a hand computation, and on the shipped digits classifier: real
held-out digits are confident and cover every class, noise is not and does not."""

import numpy as np
import pytest
import torch

from fedrun.eval.features import DigitsFeatures, Evaluator


class _Coded(torch.nn.Module):
    """Features = the pixels; the class is pixel 0 and its probability pixel 1 (the rest of the
    probability spread over the other classes), so a test chooses every prediction."""

    num_classes = 3

    def forward(self, images):
        return images.flatten(1).double()

    def probabilities(self, images):
        pixels = images.flatten(1)
        top = pixels[:, 1:2]
        out = ((1 - top) / (self.num_classes - 1)).repeat(1, self.num_classes)
        return out.scatter(1, pixels[:, :1].long(), top)

    def predict(self, images):
        return self.probabilities(images).argmax(dim=1)


def coded(pairs):
    """Images (class, top probability) with two more random pixels (for a feature covariance)."""
    out = torch.rand((len(pairs), 1, 2, 2), generator=torch.Generator().manual_seed(len(pairs)))
    out[:, 0, 0, :] = torch.tensor(pairs, dtype=torch.float32)
    return out


def test_confident_rate_and_class_coverage_against_a_hand_computation():
    # held-out classes (0, 1, 2, 2): shares 1/4, 1/4, 1/2; a class is covered when its confident
    # samples are at least half its share of all samples: 1/8, 1/8, 1/4
    evaluator = Evaluator(coded([(0, 1.0), (1, 1.0), (2, 1.0), (2, 1.0)]), coded([(0, 1.0)] * 6), _Coded(),
                          "coded", reference_labels=np.array([0, 1, 2, 2]), kid_subset_size=2)
    # confident (p >= 0.9): class 0 twice (0.95, 0.91; not 0.5), class 1 never (0.8), class 2
    # three times (0.9, 0.97, 0.93; not 0.89): 5 of 8; shares 2/8, 0, 3/8: classes 0 and 2 covered
    scores = evaluator.score(coded([(0, 0.95), (0, 0.5), (1, 0.8), (2, 0.9), (2, 0.89), (2, 0.97),
                                    (2, 0.93), (0, 0.91)]))
    assert scores.confident_fraction == 5 / 8 and scores.class_coverage == 2
    record = scores.as_record("floor_")
    assert record["floor_confident_fraction"] == 5 / 8 and record["floor_class_coverage"] == 2
    # 1 confident sample of class 1 in 8 is exactly half its share: covered
    exact = evaluator.score(coded([(0, 0.95), (1, 0.95), (2, 0.95), (2, 0.95), (2, 0.95)] + [(2, 0.5)] * 3))
    assert exact.class_coverage == 3 and exact.confident_fraction == 5 / 8
    # a class the held-out images do not hold (data.classes) is never covered: reference (1, 1),
    # samples all confidently class 0: only class 1 could count, and it has no samples
    absent = Evaluator(coded([(1, 1.0), (1, 1.0)]), coded([(1, 1.0)] * 4), _Coded(), "coded",
                       reference_labels=np.array([1, 1]), kid_subset_size=2)
    assert absent.score(coded([(0, 0.95)] * 4)).class_coverage == 0
    assert absent.score(coded([(1, 0.95)] * 4)).class_coverage == 1


def test_real_digits_are_confident_and_cover_every_class_noise_is_not():
    from fedrun.config import DataConfig
    from fedrun.data import build_datasets

    train, heldout = build_datasets(DataConfig(image_size=8), seed=0)
    everything = lambda data: data.get_batch(np.arange(len(data)))  # noqa: E731
    evaluator = Evaluator(everything(heldout), everything(train), DigitsFeatures(), "digits",
                          reference_labels=heldout.labels)
    real = evaluator.floor(500)
    assert real.confident_fraction >= 0.95 and real.class_coverage == 10
    noise = evaluator.score(torch.rand((500, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise.class_coverage < 10 and noise.confident_fraction < real.confident_fraction
    print(f"\nreal: {real.confident_fraction:.3f}, {real.class_coverage} classes; "
          f"noise: {noise.confident_fraction:.3f}, {noise.class_coverage} classes")


@pytest.mark.parametrize("probability", [0.9, 0.8999])
def test_the_confidence_threshold_is_inclusive(probability):
    evaluator = Evaluator(coded([(0, 1.0), (1, 1.0)]), coded([(0, 1.0)] * 4), _Coded(), "coded",
                          reference_labels=np.array([0, 1]), kid_subset_size=2)
    scores = evaluator.score(coded([(0, probability), (1, probability)]))
    assert scores.confident_fraction == (1.0 if probability >= 0.9 else 0.0)
