"""The report's statistics against hand computations: the paired t test (p from the closed form
of Student's t with 4 degrees of freedom, the interval from the tabulated quantile), Holm's
step-down procedure on the textbook example, and a table's family of comparisons (pairing by
seed, the verdict only when Holm rejects, the interval at Holm's level)."""

import math

import pytest

from fedrun.experiments import stats

# a - b = (-1, -2, -1, -2, -1): mean -1.4, s_d^2 = (3 x 0.4^2 + 2 x 0.6^2) / 4 = 0.3,
# se = sqrt(0.3 / 5) = sqrt(0.06) = 0.244949, t = -1.4 / 0.244949 = -5.715476
A = [10.0, 12.0, 11.0, 13.0, 14.0]
B = [11.0, 14.0, 12.0, 15.0, 15.0]


def two_sided_p_df4(t: float) -> float:
    """Student's t with 4 degrees of freedom in closed form: with sin(theta) = |t| / sqrt(4 + t^2),
    P(|T| > |t|) = 1 - sin(theta) (1 + cos^2(theta) / 2)."""
    sin = abs(t) / math.sqrt(4 + t * t)
    return 1 - sin * (1 + (1 - sin * sin) / 2)


def test_paired_t_against_a_hand_computation():
    test = stats.paired_t(A, B)
    assert test.n == 5 and test.mean == pytest.approx(-1.4)
    assert test.se == pytest.approx(math.sqrt(0.06))
    # p: 1 - 0.943880 x (1 + 0.109091 / 2) = 0.004636
    assert two_sided_p_df4(-1.4 / math.sqrt(0.06)) == pytest.approx(0.004636, abs=1e-6)
    assert test.p == pytest.approx(two_sided_p_df4(-1.4 / math.sqrt(0.06)), rel=1e-9)
    # 95 %: -1.4 ± t(0.975, 4) se = -1.4 ± 2.776445 x 0.244949 = -1.4 ± 0.680083 (t table: 2.776)
    assert (test.low, test.high) == (pytest.approx(-2.080083, abs=1e-5), pytest.approx(-0.719917, abs=1e-5))
    assert stats.paired_t(B, A).p == pytest.approx(test.p)  # two-sided


def test_paired_t_edge_cases():
    same = stats.paired_t([3.0, 4.0], [2.0, 3.0])  # every difference 1: no spread
    assert (same.mean, same.se, same.p, same.low, same.high) == (1.0, 0.0, 0.0, 1.0, 1.0)
    assert stats.paired_t([3.0, 4.0], [3.0, 4.0]).p == 1.0
    with pytest.raises(ValueError, match="at least 2 pairs"):
        stats.paired_t([1.0], [2.0])


def test_fieller_interval_ends_are_where_the_paired_t_test_of_a_minus_r_b_stops_rejecting():
    """At each end r of Fieller's interval the paired t test of a - r b sits exactly on its
    boundary (the interval of a - r b touches 0); inside, 0 is in that interval."""
    a = [2.1, 2.6, 1.7, 2.4, 2.2]   # e.g. the part of a gap that a change closes, per seed
    b = [4.0, 5.1, 3.9, 4.8, 4.4]   # the whole gap, per seed
    out = stats.fieller_ratio(a, b)
    assert out.bounded and out.n == 5
    assert out.ratio == pytest.approx(sum(a) / sum(b))
    assert out.low < out.ratio < out.high
    for end in (out.low, out.high):
        test = stats.paired_t(a, [end * x for x in b])
        assert min(abs(test.low), abs(test.high)) == pytest.approx(0.0, abs=1e-9)
    middle = stats.paired_t(a, [out.ratio * x for x in b])
    assert middle.low < 0 < middle.high


def test_fieller_interval_degenerate_cases():
    exact = stats.fieller_ratio([2.0, 2.1, 1.9, 2.05], [4.0, 4.2, 3.8, 4.1])  # a = b / 2 at every seed
    assert (exact.ratio, exact.low, exact.high) == (0.5, pytest.approx(0.5), pytest.approx(0.5))
    loose = stats.fieller_ratio([1.0, 2.0, 1.5], [1.0, -1.0, 0.5])  # b's mean not away from 0
    assert not loose.bounded and (loose.low, loose.high) == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        stats.fieller_ratio([1.0], [2.0])


def test_holm_on_the_textbook_example():
    """Four hypotheses, p = 0.01, 0.04, 0.03, 0.005, alpha 0.05 (the Holm-Bonferroni example of
    Wikipedia): sorted 0.005, 0.01, 0.03, 0.04 against 0.0125, 0.0167, 0.025, 0.05; the first
    two are rejected, 0.03 > 0.025 stops the procedure, so 0.04 is not rejected although it is
    below its own level."""
    out = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert [h.rank for h in out] == [2, 4, 3, 1]
    assert [h.level for h in out] == pytest.approx([0.05 / 3, 0.05, 0.025, 0.0125])
    assert [h.rejected for h in out] == [True, False, False, True]
    # adjusted: 4 x 0.005 = 0.02; max(0.02, 3 x 0.01) = 0.03; max(0.03, 2 x 0.03) = 0.06;
    # max(0.06, 1 x 0.04) = 0.06
    assert [h.adjusted for h in out] == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_leaves_untested_hypotheses_out_of_the_count():
    out = stats.holm([0.02, math.nan, None, 0.03])
    assert out[1] is None and out[2] is None
    assert [out[0].adjusted, out[3].adjusted] == pytest.approx([0.04, 0.04])  # m = 2
    assert out[0].rejected and out[3].rejected
    assert stats.holm([]) == []


def test_a_family_of_paired_comparisons():
    """Two rows against their baseline, paired by seed: seed 9 is only in one of them and is
    left out. Row x: the differences above (p 0.004636); row y: (0.5, -0.5, 1, 0, 0.5), mean 0.3.
    m = 2: x has rank 1, tested at 0.025, adjusted p 2 x 0.004636 -> better; its Holm interval
    is the t interval at 1 - 0.025 and excludes 0."""
    base = {seed: value for seed, value in enumerate(B)}
    x = {**{seed: value for seed, value in enumerate(A)}, 9: 0.0}
    y = {seed: value + d for seed, (value, d) in enumerate(zip(B, [0.5, -0.5, 1.0, 0.0, 0.5]))}
    out = stats.compare_family({"x": (x, base), "y": (y, base), "z": ({0: 1.0}, base)})
    cx, cy, cz = out["x"], out["y"], out["z"]
    assert cx.n == 5 and cx.diff == pytest.approx(-1.4)
    assert (cx.low, cx.high) == (pytest.approx(-2.080083, abs=1e-5), pytest.approx(-0.719917, abs=1e-5))
    assert cx.p_holm == pytest.approx(2 * 0.004636, abs=2e-6) and cx.holm_level == 0.025
    assert cx.verdict == "better"
    # the Holm interval's half width q x se solves P(|T_4| > q) = 0.025
    q = (cx.holm_high - cx.holm_low) / 2 / math.sqrt(0.06)
    assert two_sided_p_df4(q) == pytest.approx(0.025, abs=1e-9)
    assert cx.holm_high < 0 < cy.holm_high
    assert cy.diff == pytest.approx(0.3) and cy.verdict == stats.NO_DIFFERENCE
    assert cy.p_holm == pytest.approx(max(cy.p, cx.p_holm)) and cy.holm_level == 0.05
    assert (cz.n, cz.diff, cz.verdict) == (1, -10.0, "fewer than 2 paired seeds")
    assert math.isnan(cz.p)
    worse = stats.compare_family({"x": (base, x)})["x"]  # the other way round: worse
    assert worse.verdict == "worse" and worse.p_holm == pytest.approx(0.004636, abs=1e-6)
    higher = stats.compare_family({"x": (x, base)}, lower_is_better=False)["x"]  # e.g. coverage
    assert higher.verdict == "worse"
