"""``fedrun compare``: run (or collect) a grid of federated and centralized runs at the same
sample budget and seeds, and write a report folder (markdown table, curves, findings).

    python -m fedrun compare --grid configs/grids/paper.yaml --jobs 2
    python -m fedrun compare --grid configs/grids/paper.yaml --quick      # tiny, for tests

The grid file (see configs/grids/paper.yaml) names a base config, the seeds, the budget in
samples, the evaluation points, the runs (each a list of overrides; ``kind: central`` for the
baseline), the series to plot and the claims to check. Instead of (or besides) listing runs, a
``matrix`` names axes of overrides (e.g. partitions x methods, configs/grids/noniid.yaml) whose
every combination is a run named ``<value>-<value>``; ``series`` entries may then select runs by
axis value, split a figure into one panel per value of an axis, or draw the class mix of the
samples (``kind: class_mix``), and ``tables`` write one table per value of an axis with each row's
difference to a baseline row. For every run the comparison derives

    rounds     = samples / (K x E x B)          (federated; central: central.samples = samples)
    eval.every = eval_every_samples / (K x E x B)
    ema.decay  = H / (H + K x E x B)             (H = ema_horizon_samples)

so that all runs see the same number of samples, are evaluated at the same points, and average
their EMA over the same number of samples: with that decay the EMA's weights have a mean age of
H samples in the steady state; after the warm-up (H / (K x E x B) rounds, ``fedrun.engine.ema.EMA``)
the mean age approaches H geometrically from below. A run directory that already holds a
finished run (``final/`` and an evaluation at its last round) is collected, not retrained.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from fedrun.errors import ConfigError, FedrunError

RUN_INFO = "compare_run.json"


# ---------------------------------------------------------------- the grid

@dataclass
class Grid:
    base_config: Optional[str]
    output_dir: str
    seeds: List[int]
    samples: int
    eval_every_samples: int
    ema_horizon_samples: int
    overrides: List[str]
    runs: List[dict]
    series: List[dict] = field(default_factory=list)
    findings: List[dict] = field(default_factory=list)
    matrix: List[dict] = field(default_factory=list)
    """Axes ``{axis: name, values: [{name, overrides, title?, baseline?}]}``: a run per
    combination (expanded into ``runs`` by load_grid, each with its ``axes``: axis -> value name).
    A value's ``baseline`` names the value of the same axis its rows are compared with in
    ``tables`` instead of the table's baseline."""
    tables: List[dict] = field(default_factory=list)
    """``{by: axis, baseline: {axis: value}, with: [runs]}``: one report table per value of ``by``."""
    bytes_plot: bool = True
    """Draw bytes communicated vs FID (uninformative when every federated run sends the same)."""
    source: str = ""


def load_grid(path: str, quick: bool = False, extra_overrides: Optional[List[str]] = None) -> Grid:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"grid file '{path}' does not exist")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"grid file '{path}' is not valid YAML: {exc}") from None
    quick_section = raw.pop("quick", None) or {}
    known = set(Grid.__dataclass_fields__) - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"grid file '{path}': unknown keys {unknown} (known: {sorted(known)})")
    if quick:
        raw.update({k: v for k, v in quick_section.items() if k != "overrides"})
        raw["overrides"] = list(raw.get("overrides") or []) + list(quick_section.get("overrides") or [])
        raw["output_dir"] = str(raw.get("output_dir", "runs/compare")) + "_quick"
    raw["overrides"] = list(raw.get("overrides") or []) + list(extra_overrides or [])
    for key in ("seeds", "samples", "eval_every_samples"):
        if key not in raw:
            raise ConfigError(f"grid file '{path}': missing key '{key}'")
    if "runs" not in raw and "matrix" not in raw:
        raise ConfigError(f"grid file '{path}': missing key 'runs' (or 'matrix')")
    raw.setdefault("output_dir", "runs/compare")
    raw.setdefault("base_config", None)
    raw.setdefault("ema_horizon_samples", 5120)
    raw["matrix"] = list(raw.get("matrix") or [])
    raw["runs"] = list(raw.get("runs") or []) + expand_matrix(raw["matrix"], path)
    names = [r.get("name") for r in raw["runs"]]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"grid file '{path}': every run needs a unique 'name', got {names}")
    grid = Grid(**raw, source=str(file))
    for group in ("series", "findings"):
        for item in getattr(grid, group):
            missing = [n for n in item.get("runs", []) if n not in names]
            if missing:
                raise ConfigError(f"grid file '{path}': {group} entry names unknown runs {missing}")
    for item in grid.findings:
        wanted = {"close": 2, "better": 2, "increasing": None, "decreasing": None}
        if item.get("kind") not in wanted:
            raise ConfigError(f"grid file '{path}': finding kind must be one of {sorted(wanted)}, "
                              f"got '{item.get('kind')}'")
        if wanted[item["kind"]] and len(item["runs"]) != wanted[item["kind"]]:
            raise ConfigError(f"grid file '{path}': a '{item['kind']}' finding compares 2 runs, "
                              f"got {item['runs']}")
    for item in grid.series:
        _check_series(grid, item, path)
    for item in grid.tables:
        _check_table(grid, item, path)
    return grid


def expand_matrix(axes: List[dict], path: str = "grid") -> List[dict]:
    """Every combination of the axes' values as a run: name ``a-b``, overrides in axis order."""
    import itertools

    if not axes:
        return []
    for axis in axes:
        values = [v.get("name") for v in axis.get("values") or []]
        if not axis.get("axis") or not values or any(not v for v in values) or len(set(values)) != len(values):
            raise ConfigError(f"grid file '{path}': a matrix axis needs an 'axis' name and 'values' "
                              f"with unique names, got {axis}")
    for axis in axes:
        values = [v["name"] for v in axis["values"]]
        wrong = [v["baseline"] for v in axis["values"] if v.get("baseline") not in (None, *values)]
        if wrong:
            raise ConfigError(f"grid file '{path}': matrix axis '{axis['axis']}': baseline {wrong} "
                              f"is not one of its values {values}")
    names = [a["axis"] for a in axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid file '{path}': matrix axes must have unique names, got {names}")
    runs = []
    for combination in itertools.product(*(a["values"] for a in axes)):
        runs.append({"name": "-".join(v["name"] for v in combination),
                     "overrides": [o for v in combination for o in v.get("overrides") or []],
                     "axes": {a["axis"]: v["name"] for a, v in zip(axes, combination)}})
    return runs


def _axis_values(grid: Grid, axis: str, path: str) -> List[str]:
    for item in grid.matrix:
        if item["axis"] == axis:
            return [v["name"] for v in item["values"]]
    raise ConfigError(f"grid file '{path}': unknown matrix axis '{axis}' "
                      f"(axes: {[a['axis'] for a in grid.matrix]})")


def _check_selection(grid: Grid, select: dict, path: str) -> None:
    for axis, wanted in select.items():
        known = _axis_values(grid, axis, path)
        unknown = [v for v in (wanted if isinstance(wanted, list) else [wanted]) if v not in known]
        if unknown:
            raise ConfigError(f"grid file '{path}': axis '{axis}' has no values {unknown} (values: {known})")


def _check_series(grid: Grid, item: dict, path: str) -> None:
    kind = item.get("kind", "fid")
    if kind not in ("fid", "class_mix"):
        raise ConfigError(f"grid file '{path}': series kind must be 'fid' or 'class_mix', got '{kind}'")
    _check_selection(grid, item.get("select") or {}, path)
    if item.get("panels"):
        if kind != "fid":
            raise ConfigError(f"grid file '{path}': 'panels' is for FID series, not '{kind}'")
        _axis_values(grid, item["panels"], path)
    if not series_runs(grid, item):
        raise ConfigError(f"grid file '{path}': series '{item.get('name')}' selects no runs")


def _check_table(grid: Grid, item: dict, path: str) -> None:
    _axis_values(grid, item.get("by", ""), path)
    _check_selection(grid, item.get("baseline") or {}, path)
    missing = [n for n in item.get("with") or [] if n not in [r["name"] for r in grid.runs]]
    if missing:
        raise ConfigError(f"grid file '{path}': table names unknown runs {missing}")


def select_runs(grid: Grid, select: dict) -> List[str]:
    """Names of the matrix runs whose axis values match ``select`` (axis -> value or values)."""
    def matches(run: dict) -> bool:
        axes = run.get("axes") or {}
        return bool(axes) and all(axes.get(axis) in (wanted if isinstance(wanted, list) else [wanted])
                                  for axis, wanted in select.items())
    return [r["name"] for r in grid.runs if matches(r)]


def series_runs(grid: Grid, item: dict) -> List[str]:
    """A series' runs: those it names, then the matrix runs its ``select`` (or ``panels``) picks."""
    picked = select_runs(grid, item.get("select") or {}) if item.get("select") or item.get("panels") else []
    return list(item.get("runs") or []) + [n for n in picked if n not in (item.get("runs") or [])]


@dataclass
class RunSpec:
    name: str
    kind: str  # 'train' or 'central'
    seed: int
    run_dir: Path
    overrides: List[str]
    round_samples: int


def _divide(total: int, unit: int, what: str, name: str) -> int:
    if total % unit:
        raise ConfigError(f"grid run '{name}': {what} ({total}) is not a multiple of the samples of "
                          f"one round ({unit} = K x E x B); choose budgets divisible by it")
    return total // unit


def plan_runs(grid: Grid) -> List[RunSpec]:
    """Every (run, seed) with its derived overrides; checks the budgets divide into rounds."""
    from fedrun.engine.central import federated_steps_per_round, plan
    from fedrun.config import load_config

    specs = []
    for run in grid.runs:
        kind = run.get("kind", "train")
        if kind not in ("train", "central"):
            raise ConfigError(f"grid run '{run['name']}': kind must be 'train' or 'central', got '{kind}'")
        overrides = list(grid.overrides) + list(run.get("overrides") or [])
        cfg = load_config(grid.base_config, overrides)
        if cfg.local_epochs is not None:
            raise ConfigError(f"grid run '{run['name']}': use local_steps, not local_epochs, in a "
                              "comparison (the budget must divide into rounds)")
        # The runs' own arithmetic; client sizes only matter with local_epochs, refused above.
        client_sizes = [0] * cfg.num_clients
        if kind == "central":
            schedule = plan(cfg, client_sizes)
            steps = schedule["steps_per_round"]
            round_samples = steps * schedule["batch"]
        else:
            round_samples = federated_steps_per_round(cfg, client_sizes) * cfg.optim.batch_size
        rounds = _divide(grid.samples, round_samples, "samples", run["name"])
        every = _divide(grid.eval_every_samples, round_samples, "eval_every_samples", run["name"])
        if grid.ema_horizon_samples < 0:
            raise ConfigError(f"grid: ema_horizon_samples must be >= 0, got {grid.ema_horizon_samples}")
        # Mean age d / (1 - d) rounds = H samples (fedrun.engine.ema.EMA).
        decay = grid.ema_horizon_samples / (grid.ema_horizon_samples + round_samples)
        derived = [f"rounds={rounds}", f"eval.every={every}", f"ema.decay={decay:.6g}"]
        if kind == "central":
            derived += [f"central.samples={grid.samples}", f"central.steps_per_round={steps}"]
        for seed in grid.seeds:
            run_dir = Path(grid.output_dir) / "runs" / run["name"] / f"seed{seed}"
            specs.append(RunSpec(run["name"], kind, seed, run_dir,
                                 overrides + derived + [f"seed={seed}", f"output_dir={run_dir}"],
                                 round_samples))
    return specs


# ---------------------------------------------------------------- running

def is_finished(run_dir: Path) -> bool:
    from fedrun.engine.metrics import read_metrics

    records = read_metrics(run_dir)
    return (run_dir / "final").is_dir() and bool(records) and "fid" in records[-1]


def execute(spec: RunSpec, base_config: Optional[str], in_process: bool,
            commit: Optional[str] = None) -> float:
    """Train one run (overwriting an unfinished one); returns its wall time in seconds.

    In process, a failed run raises its FedrunError; as a subprocess (``python -m fedrun``), a
    FedrunError names the run and its log."""
    overrides = spec.overrides + ["overwrite=true"]
    started = time.perf_counter()
    if in_process:
        _train(spec.kind, base_config, overrides)
    else:
        spec.run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = spec.run_dir.parent / f"seed{spec.seed}.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", WANDB_SILENT="true")
        args = ([f"--config={base_config}"] if base_config else []) + overrides
        with open(log, "w") as handle:
            code = subprocess.call([sys.executable, "-m", "fedrun", spec.kind] + args,
                                   stdout=handle, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            raise FedrunError(f"run '{spec.name}' seed {spec.seed} failed (exit code {code}); "
                              f"see {log}")
    wall = time.perf_counter() - started
    (spec.run_dir / RUN_INFO).write_text(json.dumps({"wall_s": wall, "kind": spec.kind,
                                                     "overrides": spec.overrides, "commit": commit}))
    return wall


def _train(kind: str, base_config: Optional[str], overrides: List[str]) -> Path:
    """``fedrun train`` or ``fedrun central`` of one run, through the library."""
    from fedrun.config import load_config

    cfg = load_config(base_config, overrides)
    if kind == "central":
        from fedrun.engine.central import run_central

        return run_central(cfg)
    from fedrun.engine import simulator

    return simulator.run(cfg)


def run_grid(grid: Grid, jobs: int = 1, say=print, commit: Optional[str] = None) -> List[RunSpec]:
    """Train what is missing: in this process (jobs=1) or as ``jobs`` parallel processes; each
    run records ``commit``, the code it trains with."""
    specs = plan_runs(grid)
    todo = [s for s in specs if not is_finished(s.run_dir)]
    say(f"compare: {len(specs)} runs ({len(specs) - len(todo)} already finished), "
        f"{grid.samples} samples each, {'in this process' if jobs == 1 else f'{jobs} processes'}")

    def one(spec: RunSpec) -> None:
        wall = execute(spec, grid.base_config, in_process=jobs == 1, commit=commit)
        say(f"compare: {spec.name} seed {spec.seed} done in {wall:.0f} s")

    if jobs == 1:
        for spec in todo:
            one(spec)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in [pool.submit(one, s) for s in todo]:
                future.result()
    return specs


# ---------------------------------------------------------------- collecting

def collect(spec: RunSpec) -> dict:
    """The numbers of one finished run."""
    from fedrun.engine.metrics import read_metrics

    if not spec.run_dir.is_dir():
        raise FedrunError(f"run directory '{spec.run_dir}' does not exist (run the grid without --collect)")
    records = read_metrics(spec.run_dir)
    evals = [r for r in records if "fid" in r]
    if not records or not evals:
        raise FedrunError(f"run '{spec.run_dir}' has no evaluation records in metrics.jsonl")
    last = records[-1]
    info_file = spec.run_dir / RUN_INFO
    commit = None  # the code the run trained with, when compare recorded it
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        wall, ended, commit = info["wall_s"], info_file.stat().st_mtime, info.get("commit")
    else:
        wall = sum(r.get("round_time_s", 0.0) for r in records)
        ended = (spec.run_dir / "metrics.jsonl").stat().st_mtime
    final = evals[-1]
    fractions = final.get("class_fractions")
    min_class = final.get("min_class")
    if min_class is None and fractions:  # records written before min_class existed
        min_class = int(np.argmin(fractions))
    return {
        "name": spec.name, "seed": spec.seed, "kind": spec.kind, "commit": commit,
        "fid": final["fid"], "kid": final["kid"], "floor_fid": final["floor_fid"],
        "floor_kid": final["floor_kid"], "class_tv": final.get("class_tv"),
        "class_fractions": fractions, "reference_class_fractions": final.get("reference_class_fractions"),
        "min_class": min_class, "min_class_fraction": None if min_class is None else fractions[min_class],
        "final_loss": last["train_loss"], "samples": last["samples"], "bytes_total": last["bytes_total"],
        "wall_s": wall, "ended": ended, "eval_samples": final["eval_samples"], "eval_reference": final["eval_reference"],
        "eval_feature": final["eval_feature"],
        "curve": [(r["samples"], r["fid"]) for r in evals],
        "params_bytes": last.get("bytes_sent_per_client"),
        "steps": last.get("steps"),  # central runs: optimizer steps taken
    }


def _mean_std(values) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"))


def summarise(results: List[dict], run_names: List[str]) -> Dict[str, dict]:
    out = {}
    for name in run_names:
        mine = [r for r in results if r["name"] == name]
        summary = {"seeds": [r["seed"] for r in mine], "kind": mine[0]["kind"]}
        for key in ("fid", "kid", "floor_fid", "floor_kid", "class_tv", "min_class_fraction",
                    "final_loss", "samples", "bytes_total", "wall_s"):
            summary[key] = _mean_std([r[key] for r in mine])
        summary["min_class"] = [r["min_class"] for r in mine]  # per seed
        fractions = [r["class_fractions"] for r in mine if r["class_fractions"]]
        if fractions:  # per class, over the seeds
            summary["class_fractions"] = [_mean_std(column) for column in zip(*fractions)]
            summary["reference_class_fractions"] = mine[0]["reference_class_fractions"]
        points = sorted({s for r in mine for s, _ in r["curve"]})
        summary["curve"] = [(s, *_mean_std([f for r in mine for s2, f in r["curve"] if s2 == s]))
                            for s in points]
        out[name] = summary
    return out


# ---------------------------------------------------------------- findings

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
    """Each claim of the grid, decided on the mean final FID over seeds (rules in the report)."""
    out = []
    for item in grid.findings:
        runs = item["runs"]
        means = [summary[n]["fid"][0] for n in runs]
        stds = [summary[n]["fid"][1] for n in runs]
        n_seeds = len(grid.seeds)
        if item["kind"] == "better":
            diff, se, verdict = difference(summary[runs[0]]["fid"], summary[runs[1]]["fid"], n_seeds)
            spread = (f"± {se:.2g} (standard error; 'better' needs a difference below −2 standard errors)"
                      if math.isfinite(se) else "(one seed: the spread is unknown)")
            verdict = "holds" if verdict == "lower" else "does not hold"
            detail = f"{runs[0]} {means[0]:.3g} vs {runs[1]} {means[1]:.3g}: difference {diff:+.3g} {spread}"
        elif item["kind"] == "close":
            a, b = means[0], means[1]
            se = math.sqrt(sum((s if math.isfinite(s) else 0.0) ** 2 for s in stds[:2]) / n_seeds)
            tolerance = max(0.1 * abs(b), 2 * se)
            verdict = "holds" if abs(a - b) <= tolerance else "does not hold"
            detail = (f"{runs[0]} {a:.3g} vs {runs[1]} {b:.3g}: difference {a - b:+.3g} "
                      f"(tolerance {tolerance:.3g} = max(10 % of {runs[1]}, 2 standard errors))")
        else:
            pairs = list(zip(means, means[1:]))
            rising = [y > x for x, y in pairs]
            wanted = rising if item["kind"] == "increasing" else [not r for r in rising]
            verdict = "holds" if all(wanted) else ("partly holds" if any(wanted) else "does not hold")
            detail = " → ".join(f"{n} {m:.3g}" for n, m in zip(runs, means))
        out.append({"claim": item["claim"], "verdict": verdict, "detail": detail})
    return out


# ---------------------------------------------------------------- the report

def _fmt(mean_std: tuple, digits: int = 3, scale: float = 1.0) -> str:
    mean, std = mean_std
    if not math.isfinite(mean):
        return "–"
    text = f"{mean / scale:.{digits}g}"
    return text + (f" ± {std / scale:.{digits}g}" if math.isfinite(std) else "")


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


def write_report(grid: Grid, summary: Dict[str, dict], results: List[dict], report_dir: Path,
                 command: str, wall_s: float, commit: Optional[str] = None, collected: int = 0) -> Path:
    from fedrun.eval.features import bias_warning

    report_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(grid, summary, report_dir) + plot_class_mixes(grid, summary, report_dir)
    if grid.bytes_plot:
        plots.append(plot_bytes(summary, report_dir))
    findings = check_findings(grid, summary)
    any_result = results[0]
    lines = [
        "# fedrun compare report", "",
        f"Grid `{grid.source}`: {len(grid.runs)} configurations × seeds {grid.seeds}, every run "
        f"{grid.samples:,} samples seen; FID/KID from {any_result['eval_samples']} generated samples "
        f"({any_result['eval_feature']} features) against {any_result['eval_reference']} held-out "
        f"images, every {grid.eval_every_samples:,} samples. "
        + (f"Wall time of the grid: {wall_s / 60:.1f} min." if not collected else
           f"Wall time of this invocation: {wall_s / 60:.1f} min ({len(results) - collected} runs "
           f"trained, {collected} finished earlier and collected; each run's own time is below)."),
        "", f"Command (the runs trained with the code of commit `{commit}`):", "", "```bash", command, "```", "",
        *([f"**Warning:** {bias_warning(any_result['eval_samples'])}.", ""]
          if bias_warning(any_result["eval_samples"]) else []),
        "| configuration | FID | KID ×100 | floor FID | floor KID ×100 | class TV | rarest class | final loss | samples seen | bytes communicated | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in grid.runs:
        s = summary[run["name"]]
        lines.append(f"| {run['name']} | {_fmt(s['fid'])} | {_fmt(s['kid'], scale=0.01)} | "
                     f"{_fmt(s['floor_fid'])} | {_fmt(s['floor_kid'], scale=0.01)} | {_fmt(s['class_tv'], 2)} | "
                     f"{_rarest(s)} | {_fmt(s['final_loss'])} | {s['samples'][0]:,.0f} | "
                     f"{s['bytes_total'][0]:,.0f} | {_fmt(s['wall_s'], 3)} |")
    lines += [
        "", "Mean ± standard deviation over the seeds (sample std, n = "
        f"{len(grid.seeds)}). FID and KID are of the EMA model at the end of the budget. The floor is "
        "the same metric for as many real training images against the same held-out images: a "
        "model cannot be expected to score below it. Class TV is the total variation distance "
        "between the classifier's class distribution of the samples and the held-out labels' "
        f"(0 = the same mix of digits); rarest class: the share of the samples in their least "
        f"frequent class{_reference_rarest(summary)}, with that class per seed in brackets. Bytes: federated = 2 × 4 P bytes per client per round "
        "(the model down, the update up; P parameters, fp32); centralized = gradient all-reduce "
        "volume 2 (W − 1) × 4 P per step over W ranks (0 for one process).", "",
        *_ddp_note(results),
    ]
    for item in grid.tables:
        lines += axis_tables(grid, summary, item)
    if findings:
        lines += ["## The grid's findings", ""]
    for f in findings:
        lines.append(f"- **{f['claim']}**: {f['verdict']}. {f['detail']}.")
    if findings:
        lines += ["", "Rules: 'close' holds when the difference of the mean FIDs is at most max(10 % of the "
                  "reference, 2 standard errors of the difference); 'increasing'/'decreasing' hold when "
                  "every step of the series moves the mean FID that way, 'partly' when some do; "
                  "'better' holds when the first run's mean FID is lower than the second's by more "
                  "than 2 standard errors of the difference.", ""]
    lines += ["## Figures", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Per seed", "", "| configuration | seed | FID | KID ×100 | final loss | wall time (s) |",
              "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['seed']} | {r['fid']:.3g} | {r['kid'] * 100:.3g} | "
                     f"{r['final_loss']:.3g} | {r['wall_s']:.0f} |")
    (report_dir / "README.md").write_text("\n".join(lines) + "\n")
    (report_dir / "results.json").write_text(json.dumps(
        {"grid": grid.source, "samples": grid.samples, "seeds": grid.seeds, "wall_s": wall_s,
         "command": command, "commit": commit, "runs": results, "findings": findings}, indent=1))
    return report_dir / "README.md"


def _rarest(s: dict) -> str:
    if not math.isfinite(s["min_class_fraction"][0]):
        return "–"
    return f"{_fmt(s['min_class_fraction'], 2)} [{', '.join(str(c) for c in s['min_class'])}]"


def _reference_rarest(summary: Dict[str, dict]) -> str:
    reference = next((s["reference_class_fractions"] for s in summary.values()
                      if s.get("reference_class_fractions")), None)
    if not reference:
        return ""
    return f" (held-out images: {min(reference):.3g}, class {int(np.argmin(reference))})"


def axis_tables(grid: Grid, summary: Dict[str, dict], item: dict) -> List[str]:
    """One markdown table per value of the axis ``item['by']``: a row per run with that value
    (named by its other axes' values), the ``with`` runs as reference rows, and each row's
    difference of mean FID to the row matching ``item['baseline']`` (rule of ``difference``)."""
    by, baseline = item["by"], item.get("baseline") or {}
    n_seeds = len(grid.seeds)
    values = next(a["values"] for a in grid.matrix if a["axis"] == by)
    lines = []
    for value in values:
        title = value.get("title", value["name"])
        names = select_runs(grid, {by: value["name"]})
        base = _baseline_of(grid, names, baseline, None)
        lines += [f"### {item.get('name', by)}: {title}", "",
                  f"| run | FID | ΔFID vs {_label(grid, base, by) if base else '–'} | class TV | rarest class | KID ×100 | final loss |",
                  "|---|---|---|---|---|---|---|"]
        for name in list(item.get("with") or []) + names:
            s = summary[name]
            delta = "–"
            own = _baseline_of(grid, names, baseline, name)
            if own and name != own:
                diff, se, verdict = difference(s["fid"], summary[own]["fid"], n_seeds)
                verdict = {"lower": "**better**", "higher": "**worse**",
                           "no spread known": "one seed"}.get(verdict, "within spread")
                delta = (f"{diff:+.3g}" + (f" ± {se:.2g}" if math.isfinite(se) else "") + f" ({verdict})"
                         + (f" vs {_label(grid, own, by)}" if own != base else ""))
            lines.append(f"| {_label(grid, name, by)} | {_fmt(s['fid'])} | {delta} | "
                         f"{_fmt(s['class_tv'], 2)} | {_rarest(s)} | {_fmt(s['kid'], scale=0.01)} | "
                         f"{_fmt(s['final_loss'])} |")
        lines.append("")
    lines += [f"ΔFID: difference of the mean final FIDs ± its standard error sqrt((std² + std_base²) / n), "
              f"n = {n_seeds} seeds; **better**/**worse** when it exceeds 2 standard errors.", ""]
    return lines


def _baseline_of(grid: Grid, names: List[str], baseline: dict, name: Optional[str]) -> Optional[str]:
    """The run among ``names`` that ``name`` is compared with: the one matching ``baseline``
    (axis -> value), except where ``name``'s value on that axis names its own ``baseline`` value
    (e.g. scaffold, trained with SGD, against FedAvg with SGD)."""
    if not baseline:
        return None
    run = next((r for r in grid.runs if r["name"] == name), {})
    wanted = dict(baseline)
    for axis in grid.matrix:
        mine = (run.get("axes") or {}).get(axis["axis"])
        value = next((v for v in axis["values"] if v["name"] == mine), {})
        if axis["axis"] in wanted and value.get("baseline"):
            wanted[axis["axis"]] = value["baseline"]
    return next((n for n in names if n in select_runs(grid, wanted)), None)


def _label(grid: Grid, name: str, drop_axis: Optional[str] = None) -> str:
    """A run's name in a table or legend: its values on the axes other than ``drop_axis``."""
    run = next(r for r in grid.runs if r["name"] == name)
    axes = {k: v for k, v in (run.get("axes") or {}).items() if k != drop_axis}
    return "-".join(axes.values()) if axes else name


def _ddp_note(results: List[dict]) -> List[str]:
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(grid: Grid, summary: Dict[str, dict], report_dir: Path) -> List[Path]:
    """FID vs samples seen, one figure per FID series (all runs when the grid names none); a
    series with ``panels: axis`` gets one panel per value of that axis, its named runs (e.g. the
    centralized baseline) drawn in every panel."""
    plt = _pyplot()
    series = [item for item in grid.series if item.get("kind", "fid") == "fid"]
    if not grid.series:
        series = [{"name": "all runs", "file": "fid_vs_samples.png", "runs": [r["name"] for r in grid.runs]}]
    paths = []
    for item in series:
        panels = _panels(grid, item)
        columns = min(3, len(panels))
        rows = math.ceil(len(panels) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(6 if columns == 1 else 4.2 * columns, 4 * rows),
                                 squeeze=False, sharey=True)
        for ax, (title, names) in zip(axes.flat, panels):
            _draw_curves(ax, grid, summary, names, item.get("panels"))
            ax.set_title(title, fontsize=10)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        if len(panels) > 1:
            fig.suptitle(item["name"], fontsize=11)
        paths.append(_save_figure(fig, report_dir / item.get("file", f"fid_vs_samples_{len(paths)}.png")))
    return paths


def _save_figure(fig, path: Path) -> Path:
    """Lay out, write (110 dpi) and close a report figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panels(grid: Grid, item: dict) -> List[tuple]:
    """(title, run names) per panel of an FID series."""
    if not item.get("panels"):
        return [(item["name"], series_runs(grid, item))]
    axis = next(a for a in grid.matrix if a["axis"] == item["panels"])
    picked = set(series_runs(grid, item))
    out = []
    for value in axis["values"]:
        names = [n for n in select_runs(grid, {axis["axis"]: value["name"]}) if n in picked]
        if names:
            out.append((value.get("title", value["name"]), list(item.get("runs") or []) + names))
    return out


def _draw_curves(ax, grid: Grid, summary: Dict[str, dict], names: List[str], drop_axis: Optional[str]) -> None:
    floor = np.mean([summary[n]["floor_fid"][0] for n in names])
    for name in names:
        curve = np.array(summary[name]["curve"], dtype=float)
        style = "--" if summary[name]["kind"] == "central" else "-"
        ax.plot(curve[:, 0], curve[:, 1], style, marker="o", label=_label(grid, name, drop_axis))
        if np.isfinite(curve[:, 2]).any():
            ax.fill_between(curve[:, 0], curve[:, 1] - np.nan_to_num(curve[:, 2]),
                            curve[:, 1] + np.nan_to_num(curve[:, 2]), alpha=0.15)
    ax.axhline(floor, color="gray", linestyle=":", label="real-vs-real floor")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("FID (mean ± std over seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)


def plot_class_mixes(grid: Grid, summary: Dict[str, dict], report_dir: Path) -> List[Path]:
    """Per ``kind: class_mix`` series: the class fractions of the final samples (mean ± std over
    seeds) of each run, next to the held-out reference's, as grouped bars per class."""
    plt = _pyplot()
    paths = []
    for item in [i for i in grid.series if i.get("kind") == "class_mix"]:
        names = [n for n in series_runs(grid, item) if summary[n].get("class_fractions")]
        if not names:
            continue  # features without classes (inception): nothing to draw
        reference = np.array(summary[names[0]]["reference_class_fractions"], dtype=float)
        classes = np.arange(len(reference))
        width = 0.8 / (len(names) + 1)
        fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 0.15 * len(classes) * (len(names) + 1))), 4))
        ax.bar(classes - 0.4 + width / 2, reference, width, color="black", label="held-out images")
        for i, name in enumerate(names, start=1):
            mean_std = np.array(summary[name]["class_fractions"], dtype=float)
            ax.bar(classes - 0.4 + width * (i + 0.5), mean_std[:, 0], width,
                   yerr=np.nan_to_num(mean_std[:, 1]), capsize=1.5, error_kw={"linewidth": 0.6},
                   label=f"{_label(grid, name, _common_axis(grid, names))} (TV {summary[name]['class_tv'][0]:.2f})")
        ax.set_xticks(classes)
        ax.set_xlabel("class (predicted by the digits classifier)")
        ax.set_ylabel("fraction of the samples (mean ± std over seeds)")
        ax.set_title(item["name"], fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        paths.append(_save_figure(fig, report_dir / item.get("file", f"class_mix_{len(paths)}.png")))
    return paths


def _common_axis(grid: Grid, names: List[str]) -> Optional[str]:
    """An axis on which all of ``names`` that have axes agree (left out of their labels)."""
    runs = [r for r in grid.runs if r["name"] in names and r.get("axes")]
    for axis in (a["axis"] for a in grid.matrix):
        if runs and len({r["axes"][axis] for r in runs}) == 1:
            return axis
    return None


def plot_bytes(summary: Dict[str, dict], report_dir: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in summary.items():
        ax.errorbar(s["bytes_total"][0] / 1e6, s["fid"][0], yerr=np.nan_to_num(s["fid"][1]),
                    marker="s" if s["kind"] == "central" else "o", capsize=3, label=name)
    floor = np.mean([s["floor_fid"][0] for s in summary.values()])
    ax.axhline(floor, color="gray", linestyle=":", label="real-vs-real floor")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(-0.5, 3 * max(1.0, max(s["bytes_total"][0] for s in summary.values()) / 1e6))
    ax.set_xlabel("bytes communicated (MB; symlog, 0 = one-process centralized)")
    ax.set_ylabel("final FID")
    ax.set_title("Communication vs quality at equal samples seen", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = report_dir / "bytes_vs_fid.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(grid_file: str, quick: bool = False, jobs: int = 1, collect_only: bool = False,
            report_dir: Optional[str] = None, overrides: Optional[List[str]] = None,
            command: str = "", say=print, output_dir: Optional[str] = None) -> Path:
    """Run/collect the grid and write the report; returns the report's README.md."""
    from fedrun.engine.metrics import code_commit

    grid = load_grid(grid_file, quick, overrides)
    if output_dir:
        grid.output_dir = output_dir
    commit = code_commit()  # the code the runs trained now train with
    started = time.perf_counter()
    collected = 0 if collect_only else sum(is_finished(s.run_dir) for s in plan_runs(grid))
    specs = plan_runs(grid) if collect_only else run_grid(grid, jobs, say, commit)
    results = [collect(s) for s in specs]
    commit = describe_commits(results)
    summary = summarise(results, [r["name"] for r in grid.runs])
    if collect_only:  # from the first run's start to the last run's end
        wall = max(r["ended"] for r in results) - min(r["ended"] - r["wall_s"] for r in results)
    else:
        wall = time.perf_counter() - started
    target = Path(report_dir) if report_dir else Path(grid.output_dir) / "report"
    return write_report(grid, summary, results, target, command, wall, commit, collected)
