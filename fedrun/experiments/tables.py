"""Markdown tables of the experiment reports, and ``fmt``, the one number formatter of every
report (compare, the privacy report, the LoRA demo).

Every table of a grid report shows the metric's range: the real-vs-real floor and, when the grid
gives it (``untrained``), the untrained model's anchor; a mean FID or KID at or beyond the anchor
carries a dagger (not informative)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from fedrun.experiments.grid import Grid, Table
from fedrun.experiments.leakage import privacy_level
from fedrun.experiments.stats import ALPHA, compare_family, pareto_front
from fedrun.experiments.steps import BLOCKED, DIVERGED, FAILED, MISSING

NOT_INFORMATIVE = " †"


def fmt(value, digits: int = 3, scale: float = 1.0) -> str:
    """A number for a report: '–' when absent (None, nan), '∞' for infinity, floats to ``digits``
    significant digits (divided by ``scale``), a (mean, std) pair as 'mean ± std' (the std left
    out when unknown, e.g. one seed); integers and text as they are."""
    if isinstance(value, tuple):
        mean, std = value
        text = fmt(mean, digits, scale)
        return text + (f" ± {std / scale:.{digits}g}" if text != "–" and math.isfinite(std) else "")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return ("∞" if value > 0 else "−∞") if math.isinf(value) else f"{value / scale:.{digits}g}"
    return str(value)


def duration(seconds: float) -> str:
    """A wall or run time for a report: minutes up to 2 hours, then hours."""
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*columns) -> List[str]:
    return [row(*columns), "|" + "---|" * len(columns)]


def main_table(grid: Grid, summary: Dict[str, dict], failures: List[dict]) -> List[str]:
    """A row per configuration: mean ± std over its seeds; configurations without results say
    so; then the floor's and the untrained anchor's rows."""
    lines = header("configuration", "FID", "KID ×100", "confident", "classes covered", "floor FID",
                   "floor KID ×100", "class TV", "rarest class", "final loss", "samples seen",
                   "bytes communicated", "time of rounds (s)")
    for run in grid.runs:
        s = summary.get(run.name)
        name = run.name + failed_seeds(failures, run.name)
        if s is None:
            lines.append(row(name, "no results", *["–"] * 11))
            continue
        lines.append(row(name, scored(grid, s, "fid"), scored(grid, s, "kid", 0.01),
                         fmt(s["confident_fraction"], 2), fmt(s["class_coverage"], 2),
                         fmt(s["floor_fid"]), fmt(s["floor_kid"], scale=0.01), fmt(s["class_tv"], 2),
                         rarest(s), fmt(s["final_loss"]), f"{s['samples'][0]:,.0f}",
                         f"{s['bytes_total'][0]:,.0f}", fmt(run_time(s), 3)))
    return lines + [row(*reference[:5], *["–"] * 8) for reference in range_rows(grid, summary)]


def run_time(s: dict):
    """A summary's or result's time of rounds until its budget, pauses left out (results
    collected before that was kept: the run's wall time)."""
    rounds = s.get("rounds_s")
    missing = rounds is None or (isinstance(rounds, tuple) and not math.isfinite(rounds[0]))
    return s["wall_s"] if missing else rounds


def scored(grid: Grid, s: dict, key: str, scale: float = 1.0) -> str:
    """A score's mean ± std, with a dagger when the mean is at or beyond the untrained anchor."""
    anchor = grid.untrained.get(key)
    beyond = anchor is not None and math.isfinite(s[key][0]) and s[key][0] >= anchor
    return fmt(s[key], scale=scale) + (NOT_INFORMATIVE if beyond else "")


def beyond_anchor(grid: Grid, s: dict) -> bool:
    anchor = grid.untrained.get("fid")
    return anchor is not None and s["fid"][0] >= anchor


def not_informative(grid: Grid, summary: Dict[str, dict], name: str, own: str) -> bool:
    """A row and the run it is compared with both beyond the untrained anchor: their
    difference does not track training."""
    return beyond_anchor(grid, summary[name]) and beyond_anchor(grid, summary[own])


def range_rows(grid: Grid, summary: Dict[str, dict]) -> List[tuple]:
    """The reference rows: the floor, the untrained anchor (when given), the grid's other
    ``anchors``; each (name, FID, KID ×100, confident, classes covered, class TV, TSTR, in the
    held-out classes). The
    floor is the mean over the configurations (every run scores the same real images)."""
    def mean(key):
        values = [s[key][0] for s in summary.values() if math.isfinite(s[key][0])]
        return float(np.mean(values)) if values else None

    rows = [("real vs real (floor)", fmt(mean("floor_fid")), fmt(mean("floor_kid"), scale=0.01),
             fmt(mean("floor_confident_fraction"), 2), fmt(mean("floor_class_coverage"), 2), "–", "–",
             "1")]
    named = ([("untrained model (anchor)", grid.untrained)] if grid.untrained else []) + [
        (f"{name} (anchor)", scores) for name, scores in grid.anchors.items()]
    for name, u in named:
        rows.append((name, fmt(u.get("fid")), fmt(u.get("kid"), scale=0.01),
                     fmt(u.get("confident_fraction"), 2), fmt(u.get("class_coverage"), 2),
                     fmt(u.get("class_tv"), 2), fmt(u.get("tstr_accuracy"), 2), fmt(u.get("in_classes"), 2)))
    return rows


def has(summary: Dict[str, dict], key: str) -> bool:
    """Whether any configuration has the score ``key`` (e.g. 'in_classes': only where the
    held-out images leave classes out, data.classes)."""
    return any(math.isfinite(s.get(key, (math.nan,))[0]) for s in summary.values())


def range_legend(grid: Grid) -> List[str]:
    """What the floor and anchor rows and the dagger mean."""
    anchor = ("The untrained model (anchor): the same architecture, sampler and number of samples "
              "with the weights training starts from (`python -m scripts.untrained_anchor`); "
              f"{NOT_INFORMATIVE.strip()} marks a mean FID or KID at or beyond it: such a score does not "
              "track training (not informative)." if grid.untrained.get("fid") is not None else
              "No untrained anchor is given (grid key `untrained`), so scores near the ceiling "
              "cannot be told apart from an untrained model here.")
    return ["Range of the metric: the floor is the same metric for as many real training images "
            "against the same held-out images: no model can be expected to score below it. "
            + anchor + " Confident: the share of the samples the digits classifier assigns a class "
            "with probability >= 0.9; classes covered: the classes whose confident samples are at "
            "least half their share among the held-out images (of the classes the held-out images "
            "hold). Both stay informative where FID saturates. In classes (where the held-out images "
            "leave classes out, data.classes): the share of the samples classified into a class the "
            "held-out images hold.", ""]


def failed_seeds(failures: List[dict], name: str) -> str:
    """The seeds of configuration ``name`` without results, by why: diverged or failed."""
    kinds: Dict[str, List[str]] = {}
    for f in failures:
        if f["name"] == name:
            kinds.setdefault(_reason(f), []).append(str(f["seed"]))
    return "".join(f" (**{why}: seed {', '.join(seeds)}**)" for why, seeds in kinds.items())


def rarest(s: dict) -> str:
    if not math.isfinite(s["min_class_fraction"][0]):
        return "–"
    return f"{fmt(s['min_class_fraction'], 2)} [{', '.join(str(c) for c in s['min_class'])}]"


def reference_rarest(summary: Dict[str, dict]) -> str:
    reference = next((s["reference_class_fractions"] for s in summary.values()
                      if s.get("reference_class_fractions")), None)
    if not reference:
        return ""
    from fedrun.eval.features import rarest_class

    c = rarest_class(reference, reference)
    return f" (held-out images: {reference[c]:.3g}, class {c})"


def axis_tables(grid: Grid, summary: Dict[str, dict], item: Table,
                failures: Optional[List[dict]] = None) -> List[str]:
    """One markdown table per value of the axis ``item.by``: a row per run with that value
    (named by its other axes' values, and the seeds it has no results for and why), the
    ``with`` runs as reference rows, each row's paired FID difference to the row matching
    ``item.baseline`` (Holm-corrected within the table), and the floor's and the anchor's rows."""
    failures = failures or []
    lines = []
    for value in grid.axis(item.by).values:
        names = grid.select({item.by: value.name})
        base = baseline_of(grid, names, item.baseline, None)
        tests = _table_tests(grid, summary, item, names)
        tstr = has(summary, "tstr_accuracy")  # train-on-synthetic, test-on-real accuracy, when scored
        inside = has(summary, "in_classes")  # the held-out images hold only some classes
        extra = tstr + inside
        lines += [f"### {item.name or item.by}: {value.label}", "",
                  *header("run", "FID", f"ΔFID vs {grid.label(base, item.by) if base else '–'} [95 % CI]",
                          "Holm interval", "p (Holm)", "verdict", "confident", "classes covered",
                          "class TV", "rarest class", "KID ×100", *(["TSTR acc."] if tstr else []),
                          *(["in classes"] if inside else []))]
        for name in item.with_ + names:
            s = summary.get(name)
            label = grid.label(name, item.by) + failed_seeds(failures, name)
            if s is None:
                lines.append(row(label, "no results", *["–"] * (9 + extra)))
                continue
            lines.append(row(label, scored(grid, s, "fid"),
                             *_test_cells(grid, summary, item, names, name, base, tests.get(name)),
                             fmt(s["confident_fraction"], 2), fmt(s["class_coverage"], 2),
                             fmt(s["class_tv"], 2), rarest(s), scored(grid, s, "kid", 0.01),
                             *([fmt(s["tstr_accuracy"], 2)] if tstr else []),
                             *([fmt(s["in_classes"], 2)] if inside else [])))
        for reference in range_rows(grid, summary):
            lines.append(row(reference[0], reference[1], *["–"] * 4, *reference[3:6], "–",
                             reference[2], *([reference[6]] if tstr else []),
                             *([reference[7]] if inside else [])))
        lines.append("")
    return lines + statistics_legend(len(grid.seeds))


def _table_tests(grid: Grid, summary: Dict[str, dict], item: Table, names: List[str]) -> dict:
    """The table's family: every row with results against its own baseline, paired by seed."""
    pairs = {}
    for name in item.with_ + names:
        own = baseline_of(grid, names, item.baseline, name)
        if name in summary and own in summary and own != name:
            pairs[name] = (summary[name]["per_seed"]["fid"], summary[own]["per_seed"]["fid"])
    return compare_family(pairs)


def _test_cells(grid: Grid, summary: Dict[str, dict], item: Table, names: List[str], name: str,
                base: Optional[str], test) -> List[str]:
    """ΔFID [95 % CI], Holm interval, p (Holm), verdict of one row."""
    if test is None:
        return ["–"] * 4
    own = baseline_of(grid, names, item.baseline, name)
    against = f" vs {grid.label(own, item.by)}" if own != base else ""
    if not math.isfinite(test.p):
        return [f"{test.diff:+.3g}{against}", "–", "–", test.verdict]
    verdict = f"**{test.verdict}**" if test.verdict in ("better", "worse") else test.verdict
    if not_informative(grid, summary, name, own):
        verdict = "not informative (both †)"
    if test.n < len(grid.seeds):  # a seed of the row or its baseline has no result
        against += f" (n = {test.n})"
    return [f"{test.diff:+.3g} [{test.low:+.3g}, {test.high:+.3g}]{against}",
            f"[{test.holm_low:+.3g}, {test.holm_high:+.3g}] at {100 * (1 - test.holm_level):.3g} %",
            f"{test.p_holm:.2g}", verdict]


def statistics_legend(n_seeds: int) -> List[str]:
    return [f"ΔFID: the mean over the paired seeds (n = {n_seeds}, the same seeds for every row; "
            "where a row or its baseline has no result for a seed, the seeds both have, n shown) of "
            "the row's FID minus its baseline's, with its 95 % paired t interval (mean ± t(0.975, "
            "n − 1) · s_d / √n). Within each table the m comparisons are corrected by Holm's "
            "step-down procedure: ordered by p, the i-th is tested at level 0.05 / (m − i + 1) and "
            "only while every smaller p was rejected; p (Holm) is the adjusted p, max over j <= i of "
            "(m − j + 1) · p_(j). The Holm interval is the paired t interval at the level its test "
            "uses (1 − 0.05 / (m − i + 1)). **better** / **worse** only when p (Holm) <= "
            f"{ALPHA:g} (its Holm interval then excludes 0), otherwise 'no detected difference'; "
            "'not informative' when both FIDs are beyond the untrained anchor.", ""]


def glance_tables(grid: Grid, summaries: Dict[int, Dict[str, dict]], item: Table,
                  failures: Dict[int, List[dict]]) -> List[str]:
    """The verdicts of the axis tables of ``item`` in one table per budget: a row per run label
    (the ``with`` runs first), a column per value of the axis, each cell the row's ΔFID to its
    baseline there with the table's verdict (the same tests as the axis tables)."""
    values = grid.axis(item.by).values
    budgets = sorted(summaries)
    lines = ["## Verdicts at a glance", "",
             f"ΔFID to {baseline_label(grid, item)} in each {item.by}'s table (negative: lower FID), "
             "with that table's verdict: **better** / **worse** when the Holm-corrected paired test "
             "rejects, else the difference alone; † both beyond the untrained anchor (not "
             "informative); n: the seeds compared where some diverged or failed. The tables below "
             "give the intervals.", ""]
    for budget in budgets:
        summary = summaries[budget]
        cells: Dict[str, Dict[str, str]] = {}
        for value in values:
            for label, name, own, test in table_rows(grid, summary, item, value.name):
                cells.setdefault(label, {})[value.name] = _glance_cell(
                    grid, summary, name, own, test, failures.get(budget, []))
        if len(budgets) > 1:
            lines += [f"At {budget:,} samples seen:", ""]
        lines += header("run", *[v.label for v in values])
        lines += [row(label, *[by.get(v.name, "–") for v in values]) for label, by in cells.items()]
        lines.append("")
    return lines


def table_rows(grid: Grid, summary: Dict[str, dict], item: Table, value: str) -> List[tuple]:
    """The rows of ``item``'s table for one value of its axis: (label, run, the run it is
    compared with, its test or None), the ``with`` runs first; a row compared with another run
    than the table's baseline says which in its label."""
    names = grid.select({item.by: value})
    tests = _table_tests(grid, summary, item, names)
    out = []
    for name in item.with_ + names:
        label = grid.label(name, item.by)
        own = baseline_of(grid, names, item.baseline, name)
        if own != baseline_of(grid, names, item.baseline, None):
            label += f" (vs {grid.label(own, item.by)})"
        out.append((label, name, own, tests.get(name)))
    return out


def baseline_label(grid: Grid, item: Table) -> str:
    return ", ".join(str(v) for v in item.baseline.values()) if item.baseline else "the baseline"


def _glance_cell(grid: Grid, summary: Dict[str, dict], name: str, own: Optional[str], test,
                 failures: List[dict]) -> str:
    kinds: Dict[str, int] = {}
    for f in failures:
        if f["name"] == name:
            kinds[_reason(f)] = kinds.get(_reason(f), 0) + 1
    if name not in summary:
        return " / ".join(kinds) if kinds else "no results"
    if name == own:  # the baseline itself
        return f"FID {fmt(summary[name]['fid'][0])}" + (f" ({_lost(kinds)})" if kinds else "")
    if test is None or not math.isfinite(test.p):
        return "–"  # no baseline results, or fewer than 2 paired seeds
    cell = f"{test.diff:+.3g}"
    if not_informative(grid, summary, name, own):
        cell += " †"
    elif test.verdict in ("better", "worse"):
        cell += f" **{test.verdict}**"
    notes = ([f"n = {test.n}"] if test.n < len(grid.seeds) else []) + ([_lost(kinds)] if kinds else [])
    return cell + (f" ({'; '.join(notes)})" if notes else "")


def _lost(kinds: Dict[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in kinds.items())


def baseline_of(grid: Grid, names: List[str], baseline: dict, name: Optional[str]) -> Optional[str]:
    """The run among ``names`` that ``name`` is compared with: the one matching ``baseline``
    (axis -> value), except where ``name``'s value on that axis names its own ``baseline`` value
    (e.g. scaffold, trained with SGD, against FedAvg with SGD)."""
    if not baseline:
        return None
    axes = grid.run(name).axes if name else {}
    wanted = dict(baseline)
    for axis in grid.matrix:
        value = next((v for v in axis.values if v.name == axes.get(axis.axis)), None)
        if axis.axis in wanted and value is not None and value.baseline:
            wanted[axis.axis] = value.baseline
    return next((n for n in names if n in grid.select(wanted)), None)


def ddp_note(results: List[dict]) -> List[str]:
    """What the one-process centralized runs would have communicated as DDP over 4 workers."""
    model_bytes = next((r["params_bytes"] for r in results if r.get("params_bytes")), None)
    central = [r for r in results if r["kind"] == "central" and r["bytes_total"] == 0]
    if not model_bytes or not central:
        return []
    steps = central[0]["steps"]
    per_step = 2 * 3 * model_bytes
    return [f"For scale: run as DDP over W = 4 workers, the centralized baseline would move "
            f"2 × 3 × 4 P = {per_step / 1e6:.3g} MB per step, {per_step * steps / 1e9:.3g} GB over its "
            f"{steps:,} steps (P = {model_bytes // 4:,} parameters).", ""]


def pareto_table(summary: Dict[str, dict], untrained_fid: Optional[float] = None,
                 groups: Optional[Dict[str, List[str]]] = None) -> List[str]:
    """Bytes each way and final FID of every configuration, per group (e.g. partition) with the
    group's Pareto front marked (no other configuration of the group has both fewer bytes and
    a lower FID), with the metric's floor and the untrained model's score."""
    groups = groups or {"": list(summary)}
    floor = np.mean([s["floor_fid"][0] for s in summary.values()])
    anchor = f"; an untrained model scores {fmt(untrained_fid)}" if untrained_fid is not None else ""
    out = ["## Quality against communication", "",
           "Mean over seeds (± std). **Bold**: on the Pareto front of final FID against total bytes"
           + (" within the group" if len(groups) > 1 else "")
           + f". The FID floor (real vs real) is {fmt(float(floor))}{anchor}.", ""]
    for title, names in groups.items():
        mine = {n: summary[n] for n in names}
        front = set(pareto_front(mine))
        out += ([f"### {title}", ""] if title else []) + header(
            "configuration", "MB up", "MB down", "MB total", "final FID")
        for name, s in sorted(mine.items(), key=lambda item: item[1]["bytes_total"][0]):
            label = f"**{name}**" if name in front else name
            up, down = s.get("bytes_up_total", (math.nan,)), s.get("bytes_down_total", (math.nan,))
            out.append(row(label, fmt(up[0], scale=1e6), fmt(down[0], scale=1e6),
                           fmt(s["bytes_total"][0], scale=1e6), fmt(s["fid"])))
        out.append("")
    return out


def per_seed_table(results: List[dict], budgets: Optional[List[int]] = None) -> List[str]:
    """A row per run directory: FID at each budget it reached, then its final scores."""
    from fedrun.experiments.collect import at_budget

    budgets = budgets or sorted({r["samples"] for r in results})
    fids = [f"FID at {b:,}" for b in budgets] if len(budgets) > 1 else ["FID"]
    lines = ["FID at each budget the run reached; the other columns at the run's end (a tuned "
             "run trains to the last budget its point is chosen at).", ""] if len(budgets) > 1 else []
    lines += header("configuration", "seed", *fids, "KID ×100 (± subset std)", "confident",
                    "classes covered", "final loss", "time of rounds (s)")
    for r in results:
        reached = [fmt(at_budget(r, b)["fid"]) if r["samples"] >= b else "–" for b in budgets]
        kid = fmt(r["kid"], scale=0.01) + (f" ± {r['kid_std'] * 100:.2g}" if r.get("kid_std") else "")
        lines.append(row(r["name"], r["seed"], *reached, kid, fmt(r.get("confident_fraction"), 2),
                         fmt(r.get("class_coverage")), fmt(r["final_loss"]), f"{run_time(r):.0f}"))
    return lines


def sweep_tables(sweep, anchor: Optional[float] = None) -> List[str]:
    """The tuning's report: the protocol and its cost, then per sweep a table of every point
    (its metric per tuning seed and mean at each budget, the chosen one in bold with ✓, a mean
    at or beyond the untrained model's ``anchor`` with a dagger) and its edge flags."""
    lines = ["## Tuning", "", *_protocol(sweep), ""]
    if anchor is not None:
        lines[-1:-1] = [f"The untrained model scores {sweep.metric} {fmt(anchor)}; "
                        f"{NOT_INFORMATIVE.strip()}: a mean at or beyond it.", ""]
    for group in sweep.groups:
        keys = [a["key"] for a in group.axes]
        columns = [c for b in sweep.budgets for c in (f"{sweep.metric} at {b:,}: per seed", "mean")]
        lines += [f"### {group.name}", "", f"Tuning runs train `{group.run}`; the choice is reported "
                  f"for {', '.join(f'`{n}`' for n in group.serves)}.", "",
                  *header("point", *keys, *columns)]
        failed = _failed_points(sweep.failures, group.name)
        for point in group.points:
            cells = []
            for budget in sweep.budgets:
                values = group.scores.get(point.label, {}).get(str(budget), {})
                per_seed = ", ".join(fmt(values.get(str(s))) if str(s) in values
                                     else failed.get(point.label, {}).get(s, "–") for s in sweep.seeds)
                chosen = (group.choice.get(str(budget)) or {}).get("point") == point.label
                mean = (sum(values.values()) / len(values)) if len(values) == len(sweep.seeds) else None
                text = fmt(mean) + (NOT_INFORMATIVE if _beyond(mean, anchor, sweep.lower_is_better) else "")
                cells += [per_seed, f"**{text}** ✓" if chosen else text]
            label = point.label + (" (beyond an edge)" if point.extension else "")
            lines.append(row(label, *[fmt(point.values[k]) for k in keys], *cells))
        lines += ["", *_failure_notes(sweep.failures, group.name), *_edge_notes(sweep, group), ""]
    return lines


def _reason(failure: dict) -> str:
    """Why a run has no results, in a word or two: 'diverged' where the run stopped itself
    because every client update was rejected (it cannot learn at that point; records from
    before that status: told by the error), 'not run' where it never ran or did not finish
    (--collect of an unfinished grid, or a step it depends on failed), else 'failed'."""
    diverged = failure.get("status") == DIVERGED or "cannot learn" in (failure.get("error") or "")
    if diverged:
        return DIVERGED
    return MISSING if failure.get("status") in (MISSING, BLOCKED) else FAILED


def _failed_points(failures: List[dict], group: str) -> Dict[str, Dict[int, str]]:
    """The group's tuning runs without results: point label -> {seed: 'diverged' or 'failed'}."""
    failed: Dict[str, Dict[int, str]] = {}
    for f in failures:
        name, _, label = f["name"].removeprefix("tuning/").partition("@")
        if name == group:
            failed.setdefault(label, {})[f["seed"]] = _reason(f)
    return failed


def _failure_notes(failures: List[dict], group: str) -> List[str]:
    """One line per kind of failure of the group's tuning runs: the points and the first error."""
    kinds: Dict[str, List[dict]] = {}
    for f in failures:
        name, _, label = f["name"].removeprefix("tuning/").partition("@")
        if name == group:
            kinds.setdefault(_reason(f), []).append({**f, "label": label})
    notes = []
    for reason, runs in kinds.items():
        points = ", ".join(dict.fromkeys(f"{r['label']} (seed {r['seed']})" for r in runs))
        why = ("the run stopped: every client update was rejected round after round (non-finite), "
               "so the point is not a candidate" if reason == "diverged" else runs[0]["error"])
        notes.append(f"- {reason}, no results: {points}; {why} (log: `{runs[0].get('log')}`)")
    return notes


def _beyond(value: Optional[float], anchor: Optional[float], lower_is_better: bool) -> bool:
    if value is None or anchor is None:
        return False
    return value >= anchor if lower_is_better else value <= anchor


def _protocol(sweep) -> List[str]:
    cost = sweep.cost
    points = {len([p for p in g.points if not p.extension]) for g in sweep.groups}
    extended = sum(p.extension for g in sweep.groups for p in g.points)
    better = "lower" if sweep.lower_is_better else "higher"
    return [f"Every method is tuned over {'/'.join(map(str, sorted(points)))} points "
            f"({extended} more beyond optima on an edge) on the tuning seeds {sweep.seeds}, disjoint "
            f"from the reporting seeds; at each budget the point of best mean {sweep.metric} over the "
            f"tuning seeds ({better} is better; a point missing a seed is not a candidate) is the "
            "setting the reporting runs train with. Cost of the tuning: "
            f"{cost.get('runs', 0):.0f} runs, {duration(cost.get('wall_s') or 0)} of run time "
            "(summed over the runs)"
            + (f"; {duration(cost['rounds_s'])} of rounds alone (evaluations included; not the "
               "start-up, nor the pauses" + (f": {duration(cost['paused_s'])} left out"
                                             if cost.get("paused_s") else "") + ")"
               if cost.get("rounds_s") else "")
            + (f"; {len(sweep.failures)} tuning runs without results"
                                         if sweep.failures else "") + "."
            + (" Reused from tuning.json (the same tuning runs)." if sweep.reused else "")]


def _edge_notes(sweep, group) -> List[str]:
    notes = []
    for budget in sweep.budgets:
        chosen = group.choice.get(str(budget))
        if chosen is None:
            notes.append(f"- {budget:,} samples: **no point has results for every tuning seed**")
            continue
        for key, side, label in chosen.get("extended", []):
            notes.append(f"- {budget:,} samples: the optimum was on the {side} edge of `{key}`; "
                         f"extended once to {label} ({key} = {fmt(group.point(label).values[key])})")
        for key, side in chosen["edges"]:
            notes.append(f"- {budget:,} samples: **chosen {chosen['point']} is on the {side} edge of "
                         f"`{key}`** (the optimum may lie beyond the tried values)")
    return notes or ["No chosen point is on the edge of an axis."]


def failures_list(failures: List[dict]) -> List[str]:
    """The runs without results: each with its status, error and log file."""
    if not failures:
        return []
    lines = ["## Runs without results", ""]
    for f in failures:
        log = f" (log: `{f['log']}`)" if f.get("log") else ""
        status = DIVERGED if _reason(f) == DIVERGED else f["status"]  # older records: by the error
        lines.append(f"- {f['name']} seed {f['seed']}: {status}: {f['error']}{log}")
    return lines + [""]


def leakage_table(names: List[str], summary: Dict[str, dict]) -> List[str]:
    """Per configuration with an audit: epsilon, MIA AUC, TPR at 1 % FPR, memorised share (mean
    ± std over its seeds)."""
    audited = [n for n in names if n in summary and math.isfinite(summary[n].get("mia_auc", (math.nan,))[0])]
    if not audited:
        return []
    lines = ["## Leakage (the audit of each run's final model)", "",
             *header("configuration", "ε", "MIA AUC", "TPR at 1 % FPR", "memorised samples")]
    for name in audited:
        s = summary[name]
        level = privacy_level(s)
        lines.append(row(name, {"clip": "∞ (clip only, σ = 0)", "none": "∞ (no DP)"}.get(level)
                         or fmt(s["epsilon"]),
                         fmt(s["mia_auc"]), fmt(s["mia_tpr_at_1pct_fpr"]), fmt(s["memorised_fraction"])))
    lines += ["", "Mean ± std over the seeds. MIA: the loss-threshold membership-inference attack of "
              "`fedrun audit` (training images against held-out ones; AUC 0.5 = no signal); TPR at "
              "1 % FPR is left out (–) when there are too few non-members for that point. "
              "Memorised: the share of the audit's samples nearer a training image than half the "
              "held-out images' distance (pixels). ε: final/privacy.json (δ there).", ""]
    return lines
