"""``fedrun compare``: run (or collect) a grid of federated and centralized runs at the same
sample budget and seeds, and write a report folder (markdown tables, curves, findings).

    python -m fedrun compare --grid configs/grids/paper.yaml --jobs 2
    python -m fedrun compare --grid configs/grids/paper.yaml --quick      # tiny, for tests
    python -m fedrun compare --grid configs/grids/noniid.yaml --jobs 8 --backend slurm
    python -m fedrun compare --grid configs/grids/noniid.yaml --collect --records docs/results/noniid/records

grid file -> (its ``setup`` runs, made once: e.g. a public pre-training the runs start from)
-> (``tuning.tune``: the tuning runs, the choice per method and budget, tuning.json)
-> ``grid.plan`` (runner steps, tuned runs with their chosen points) -> ``runner.execute``
(finished runs are skipped, a failed run is recorded and the others go on) -> ``collect`` ->
``stats`` -> this module's report (``tables``, ``plots``): README.md (the failed runs marked),
results.json and, with tuning, tuning.json. Tuning and reporting runs go through the same
runner, so ``--jobs`` and ``--backend slurm`` apply to both.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

from fedrun.errors import FedrunError
from fedrun.experiments.collect import PAUSED, budget_failures, budget_view, collect_all
from fedrun.experiments.grid import Grid, load_grid, plan, setup_specs
from fedrun.experiments.leakage import audit_steps
from fedrun.experiments.runner import execute
from fedrun.experiments.stats import check_findings, describe_commits, summarise
from fedrun.experiments.steps import FAILED, FINISHED_EARLIER, MISSING, Outcome, RunSpec, earlier, read_record
from fedrun.experiments.tuning import TUNING_FILE, Sweep, group_specs, tune
from fedrun.experiments import plots, records, tables


class Compared(NamedTuple):
    readme: Path
    failures: List[dict]  # runs without results: name, seed, status, error, log


def compare(grid_file: str, quick: bool = False, jobs: int = 1, collect_only: bool = False,
            report_dir: Optional[str] = None, overrides: Optional[List[str]] = None,
            command: str = "", say=print, output_dir: Optional[str] = None,
            backend: Optional[str] = None, records_dir: Optional[str] = None) -> Compared:
    """Run (``collect_only``: only collect) the grid, its tuning first, and write its report.
    ``records_dir``: the study's kept records (``fedrun.experiments.records``), restored
    where a run is missing before each batch of steps and added to as they settle."""
    grid = load_grid(grid_file, quick, overrides)
    if output_dir:
        grid.output_dir = output_dir
    target = Path(report_dir) if report_dir else Path(grid.output_dir) / "report"
    started = time.perf_counter()
    progress = lambda message: say(f"compare: {message}")  # noqa: E731

    def keep(outcome: Outcome) -> None:  # --records: a run's records as soon as it settles
        records.save([outcome.spec], Path(grid.output_dir), Path(records_dir))

    warned: List[Path] = []

    def run(specs: List[RunSpec]) -> Dict[str, Outcome]:
        if records_dir:
            for folder in records.ignored_by_git(specs, Path(grid.output_dir), Path(records_dir)):
                if folder not in warned:  # what git add would leave out without a word
                    warned.append(folder)
                    progress(f"records: warning: git ignores '{folder}' (see `git check-ignore -v "
                             f"{folder}/record`): its records stay out of a commit")
            records.restore(specs, Path(grid.output_dir), Path(records_dir), progress)
        if collect_only:
            outcomes = {s.id: as_found(s) for s in specs}
        else:
            outcomes = execute(specs, jobs, backend, say=progress, on_outcome=keep if records_dir else None)
        if records_dir:  # and those settled before (--collect: the runs settled so far)
            kept, written = records.save(specs, Path(grid.output_dir), Path(records_dir))
            if written:
                progress(f"records: {written} runs kept in {records_dir} ({kept} of these steps there)")
        return outcomes

    setup = setup_specs(grid)  # grid key setup: made once, before everything that uses them
    failed = [o for o in run(setup).values() if not o.ok]
    if failed and not collect_only:
        raise FedrunError(f"the grid's setup run {failed[0].spec.id} has no results: "
                          f"{failed[0].error or failed[0].status} (log: {failed[0].log})")
    sweep = None
    if grid.tuning is not None:
        sweep = tune(grid, run, target / TUNING_FILE, progress, collect_only)
        if records_dir and sweep.reused:  # its runs kept too (a reused sweep runs none of them)
            records.save([s for g in sweep.groups for s in group_specs(grid, g, g.points)],
                         Path(grid.output_dir), Path(records_dir))
    training = plan(grid, sweep.tuned() if sweep else None)
    audits = audit_steps(grid.audit, training)  # grid key audit: fedrun audit after each run
    outcomes = run(training + audits)
    results, failures = collect_all({s.id: outcomes[s.id] for s in training})
    failures += [{"name": s.name, "seed": s.seed, "kind": "audit", "status": outcomes[s.id].status,
                  "error": outcomes[s.id].error or outcomes[s.id].status,
                  "log": str(outcomes[s.id].log) if outcomes[s.id].log else None}
                 for s in audits if not outcomes[s.id].ok]
    failures += untuned(grid, sweep)
    if not results:
        raise FedrunError(f"no run of the grid '{grid_file}' has results: " + "; ".join(
            f"{f['name']} seed {f['seed']}: {f['error']}" for f in failures[:3]))
    if collect_only:  # no invocation to time: the study's span says it
        wall, collected = None, 0
    else:
        wall = time.perf_counter() - started
        collected = sum(o.status == FINISHED_EARLIER for o in outcomes.values())
    readme = write_report(grid, results, target, command, wall, collected, failures, sweep)
    return Compared(readme, failures)


def untuned(grid: Grid, sweep: Optional[Sweep]) -> List[dict]:
    """The tuned runs that could not be planned: no point of their tuning has results."""
    if sweep is None:
        return []
    return [{"name": name, "seed": seed, "kind": grid.run(name).kind, "status": MISSING,
             "error": f"no tuning point of '{sweep.group_of(name).name}' has results", "log": None}
            for name, points in sweep.tuned().items() if not points for seed in grid.seeds]


def as_found(spec: RunSpec) -> Outcome:
    """--collect: a run as its directory holds it, finished, diverged or why not."""
    if spec.settled:
        return earlier(spec)
    record = read_record(spec) or {}
    if record.get("error") and spec.recorded(FAILED):  # it ran with these inputs and failed
        return Outcome(spec, FAILED, record.get("wall_s", 0.0), record["error"], record.get("log"))
    if record.get("error"):
        error = record["error"]
    elif spec.has_outputs:
        error = "trained with other settings than the grid's now (run the grid again)"
    elif spec.custom:
        error = f"not run (no {', '.join(spec.outputs)})"
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


def write_report(grid: Grid, results: List[dict], report_dir: Path, command: str, wall_s: Optional[float],
                 collected: int = 0, failures: Optional[List[dict]] = None,
                 sweep: Optional[Sweep] = None) -> Path:
    """README.md (the tuning's sweeps, then per budget the tables and findings; figures,
    per-seed numbers, failed runs) and results.json."""
    failures = failures or []
    report_dir.mkdir(parents=True, exist_ok=True)
    budgets = grid.budget_list
    names = [r.name for r in grid.runs]
    chosen = sweep.chosen() if sweep else {}
    views = {b: budget_view(results, b, chosen) for b in budgets}  # each budget's own numbers
    summaries = {b: summarise(views[b], names) for b in budgets}
    summary = summaries[budgets[-1]]
    figures = [*plots.plot_curves(grid, summary, report_dir),
               *plots.plot_class_mixes(grid, summary, report_dir),
               *plots.plot_differences(grid, summaries, report_dir),
               *plots.plot_privacy(grid, summary, report_dir)]
    groups = bytes_groups(grid, summary)
    if grid.bytes_plot:
        figures.append(plots.plot_bytes(summary, report_dir, grid.untrained.get("fid"), groups))
    findings = {b: check_findings(grid, summaries[b]) for b in budgets}
    commit = describe_commits(results)
    study = study_time(results, sweep)
    lines = [*_introduction(grid, results, command, wall_s, collected, commit, study),
             *(tables.sweep_tables(sweep, grid.untrained.get(sweep.metric)) if sweep else [])]
    missing = {b: budget_failures(failures, b, chosen) for b in budgets}
    if grid.tables:
        lines += tables.glance_tables(grid, summaries, grid.tables[0], missing)
    for budget in budgets:
        lines += _budget_section(grid, summaries[budget], views[budget], missing[budget], findings[budget],
                                 budget if len(budgets) > 1 else None)
    lines += tables.leakage_table(names, summary)
    if grid.bytes_plot:
        lines += tables.pareto_table(summary, grid.untrained.get("fid"), groups)
    lines += ["## Figures", "", *[f"![{p.stem}]({p.name})" for p in figures], "", "## Per seed", "",
              *tables.per_seed_table(results, budgets), "", *tables.failures_list(failures)]
    (report_dir / "README.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    (report_dir / "results.json").write_text(json.dumps(
        {"grid": grid.source, "samples": grid.samples, "budgets": budgets, "seeds": grid.seeds,
         "wall_s": wall_s, "study": study, "command": command, "commit": commit,
         "chosen": {run: {str(b): p for b, p in points.items()} for run, points in chosen.items()},
         "runs": results, "findings": findings[budgets[-1]],
         "findings_by_budget": {str(b): f for b, f in findings.items()}, "failures": failures},
        indent=1))
    return report_dir / "README.md"


def _budget_section(grid: Grid, summary: Dict[str, dict], results: List[dict], failures: List[dict],
                    findings: List[dict], budget: Optional[int]) -> List[str]:
    """The main table, its legend, the axis tables and the findings at one budget."""
    lines = [f"## At {budget:,} samples seen", ""] if budget else []
    lines += [*tables.main_table(grid, summary, failures), *_legend(grid, summary, results)]
    for item in grid.tables:
        lines += tables.axis_tables(grid, summary, item, failures)
    return lines + _findings(findings, budget)


def study_time(results: List[dict], sweep: Optional[Sweep]) -> dict:
    """The study's wall time, from its first run's start to its last run's end (the tuning's
    included), and the run time summed over its runs, tuning and reporting apart."""
    starts = [r["ended"] - r["wall_s"] for r in results]
    ends = [r["ended"] for r in results]
    cost = sweep.cost if sweep else {}
    if cost.get("started") is not None:
        starts.append(cost["started"])
        ends.append(cost["ended"])
    return {"span_s": max(ends) - min(starts), "reporting_runs": len(results),
            "reporting_run_s": sum(r["wall_s"] for r in results),
            "reporting_rounds_s": sum(r.get("rounds_s") or 0.0 for r in results),
            "tuning_runs": int(cost.get("runs", 0)), "tuning_run_s": cost.get("wall_s", 0.0),
            "tuning_rounds_s": cost.get("rounds_s") or 0.0,
            "paused_s": sum(r.get("paused_s") or 0.0 for r in results) + (cost.get("paused_s") or 0.0)}


def _introduction(grid: Grid, results: List[dict], command: str, wall_s: Optional[float], collected: int,
                  commit: str, study: dict) -> List[str]:
    from fedrun.eval.features import bias_warning

    first = results[0]
    if wall_s is None:  # --collect
        timing = ""
    elif not collected:
        timing = f"Wall time of the grid: {wall_s / 60:.1f} min. "
    else:
        timing = (f"Wall time of this invocation: {wall_s / 60:.1f} min ({len(results) - collected} runs "
                  f"trained, {collected} finished earlier and collected; each run's own time is below). ")
    hours = tables.duration
    timing += (f"The study, from its first run's start to its last run's end (any pause or break "
               f"between invocations included): {hours(study['span_s'])}; "
               f"run time summed over its runs: {hours(study['reporting_run_s'])} for "
               f"{study['reporting_runs']} reporting runs"
               + (f" and {hours(study['tuning_run_s'])} for {study['tuning_runs']} tuning runs"
                  if study["tuning_runs"] else "") + ".")
    if study.get("reporting_rounds_s"):  # the runs' own round times: no start-up, no pauses
        timing += (f" Their rounds alone (evaluations included; not the start-up, nor the pauses: a "
                   f"round over {PAUSED} × its run's median round counts at that median): "
                   f"{hours(study['reporting_rounds_s'])}"
                   + (f" and {hours(study['tuning_rounds_s'])}" if study["tuning_runs"] else "")
                   + (f" ({hours(study['paused_s'])} of pauses left out)" if study.get("paused_s") else "")
                   + ".")
    budgets = grid.budget_list
    seen = (f"every run {grid.samples:,} samples seen" if len(budgets) == 1 else
            f"compared at {', '.join(f'{b:,}' for b in budgets)} samples seen")
    warning = bias_warning(first["eval_samples"])
    return ["# fedrun compare report", "",
            f"Grid `{grid.source}`: {len(grid.runs)} configurations × seeds {grid.seeds}, {seen}; "
            f"FID/KID from {first['eval_samples']} generated samples "
            f"({first['eval_feature']} features) against {first['eval_reference']} held-out "
            + (f"images, every {grid.eval_every_samples:,} samples. " if grid.eval_every_samples
               else "images, at each budget. ") + timing,
            "", f"Command (the runs trained with the code of commit `{commit}`):", "", "```bash",
            command, "```", "", *([f"**Warning:** {warning}.", ""] if warning else [])]


def _legend(grid: Grid, summary: dict, results: List[dict]) -> List[str]:
    return ["", "Mean ± standard deviation over the seeds (sample std, n = "
            f"{len(grid.seeds)}; fewer where a row names seeds without results: diverged, the run "
            "stopped itself because every client update was rejected, or failed). FID and KID are "
            "of the EMA model at the end of the budget. Time of rounds: the run's rounds until the "
            "budget, evaluations included, not its start-up nor the time it was paused. "
            "Class TV is the total variation distance "
            "between the classifier's class distribution of the samples and the held-out labels' "
            f"(0 = the same mix of digits); rarest class: the share of the samples in their least "
            f"frequent class{tables.reference_rarest(summary)}, with that class per seed in brackets. "
            "Bytes: federated = 2 × 4 P bytes per client per round "
            "(the model down, the update up; P parameters, fp32); centralized = gradient all-reduce "
            "volume 2 (W − 1) × 4 P per step over W ranks (0 for one process).", "",
            *tables.range_legend(grid), *tables.ddp_note(results)]


def _findings(findings: List[dict], budget: Optional[int] = None) -> List[str]:
    if not findings:
        return []
    return ["## The grid's findings" + (f" at {budget:,} samples seen" if budget else ""), "",
            *[f"- **{f['claim']}**: {f['verdict']}. {f['detail']}." for f in findings],
            "", "Rules: 'close' holds when the difference of the mean FIDs is at most max(10 % of the "
            "reference, 2 standard errors of the difference); 'increasing'/'decreasing' hold when "
            "every step of the series moves the mean FID that way, 'partly' when some do; "
            "'better' holds when the first run's FID is lower than the second's in a paired t test "
            "over the seeds, Holm-corrected over the grid's 'better' claims (adjusted p <= 0.05), "
            "'the opposite holds' when the second's is lower in that test, 'not shown' when the "
            "difference is not significant either way (too few seeds or too small a difference: "
            "not evidence against the claim); a claim on a configuration without results is "
            "not decided.", ""]
