"""``fedrun compare``: run (or collect) a grid of federated and centralized runs at the same
sample budget and seeds, and write a report folder (markdown tables, curves, findings).

    python -m fedrun compare --grid configs/grids/paper.yaml --jobs 2
    python -m fedrun compare --grid configs/grids/paper.yaml --quick      # tiny, for tests
    python -m fedrun compare --grid configs/grids/noniid.yaml --jobs 8 --backend slurm

grid file -> ``grid.plan`` (runner steps) -> ``runner.execute`` (finished runs are skipped, a
failed run is recorded and the others go on) -> ``collect`` -> ``stats`` -> this module's
report (``tables``, ``plots``): README.md (the failed runs marked) and results.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

from fedrun.errors import FedrunError
from fedrun.experiments.collect import collect_all
from fedrun.experiments.grid import Grid, load_grid, plan
from fedrun.experiments.runner import execute
from fedrun.experiments.stats import check_findings, describe_commits, summarise
from fedrun.experiments.steps import FINISHED_EARLIER, MISSING, Outcome, RunSpec, read_record
from fedrun.experiments import plots, tables


class Compared(NamedTuple):
    readme: Path
    failures: List[dict]  # runs without results: name, seed, status, error, log


def compare(grid_file: str, quick: bool = False, jobs: int = 1, collect_only: bool = False,
            report_dir: Optional[str] = None, overrides: Optional[List[str]] = None,
            command: str = "", say=print, output_dir: Optional[str] = None,
            backend: Optional[str] = None) -> Compared:
    """Run (``collect_only``: only collect) the grid and write its report."""
    grid = load_grid(grid_file, quick, overrides)
    if output_dir:
        grid.output_dir = output_dir
    specs = plan(grid)
    started = time.perf_counter()
    if collect_only:
        outcomes = {s.id: as_found(s) for s in specs}
    else:
        outcomes = execute(specs, jobs, backend, say=lambda m: say(f"compare: {m}"))
    results, failures = collect_all(outcomes)
    if not results:
        raise FedrunError(f"no run of the grid '{grid_file}' has results: " + "; ".join(
            f"{f['name']} seed {f['seed']}: {f['error']}" for f in failures[:3]))
    if collect_only:  # the grid's: from the first run's start to the last run's end
        wall = max(r["ended"] for r in results) - min(r["ended"] - r["wall_s"] for r in results)
        collected = 0
    else:
        wall = time.perf_counter() - started
        collected = sum(o.status == FINISHED_EARLIER for o in outcomes.values())
    target = Path(report_dir) if report_dir else Path(grid.output_dir) / "report"
    readme = write_report(grid, results, target, command, wall, collected, failures)
    return Compared(readme, failures)


def as_found(spec: RunSpec) -> Outcome:
    """--collect: a run as its directory holds it, finished or why not."""
    if spec.finished:
        return Outcome(spec, FINISHED_EARLIER)
    record = read_record(spec) or {}
    if record.get("error"):
        error = record["error"]
    elif spec.has_outputs:
        error = "trained with other settings than the grid's now (run the grid again)"
    else:
        error = "unfinished (no final/ or no FID at its last round)"
    return Outcome(spec, MISSING, error=error, log=record.get("log"))


def bytes_groups(grid: Grid, summary: Dict[str, dict]) -> Dict[str, List[str]]:
    """The configurations compared on quality against bytes, grouped like the grid's first
    table (``by``: e.g. one group per partition, each with its own Pareto front, and the table's
    reference rows ``with`` in every group); one group of all of them when the grid has no
    table."""
    if not grid.tables:
        return {"": list(summary)}
    table = grid.tables[0]
    axis = grid.axis(table.by)
    groups = {v.title or v.name: [n for n in [*table.with_, *grid.select({axis.axis: v.name})]
                                  if n in summary]
              for v in axis.values}
    return {title: names for title, names in groups.items() if names}


def write_report(grid: Grid, results: List[dict], report_dir: Path, command: str, wall_s: float,
                 collected: int = 0, failures: Optional[List[dict]] = None) -> Path:
    """README.md (tables, findings, figures, per-seed numbers, failed runs) and results.json."""
    failures = failures or []
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(results, [r.name for r in grid.runs])
    figures = [*plots.plot_curves(grid, summary, report_dir),
               *plots.plot_class_mixes(grid, summary, report_dir)]
    groups = bytes_groups(grid, summary)
    if grid.bytes_plot:
        figures.append(plots.plot_bytes(summary, report_dir, grid.untrained_fid, groups))
    findings = check_findings(grid, summary)
    commit = describe_commits(results)
    lines = [*_introduction(grid, results, command, wall_s, collected, commit),
             *tables.main_table(grid, summary, failures), *_legend(grid, summary, results)]
    for item in grid.tables:
        lines += tables.axis_tables(grid, summary, item)
    if grid.bytes_plot:
        lines += tables.pareto_table(summary, grid.untrained_fid, groups)
    lines += _findings(findings)
    lines += ["## Figures", "", *[f"![{p.stem}]({p.name})" for p in figures], "", "## Per seed", "",
              *tables.per_seed_table(results), "", *tables.failures_list(failures)]
    (report_dir / "README.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    (report_dir / "results.json").write_text(json.dumps(
        {"grid": grid.source, "samples": grid.samples, "seeds": grid.seeds, "wall_s": wall_s,
         "command": command, "commit": commit, "runs": results, "findings": findings,
         "failures": failures}, indent=1))
    return report_dir / "README.md"


def _introduction(grid: Grid, results: List[dict], command: str, wall_s: float, collected: int,
                  commit: str) -> List[str]:
    from fedrun.eval.features import bias_warning

    first = results[0]
    timing = (f"Wall time of the grid: {wall_s / 60:.1f} min." if not collected else
              f"Wall time of this invocation: {wall_s / 60:.1f} min ({len(results) - collected} runs "
              f"trained, {collected} finished earlier and collected; each run's own time is below).")
    warning = bias_warning(first["eval_samples"])
    return ["# fedrun compare report", "",
            f"Grid `{grid.source}`: {len(grid.runs)} configurations × seeds {grid.seeds}, every run "
            f"{grid.samples:,} samples seen; FID/KID from {first['eval_samples']} generated samples "
            f"({first['eval_feature']} features) against {first['eval_reference']} held-out "
            f"images, every {grid.eval_every_samples:,} samples. " + timing,
            "", f"Command (the runs trained with the code of commit `{commit}`):", "", "```bash",
            command, "```", "", *([f"**Warning:** {warning}.", ""] if warning else [])]


def _legend(grid: Grid, summary: dict, results: List[dict]) -> List[str]:
    return ["", "Mean ± standard deviation over the seeds (sample std, n = "
            f"{len(grid.seeds)}). FID and KID are of the EMA model at the end of the budget. The floor is "
            "the same metric for as many real training images against the same held-out images: a "
            "model cannot be expected to score below it. Class TV is the total variation distance "
            "between the classifier's class distribution of the samples and the held-out labels' "
            f"(0 = the same mix of digits); rarest class: the share of the samples in their least "
            f"frequent class{tables.reference_rarest(summary)}, with that class per seed in brackets. "
            "Bytes: federated = 2 × 4 P bytes per client per round "
            "(the model down, the update up; P parameters, fp32); centralized = gradient all-reduce "
            "volume 2 (W − 1) × 4 P per step over W ranks (0 for one process).", "",
            *tables.ddp_note(results)]


def _findings(findings: List[dict]) -> List[str]:
    if not findings:
        return []
    return ["## The grid's findings", "",
            *[f"- **{f['claim']}**: {f['verdict']}. {f['detail']}." for f in findings],
            "", "Rules: 'close' holds when the difference of the mean FIDs is at most max(10 % of the "
            "reference, 2 standard errors of the difference); 'increasing'/'decreasing' hold when "
            "every step of the series moves the mean FID that way, 'partly' when some do; "
            "'better' holds when the first run's mean FID is lower than the second's by more "
            "than 2 standard errors of the difference; a claim on a configuration without results "
            "is not decided.", ""]
