"""``fedrun audit --run RUN``: what a trained model reveals about its clients' images.

    python -m fedrun audit --run runs/digits_fedavg                       # pre-training run
    python -m fedrun audit --run runs/lora_demo/lora_seed0 --heldout DIR  # LoRA fine-tuning run

Writes RUN/audit/audit.json, closest_pairs.png, ratios.png, mia_roc.png and the samples it
analysed (samples.npz, as `fedrun sample` writes them):

1. Extraction / memorisation in the style of Carlini et al. 2023 ("Extracting training data from
   diffusion models"): ``num_samples`` (>= 1,000 by default) samples of the run's final model;
   for each, the L2 distance to the nearest training image and to the nearest held-out image, in
   pixel space ([-1, 1]) and in feature space (``eval.feature``: the digits classifier by
   default). The per-sample ratio d(nearest train) / d(nearest held-out) is computed against
   equally many training and held-out images (a seeded subset of the larger set: the nearest of
   a bigger set is closer by itself); a ratio well below 1 means the sample sits on a training
   image, not merely on the data distribution. Reported: the median ratio, the fraction of
   samples below each threshold (0.5, 0.8), the closest pairs as a picture, and the clients that
   hold the nearest training images of the samples below ``memorised_threshold`` (the partition
   is recomputed from the run's config).
2. Loss-based membership inference (Yeom et al. 2018; Carlini et al. 2023 Sec. 5): the per-image
   diffusion loss at fixed timesteps with fixed (seeded) noise, averaged; members (training
   images) should have lower loss than non-members (held-out images). Reported
   (``mia_statistics``): ROC AUC of the score -loss with a 95 % stratified-bootstrap interval, and
   the TPR at 1 % FPR with the FPR actually reached there and a 95 % Clopper-Pearson interval;
   with fewer than 100 non-members no threshold has a false positive rate in (0, 1 %], the
   "1 % FPR" point is the zero-false-positive point, and its TPR is biased upward, so it is
   flagged unreliable (``tpr_at_1pct_fpr_reliable``) rather than printed.

Pre-training runs: members = the run's training split, non-members = its held-out split
(``data.heldout_fraction``), samples = the exported EMA model's DDIM samples. LoRA fine-tuning
runs: members = the subject images (``data.root``), non-members = images of the same class the
run never saw (``--heldout DIR``, required), samples = the base pipeline with final/'s LoRA
loaded by stock ``load_lora_weights``, for the instance prompt; the loss is SD's latent loss
conditioned on that prompt.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from fedrun.errors import ConfigError, EvaluationError
from fedrun.rng import derived_generator
from fedrun.tasks.base import AuditSubject

AUDIT_DIR = "audit"
MIA_TIMESTEP_FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5)  # of num_train_timesteps
MIA_TARGET_FPR = 0.01  # the operating point of "TPR at 1 % FPR"
MIA_MIN_NONMEMBERS = 100  # fewer: no threshold reaches an FPR in (0, 1 %]; the TPR is unreliable
MIA_BOOTSTRAP = 1000  # stratified bootstrap resamples of the AUC interval
AUDIT_CHUNK = 100  # samples per sampling call (progress bar granularity)


@dataclass
class AuditOptions:
    """What ``fedrun audit`` measures (CLI flags of the same names)."""

    num_samples: int = 1000
    """Generated samples for the memorisation analysis (Carlini et al. use far more; >= 1000)."""
    thresholds: List[float] = field(default_factory=lambda: [0.5, 0.8])
    """Report the fraction of samples whose distance ratio is below each of these."""
    memorised_threshold: float = 0.5
    """A sample with pixel ratio below this counts as memorised (for the client attribution)."""
    noise_draws: int = 2
    """Fixed noise draws per timestep in the membership-inference loss."""
    max_members: int = 2000
    """At most this many training images enter the membership-inference attack (seeded subset)."""
    show_pairs: int = 16
    seed: int = 0
    heldout: Optional[str] = None
    """Fine-tuning runs: folder of held-out images of the subject's class (non-members)."""
    samples: Optional[str] = None
    """Use these samples (a samples.npz of ``fedrun sample``) instead of generating them."""
    batch_size: int = 250

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ConfigError(f"audit --num-samples: must be >= 2, got {self.num_samples}")
        if self.noise_draws < 1:
            raise ConfigError(f"audit --noise-draws: must be >= 1, got {self.noise_draws}")


# ---------------------------------------------------------------- subjects

def _subset(n: int, k: int, seed: int, tag: int) -> np.ndarray:
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, tag]).choice(n, size=k, replace=False))


def nearest(queries: torch.Tensor, pool: torch.Tensor, batch: int = 1000) -> tuple:
    """(distance, index) of each query's nearest pool row (L2, float64)."""
    pool = pool.flatten(1).double()
    dist, index = [], []
    for i in range(0, len(queries), batch):
        d = torch.cdist(queries[i: i + batch].flatten(1).double(), pool)
        m = d.min(dim=1)
        dist.append(m.values)
        index.append(m.indices)
    return torch.cat(dist).numpy(), torch.cat(index).numpy()


def distance_ratios(samples: torch.Tensor, members: torch.Tensor, nonmembers: torch.Tensor,
                    seed: int) -> Dict[str, np.ndarray]:
    """Per sample: d(nearest of k members), d(nearest of k non-members), their ratio (k = the
    smaller set's size), and the nearest of *all* members (distance, index) for attribution."""
    k = min(len(members), len(nonmembers))
    m_sub = _subset(len(members), k, seed, 11)
    n_sub = _subset(len(nonmembers), k, seed, 12)
    d_train, _ = nearest(samples, members[m_sub])
    d_heldout, _ = nearest(samples, nonmembers[n_sub])
    d_all, i_all = nearest(samples, members)
    ratio = d_train / np.maximum(d_heldout, 1e-12)
    return {"d_train": d_train, "d_heldout": d_heldout, "ratio": ratio, "d_nearest": d_all,
            "nearest": i_all, "reference_size": np.array(k)}


def _summary(d: Dict[str, np.ndarray], thresholds: List[float]) -> dict:
    return {"median_ratio": float(np.median(d["ratio"])), "mean_ratio": float(np.mean(d["ratio"])),
            "fraction_below": {str(t): float((d["ratio"] < t).mean()) for t in thresholds},
            "median_d_train": float(np.median(d["d_train"])),
            "median_d_heldout": float(np.median(d["d_heldout"])),
            "reference_images_each": int(d["reference_size"])}


def mia_losses(subject: AuditSubject, images: torch.Tensor, options: AuditOptions,
               desc: str) -> np.ndarray:
    """Mean loss of each image over the fixed timesteps and noise draws. The noise of image i at
    (timestep k, draw j) is row i of a tensor drawn from (seed, k, j): members and non-members
    get the same noise row by row."""
    from tqdm.auto import tqdm

    timesteps = [max(1, int(f * subject.num_train_timesteps)) for f in MIA_TIMESTEP_FRACTIONS]
    total = torch.zeros(len(images), dtype=torch.float64)
    jobs = [(k, j) for k in range(len(timesteps)) for j in range(options.noise_draws)]
    for k, j in tqdm(jobs, desc=desc, unit="pass", leave=False):
        generator = derived_generator(options.seed, 0xA0D1, k, j)
        for start in range(0, len(images), options.batch_size):
            batch = images[start: start + options.batch_size]
            total[start: start + len(batch)] += subject.per_image_loss(batch, generator, timesteps[k]).double()
    return (total / len(jobs)).numpy()


def _clopper_pearson(k: int, n: int, level: float = 0.95) -> List[float]:
    """Exact (Clopper-Pearson) binomial interval of k successes in n trials."""
    from scipy.stats import beta

    a = (1 - level) / 2
    lower = float(beta.ppf(a, k, n - k + 1)) if k > 0 else 0.0
    upper = float(beta.ppf(1 - a, k + 1, n - k)) if k < n else 1.0
    return [lower, upper]


def _bootstrap_aucs(members: np.ndarray, nonmembers: np.ndarray, resamples: int,
                    rng: np.random.Generator, chunk: int = 100) -> np.ndarray:
    """AUCs of ``resamples`` stratified bootstrap resamples (members and non-members resampled
    separately, with replacement), vectorised: a resample is a count per point, and the AUC of
    counts c (members) and d (non-members) is sum_i c_i G_d(s_i) / (n1 n0) with
    G_d(s) = sum_j d_j ([s_j < s] + [s_j == s] / 2), read off d's cumulative sums over the sorted
    non-member scores. O(resamples * (n1 + n0)) time, chunked memory."""
    n1, n0 = len(members), len(nonmembers)
    order = np.sort(nonmembers)
    lo = np.searchsorted(order, members, side="left")  # non-members strictly below each member
    hi = np.searchsorted(order, members, side="right")  # ... below or tied
    out = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        rows = np.arange(b)[:, None]
        c = np.bincount((rows * n1 + rng.integers(0, n1, (b, n1))).ravel(),
                        minlength=b * n1).reshape(b, n1)
        d = np.bincount((rows * n0 + rng.integers(0, n0, (b, n0))).ravel(),
                        minlength=b * n0).reshape(b, n0)  # counts indexed like ``order``
        cum = np.zeros((b, n0 + 1))
        np.cumsum(d, axis=1, out=cum[:, 1:])
        below = cum[:, lo] + 0.5 * (cum[:, hi] - cum[:, lo])  # (b, n1): G_d at each member
        out.append((c * below).sum(axis=1) / (n1 * n0))
    return np.concatenate(out)


def mia_statistics(members: np.ndarray, nonmembers: np.ndarray, seed: int = 0,
                   resamples: int = MIA_BOOTSTRAP, target_fpr: float = MIA_TARGET_FPR) -> dict:
    """Membership-inference statistics of attack scores (higher = "member"): pure, no model.

    * ``auc``: ROC AUC (Mann-Whitney, ties count 1/2; equals sklearn's roc_auc_score).
      ``auc_ci95``: 95 % percentile interval of a *stratified bootstrap* -- members and
      non-members resampled separately with replacement, ``resamples`` times, from
      ``np.random.default_rng([seed, 14])``; ``auc_se`` is the bootstrap standard deviation.
    * ``tpr_at_1pct_fpr``: the fraction of members scoring above the lowest threshold whose false
      positive rate is <= ``target_fpr`` (the best TPR at FPR <= 1 %, as ``tpr[fpr <= 0.01].max()``
      of sklearn's roc_curve). ``fpr_reached``: that threshold's actual FPR -- the largest
      achievable FPR <= 1 %, which is 0 with fewer than 100 non-members (one false positive is
      already more than 1 %), and then the estimate is the TPR at zero false positives of a small
      sample, biased upward. ``tpr_at_1pct_fpr_reliable``: non-members >= 100 (generally: the
      operating point allows at least one false positive).
      ``tpr_at_1pct_fpr_ci95``: *Clopper-Pearson* exact 95 % interval of the members above that
      threshold (binomial in the members); it is conditional on the threshold, so it does not
      include the uncertainty of where the threshold lies, which the non-members decide and which
      dominates when they are few (hence the reliability flag).
    """
    s1 = np.asarray(members, dtype=np.float64).ravel()
    s0 = np.asarray(nonmembers, dtype=np.float64).ravel()
    n1, n0 = len(s1), len(s0)
    if n1 == 0 or n0 == 0:
        raise ValueError(f"mia_statistics needs members and non-members, got {n1} and {n0}")
    if not (np.isfinite(s1).all() and np.isfinite(s0).all()):
        raise ValueError("mia_statistics: scores must be finite")
    order = np.sort(s0)
    lo, hi = np.searchsorted(order, s1, "left"), np.searchsorted(order, s1, "right")
    auc = float((lo + 0.5 * (hi - lo)).sum() / (n1 * n0))
    aucs = _bootstrap_aucs(s1, s0, resamples, np.random.default_rng([seed, 14]))
    # operating point: at most k_max false positives (k / n0 <= target, as sklearn's fpr <= target);
    # "member" = score above the (k_max + 1)-th highest non-member score
    k_max = int(np.flatnonzero(np.arange(n0 + 1) / n0 <= target_fpr).max())
    cut = order[n0 - 1 - k_max] if k_max < n0 else -np.inf
    true_positives, false_positives = int((s1 > cut).sum()), int((s0 > cut).sum())
    return {"auc": auc,
            "auc_ci95": [float(v) for v in np.percentile(aucs, [2.5, 97.5])],
            "auc_se": float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0,
            "auc_ci95_method": f"stratified bootstrap, {resamples} resamples, percentile",
            "tpr_at_1pct_fpr": true_positives / n1,
            "tpr_at_1pct_fpr_ci95": _clopper_pearson(true_positives, n1),
            "tpr_at_1pct_fpr_ci95_method": "Clopper-Pearson on the members at the chosen threshold",
            "fpr_reached": false_positives / n0,
            "true_positives_at_1pct_fpr": true_positives,
            "false_positives_at_1pct_fpr": false_positives,
            # at least one false positive allowed; at 1 %: non-members >= MIA_MIN_NONMEMBERS (100)
            "tpr_at_1pct_fpr_reliable": k_max >= 1, "target_fpr": target_fpr,
            "members": n1, "nonmembers": n0, "bootstrap_seed": seed}


def mia_summary(mia: dict) -> str:
    """The audit's one-line account of ``mia_statistics``' result."""
    lo, hi = mia["auc_ci95"]
    line = (f"MIA AUC {mia['auc']:.3f} (95 % CI {lo:.3f}-{hi:.3f}; {mia['members']} members vs "
            f"{mia['nonmembers']} non-members), TPR at 1 % FPR ")
    if not mia["tpr_at_1pct_fpr_reliable"]:
        return line + f"unreliable ({mia['nonmembers']} non-members < {MIA_MIN_NONMEMBERS})"
    lo, hi = mia["tpr_at_1pct_fpr_ci95"]
    return line + (f"{mia['tpr_at_1pct_fpr']:.3f} (95 % CI {lo:.3f}-{hi:.3f}, FPR reached "
                   f"{mia['fpr_reached']:.4f})")


def membership_inference(subject: AuditSubject, options: AuditOptions) -> dict:
    from sklearn.metrics import roc_curve

    members = subject.members[_subset(len(subject.members), options.max_members, options.seed, 13)]
    loss_in = mia_losses(subject, members, options, "MIA members")
    loss_out = mia_losses(subject, subject.nonmembers, options, "MIA non-members")
    labels = np.r_[np.ones(len(loss_in)), np.zeros(len(loss_out))]
    scores = -np.r_[loss_in, loss_out]  # lower loss -> "member"
    fpr, tpr, _ = roc_curve(labels, scores)
    return {**mia_statistics(-loss_in, -loss_out, seed=options.seed),
            "mean_loss_members": float(loss_in.mean()), "mean_loss_nonmembers": float(loss_out.mean()),
            "timestep_fractions": list(MIA_TIMESTEP_FRACTIONS), "noise_draws": options.noise_draws,
            "_roc": (fpr, tpr)}


def generate_samples(subject: AuditSubject, options: AuditOptions) -> np.ndarray:
    from tqdm.auto import tqdm

    if options.samples is not None:
        from fedrun.eval.sampling import load_samples

        images = load_samples(options.samples)
        if len(images) < options.num_samples:
            raise EvaluationError(f"audit --samples: '{options.samples}' holds {len(images)} samples, "
                                  f"fewer than --num-samples {options.num_samples}")
        return images[: options.num_samples]
    out = []
    chunks = math.ceil(options.num_samples / AUDIT_CHUNK)
    for index in tqdm(range(chunks), desc="audit samples", unit="chunk", leave=False):
        out.append(subject.generate(min(AUDIT_CHUNK, options.num_samples - index * AUDIT_CHUNK), index))
    return np.concatenate(out)


# ---------------------------------------------------------------- the audit

def audit_run(run_dir, options: Optional[AuditOptions] = None, say=print) -> dict:
    """Audit the run in ``run_dir``; writes RUN/audit/ and returns the audit.json record."""
    from fedrun.eval.sampling import open_run
    from fedrun.eval.features import build_feature_extractor, to_model_range
    from fedrun.engine.metrics import code_commit
    from fedrun.tasks.base import build_task

    options = options or AuditOptions()
    run_dir = Path(run_dir)
    cfg = open_run(run_dir)
    started = time.perf_counter()
    task = build_task(cfg)
    kind = task.name
    subject = task.audit_subject(run_dir, options.heldout)
    say(f"audit of {run_dir}: {subject.description}")
    # 1. samples and their nearest neighbours, in pixel and feature space
    images = generate_samples(subject, options)
    samples = to_model_range(images)
    pixel = distance_ratios(samples, subject.members, subject.nonmembers, options.seed)
    extractor = build_feature_extractor(cfg.eval.feature, cfg.eval.inception_weights)
    embed = lambda x: torch.cat([extractor(x[i: i + options.batch_size])  # noqa: E731
                                 for i in range(0, len(x), options.batch_size)])
    with torch.no_grad():
        feature = distance_ratios(embed(samples), embed(subject.members), embed(subject.nonmembers),
                                  options.seed)
    memorised = pixel["ratio"] < options.memorised_threshold
    sources = subject.member_clients[pixel["nearest"][memorised]]
    # 2. membership inference
    mia = membership_inference(subject, options)
    roc = mia.pop("_roc")
    record = {
        "run": str(run_dir), "task": kind, "description": subject.description,
        "num_samples": len(samples), "pixel": _summary(pixel, options.thresholds),
        "feature": {**_summary(feature, options.thresholds), "extractor": cfg.eval.feature},
        "memorised": {"threshold": options.memorised_threshold, "samples": int(memorised.sum()),
                      "fraction": float(memorised.mean()),
                      "distinct_training_images": int(len(np.unique(pixel["nearest"][memorised]))),
                      "by_client": {str(c): int(n) for c, n in
                                    zip(*np.unique(sources, return_counts=True))}},
        "membership_inference": mia,
        "privacy": _privacy_of(run_dir),
        "options": asdict(options), "commit": code_commit(),
    }
    out = run_dir / AUDIT_DIR
    out.mkdir(parents=True, exist_ok=True)
    _pictures(out, images, subject, pixel, feature, roc, options)
    np.savez_compressed(out / "samples.npz", images=(images * 255).round().astype(np.uint8))
    record["seconds"] = time.perf_counter() - started
    (out / "audit.json").write_text(json.dumps(record, indent=2) + "\n")
    say(f"audit: median distance ratio {record['pixel']['median_ratio']:.3g} (pixel), "
        f"{record['feature']['median_ratio']:.3g} (features); "
        f"{100 * record['pixel']['fraction_below'][str(options.thresholds[0])]:.1f} % of samples "
        f"below {options.thresholds[0]}; {mia_summary(mia)} -> {out / 'audit.json'}")
    return record


def _privacy_of(run_dir: Path) -> Optional[dict]:
    from fedrun.fl.privacy.accountant import PRIVACY_FILE

    path = run_dir / "final" / PRIVACY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _pictures(out: Path, images: np.ndarray, subject: AuditSubject, pixel: dict, feature: dict,
              roc: tuple, options: AuditOptions) -> None:
    """closest_pairs.png (top row: the samples nearest a training image relative to the held-out
    set; bottom row: that training image), ratios.png, mia_roc.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedrun.eval.images import save_grid

    order = np.argsort(pixel["ratio"])[: options.show_pairs]
    train = ((subject.members[pixel["nearest"][order]] + 1) / 2).permute(0, 2, 3, 1).numpy()
    save_grid(np.concatenate([images[order], train]), out / "closest_pairs.png", columns=len(order))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, (name, d) in zip(axes, (("pixel", pixel), ("feature", feature))):
        ax.hist(d["ratio"], bins=40, color="tab:blue")
        for t in options.thresholds:
            ax.axvline(t, color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(f"{name} space: d(train) / d(held-out)")
        ax.set_xlabel("ratio")
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    ax.plot(roc[0], roc[1], color="tab:blue")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("loss-based membership inference")
    fig.tight_layout()
    fig.savefig(out / "mia_roc.png", dpi=110)
    plt.close(fig)
