"""Markdown tables of the experiment reports, and ``fmt``, the one number formatter of every
report (compare, the privacy report, the LoRA demo)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from fedrun.experiments.grid import Grid, Table
from fedrun.experiments.stats import difference, pareto_front


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


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*columns) -> List[str]:
    return [row(*columns), "|" + "---|" * len(columns)]


def main_table(grid: Grid, summary: Dict[str, dict], failures: List[dict]) -> List[str]:
    """A row per configuration: mean ± std over its seeds; configurations without results say so."""
    lines = header("configuration", "FID", "KID ×100", "floor FID", "floor KID ×100", "class TV",
                   "rarest class", "final loss", "samples seen", "bytes communicated", "wall time (s)")
    for run in grid.runs:
        s = summary.get(run.name)
        name = run.name + failed_seeds(failures, run.name)
        if s is None:
            lines.append(row(name, "no results", *["–"] * 9))
            continue
        lines.append(row(name, fmt(s["fid"]), fmt(s["kid"], scale=0.01), fmt(s["floor_fid"]),
                         fmt(s["floor_kid"], scale=0.01), fmt(s["class_tv"], 2), rarest(s),
                         fmt(s["final_loss"]), f"{s['samples'][0]:,.0f}", f"{s['bytes_total'][0]:,.0f}",
                         fmt(s["wall_s"], 3)))
    return lines


def failed_seeds(failures: List[dict], name: str) -> str:
    seeds = [str(f["seed"]) for f in failures if f["name"] == name]
    return f" (**failed: seed {', '.join(seeds)}**)" if seeds else ""


def rarest(s: dict) -> str:
    if not math.isfinite(s["min_class_fraction"][0]):
        return "–"
    return f"{fmt(s['min_class_fraction'], 2)} [{', '.join(str(c) for c in s['min_class'])}]"


def reference_rarest(summary: Dict[str, dict]) -> str:
    reference = next((s["reference_class_fractions"] for s in summary.values()
                      if s.get("reference_class_fractions")), None)
    if not reference:
        return ""
    return f" (held-out images: {min(reference):.3g}, class {int(np.argmin(reference))})"


def axis_tables(grid: Grid, summary: Dict[str, dict], item: Table) -> List[str]:
    """One markdown table per value of the axis ``item.by``: a row per run with that value
    (named by its other axes' values), the ``with`` runs as reference rows, and each row's
    difference of mean FID to the row matching ``item.baseline`` (rule of ``difference``)."""
    lines = []
    for value in grid.axis(item.by).values:
        names = grid.select({item.by: value.name})
        base = baseline_of(grid, names, item.baseline, None)
        lines += [f"### {item.name or item.by}: {value.label}", "",
                  *header("run", "FID", f"ΔFID vs {grid.label(base, item.by) if base else '–'}",
                          "class TV", "rarest class", "KID ×100", "final loss")]
        for name in item.with_ + names:
            s = summary.get(name)
            if s is None:
                lines.append(row(grid.label(name, item.by), "no results (failed)", *["–"] * 5))
                continue
            lines.append(row(grid.label(name, item.by), fmt(s["fid"]),
                             _delta(grid, summary, item, names, name, base), fmt(s["class_tv"], 2),
                             rarest(s), fmt(s["kid"], scale=0.01), fmt(s["final_loss"])))
        lines.append("")
    lines += ["ΔFID: difference of the mean final FIDs ± its standard error sqrt((std² + std_base²) "
              f"/ n), n = {len(grid.seeds)} seeds; **better**/**worse** when it exceeds 2 standard "
              "errors.", ""]
    return lines


def _delta(grid: Grid, summary: Dict[str, dict], item: Table, names: List[str], name: str,
           base: Optional[str]) -> str:
    own = baseline_of(grid, names, item.baseline, name)
    if not own or name == own or own not in summary:
        return "–"
    diff, se, verdict = difference(summary[name]["fid"], summary[own]["fid"], len(grid.seeds))
    verdict = {"lower": "**better**", "higher": "**worse**",
               "no spread known": "one seed"}.get(verdict, "within spread")
    return (f"{diff:+.3g}" + (f" ± {se:.2g}" if math.isfinite(se) else "") + f" ({verdict})"
            + (f" vs {grid.label(own, item.by)}" if own != base else ""))


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


def per_seed_table(results: List[dict]) -> List[str]:
    lines = header("configuration", "seed", "FID", "KID ×100", "final loss", "wall time (s)")
    return lines + [row(r["name"], r["seed"], f"{r['fid']:.3g}", f"{r['kid'] * 100:.3g}",
                        f"{r['final_loss']:.3g}", f"{r['wall_s']:.0f}") for r in results]


def failures_list(failures: List[dict]) -> List[str]:
    """The runs without results: each with its status, error and log file."""
    if not failures:
        return []
    lines = ["## Runs without results", ""]
    for f in failures:
        log = f" (log: `{f['log']}`)" if f.get("log") else ""
        lines.append(f"- {f['name']} seed {f['seed']}: {f['status']}: {f['error']}{log}")
    return lines + [""]
