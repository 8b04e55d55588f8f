"""The audit's statistics without a model: distance ratios by hand, membership-inference AUC and
TPR at 1 % FPR with their intervals, the reliability flag, and the bias they guard against."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny
from fedrun.engine import simulator
from fedrun.eval.audit import AuditOptions, distance_ratios
from fedrun.config import load_config

# 8 training and 8 held-out digits, one client, 1,000 steps of batch 8: far past generalising
# (about 30 s on an idle core). A federation of 2 clients needs several times more steps to
# memorise as visibly, so the positive control trains one client.
OVERFIT = ["data.max_samples=16", "data.heldout_fraction=0.5", "optim.batch_size=8",
           "optim.lr=1e-2", "num_clients=1", "rounds=10", "local_steps=100", "ema.enabled=false",
           "sample.every=0"]


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("audit") / "overfit"
    simulator.run(load_config(None, tiny(run_dir, *OVERFIT)))
    return run_dir


def test_distance_ratios_hand_values():
    """Samples = a training image and a point halfway between; equal-size reference sets."""
    members = torch.tensor([[0.0, 0.0], [10.0, 0.0]]).view(2, 1, 1, 2)
    nonmembers = torch.tensor([[0.0, 4.0], [10.0, 5.0]]).view(2, 1, 1, 2)
    samples = torch.tensor([[0.0, 0.0], [10.0, 2.5]]).view(2, 1, 1, 2)
    d = distance_ratios(samples, members, nonmembers, seed=0)
    assert np.allclose(d["d_train"], [0.0, 2.5]) and np.allclose(d["d_heldout"], [4.0, 2.5])
    assert np.allclose(d["ratio"], [0.0, 1.0]) and list(d["nearest"]) == [0, 1]


# ---------------------------------------------------------------- membership-inference statistics
# mia_statistics is pure (scores in, dict out); scores are "higher = member" (the audit uses -loss).

def test_mia_statistics_hand_values():
    """4 members vs 4 non-members. Member-above-non-member pairs: 0.9 beats 4, 0.6 beats 3
    (0.5, 0.2, 0.1), 0.4 and 0.3 beat 2 each: AUC = 11/16. At FPR 0 the threshold sits above the
    top non-member 0.7: one member (0.9) -> TPR 1/4; allowing one false positive (FPR <= 1/4) it
    sits above 0.5: 0.9, 0.6 -> TPR 2/4 at FPR 1/4; allowing two: above 0.2 -> all 4 at 2/4."""
    from fedrun.eval.audit import mia_statistics

    members, nonmembers = [0.9, 0.6, 0.4, 0.3], [0.7, 0.5, 0.2, 0.1]
    m = mia_statistics(members, nonmembers, resamples=200)
    assert m["auc"] == pytest.approx(11 / 16)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.25) and m["fpr_reached"] == 0.0
    assert m["true_positives_at_1pct_fpr"] == 1 and m["false_positives_at_1pct_fpr"] == 0
    # Clopper-Pearson of 1 in 4: lower = 1 - 0.975 ** (1/4) (closed form for k = 1)
    assert m["tpr_at_1pct_fpr_ci95"][0] == pytest.approx(1 - 0.975 ** 0.25)
    assert m["tpr_at_1pct_fpr_ci95"][1] == pytest.approx(0.8059, abs=1e-4)
    assert m["members"] == 4 and m["nonmembers"] == 4 and m["tpr_at_1pct_fpr_reliable"] is False
    m = mia_statistics(members, nonmembers, resamples=10, target_fpr=0.25)
    assert (m["tpr_at_1pct_fpr"], m["fpr_reached"]) == (0.5, 0.25)
    m = mia_statistics(members, nonmembers, resamples=10, target_fpr=0.5)
    assert (m["tpr_at_1pct_fpr"], m["fpr_reached"]) == (1.0, 0.5)
    assert m["tpr_at_1pct_fpr_ci95"] == [pytest.approx(0.025 ** 0.25), 1.0]  # k = n closed form


def test_mia_statistics_ties_count_half():
    """Member 0.5 tied with non-member 0.5 counts 1/2: AUC = (2 + 1.5) / 4. A tie is not above
    the threshold: at FPR 0 only the member 1.0 counts."""
    from fedrun.eval.audit import mia_statistics

    m = mia_statistics([1.0, 0.5], [0.5, 0.0], resamples=10)
    assert m["auc"] == pytest.approx(0.875)
    assert (m["tpr_at_1pct_fpr"], m["fpr_reached"]) == (0.5, 0.0)
    m = mia_statistics([1.0, 0.5], [0.5, 0.0], resamples=10, target_fpr=0.5)
    assert (m["tpr_at_1pct_fpr"], m["fpr_reached"]) == (1.0, 0.5)
    with pytest.raises(ValueError):
        mia_statistics([1.0], [], resamples=10)


def test_mia_statistics_matches_sklearn_and_the_old_keys():
    """auc and tpr_at_1pct_fpr are what the audit reported before (sklearn's roc_auc_score and
    tpr[fpr <= 0.01].max() of roc_curve), also with ties and with >= 100 non-members."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from fedrun.eval.audit import mia_statistics

    rng = np.random.default_rng(0)
    for n1, n0 in ((16, 16), (300, 100), (50, 250), (1000, 180)):
        a, b = rng.normal(0.5, 1, n1).round(1), rng.normal(0, 1, n0).round(1)  # rounding: ties
        labels, scores = np.r_[np.ones(n1), np.zeros(n0)], np.r_[a, b]
        fpr, tpr, _ = roc_curve(labels, scores)
        m = mia_statistics(a, b, resamples=20)
        assert m["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert m["tpr_at_1pct_fpr"] == pytest.approx(tpr[fpr <= 0.01].max(), abs=1e-12)
        assert m["fpr_reached"] == pytest.approx(fpr[fpr <= 0.01][np.argmax(tpr[fpr <= 0.01])])


def test_mia_bootstrap_is_the_stratified_bootstrap():
    """The vectorised bootstrap equals resampling members and non-members separately and
    recomputing the AUC with sklearn, draw for draw."""
    from sklearn.metrics import roc_auc_score

    from fedrun.eval.audit import _bootstrap_aucs

    rng = np.random.default_rng(3)
    a, b = rng.normal(0.3, 1, 12).round(1), rng.normal(0, 1, 9).round(1)
    fast = _bootstrap_aucs(a, b, 30, np.random.default_rng(7))
    draws = np.random.default_rng(7)
    i, j = draws.integers(0, len(a), (30, len(a))), draws.integers(0, len(b), (30, len(b)))
    order = np.sort(b)
    slow = [roc_auc_score(np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a[i[r]], order[j[r]]])
            for r in range(30)]
    assert np.allclose(fast, slow)


def test_mia_reliability_flag_and_fpr_reached():
    from fedrun.eval.audit import mia_statistics, mia_summary

    rng = np.random.default_rng(1)
    for n0 in (16, 24, 99):
        m = mia_statistics(rng.normal(1, 1, 16), rng.normal(0, 1, n0), resamples=50)
        assert m["tpr_at_1pct_fpr_reliable"] is False and m["fpr_reached"] == 0.0
        assert m["false_positives_at_1pct_fpr"] == 0 and m["nonmembers"] == n0
        line = mia_summary(m)
        assert f"TPR at 1 % FPR unreliable ({n0} non-members < 100)" in line
        assert f"{m['tpr_at_1pct_fpr']:.3f}" not in line.split("TPR")[1]
    for n0, reached in ((100, 0.01), (180, 1 / 180), (1000, 0.01)):
        m = mia_statistics(rng.normal(1, 1, 200), rng.normal(0, 1, n0), resamples=50)
        assert m["tpr_at_1pct_fpr_reliable"] is True and m["fpr_reached"] <= 0.01
        assert m["fpr_reached"] == pytest.approx(reached)  # continuous scores: no ties
        lo, hi = m["tpr_at_1pct_fpr_ci95"]
        assert lo <= m["tpr_at_1pct_fpr"] <= hi
        assert "unreliable" not in mia_summary(m) and "FPR reached" in mia_summary(m)


def test_mia_auc_interval_contains_auc_and_shrinks():
    from fedrun.eval.audit import mia_statistics

    rng = np.random.default_rng(2)
    widths = []
    for n in (16, 100, 2000):
        m = mia_statistics(rng.normal(0.5, 1, n), rng.normal(0, 1, n), seed=5)
        lo, hi = m["auc_ci95"]
        assert lo < m["auc"] < hi and m["auc_se"] > 0
        widths.append(hi - lo)
        again = mia_statistics(rng.normal(0.5, 1, n), rng.normal(0, 1, n), seed=5)
        assert again["auc_ci95"] != m["auc_ci95"]  # different data
    assert widths[0] > 2 * widths[1] > 4 * widths[2], widths
    # the 16 vs 16 interval is about +-0.2 wide: the caveat on the committed LoRA audits
    assert 0.25 < widths[0] < 0.6, widths
    # seeded: the same scores and seed give the same interval
    a, b = rng.normal(0.5, 1, 40), rng.normal(0, 1, 40)
    assert mia_statistics(a, b, seed=1)["auc_ci95"] == mia_statistics(a, b, seed=1)["auc_ci95"]


def test_old_tpr_at_1pct_fpr_is_biased_with_24_nonmembers_and_now_flagged():
    """Gaussian scores, members N(mu, 1), non-members N(0, 1), mu chosen for a true TPR of 0.034
    at 1 % FPR. With 24 non-members the old plain estimate (roc_curve, tpr[fpr <= 0.01].max(): the
    members above the *top* non-member) averages about 0.1 over redraws -- three times the truth;
    the new statistics flag it unreliable with fpr_reached 0. With 2,000 non-members it is close."""
    from scipy.stats import norm
    from sklearn.metrics import roc_curve

    from fedrun.eval.audit import mia_statistics

    true_tpr = 0.034
    mu = norm.ppf(0.99) - norm.ppf(1 - true_tpr)
    rng = np.random.default_rng(4)

    def old_estimate(members, nonmembers):
        labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
        fpr, tpr, _ = roc_curve(labels, np.r_[members, nonmembers])
        return tpr[fpr <= 0.01].max()

    small = [old_estimate(rng.normal(mu, 1, 200), rng.normal(0, 1, 24)) for _ in range(400)]
    assert np.mean(small) > 2 * true_tpr, np.mean(small)
    large = [old_estimate(rng.normal(mu, 1, 2000), rng.normal(0, 1, 2000)) for _ in range(40)]
    assert abs(np.mean(large) - true_tpr) < 0.01, np.mean(large)
    members, nonmembers = rng.normal(mu, 1, 200), rng.normal(0, 1, 24)
    m = mia_statistics(members, nonmembers, resamples=50)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(old_estimate(members, nonmembers))
    assert m["tpr_at_1pct_fpr_reliable"] is False and m["fpr_reached"] == 0.0


def _score_subject(loss_members, loss_nonmembers):
    """An AuditSubject whose per-image loss is the image's single pixel: no model."""
    from fedrun.eval.audit import AuditSubject

    as_images = lambda v: torch.tensor(v, dtype=torch.float64).view(-1, 1, 1, 1)  # noqa: E731
    return AuditSubject("train", as_images(loss_members), np.zeros(len(loss_members), dtype=int),
                        as_images(loss_nonmembers), None,
                        lambda images, generator, t: images.flatten(1)[:, 0], 1000, "scores")


def test_membership_inference_record_has_the_new_keys():
    """What goes into audit.json: the old keys with their old meaning plus the intervals, the FPR
    reached and the reliability flag (the old record had none of these)."""
    from fedrun.eval.audit import membership_inference

    rng = np.random.default_rng(6)
    losses_in, losses_out = rng.normal(-0.5, 1, 16), rng.normal(0, 1, 16)
    mia = membership_inference(_score_subject(losses_in, losses_out),
                               AuditOptions(num_samples=2, noise_draws=1, seed=3))
    mia.pop("_roc")
    json.dumps(mia)  # plain JSON types
    for key in ("auc", "tpr_at_1pct_fpr", "members", "nonmembers", "mean_loss_members",
                "mean_loss_nonmembers", "timestep_fractions", "noise_draws", "auc_ci95", "auc_se",
                "tpr_at_1pct_fpr_ci95", "fpr_reached", "tpr_at_1pct_fpr_reliable"):
        assert key in mia, key
    assert (mia["members"], mia["nonmembers"]) == (16, 16)
    assert mia["tpr_at_1pct_fpr_reliable"] is False and mia["fpr_reached"] == 0.0
    assert mia["mean_loss_members"] == pytest.approx(losses_in.mean())
    # score = -loss: the member with the lowest loss ranks first
    from fedrun.eval.audit import mia_statistics

    expected = mia_statistics(-losses_in, -losses_out, seed=3)
    assert mia["auc"] == expected["auc"] and mia["auc_ci95"] == expected["auc_ci95"]
    mia = membership_inference(_score_subject(rng.normal(-0.5, 1, 40), rng.normal(0, 1, 150)),
                               AuditOptions(num_samples=2, noise_draws=1))
    assert mia["tpr_at_1pct_fpr_reliable"] is True and mia["fpr_reached"] == pytest.approx(1 / 150)
