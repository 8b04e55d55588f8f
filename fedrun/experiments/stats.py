"""The grid's statistics: mean ± sample std over seeds per configuration (``summarise``), the
difference of two configurations against 2 standard errors (``difference``), and the verdicts
of the grid's claims (``check_findings``)."""

from __future__ import annotations

import math
from typing import Dict, List

import numpy as np

from fedrun.experiments.grid import Finding, Grid

NOT_DECIDED = "not decided"


def mean_std(values) -> tuple:
    """(mean, sample std) of the values that are not None; nan std for one value."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"))


def summarise(results: List[dict], run_names: List[str]) -> Dict[str, dict]:
    """Per configuration with results: each number's (mean, std) over its seeds, the class mix
    per class, and the FID curve (mean, std) per evaluation point."""
    out = {}
    for name in run_names:
        mine = [r for r in results if r["name"] == name]
        if not mine:
            continue  # every seed failed: the report says so
        summary = {"seeds": [r["seed"] for r in mine], "kind": mine[0]["kind"]}
        for key in ("fid", "kid", "floor_fid", "floor_kid", "class_tv", "min_class_fraction",
                    "final_loss", "samples", "bytes_total", "wall_s"):
            summary[key] = mean_std([r[key] for r in mine])
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


def pareto_front(summary: Dict[str, dict]) -> List[str]:
    """The configurations no other beats on both final FID and total bytes (mean over seeds;
    ties on both kept), cheapest first."""
    points = {n: (s["bytes_total"][0], s["fid"][0]) for n, s in summary.items()
              if math.isfinite(s["fid"][0])}
    front = [n for n, (b, f) in points.items()
             if not any((b2 <= b and f2 <= f) and (b2 < b or f2 < f) for b2, f2 in points.values())]
    return sorted(front, key=lambda n: points[n])


def difference(a: tuple, b: tuple, n_seeds: int) -> tuple:
    """(mean_a - mean_b, its standard error, verdict) of two (mean, std) over n_seeds seeds each.

    The verdict is 'lower' / 'higher' when the difference exceeds 2 standard errors
    sqrt((std_a^2 + std_b^2) / n), else 'within the seeds' spread'; with one seed (no std) it is
    'no spread known'."""
    diff = a[0] - b[0]
    if not (math.isfinite(a[1]) and math.isfinite(b[1])):
        return diff, float("nan"), "no spread known"
    se = math.sqrt((a[1] ** 2 + b[1] ** 2) / n_seeds)
    if abs(diff) <= 2 * se:
        return diff, se, "within the seeds' spread"
    return diff, se, ("lower" if diff < 0 else "higher")


def check_findings(grid: Grid, summary: Dict[str, dict]) -> List[dict]:
    """Each claim of the grid, decided on the mean final FID over seeds (rules in the report);
    a claim on a configuration without results is not decided."""
    out = []
    for item in grid.findings:
        missing = [n for n in item.runs if n not in summary]
        if missing:
            verdict, detail = NOT_DECIDED, f"no results for {', '.join(missing)} (failed)"
        else:
            decide = {"better": _better, "close": _close}.get(item.kind, _monotone)
            verdict, detail = decide(item, summary, len(grid.seeds))
        out.append({"claim": item.claim, "verdict": verdict, "detail": detail})
    return out


def _better(item: Finding, summary: Dict[str, dict], n_seeds: int) -> tuple:
    a, b = item.runs
    diff, se, verdict = difference(summary[a]["fid"], summary[b]["fid"], n_seeds)
    spread = (f"± {se:.2g} (standard error; 'better' needs a difference below −2 standard errors)"
              if math.isfinite(se) else "(one seed: the spread is unknown)")
    detail = (f"{a} {summary[a]['fid'][0]:.3g} vs {b} {summary[b]['fid'][0]:.3g}: "
              f"difference {diff:+.3g} {spread}")
    return ("holds" if verdict == "lower" else "does not hold"), detail


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
