"""``fedrun compare``: run (or collect) a grid of federated and centralized runs at the same
sample budget and seeds, and write a report folder (markdown table, curves, findings).

    python -m fedrun compare --grid configs/grids/paper.yaml --jobs 2
    python -m fedrun compare --grid configs/grids/paper.yaml --quick      # tiny, for tests

The grid file (see configs/grids/paper.yaml) names a base config, the seeds, the budget in
samples, the evaluation points, the runs (each a list of overrides; ``kind: central`` for the
baseline), the series to plot and the claims to check. For every run the comparison derives

    rounds     = samples / (K x E x B)          (federated; central: central.samples = samples)
    eval.every = eval_every_samples / (K x E x B)
    ema.decay  = H / (H + K x E x B)             (H = ema_horizon_samples)

so that all runs see the same number of samples, are evaluated at the same points, and average
their EMA over the same number of samples: with that decay the EMA's weights have a mean age of
H samples in the steady state; after the warm-up (H / (K x E x B) rounds, ``fedrun.server.EMA``)
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
    for key in ("seeds", "samples", "eval_every_samples", "runs"):
        if key not in raw:
            raise ConfigError(f"grid file '{path}': missing key '{key}'")
    raw.setdefault("output_dir", "runs/compare")
    raw.setdefault("base_config", None)
    raw.setdefault("ema_horizon_samples", 5120)
    names = [r.get("name") for r in raw["runs"]]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"grid file '{path}': every run needs a unique 'name', got {names}")
    for group in ("series", "findings"):
        for item in raw.get(group) or []:
            missing = [n for n in item.get("runs", []) if n not in names]
            if missing:
                raise ConfigError(f"grid file '{path}': {group} entry names unknown runs {missing}")
    return Grid(**raw, source=str(file))


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
    from fedrun.centralized import federated_steps_per_round, plan
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
        # Mean age d / (1 - d) rounds = H samples (fedrun.server.EMA).
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
    from fedrun.logging import read_metrics

    records = read_metrics(run_dir)
    return (run_dir / "final").is_dir() and bool(records) and "fid" in records[-1]


def execute(spec: RunSpec, base_config: Optional[str], in_process: bool) -> float:
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
                                                     "overrides": spec.overrides}))
    return wall


def _train(kind: str, base_config: Optional[str], overrides: List[str]) -> Path:
    """``fedrun train`` or ``fedrun central`` of one run, through the library."""
    from fedrun.config import load_config

    cfg = load_config(base_config, overrides)
    if kind == "central":
        from fedrun.centralized import run_central

        return run_central(cfg)
    from fedrun import simulator

    return simulator.run(cfg)


def run_grid(grid: Grid, jobs: int = 1, say=print) -> List[RunSpec]:
    """Train what is missing: in this process (jobs=1) or as ``jobs`` parallel processes."""
    specs = plan_runs(grid)
    todo = [s for s in specs if not is_finished(s.run_dir)]
    say(f"compare: {len(specs)} runs ({len(specs) - len(todo)} already finished), "
        f"{grid.samples} samples each, {'in this process' if jobs == 1 else f'{jobs} processes'}")

    def one(spec: RunSpec) -> None:
        wall = execute(spec, grid.base_config, in_process=jobs == 1)
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
    from fedrun.logging import read_metrics

    if not spec.run_dir.is_dir():
        raise FedrunError(f"run directory '{spec.run_dir}' does not exist (run the grid without --collect)")
    records = read_metrics(spec.run_dir)
    evals = [r for r in records if "fid" in r]
    if not records or not evals:
        raise FedrunError(f"run '{spec.run_dir}' has no evaluation records in metrics.jsonl")
    last = records[-1]
    info_file = spec.run_dir / RUN_INFO
    if info_file.is_file():
        wall, ended = json.loads(info_file.read_text())["wall_s"], info_file.stat().st_mtime
    else:
        wall = sum(r.get("round_time_s", 0.0) for r in records)
        ended = (spec.run_dir / "metrics.jsonl").stat().st_mtime
    final = evals[-1]
    return {
        "name": spec.name, "seed": spec.seed, "kind": spec.kind,
        "fid": final["fid"], "kid": final["kid"], "floor_fid": final["floor_fid"],
        "floor_kid": final["floor_kid"], "class_tv": final.get("class_tv"),
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
        for key in ("fid", "kid", "floor_fid", "floor_kid", "class_tv", "final_loss", "samples",
                    "bytes_total", "wall_s"):
            summary[key] = _mean_std([r[key] for r in mine])
        points = sorted({s for r in mine for s, _ in r["curve"]})
        summary["curve"] = [(s, *_mean_std([f for r in mine for s2, f in r["curve"] if s2 == s]))
                            for s in points]
        out[name] = summary
    return out


# ---------------------------------------------------------------- findings

def check_findings(grid: Grid, summary: Dict[str, dict]) -> List[dict]:
    """Each claim of the grid, decided on the mean final FID over seeds (rules in the report)."""
    out = []
    for item in grid.findings:
        runs = item["runs"]
        means = [summary[n]["fid"][0] for n in runs]
        stds = [summary[n]["fid"][1] for n in runs]
        n_seeds = len(grid.seeds)
        if item["kind"] == "close":
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


def write_report(grid: Grid, summary: Dict[str, dict], results: List[dict], report_dir: Path,
                 command: str, wall_s: float, commit: Optional[str] = None) -> Path:
    from fedrun.features import bias_warning

    report_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(grid, summary, report_dir) + [plot_bytes(summary, report_dir)]
    findings = check_findings(grid, summary)
    any_result = results[0]
    lines = [
        "# fedrun compare report", "",
        f"Grid `{grid.source}`: {len(grid.runs)} configurations × seeds {grid.seeds}, every run "
        f"{grid.samples:,} samples seen; FID/KID from {any_result['eval_samples']} generated samples "
        f"({any_result['eval_feature']} features) against {any_result['eval_reference']} held-out "
        f"images, every {grid.eval_every_samples:,} samples. Wall time of the grid: {wall_s / 60:.1f} min.",
        "", f"Command (at commit `{commit}`):", "", "```bash", command, "```", "",
        *([f"**Warning:** {bias_warning(any_result['eval_samples'])}.", ""]
          if bias_warning(any_result["eval_samples"]) else []),
        "| configuration | FID | KID ×100 | floor FID | floor KID ×100 | class TV | final loss | samples seen | bytes communicated | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in grid.runs:
        s = summary[run["name"]]
        lines.append(f"| {run['name']} | {_fmt(s['fid'])} | {_fmt(s['kid'], scale=0.01)} | "
                     f"{_fmt(s['floor_fid'])} | {_fmt(s['floor_kid'], scale=0.01)} | {_fmt(s['class_tv'], 2)} | "
                     f"{_fmt(s['final_loss'])} | {s['samples'][0]:,.0f} | {s['bytes_total'][0]:,.0f} | "
                     f"{_fmt(s['wall_s'], 3)} |")
    lines += [
        "", "Mean ± standard deviation over the seeds (sample std, n = "
        f"{len(grid.seeds)}). FID and KID are of the EMA model at the end of the budget. The floor is "
        "the same metric for as many real training images against the same held-out images: a "
        "model cannot be expected to score below it. Class TV is the total variation distance "
        "between the classifier's class distribution of the samples and the held-out labels' "
        "(0 = the same mix of digits). Bytes: federated = 2 × 4 P bytes per client per round "
        "(the model down, the update up; P parameters, fp32); centralized = gradient all-reduce "
        "volume 2 (W − 1) × 4 P per step over W ranks (0 for one process).", "",
        *_ddp_note(results),
        "## The paper's findings on this grid", "",
    ]
    for f in findings:
        lines.append(f"- **{f['claim']}**: {f['verdict']}. {f['detail']}.")
    lines += ["", "Rules: 'close' holds when the difference of the mean FIDs is at most max(10 % of the "
              "reference, 2 standard errors of the difference); 'increasing'/'decreasing' hold when "
              "every step of the series moves the mean FID that way, 'partly' when some do.", "",
              "## Figures", ""]
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
    plt = _pyplot()
    series = grid.series or [{"name": "all runs", "file": "fid_vs_samples.png",
                              "runs": [r["name"] for r in grid.runs]}]
    paths = []
    for item in series:
        fig, ax = plt.subplots(figsize=(6, 4))
        floor = np.mean([summary[n]["floor_fid"][0] for n in item["runs"]])
        for name in item["runs"]:
            curve = np.array(summary[name]["curve"], dtype=float)
            style = "--" if summary[name]["kind"] == "central" else "-"
            ax.plot(curve[:, 0], curve[:, 1], style, marker="o", label=name)
            if np.isfinite(curve[:, 2]).any():
                ax.fill_between(curve[:, 0], curve[:, 1] - np.nan_to_num(curve[:, 2]),
                                curve[:, 1] + np.nan_to_num(curve[:, 2]), alpha=0.15)
        ax.axhline(floor, color="gray", linestyle=":", label="real-vs-real floor")
        ax.set_xlabel("samples seen")
        ax.set_ylabel("FID (mean ± std over seeds)")
        ax.set_yscale("log")
        ax.set_title(item["name"], fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = report_dir / item.get("file", f"fid_vs_samples_{len(paths)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


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
    from fedrun.logging import code_commit

    grid = load_grid(grid_file, quick, overrides)
    if output_dir:
        grid.output_dir = output_dir
    commit = code_commit()  # the code the runs train with (collect-only: the code collecting)
    started = time.perf_counter()
    specs = plan_runs(grid) if collect_only else run_grid(grid, jobs, say)
    results = [collect(s) for s in specs]
    summary = summarise(results, [r["name"] for r in grid.runs])
    if collect_only:  # from the first run's start to the last run's end
        wall = max(r["ended"] for r in results) - min(r["ended"] - r["wall_s"] for r in results)
    else:
        wall = time.perf_counter() - started
    target = Path(report_dir) if report_dir else Path(grid.output_dir) / "report"
    return write_report(grid, summary, results, target, command, wall, commit)
