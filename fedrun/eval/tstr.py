"""Train on synthetic, test on real (TSTR): how useful generated images are as training data.

A fresh small classifier is trained on the generated samples and tested on the real held-out
images; its accuracy is ``tstr_accuracy`` (the downstream metric of DPDM, Dockhorn et al. 2023).
It stays informative where FID saturates: samples of a weak model (a DP model, say) can all
score FID far above the floor and still differ in whether they carry their classes.

The samples' labels are the conditioning labels of a class-conditional task (the class each
sample was drawn for), or, for unconditional samples of the digits, what the shipped digits
classifier (``fedrun.eval.classifier``) reads in them. Every score carries two anchors computed
the same way: ``trtr_accuracy``, the same classifier trained on as many real training images
(train on real, test on real: what the samples could at best achieve), and ``tstr_chance``, the
accuracy of always answering the held-out images' most frequent class. The classifier, its
initialisation and its batch order are fixed by ``eval.seed``: the same samples give the same
score. It reads every image as one channel at 16x16 (``DigitsClassifier.prepare``), so it
costs a few seconds per thousand samples on one CPU core.

Switched on by ``eval.tstr`` (``fedrun.config.EvalConfig``); ``Evaluator.report``
(``fedrun.eval.features``) then adds the scores to every evaluation record.
"""

from __future__ import annotations

import math
import time
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedrun.errors import ConfigError, EvaluationError

#: the classifier's training recipe, the same for samples and for the real anchor
EPOCHS = 10
BATCH_SIZE = 64
LEARNING_RATE = 5e-3  # the one-cycle schedule's peak: across classifier seeds, accuracy from 1,000
                      # real digits spreads over 0.961-0.972 (constant 2e-3: 0.922-0.972)
#: the data source the shipped digits classifier reads (it labels unconditional samples)
CLASSIFIER_DATA = "digits"


class SmallClassifier(nn.Module):
    """Two convolutions and a linear head on 16x16x1 inputs (any (N, C, H, W) in [-1, 1] is
    brought there first); ~45 k parameters."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8x8
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from fedrun.eval.classifier import DigitsClassifier

        return self.body(DigitsClassifier.prepare(images))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int,
                     epochs: int = EPOCHS) -> SmallClassifier:
    """A fresh ``SmallClassifier`` trained on ``images`` ((N, C, H, W) in [-1, 1]) and their
    ``labels``: AdamW with a one-cycle learning rate, ``epochs`` passes in a shuffled order;
    initialisation and order from ``seed`` (the global random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallClassifier(num_classes)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=max(1, epochs * math.ceil(len(images) / BATCH_SIZE)))
    images, labels = images.float().cpu(), labels.long().cpu()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), BATCH_SIZE):
            batch = order[start: start + BATCH_SIZE]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500) -> float:
    predicted = torch.cat([model(images[i: i + batch_size].float()).argmax(dim=1)
                           for i in range(0, len(images), batch_size)])
    return float((predicted == labels.long()).double().mean())


class TSTR:
    """TSTR scores of image sets against fixed real test images (the held-out split).

    ``real_pool`` (the training split: a labelled data set with ``get_batch``) gives the
    train-on-real anchor, with as many images as the scored set (seeded choice, read when first
    needed, cached per count). ``labeller`` maps images to class logits for unconditional
    samples (the digits classifier); without one, samples need their conditioning labels."""

    def __init__(self, test_images: torch.Tensor, test_labels: np.ndarray, real_pool,
                 num_classes: int, seed: int, labeller=None, epochs: int = EPOCHS):
        self.test_images, self.test_labels = test_images, torch.as_tensor(test_labels)
        self.real_pool = real_pool
        self.num_classes, self.seed, self.labeller, self.epochs = num_classes, seed, labeller, epochs
        self.chance = float(np.bincount(np.asarray(test_labels)).max() / len(test_labels))
        self._anchors: Dict[int, float] = {}

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Accuracy on the real test images of a classifier trained on (images, labels)."""
        model = train_classifier(images, labels, self.num_classes, self.seed, self.epochs)
        return accuracy(model, self.test_images, self.test_labels)

    def real_anchor(self, num_images: int) -> float:
        """``score`` of ``num_images`` real training images (at most all of them)."""
        n = min(num_images, len(self.real_pool))
        if n not in self._anchors:
            generator = torch.Generator().manual_seed(self.seed)
            chosen = torch.randperm(len(self.real_pool), generator=generator)[:n].numpy()
            self._anchors[n] = self.score(self.real_pool.get_batch(chosen),
                                          torch.as_tensor(self.real_pool.labels[chosen]))
        return self._anchors[n]

    def label(self, images: torch.Tensor, labels: Optional[np.ndarray]) -> torch.Tensor:
        """The class ids to train on: the conditioning ``labels``, else the labeller's reading."""
        if labels is not None:
            return torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if self.labeller is None:
            raise EvaluationError(
                "config key 'eval.tstr': these samples carry no labels and the data is not the "
                f"digits, which the shipped classifier labels (data.name={CLASSIFIER_DATA}); TSTR "
                "needs a class-conditional task's samples with their labels")
        with torch.no_grad():
            return torch.cat([self.labeller(images[i: i + 500]).argmax(dim=1)
                              for i in range(0, len(images), 500)])

    def report(self, images: torch.Tensor, labels: Optional[np.ndarray] = None) -> Dict[str, object]:
        """``tstr_accuracy`` of ``images`` ((N, C, H, W) in [-1, 1]) with its anchors and its
        cost in seconds (``tstr_s``), as one flat record; ``labels``: the conditioning labels
        (None: the labeller's reading)."""
        started = time.perf_counter()
        targets = self.label(images, labels)
        if len(targets) and int(targets.max()) >= self.num_classes:
            raise EvaluationError(f"TSTR: a sample's label {int(targets.max())} is outside the "
                                  f"{self.num_classes} classes of the held-out images")
        record = {"tstr_accuracy": self.score(images, targets),
                  "trtr_accuracy": self.real_anchor(len(images)), "tstr_chance": self.chance,
                  "tstr_samples": len(images),
                  "tstr_labels": "conditioning" if labels is not None else "digits_classifier"}
        record["tstr_s"] = time.perf_counter() - started  # with the anchor the first time
        return record


def build_tstr(eval_cfg, train, heldout) -> TSTR:
    """The TSTR scorer of a run: test = the held-out split, anchor pool = the training split."""
    for split, name in ((heldout, "held-out"), (train, "training")):
        if split.labels is None:
            raise ConfigError(f"config key 'eval.tstr': TSTR tests a classifier on labelled real "
                              f"images, and the {name} images of data source '{split.name}' have "
                              "no labels")
    labeller = None
    num_classes = int(max(heldout.labels.max(), train.labels.max())) + 1
    if heldout.name == CLASSIFIER_DATA:
        from fedrun.eval.classifier import load_digits_classifier

        labeller = load_digits_classifier()
        num_classes = max(num_classes, labeller.head.out_features)
    return TSTR(heldout.get_batch(np.arange(len(heldout))), heldout.labels, train, num_classes,
                eval_cfg.seed, labeller)


def check_unconditional(cfg) -> None:
    """Refuse ``eval.tstr`` for an unconditional task on data the digits classifier cannot label
    (called from the task's ``check_config``, before anything trains)."""
    if cfg.eval.tstr and cfg.data.name != CLASSIFIER_DATA:
        raise ConfigError(f"config key 'eval.tstr': task '{cfg.task.name}' draws unlabelled "
                          f"samples, which only the shipped digits classifier can label, and the "
                          f"data is '{cfg.data.name}' (TSTR needs data.name={CLASSIFIER_DATA} or a "
                          "class-conditional task such as 'dit')")
