"""``fedrun compare`` without training: every shipped grid file loads and plans, and the findings'
verdicts against hand-made summaries."""

import math
from pathlib import Path

import pytest

from fedrun import compare

GRIDS = sorted((Path(__file__).resolve().parents[1] / "configs" / "grids").glob("*.yaml"))


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_every_grid_file_loads_and_plans(path, quick, monkeypatch):
    monkeypatch.chdir(path.parents[2])  # base_config is relative to the repository root
    grid = compare.load_grid(str(path), quick=quick)
    specs = compare.plan_runs(grid)
    assert len(specs) == len(grid.runs) * len(grid.seeds)
    assert len({spec.run_dir for spec in specs}) == len(specs)
    for spec in specs:
        derived = dict(o.split("=", 1) for o in spec.overrides if "=" in o)
        rounds, every = int(derived["rounds"]), int(derived["eval.every"])
        assert rounds * spec.round_samples == grid.samples  # the same budget for every run
        assert every * spec.round_samples == grid.eval_every_samples
        decay = float(derived["ema.decay"])  # the EMA's mean age, d / (1 - d) rounds, is H
        assert decay / (1 - decay) * spec.round_samples == pytest.approx(grid.ema_horizon_samples, rel=1e-4)
        assert (spec.kind == "central") == (f"central.samples={grid.samples}" in spec.overrides)
        assert derived["seed"] == str(spec.seed)


def grid_with(findings, seeds=(0, 1)):
    names = sorted({n for item in findings for n in item["runs"]})
    return compare.Grid(base_config=None, output_dir="unused", seeds=list(seeds), samples=1,
                        eval_every_samples=1, ema_horizon_samples=1, overrides=[],
                        runs=[{"name": n} for n in names], findings=findings)


def verdicts(findings, fids, seeds=(0, 1)):
    summary = {name: {"fid": mean_std} for name, mean_std in fids.items()}
    return [f["verdict"] for f in compare.check_findings(grid_with(findings, seeds), summary)]


def test_close_claim_tolerance_is_ten_percent_or_two_standard_errors():
    close = [{"claim": "a close to b", "kind": "close", "runs": ["a", "b"]}]
    # tolerance max(0.1 x 10, 2 sqrt((0.1^2 + 0.1^2) / 2)) = max(1, 0.2) = 1
    assert verdicts(close, {"a": (10.9, 0.1), "b": (10.0, 0.1)}) == ["holds"]
    assert verdicts(close, {"a": (11.1, 0.1), "b": (10.0, 0.1)}) == ["does not hold"]
    assert verdicts(close, {"a": (8.9, 0.1), "b": (10.0, 0.1)}) == ["does not hold"]
    # wide seeds: 2 sqrt((3^2 + 3^2) / 2) = 6 > 1
    assert verdicts(close, {"a": (15.9, 3.0), "b": (10.0, 3.0)}) == ["holds"]
    assert verdicts(close, {"a": (16.1, 3.0), "b": (10.0, 3.0)}) == ["does not hold"]
    # one seed: no std (nan) counts as 0, so only the 10 % remain
    assert verdicts(close, {"a": (10.9, math.nan), "b": (10.0, math.nan)}, seeds=(0,)) == ["holds"]
    assert verdicts(close, {"a": (11.1, math.nan), "b": (10.0, math.nan)}, seeds=(0,)) == ["does not hold"]
    detail = compare.check_findings(grid_with(close), {"a": {"fid": (11.1, 0.1)}, "b": {"fid": (10.0, 0.1)}})
    assert detail[0]["claim"] == "a close to b" and "difference +1.1" in detail[0]["detail"]


@pytest.mark.parametrize("kind, fids, verdict", [
    ("increasing", (5.0, 7.0, 9.0), "holds"),
    ("increasing", (5.0, 4.0, 9.0), "partly holds"),
    ("increasing", (9.0, 7.0, 5.0), "does not hold"),
    ("decreasing", (9.0, 7.0, 5.0), "holds"),
    ("decreasing", (9.0, 7.0, 8.0), "partly holds"),
    ("decreasing", (5.0, 7.0, 9.0), "does not hold"),
])
def test_monotone_claims_compare_consecutive_means(kind, fids, verdict):
    findings = [{"claim": kind, "kind": kind, "runs": ["r1", "r2", "r3"]}]
    assert verdicts(findings, {f"r{i + 1}": (fid, 0.5) for i, fid in enumerate(fids)}) == [verdict]
