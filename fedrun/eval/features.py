"""Sample quality: FID and KID with a pluggable feature extractor, the real-vs-real floor, and
the class distribution of generated digits.

Feature extractors (``eval.feature``), registered in ``FEATURE_EXTRACTORS``:

* ``digits``: the penultimate 128-d features of the shipped digits classifier
  (``fedrun.eval.classifier``); its predictions also give the class distribution of the
  generated samples. Works offline. InceptionV3 features mean little on 8x8/16x16 digits.
* ``inception``: torchmetrics' standard FID InceptionV3 (2048-d pool features), which needs
  the ``torch-fidelity`` package and its weights file (downloaded on first use; offline, pass
  ``eval.inception_weights=PATH``).

Every score comes with its scale: the *floor* is the same metric computed for real training
images (as many as there are generated samples) against the same held-out reference images.
A generated set cannot be expected to score below it; a score near it is as good as the
evaluation can tell apart with this many samples.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from fedrun.errors import EvaluationError
from fedrun.registry import FEATURE_EXTRACTORS

# FEATURE_EXTRACTORS: name -> factory(inception_weights) of a module mapping images to features
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)
# Below this many generated samples FID/KID are visibly biased (FID upward) and noisy.
MIN_UNBIASED_SAMPLES = 1000
# A sample is "confident" when the digits classifier gives its class at least this probability;
# a class is "covered" when its confident samples are at least this share of its held-out share.
CONFIDENT_PROBABILITY = 0.9
COVERED_SHARE = 0.5


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) floats in [0, 1] (what the pipelines return) -> (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2.0 - 1.0


# ---------------------------------------------------------------- feature extractors

class DigitsFeatures(torch.nn.Module):
    """The digits classifier's 128-d penultimate features; input (N, C, H, W) in [-1, 1].

    The features are divided by a fixed constant, their RMS on the default digits training split
    (5.745), so that they are of order 1 like InceptionV3's: KID's polynomial kernel
    (x.y/d + 1)^3 is otherwise dominated by the cubic term and its estimate is very noisy.
    """

    FEATURE_RMS = 5.745

    def __init__(self):
        super().__init__()
        from fedrun.eval.classifier import load_digits_classifier

        self.classifier = load_digits_classifier()
        self.num_features = self.classifier.num_features
        self.num_classes = self.classifier.head.out_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images) / self.FEATURE_RMS

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images).argmax(dim=1)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images).softmax(dim=1)


class InceptionFeatures(torch.nn.Module):
    """torchmetrics' FID InceptionV3 (2048-d); input (N, C, H, W) in [-1, 1], any size/channels."""

    num_features = 2048

    def __init__(self, weights_path: Optional[str] = None):
        super().__init__()
        self.inception = _build_inception(weights_path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.repeat(1, 3, 1, 1)
        return self.inception(pixels)  # resizes to 299x299 itself


def _inception_help() -> str:
    return (f"the InceptionV3 FID weights are the file {INCEPTION_WEIGHTS_FILE} "
            f"({INCEPTION_WEIGHTS_URL}); without internet, download it elsewhere and pass "
            "eval.inception_weights=/path/to/" + INCEPTION_WEIGHTS_FILE
            + " (or put it in the torch hub cache, $TORCH_HOME/hub/checkpoints/). "
              "The 'digits' extractor (eval.feature=digits) needs neither")


def _build_inception(weights_path: Optional[str]):
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        import torch_fidelity  # noqa: F401  (torchmetrics' InceptionV3 is torch-fidelity's)
    except ImportError:
        raise EvaluationError("feature extractor 'inception' needs the torch-fidelity package "
                              "(pip install torch-fidelity), which is not installed; and "
                              + _inception_help()) from None
    if weights_path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
        weights_path = str(cached) if cached.is_file() else None
    elif not Path(weights_path).is_file():
        raise EvaluationError(f"config key 'eval.inception_weights': '{weights_path}' is not a file; "
                              + _inception_help())
    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=weights_path)
    except Exception as exc:  # urllib errors, hub errors, corrupt files
        raise EvaluationError(f"could not obtain the InceptionV3 FID weights ({exc}); "
                              + _inception_help()) from None


@FEATURE_EXTRACTORS.register("digits")
def _digits_features(inception_weights: Optional[str] = None) -> torch.nn.Module:
    return DigitsFeatures()  # the classifier's weights ship with fedrun: no file to point to


@FEATURE_EXTRACTORS.register("inception")
def _inception_features(inception_weights: Optional[str] = None) -> torch.nn.Module:
    return InceptionFeatures(inception_weights)


def build_feature_extractor(name: str, inception_weights: Optional[str] = None) -> torch.nn.Module:
    """A module mapping (N, C, H, W) images in [-1, 1] to (N, num_features) features."""
    return FEATURE_EXTRACTORS.get(name)(inception_weights).eval()


# ---------------------------------------------------------------- scores

def bias_warning(num_samples: int) -> Optional[str]:
    if num_samples >= MIN_UNBIASED_SAMPLES:
        return None
    return (f"FID/KID from {num_samples} samples are biased (FID upward) and noisy; use >= "
            f"{MIN_UNBIASED_SAMPLES} (eval.num_samples) and compare only numbers computed with the "
            "same number of samples (the paper's 64 samples are far too few)")


@dataclass
class Scores:
    fid: float
    kid: float
    kid_std: float
    num_samples: int
    num_reference: int
    class_fractions: Optional[List[float]] = None
    class_tv: Optional[float] = None  # total variation distance to the reference class mix
    # The rarest class among the samples and its share: a model that lost a class (e.g. one only
    # few clients hold under label skew) shows it here even when the total variation is modest.
    min_class_fraction: Optional[float] = None
    min_class: Optional[int] = None
    # Stays informative where FID saturates (an untrained model's noise is not confidently any
    # digit): the share of samples classified with probability >= CONFIDENT_PROBABILITY, and
    # the number of classes whose confident samples reach COVERED_SHARE of their held-out share.
    confident_fraction: Optional[float] = None
    class_coverage: Optional[int] = None

    def as_record(self, prefix: str = "") -> Dict[str, object]:
        out = {f"{prefix}fid": self.fid, f"{prefix}kid": self.kid, f"{prefix}kid_std": self.kid_std}
        if self.class_tv is not None:
            out[f"{prefix}class_tv"] = self.class_tv
            out[f"{prefix}min_class_fraction"] = self.min_class_fraction
            out[f"{prefix}min_class"] = self.min_class
        if self.confident_fraction is not None:
            out[f"{prefix}confident_fraction"] = self.confident_fraction
            out[f"{prefix}class_coverage"] = self.class_coverage
        return out


def rarest_class(fractions, reference=None) -> int:
    """The class with the smallest share of ``fractions`` (the lowest label among ties), among
    the classes the held-out images hold (``reference`` > 0): with data.classes a subset, the
    classes left out are not a class the model lost."""
    fractions = np.asarray(fractions, dtype=float)
    present = np.ones(len(fractions), bool) if reference is None else np.asarray(reference) > 0
    if not present.any():
        present[:] = True
    return int(np.flatnonzero(present)[np.argmin(fractions[present])])


class Evaluator:
    """FID/KID of image sets against a fixed reference set (the held-out images).

    ``floor_pool`` (the training images) gives the real-vs-real floor: as many real images as
    the scored set, against the same reference, through the same features.
    """

    def __init__(self, reference: torch.Tensor, floor_pool: torch.Tensor, extractor: torch.nn.Module,
                 feature_name: str, reference_labels: Optional[np.ndarray] = None,
                 kid_subset_size: int = 100, seed: int = 0, batch_size: int = 500, tstr=None):
        if len(reference) < 2:
            raise EvaluationError(f"FID needs at least 2 held-out reference images, got {len(reference)}; "
                                  "raise data.heldout_fraction")
        self.reference = reference
        self.floor_pool = floor_pool
        self.extractor = extractor
        self.feature_name = feature_name
        self.kid_subset_size = kid_subset_size
        self.seed = seed
        self.batch_size = batch_size
        self.reference_features = self._features(reference)
        self.reference_class_fractions = None
        if reference_labels is not None and hasattr(extractor, "predict"):
            counts = np.bincount(np.asarray(reference_labels), minlength=extractor.num_classes)
            self.reference_class_fractions = counts / counts.sum()
        self._floors: Dict[int, Scores] = {}
        self.tstr = tstr  # train-on-synthetic, test-on-real scores (fedrun.eval.tstr), or None

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.extractor(images[i: i + self.batch_size]).double()
                          for i in range(0, len(images), self.batch_size)])

    def score(self, images: torch.Tensor) -> Scores:
        """FID and KID of ``images`` ((N, C, H, W) in [-1, 1]) against the reference."""
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        if len(images) < 2:
            raise EvaluationError(f"FID needs at least 2 samples, got {len(images)}")
        features = self._features(images)
        # The metrics get the features already computed (an identity "extractor"): the
        # extractor runs once per image, and torchmetrics does the statistics in float64.
        # sync_on_compute=False: only the calling rank evaluates, never a collective here.
        identity = _Identity(features.shape[1])
        fid = FrechetInceptionDistance(feature=identity, sync_on_compute=False)
        fid.update(self.reference_features, real=True)
        fid.update(features, real=False)
        subset = min(self.kid_subset_size, len(features), len(self.reference_features))
        with warnings.catch_warnings():  # "KID will save all extracted features": they are few
            warnings.simplefilter("ignore")
            kid = KernelInceptionDistance(feature=identity, subsets=50, subset_size=subset,
                                          sync_on_compute=False)
        kid.update(self.reference_features, real=True)
        kid.update(features, real=False)
        with torch.random.fork_rng():  # KID draws its subsets from the global generator
            torch.manual_seed(self.seed)
            kid_mean, kid_std = kid.compute()
        scores = Scores(float(fid.compute()), float(kid_mean), float(kid_std), len(images),
                        len(self.reference))
        if self.reference_class_fractions is not None:
            predicted = torch.cat([self.extractor.predict(images[i: i + self.batch_size])
                                   for i in range(0, len(images), self.batch_size)])
            counts = np.bincount(predicted.numpy(), minlength=len(self.reference_class_fractions))
            fractions = counts / counts.sum()
            scores.class_fractions = fractions.round(4).tolist()
            scores.class_tv = float(0.5 * np.abs(fractions - self.reference_class_fractions).sum())
            scores.min_class = rarest_class(fractions, self.reference_class_fractions)
            scores.min_class_fraction = float(fractions[scores.min_class])
            if hasattr(self.extractor, "probabilities"):
                self._confidence(images, scores)
        return scores

    def _confidence(self, images: torch.Tensor, scores: Scores) -> None:
        """The confident-sample rate and the class coverage of ``images`` (see ``Scores``)."""
        probabilities = torch.cat([self.extractor.probabilities(images[i: i + self.batch_size])
                                   for i in range(0, len(images), self.batch_size)])
        top, predicted = probabilities.max(dim=1)
        confident = predicted[top >= CONFIDENT_PROBABILITY].numpy()
        counts = np.bincount(confident, minlength=len(self.reference_class_fractions))
        scores.confident_fraction = float(len(confident) / len(images))
        # only the classes the held-out images hold (data.classes may leave some out): an
        # absent class would otherwise count as covered by any samples at all
        present = self.reference_class_fractions > 0
        scores.class_coverage = int(((counts / len(images)
                                      >= COVERED_SHARE * self.reference_class_fractions) & present).sum())

    def floor(self, num_samples: int) -> Scores:
        """The same metrics for ``num_samples`` real training images (seeded choice, cached)."""
        n = min(num_samples, len(self.floor_pool))
        if n not in self._floors:
            order = torch.randperm(len(self.floor_pool), generator=torch.Generator().manual_seed(self.seed))
            self._floors[n] = self.score(self.floor_pool[order[:n]])
        return self._floors[n]

    def report(self, images: torch.Tensor, labels: Optional[np.ndarray] = None) -> Dict[str, object]:
        """Scores of ``images`` with the floor and the sample counts, as one flat record
        (``labels``: a conditional task's requested classes, which TSTR trains on)."""
        scores = self.score(images)
        floor = self.floor(len(images))
        record = {**scores.as_record(), **floor.as_record("floor_"),
                  "eval_samples": scores.num_samples, "eval_reference": scores.num_reference,
                  "eval_floor_samples": floor.num_samples, "eval_feature": self.feature_name}
        if scores.class_fractions is not None:
            record["class_fractions"] = scores.class_fractions
            record["reference_class_fractions"] = self.reference_class_fractions.round(4).tolist()
        if self.tstr is not None:
            record.update(self.tstr.report(images, labels))
        warning = bias_warning(scores.num_samples)
        if warning:
            record["eval_warning"] = warning
        return record


class _Identity(torch.nn.Module):
    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def build_evaluator(eval_cfg, train, heldout) -> Evaluator:
    """Evaluator for a run: reference = the held-out split, floor pool = the training split."""
    extractor = build_feature_extractor(eval_cfg.feature, eval_cfg.inception_weights)
    if len(heldout) < 2:
        raise EvaluationError(f"FID needs held-out images but the held-out split has {len(heldout)}; "
                              "set data.heldout_fraction > 0 (default 0.1)")
    everything = lambda data: data.get_batch(np.arange(len(data)))  # noqa: E731
    return Evaluator(everything(heldout), everything(train), extractor, eval_cfg.feature,
                     reference_labels=heldout.labels if eval_cfg.feature == "digits" else None,
                     kid_subset_size=eval_cfg.kid_subset_size, seed=eval_cfg.seed,
                     tstr=_tstr(eval_cfg, train, heldout))


def _tstr(eval_cfg, train, heldout):
    """The TSTR scorer under ``eval.tstr``, else None."""
    if not eval_cfg.tstr:
        return None
    from fedrun.eval.tstr import build_tstr

    return build_tstr(eval_cfg, train, heldout)


def warn_if_few(num_samples: int) -> None:
    message = bias_warning(num_samples)
    if message:
        warnings.warn(message, stacklevel=2)
