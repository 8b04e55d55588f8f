"""The grid's statistics: mean ± sample std over seeds per configuration (``summarise``); paired
comparisons of two configurations over the same seeds (``paired_t``: the mean difference, its
t interval and two-sided p) corrected for the number of comparisons in a table (``holm``,
``compare_family``); the verdicts of the grid's claims (``check_findings``).

The statistics are pure functions (numbers in, numbers out), checked against hand computations
in tests/unit/test_stats.py. The t quantiles come from scipy (a dependency of
scikit-learn, which fedrun requires).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fedrun.experiments.leakage import LEAKAGE
from fedrun.experiments.grid import Finding, Grid

NOT_DECIDED = "not decided"
ALPHA = 0.05  # family-wise error rate of a table's comparisons
NO_DIFFERENCE = "no detected difference"

def mean_std(values) -> tuple:
    """(mean, sample std) of the values that are not None; nan std for one value."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"))


def summarise(results: List[dict], run_names: List[str]) -> Dict[str, dict]:
    """Per configuration with results: each number's (mean, std) over its seeds, the class mix
    per class, the FID curve (mean, std) per evaluation point, and ``per_seed``: the compared
    metrics seed by seed (what paired comparisons pair)."""
    out = {}
    for name in run_names:
        mine = [r for r in results if r["name"] == name]
        if not mine:
            continue  # every seed failed: the report says so
        summary = {"seeds": [r["seed"] for r in mine], "kind": mine[0]["kind"]}
        for key in SUMMARISED:
            summary[key] = mean_std([r.get(key) for r in mine])  # records before a key: None
        summary["per_seed"] = {key: {r["seed"]: r[key] for r in mine if r.get(key) is not None}
                               for key in PAIRED}
        summary["min_class"] = [r["min_class"] for r in mine]  # per seed
        fractions = [r["class_fractions"] for r in mine if r["class_fractions"]]
        if fractions:  # per class, over the seeds
            summary["class_fractions"] = [mean_std(column) for column in zip(*fractions)]
            summary["reference_class_fractions"] = mine[0]["reference_class_fractions"]
        for key in ("bytes_up_total", "bytes_down_total"):
            summary[key] = mean_std([r[key] for r in mine if key in r])
        # FID against cumulative bytes, evaluation by evaluation (a seed's cohorts change the
        # downlink's bytes a little): the mean of each over the seeds
        curves = [r.get("bytes_curve") or [] for r in mine]
        summary["bytes_curve"] = [(float(np.mean([c[i][0] for c in curves])),
                                   *mean_std([c[i][1] for c in curves]))
                                  for i in range(min(map(len, curves)))]
        points = sorted({s for r in mine for s, _ in r["curve"]})
        summary["curve"] = [(s, *mean_std([f for r in mine for s2, f in r["curve"] if s2 == s]))
                            for s in points]
        out[name] = summary
    return out


SUMMARISED = ("fid", "kid", "kid_std", "floor_fid", "floor_kid", "class_tv", "min_class_fraction",
              "confident_fraction", "class_coverage", "floor_confident_fraction",
              "floor_class_coverage", "final_loss", "samples", "bytes_total", "wall_s", "rounds_s",
              "tstr_accuracy", "in_classes", *LEAKAGE)
PAIRED = ("fid", "kid", "confident_fraction", "class_coverage")  # per seed in a summary


def pareto_front(summary: Dict[str, dict]) -> List[str]:
    """The configurations no other beats on both final FID and total bytes (mean over seeds;
    ties on both kept), cheapest first."""
    points = {n: (s["bytes_total"][0], s["fid"][0]) for n, s in summary.items()
              if math.isfinite(s["fid"][0])}
    front = [n for n, (b, f) in points.items()
             if not any((b2 <= b and f2 <= f) and (b2 < b or f2 < f) for b2, f2 in points.values())]
    return sorted(front, key=lambda n: points[n])


# ---------------------------------------------------------------- paired comparisons

def t_interval(mean: float, se: float, df: int, confidence: float) -> Tuple[float, float]:
    """mean ± t(1 - (1 - confidence) / 2, df) · se: the t interval at that confidence."""
    from scipy.stats import t

    half = float(t.ppf(1 - (1 - confidence) / 2, df)) * se
    return mean - half, mean + half


@dataclass
class PairedT:
    """A paired t test of a - b over n pairs: the mean difference, its standard error, the
    two-sided p of 'no difference' and the interval at the confidence asked for."""

    n: int
    mean: float
    se: float
    p: float
    low: float
    high: float


def paired_t(a: Sequence[float], b: Sequence[float], confidence: float = 1 - ALPHA) -> PairedT:
    """Paired t test of a[i] - b[i] (n >= 2 pairs): mean d, se = s_d / sqrt(n) (s_d the sample
    std), t = d / se with n - 1 degrees of freedom. With s_d = 0 the p is 0 (1 when d = 0)."""
    from scipy.stats import t

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        raise ValueError(f"a paired t test needs at least 2 pairs, got {len(d)}")
    mean, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(len(d))
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * t.sf(abs(mean / se), len(d) - 1))
    return PairedT(len(d), mean, se, p, *t_interval(mean, se, len(d) - 1, confidence))


@dataclass
class Ratio:
    """mean(a) / mean(b) over n pairs, with Fieller's interval: the r for which a paired t test
    of a - r b does not reject 0 (``bounded`` false when mean(b) itself is not clearly away from
    0: the interval is then unbounded, low = -inf, high = inf)."""

    n: int
    ratio: float
    low: float
    high: float
    bounded: bool


def fieller_ratio(a: Sequence[float], b: Sequence[float], confidence: float = 1 - ALPHA) -> Ratio:
    """The ratio of paired means mean(a) / mean(b) and Fieller's interval at ``confidence``:
    {r : (mean a - r mean b)^2 <= t^2 var(a - r b) / n}, t with n - 1 degrees of freedom. A
    quadratic in r; bounded when mean(b)^2 > t^2 var(b) / n (b's own t test rejects 0)."""
    from scipy.stats import t

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = len(a)
    if n < 2 or len(b) != n:
        raise ValueError(f"a paired ratio needs at least 2 pairs of equal length, got {len(a)} and {len(b)}")
    ma, mb = float(a.mean()), float(b.mean())
    cov = np.cov(a, b, ddof=1) / n
    q = float(t.ppf(1 - (1 - confidence) / 2, n - 1)) ** 2
    qa, qb, qc = mb * mb - q * cov[1, 1], -2 * (ma * mb - q * cov[0, 1]), ma * ma - q * cov[0, 0]
    ratio = ma / mb if mb != 0 else math.copysign(math.inf, ma)
    if qa <= 0:
        return Ratio(n, ratio, -math.inf, math.inf, False)
    root = math.sqrt(max(qb * qb - 4 * qa * qc, 0.0))
    return Ratio(n, ratio, (-qb - root) / (2 * qa), (-qb + root) / (2 * qa), True)


@dataclass
class Holm:
    """One hypothesis of Holm's step-down procedure: its rank among the p-values (1 = smallest),
    the level it is tested at (alpha / (m - rank + 1)), the adjusted p and whether it is rejected."""

    rank: int
    level: float
    adjusted: float
    rejected: bool


def holm(p_values: Sequence[float], alpha: float = ALPHA) -> List[Optional[Holm]]:
    """Holm-Bonferroni over the finite p-values (m of them; nan: not tested, None out): sorted
    ascending, the i-th is tested at alpha / (m - i + 1) and rejected only while every smaller
    one was; adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)), so rejected exactly
    when adjusted <= alpha."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None and math.isfinite(p))
    m = len(tested)
    out: List[Optional[Holm]] = [None] * len(p_values)
    adjusted = 0.0
    for rank, (p, i) in enumerate(tested, start=1):
        adjusted = max(adjusted, min(1.0, (m - rank + 1) * p))
        out[i] = Holm(rank, alpha / (m - rank + 1), adjusted, adjusted <= alpha)
    return out


@dataclass
class Comparison:
    """A row's paired difference to its baseline within a table (a family of comparisons):
    the paired t test, its 95 % interval, Holm's adjusted p, the interval at the level Holm
    tests it at (``holm_low``, ``holm_high``) and the verdict."""

    n: int
    diff: float
    low: float = math.nan
    high: float = math.nan
    p: float = math.nan
    p_holm: float = math.nan
    holm_level: float = math.nan
    holm_low: float = math.nan
    holm_high: float = math.nan
    verdict: str = "fewer than 2 paired seeds"


def compare_family(pairs: Dict[str, Tuple[Dict[int, float], Dict[int, float]]],
                   lower_is_better: bool = True, alpha: float = ALPHA) -> Dict[str, Comparison]:
    """Each key's (values by seed of a row, of its baseline) compared on their common seeds
    (paired t), then Holm over the keys with at least 2 pairs. The verdict is 'better' or
    'worse' only when Holm rejects (adjusted p <= alpha): then the interval at Holm's level
    1 - alpha / (m - rank + 1) excludes 0; otherwise 'no detected difference'."""
    tests = {}
    for key, (a, b) in pairs.items():
        seeds = sorted(set(a) & set(b))
        tests[key] = (paired_t([a[s] for s in seeds], [b[s] for s in seeds], 1 - alpha)
                      if len(seeds) >= 2 else len(seeds))
    keys = list(tests)
    ranks = holm([t.p if isinstance(t, PairedT) else math.nan for t in tests.values()], alpha)
    out = {}
    for key, rank in zip(keys, ranks):
        test = tests[key]
        if rank is None:
            a, b = pairs[key]
            common = sorted(set(a) & set(b))
            diff = a[common[0]] - b[common[0]] if common else math.nan
            out[key] = Comparison(len(common), diff)
            continue
        low, high = t_interval(test.mean, test.se, test.n - 1, 1 - rank.level)
        verdict = NO_DIFFERENCE
        if rank.rejected:
            verdict = "better" if (test.mean < 0) == lower_is_better else "worse"
        out[key] = Comparison(test.n, test.mean, test.low, test.high, test.p, rank.adjusted,
                              rank.level, low, high, verdict)
    return out


# ---------------------------------------------------------------- the grid's claims

NOT_SHOWN = "not shown"  # a 'better' claim whose difference is not significant after Holm
OPPOSITE = "the opposite holds"  # significantly the other way


def check_findings(grid: Grid, summary: Dict[str, dict]) -> List[dict]:
    """Each claim of the grid, decided on the final FID (rules in the report); a claim on a
    configuration without results is not decided. The 'better' claims are paired comparisons
    over the seeds, Holm-corrected together."""
    decidable = {i: item for i, item in enumerate(grid.findings)
                 if all(n in summary for n in item.runs)}
    better = compare_family({i: tuple(summary[n]["per_seed"]["fid"] for n in item.runs)
                             for i, item in decidable.items() if item.kind == "better"})
    out = []
    for i, item in enumerate(grid.findings):
        if i not in decidable:
            missing = [n for n in item.runs if n not in summary]
            verdict, detail = NOT_DECIDED, f"no results for {', '.join(missing)}"
        elif item.kind == "better":
            verdict, detail = _better(item, summary, better[i], len(better))
        else:
            decide = _close if item.kind == "close" else _monotone
            verdict, detail = decide(item, summary, len(grid.seeds))
        out.append({"claim": item.claim, "verdict": verdict, "detail": detail})
    return out


def _better(item: Finding, summary: Dict[str, dict], test: Comparison, family: int) -> tuple:
    a, b = item.runs
    detail = f"{a} {summary[a]['fid'][0]:.3g} vs {b} {summary[b]['fid'][0]:.3g}: "
    if not math.isfinite(test.p):
        return NOT_SHOWN, detail + f"difference {test.diff:+.3g} ({test.verdict}: no test)"
    detail += (f"difference {test.diff:+.3g} [{test.low:+.3g}, {test.high:+.3g}] over {test.n} paired "
               f"seeds, p {test.p:.2g}, Holm-adjusted over the {family} 'better' claims {test.p_holm:.2g}")
    # not significant is not shown, not refuted: only a significant difference the other way
    # says the claim is wrong
    verdict = {"better": "holds", "worse": OPPOSITE}.get(test.verdict, NOT_SHOWN)
    return verdict, detail


def _close(item: Finding, summary: Dict[str, dict], n_seeds: int) -> tuple:
    """Holds when |mean_a - mean_b| <= max(10 % of b, 2 standard errors); an unknown std is 0."""
    (a, std_a), (b, std_b) = (summary[n]["fid"] for n in item.runs)
    se = math.sqrt(sum((s if math.isfinite(s) else 0.0) ** 2 for s in (std_a, std_b)) / n_seeds)
    tolerance = max(0.1 * abs(b), 2 * se)
    detail = (f"{item.runs[0]} {a:.3g} vs {item.runs[1]} {b:.3g}: difference {a - b:+.3g} "
              f"(tolerance {tolerance:.3g} = max(10 % of {item.runs[1]}, 2 standard errors))")
    return ("holds" if abs(a - b) <= tolerance else "does not hold"), detail


def _monotone(item: Finding, summary: Dict[str, dict], n_seeds: int) -> tuple:
    """'increasing' / 'decreasing': every consecutive step of the mean FIDs moves that way."""
    means = [summary[n]["fid"][0] for n in item.runs]
    rising = [y > x for x, y in zip(means, means[1:])]
    wanted = rising if item.kind == "increasing" else [not r for r in rising]
    verdict = "holds" if all(wanted) else ("partly holds" if any(wanted) else "does not hold")
    return verdict, " → ".join(f"{n} {m:.3g}" for n, m in zip(item.runs, means))


def describe_commits(results: List[dict]) -> str:
    """The commits the runs trained with, as recorded by each run ('unrecorded' for runs trained
    before compare recorded it): one commit, or each with its number of runs."""
    counts: Dict[str, int] = {}
    for r in results:
        key = r.get("commit") or "unrecorded"
        counts[key] = counts.get(key, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{c} ({n} runs)" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
