"""A small CNN trained on the embedded digits: classifier for generated digits and the feature
extractor for FID/KID on the embedded data (InceptionV3 features mean little on 16x16 digits).

The shipped weights (``fedrun/assets/digits_classifier.safetensors``) are reproduced by

    python scripts/train_digits_classifier.py --out fedrun/assets/digits_classifier.safetensors

which trains on the training split of the default digits data at 16x16 (``training_split``: the
images outside the held-out reference split, which is the same for every run seed,
``fedrun.data.base.HELDOUT_SPLIT_SEED``) and reports the accuracy on the reference split. The
classifier has therefore never seen an image that FID/KID use as reference, at
``data.heldout_fraction`` 0.1 (the default) or below.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "digits_classifier.safetensors"
INPUT_SIZE = 16


class DigitsClassifier(nn.Module):
    """16x16x1 images in [-1, 1] -> 10 logits; ``features`` gives the 128-d penultimate layer."""

    num_features = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8x8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 4x4
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Any (N, C, H, W) batch in [-1, 1] -> one channel at 16x16."""
        images = images.float()
        if images.shape[1] == 3:
            images = images.mean(dim=1, keepdim=True)
        if images.shape[-1] != INPUT_SIZE or images.shape[-2] != INPUT_SIZE:
            images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                                   align_corners=False, antialias=True)
        return images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_digits_classifier(path: Path = WEIGHTS) -> DigitsClassifier:
    from safetensors.torch import load_file

    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 pixel: generated digits are not perfectly centred."""
    shifted = torch.empty_like(images)
    shifts = torch.randint(-1, 2, (images.shape[0], 2), generator=generator)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        shifted[i] = torch.roll(images[i], shifts=(dy, dx), dims=(1, 2))
    return shifted


def training_split(image_size: int = INPUT_SIZE):
    """(train, reference) of the default digits data: the classifier's training images and the
    held-out split it is scored on (the same for every run seed)."""
    from fedrun.config import DataConfig
    from fedrun.data import build_datasets

    return build_datasets(DataConfig(image_size=image_size), seed=0)


def train_digits_classifier(seed: int = 0, epochs: int = 40, batch_size: int = 64):
    """Train on the default digits training split; returns (model, held-out accuracy)."""
    train, heldout = training_split()
    x = train.get_batch(list(range(len(train))))
    y = torch.as_tensor(train.labels)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=2e-3, total_steps=epochs * ((len(x) + batch_size - 1) // batch_size))
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start: start + batch_size]
            loss = F.cross_entropy(model(_augment(x[idx], generator)), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval(), heldout_accuracy(model, heldout)


@torch.no_grad()
def heldout_accuracy(model: DigitsClassifier, heldout) -> float:
    images = heldout.get_batch(list(range(len(heldout))))
    predictions = model(images).argmax(dim=1)
    return float((predictions == torch.as_tensor(heldout.labels)).float().mean())
