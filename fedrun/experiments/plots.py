"""The report figures (matplotlib, Agg): FID vs samples seen per series (optionally one panel
per value of an axis), the class mix of the final samples, each table's paired differences
with their Holm intervals at every budget, bytes communicated vs FID, quality
and leakage against epsilon (the privacy-utility-leakage figure); and the
two helpers every report's figures use (``pyplot``, ``save_figure``). Every FID figure draws the
metric's range: the real-vs-real floor and, when the grid gives it, the untrained model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from fedrun.experiments.grid import Grid, Series
from fedrun.experiments.leakage import privacy_level


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, rect=None) -> Path:
    """Lay out (within ``rect`` of the figure: room for a figure legend), write (110 dpi) and
    close a report figure; returns its path."""
    plt = pyplot()
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(grid: Grid, summary: Dict[str, dict], report_dir: Path) -> List[Path]:
    """FID vs samples seen, one figure per FID series (all runs when the grid names none); a
    series with ``panels: axis`` gets one panel per value of that axis, its named runs (e.g. the
    centralized baseline) drawn in every panel. Runs without results are left out."""
    plt = pyplot()
    series = [item for item in grid.series if item.kind == "fid"]
    if not grid.series:
        series = [Series(name="all runs", file="fid_vs_samples.png", runs=[r.name for r in grid.runs])]
    paths = []
    for item in series:
        panels = [(title, [n for n in names if n in summary]) for title, names in _panels(grid, item)]
        panels = [(title, names) for title, names in panels if names]
        if not panels:
            continue
        columns = min(3, len(panels))
        rows = math.ceil(len(panels) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(6 if columns == 1 else 4.2 * columns, 4 * rows),
                                 squeeze=False, sharey=True)
        for ax, (title, names) in zip(axes.flat, panels):
            _draw_curves(ax, grid, summary, names, item.panels)
            ax.set_title(title, fontsize=10)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        if len(panels) > 1:
            fig.suptitle(item.name, fontsize=11)
        paths.append(save_figure(fig, report_dir / (item.file or f"fid_vs_samples_{len(paths)}.png")))
    return paths


def _panels(grid: Grid, item: Series) -> List[tuple]:
    """(title, run names) per panel of an FID series."""
    if not item.panels:
        return [(item.name, grid.series_runs(item))]
    picked = set(grid.series_runs(item))
    out = []
    for value in grid.axis(item.panels).values:
        names = [n for n in grid.select({item.panels: value.name}) if n in picked]
        if names:
            out.append((value.label, list(item.runs) + names))
    return out


def _draw_curves(ax, grid: Grid, summary: Dict[str, dict], names: List[str],
                 drop_axis: Optional[str]) -> None:
    floor = np.mean([summary[n]["floor_fid"][0] for n in names])
    for name in names:
        curve = np.array(summary[name]["curve"], dtype=float)
        style = "--" if summary[name]["kind"] == "central" else "-"
        ax.plot(curve[:, 0], curve[:, 1], style, marker="o", label=grid.label(name, drop_axis))
        if np.isfinite(curve[:, 2]).any():
            ax.fill_between(curve[:, 0], curve[:, 1] - np.nan_to_num(curve[:, 2]),
                            curve[:, 1] + np.nan_to_num(curve[:, 2]), alpha=0.15)
    ax.axhline(floor, color="gray", linestyle=":", label="real-vs-real floor")
    if grid.untrained.get("fid") is not None:  # above it the FID does not track training
        ax.axhline(grid.untrained["fid"], color="firebrick", linestyle=":", label="untrained model")
    for budget in grid.budget_list[:-1]:  # the earlier budgets the report compares at
        ax.axvline(budget, color="lightgray", linewidth=0.8)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("FID (mean ± std over seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)


def plot_class_mixes(grid: Grid, summary: Dict[str, dict], report_dir: Path) -> List[Path]:
    """Per ``kind: class_mix`` series: the class fractions of the final samples (mean ± std over
    seeds) of each run, next to the held-out reference's, as grouped bars per class."""
    plt = pyplot()
    paths = []
    for item in [i for i in grid.series if i.kind == "class_mix"]:
        names = [n for n in grid.series_runs(item) if summary.get(n, {}).get("class_fractions")]
        if not names:
            continue  # features without classes (inception): nothing to draw
        reference = np.array(summary[names[0]]["reference_class_fractions"], dtype=float)
        classes = np.arange(len(reference))
        width = 0.8 / (len(names) + 1)
        fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 0.15 * len(classes) * (len(names) + 1))), 4))
        ax.bar(classes - 0.4 + width / 2, reference, width, color="black", label="held-out images")
        common = _common_axis(grid, names)
        for i, name in enumerate(names, start=1):
            mean_std = np.array(summary[name]["class_fractions"], dtype=float)
            ax.bar(classes - 0.4 + width * (i + 0.5), mean_std[:, 0], width,
                   yerr=np.nan_to_num(mean_std[:, 1]), capsize=1.5, error_kw={"linewidth": 0.6},
                   label=f"{grid.label(name, common)} (TV {summary[name]['class_tv'][0]:.2f})")
        ax.set_xticks(classes)
        ax.set_xlabel("class (predicted by the digits classifier)")
        ax.set_ylabel("fraction of the samples (mean ± std over seeds)")
        ax.set_title(item.name, fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        paths.append(save_figure(fig, report_dir / (item.file or f"class_mix_{len(paths)}.png")))
    return paths


def plot_differences(grid: Grid, summaries: Dict[int, Dict[str, dict]], report_dir: Path) -> List[Path]:
    """Per table of the grid (e.g. one per partition, in one figure per table item): each row's
    paired FID difference to its baseline with its Holm interval, one marker per budget, as the
    tables decide them: filled where the corrected test rejects (better or worse), hollow where
    no difference is detected, a cross where both FIDs are beyond the untrained anchor (not
    informative). A symmetric-log axis holds differences of 0.5 and of 30 FID in one figure."""
    from fedrun.experiments.tables import baseline_label, not_informative, table_rows

    plt = pyplot()
    budgets = sorted(summaries)
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.8, len(budgets)))
    paths = []
    for item in [t for t in grid.tables if t.baseline]:
        values = grid.axis(item.by).values
        points: Dict[str, list] = {}  # panel -> (label, budget index, test, not informative)
        labels: List[str] = []
        for value in values:
            for i, budget in enumerate(budgets):
                summary = summaries[budget]
                for label, name, own, test in table_rows(grid, summary, item, value.name):
                    if test is None or not math.isfinite(test.holm_low):
                        continue
                    if label not in labels:
                        labels.append(label)
                    lost = not_informative(grid, summary, name, own)
                    points.setdefault(value.name, []).append((label, i, test, lost))
        panels = [v for v in values if v.name in points]
        if not panels:
            continue
        height = 1.4 + 0.42 * len(labels)
        fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), height), squeeze=False,
                                 sharey=True, sharex=True)
        reach = max([1.0] + [max(abs(t.holm_low), abs(t.holm_high))
                             for p in points.values() for _, _, t, _ in p])
        ticks = [t for t in (-100, -30, -10, -3, -1, 0, 1, 3, 10, 30, 100) if abs(t) <= 1.2 * reach]
        step = 0.6 / max(1, len(budgets))
        for ax, value in zip(axes[0], panels):
            for label, i, test, lost in points[value.name]:
                y = len(labels) - 1 - labels.index(label) + (i - (len(budgets) - 1) / 2) * step
                decided = test.verdict in ("better", "worse") and not lost
                ax.plot([test.holm_low, test.holm_high], [y, y], color=colours[i], linewidth=1.2)
                ax.plot([test.diff], [y], marker="x" if lost else "o", markersize=5, linestyle="",
                        color=colours[i], markerfacecolor=colours[i] if decided else "white")
            ax.axvline(0.0, color="gray", linewidth=0.8)
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(-1.2 * reach, 1.2 * reach)
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g}" for t in ticks])
            ax.set_title(value.label, fontsize=10)
            ax.set_xlabel("ΔFID (Holm interval)", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0][0].set_yticks(range(len(labels)))
        axes[0][0].set_yticklabels(list(reversed(labels)), fontsize=8)
        handles = [plt.Line2D([], [], color=c, marker="o", label=f"{b:,} samples seen")
                   for b, c in zip(budgets, colours)]
        handles += [plt.Line2D([], [], color="black", marker="o", linestyle="", label="better / worse (Holm)"),
                    plt.Line2D([], [], color="black", marker="o", markerfacecolor="white", linestyle="",
                               label="no detected difference"),
                    plt.Line2D([], [], color="black", marker="x", linestyle="",
                               label="both beyond the untrained model")]
        fig.suptitle(f"FID difference to {baseline_label(grid, item)} per {item.by} (negative: lower "
                     "FID), paired over seeds", fontsize=10)
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7)
        rect = (0, 0.4 / height, 1, 1)
        paths.append(save_figure(fig, report_dir / f"delta_fid_{item.by}.png", rect=rect))
    return paths


def _common_axis(grid: Grid, names: List[str]) -> Optional[str]:
    """An axis on which all of ``names`` that have axes agree (left out of their labels)."""
    runs = [grid.run(n) for n in names if grid.run(n).axes]
    for axis in (a.axis for a in grid.matrix):
        if runs and len({r.axes[axis] for r in runs}) == 1:
            return axis
    return None


def plot_bytes(summary: Dict[str, dict], report_dir: Path, untrained_fid: Optional[float] = None,
               groups: Optional[Dict[str, List[str]]] = None) -> Path:
    """FID against cumulative bytes (both directions), a panel per group (e.g. partition): a
    line per configuration through its evaluations (mean over seeds), its final point with the
    seeds' std, the group's Pareto front, the floor and the untrained anchor (log; symlog when a
    centralized run at 0 bytes is in)."""
    from fedrun.experiments.stats import pareto_front

    plt = pyplot()
    groups = groups or {"": list(summary)}
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.8), squeeze=False,
                             sharey=True)
    totals = [s["bytes_total"][0] / 1e6 for s in summary.values()]
    floor = np.mean([s["floor_fid"][0] for s in summary.values()])
    for ax, (title, names) in zip(axes[0], groups.items()):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # distinct colours for up to 20 configurations
        for name in names:
            s = summary[name]
            curve = np.array(s.get("bytes_curve") or [], dtype=float).reshape(-1, 3)
            line = ax.plot(curve[:, 0] / 1e6, curve[:, 1], alpha=0.5, linewidth=1)[0] if len(curve) else None
            ax.errorbar(s["bytes_total"][0] / 1e6, s["fid"][0], yerr=np.nan_to_num(s["fid"][1]),
                        marker="s" if s["kind"] == "central" else "o", capsize=3, label=name,
                        color=line.get_color() if line is not None else None)
        front = pareto_front({n: summary[n] for n in names})
        if len(front) > 1:
            ax.plot([summary[n]["bytes_total"][0] / 1e6 for n in front],
                    [summary[n]["fid"][0] for n in front], "k--", linewidth=1, label="Pareto front")
        ax.axhline(floor, color="gray", linestyle=":", label="real-vs-real floor")
        if untrained_fid is not None:
            ax.axhline(untrained_fid, color="firebrick", linestyle=":", label="untrained model")
        if min(totals) <= 0:
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(-0.5, 3 * max(1.0, max(totals)))
            ax.set_xlabel("cumulative bytes, up + down (MB; symlog, 0 = one-process centralized)")
        else:
            ax.set_xscale("log")
            ax.set_xlabel("cumulative bytes, up + down (MB)")
        ax.set_title(title or "Quality against communication", fontsize=10)
        ax.legend(fontsize=6, ncol=2)
    axes[0][0].set_ylabel("FID (lines: evaluations; points: final)")
    return save_figure(fig, report_dir / "bytes_vs_fid.png")


PRIVACY_PANELS = (("fid", "FID (lower is better)"), ("tstr_accuracy", "train-on-synthetic, "
                  "test-on-real accuracy"), ("mia_auc", "membership inference AUC"))


def plot_privacy(grid: Grid, summary: Dict[str, dict], report_dir: Path) -> List[Path]:
    """Per ``kind: privacy`` series: FID, TSTR accuracy and MIA AUC (mean ± std over seeds)
    against epsilon (log), one line per value of its ``lines`` axis through its runs with an
    epsilon; right of them the runs without noise (clip only: square; no DP: diamond); the
    series' ``runs`` as single points. The FID panel draws the floor, every panel the untrained
    model and the grid's ``anchors`` where they have the metric, the MIA panel chance (0.5) with
    the band a no-signal attack's AUC falls in (95 %) for the audit's member and non-member
    counts. One legend below the panels."""
    plt = pyplot()
    paths = []
    for item in [i for i in grid.series if i.kind == "privacy"]:
        picked = [n for n in grid.series_runs(item) if n in summary]
        if not picked:
            continue
        epsilons = [summary[n]["epsilon"][0] for n in picked
                    if math.isfinite(summary[n].get("epsilon", (math.nan,))[0])]
        if not epsilons:
            continue
        infinite = 2.0 * max(epsilons)  # where the noiseless runs sit
        fig, axes = plt.subplots(1, len(PRIVACY_PANELS), figsize=(5.0 * len(PRIVACY_PANELS), 4.2))
        for ax, (key, label) in zip(axes, PRIVACY_PANELS):
            ax.set_prop_cycle(color=plt.cm.tab10.colors)
            for value in grid.axis(item.lines).values:
                names = [n for n in grid.select({**item.select, item.lines: value.name}) if n in picked]
                _privacy_line(ax, summary, names, key, infinite, value.label)
            for name in [n for n in item.runs if n in summary]:
                x, _ = _privacy_x(summary[name], infinite)
                y, err = summary[name].get(key, (math.nan, math.nan))
                ax.errorbar([x], [y], yerr=[np.nan_to_num(err)], marker="*", markersize=9,
                            linestyle="none", capsize=3, label=name)
            if key == "fid":
                ax.axhline(np.mean([summary[n]["floor_fid"][0] for n in picked]), color="gray",
                           linestyle=":", label="real-vs-real floor")
            anchors = [("untrained model", grid.untrained), *grid.anchors.items()]
            for (name, scores), style in zip(anchors, (":", "--", "-.", (0, (1, 3)))):
                if scores.get(key) is not None:
                    ax.axhline(scores[key], color="firebrick", linestyle=style, label=name)
            if key == "mia_auc":
                ax.axhline(0.5, color="gray", linestyle=":", label="chance (MIA AUC 0.5)")
                half = chance_auc_halfwidth(summary, picked)
                if half:
                    ax.axhspan(0.5 - half, 0.5 + half, color="gray", alpha=0.15,
                               label=f"no-signal AUC, 95 % (± {half:.3f})")
            ax.set_xscale("log")
            ticks = sorted(set(float(f"{e:.3g}") for e in epsilons))  # 7.9999 -> 8
            ax.set_xticks([*ticks, infinite, 1.5 * infinite],
                          [*(f"{t:g}" for t in ticks), "clip\nonly", "no\nDP"])
            ax.minorticks_off()
            ax.set_xlabel("ε (δ = 1e-5); no noise: clip only (square), no DP (diamond)")
            ax.set_title(label, fontsize=10)
        handles = {}
        for ax in axes:  # one legend for the figure, each label once, below the panels
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        fig.suptitle(item.name, fontsize=11)
        fig.legend(list(handles.values()), list(handles), loc="lower center", fontsize=7,
                   ncol=min(5, len(handles)), frameon=False)
        paths.append(save_figure(fig, report_dir / (item.file or f"privacy_{len(paths)}.png"),
                                 rect=(0, 0.13, 1, 1)))
    return paths


def chance_auc_halfwidth(summary: Dict[str, dict], names: List[str]) -> Optional[float]:
    """Half the 95 % range of the AUC of an attack with no signal (members and non-members
    exchangeable): 1.96 x sqrt((m + n + 1) / (12 m n)), the null standard deviation of the
    Mann-Whitney statistic divided by m n, for the audit's m members and n non-members (the
    first configuration that has them); None without an audit."""
    for name in names:
        m = summary[name].get("mia_members", (math.nan,))[0]
        n = summary[name].get("mia_nonmembers", (math.nan,))[0]
        if math.isfinite(m) and math.isfinite(n) and m > 0 and n > 0:
            return 1.96 * math.sqrt((m + n + 1) / (12 * m * n))
    return None


def _privacy_x(s: dict, infinite: float) -> tuple:
    """(x position, marker) of a configuration: its epsilon, or the noiseless edge."""
    level = privacy_level(s)
    if level == "dp":
        return s["epsilon"][0], "o"
    return (infinite, "s") if level == "clip" else (1.5 * infinite, "D")


def _privacy_line(ax, summary: Dict[str, dict], names: List[str], key: str, infinite: float,
                  label: str) -> None:
    points = sorted((_privacy_x(summary[n], infinite), summary[n].get(key, (math.nan, math.nan)))
                    for n in names)
    finite = [(x, y, e) for (x, m), (y, e) in points if m == "o" and math.isfinite(y)]
    line = None
    if finite:
        xs, ys, errs = map(np.array, zip(*finite))
        line = ax.errorbar(xs, ys, yerr=np.nan_to_num(errs), marker="o", capsize=3, label=label)
    for (x, marker), (y, err) in points:
        if marker != "o" and math.isfinite(y):
            ax.errorbar([x], [y], yerr=[np.nan_to_num(err)], marker=marker, linestyle="none", capsize=3,
                        color=line[0].get_color() if line is not None else None)
