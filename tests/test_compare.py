"""``fedrun compare``: every shipped grid file loads and plans; the findings' verdicts, the matrix
of runs and the report's per-axis tables and figures against hand-made summaries; and the
non-IID grid's quick variant end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedrun.experiments import compare

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


# ---------------------------------------------------------------- matrix grids (configs/grids/noniid.yaml)

MATRIX_GRID = """
seeds: [0, 1]
samples: 64
eval_every_samples: 32
overrides: [num_clients=4, local_steps=2, optim.batch_size=4, clients_per_round=2]
runs:
  - {name: central, kind: central}
matrix:
  - axis: partition
    values:
      - {name: iid, overrides: [partition.method=iid]}
      - {name: dir0.1, title: "Dirichlet 0.1", overrides: [partition.method=dirichlet, partition.alpha=0.1]}
  - axis: method
    values:
      - {name: fedavg, overrides: []}
      - {name: fedavgm, overrides: [server.strategy=fedavgm, server.momentum=0.5]}
      - {name: fedavgm2, baseline: fedavgm, overrides: [server.strategy=fedavgm, server.momentum=0.9]}
series:
  - {name: per partition, file: panels.png, panels: partition, runs: [central]}
  - {name: mix, kind: class_mix, file: mix.png, select: {partition: dir0.1}, runs: [central]}
tables:
  - {name: Partition, by: partition, baseline: {method: fedavg}, with: [central]}
findings:
  - {claim: momentum helps under skew, kind: better, runs: [dir0.1-fedavgm, dir0.1-fedavg]}
"""


def load_text(tmp_path, text):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return compare.load_grid(str(path))


def test_matrix_expands_to_named_runs_with_overrides_in_axis_order(tmp_path):
    grid = load_text(tmp_path, MATRIX_GRID)
    assert [r["name"] for r in grid.runs] == ["central", "iid-fedavg", "iid-fedavgm", "iid-fedavgm2",
                                              "dir0.1-fedavg", "dir0.1-fedavgm", "dir0.1-fedavgm2"]
    run = grid.runs[-2]
    assert run["overrides"] == ["partition.method=dirichlet", "partition.alpha=0.1",
                                "server.strategy=fedavgm", "server.momentum=0.5"]
    assert run["axes"] == {"partition": "dir0.1", "method": "fedavgm"}
    assert compare.select_runs(grid, {"method": "fedavg"}) == ["iid-fedavg", "dir0.1-fedavg"]
    assert compare.select_runs(grid, {"partition": ["iid"], "method": "fedavgm"}) == ["iid-fedavgm"]
    assert compare.series_runs(grid, grid.series[1]) == ["central", "dir0.1-fedavg", "dir0.1-fedavgm",
                                                         "dir0.1-fedavgm2"]
    specs = compare.plan_runs(grid)
    assert len(specs) == 7 * 2
    assert "server.momentum=0.9" in specs[-1].overrides and specs[-1].run_dir.name == "seed1"


@pytest.mark.parametrize("edit, message", [
    (("panels: partition", "panels: color"), "unknown matrix axis 'color'"),
    (("select: {partition: dir0.1}", "select: {partition: dir9}"), "axis 'partition' has no values \\['dir9'\\]"),
    (("kind: class_mix", "kind: pie"), "series kind must be 'fid' or 'class_mix'"),
    (("baseline: {method: fedavg}", "baseline: {method: sgd}"), "axis 'method' has no values \\['sgd'\\]"),
    (("kind: better", "kind: best"), "finding kind must be one of"),
    (("runs: [dir0.1-fedavgm, dir0.1-fedavg]", "runs: [dir0.1-fedavgm]"), "compares 2 runs"),
    (("{name: fedavgm, overrides", "{name: fedavg, overrides"), "values' with unique names"),
    (("baseline: fedavgm,", "baseline: sgd,"), "baseline \\['sgd'\\] is not one of its values"),
])
def test_bad_matrix_grids_are_clear_errors(tmp_path, edit, message):
    from fedrun.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, MATRIX_GRID.replace(*edit))


@pytest.mark.parametrize("a, b, n, expected", [
    # se = sqrt((0.3^2 + 0.4^2) / 1) = 0.5: |diff| 1.2 > 2 se
    ((10.0, 0.3), (11.2, 0.4), 1, (-1.2, 0.5, "lower")),
    ((12.0, 0.3), (11.0, 0.4), 1, (1.0, 0.5, "within the seeds' spread")),  # 1.0 <= 2 se exactly
    ((12.1, 0.3), (11.0, 0.4), 1, (1.1, 0.5, "higher")),
    # n = 4: se = sqrt((0.6^2 + 0.8^2) / 4) = 0.5
    ((10.0, 0.6), (11.2, 0.8), 4, (-1.2, 0.5, "lower")),
    ((10.0, math.nan), (10.5, math.nan), 1, (-0.5, math.nan, "no spread known")),  # one seed
])
def test_difference_against_two_standard_errors(a, b, n, expected):
    diff, se, verdict = compare.difference(a, b, n)
    assert (diff, verdict) == (pytest.approx(expected[0]), expected[2])
    assert se == pytest.approx(expected[1], nan_ok=True)


def test_better_finding(tmp_path):
    better = [{"claim": "a better than b", "kind": "better", "runs": ["a", "b"]}]
    # n = 2: se = sqrt((0.2^2 + 0.2^2) / 2) = 0.2
    assert verdicts(better, {"a": (10.0, 0.2), "b": (10.5, 0.2)}) == ["holds"]
    assert verdicts(better, {"a": (10.0, 0.2), "b": (10.3, 0.2)}) == ["does not hold"]
    assert verdicts(better, {"a": (11.0, 0.2), "b": (10.0, 0.2)}) == ["does not hold"]
    assert verdicts(better, {"a": (9.0, math.nan), "b": (10.0, math.nan)}, seeds=(0,)) == ["does not hold"]


def fake_result(name, seed, fid, fractions, kind="train"):
    """What compare.collect returns for a run, made up."""
    return {"name": name, "seed": seed, "kind": kind, "fid": fid, "kid": fid / 100, "floor_fid": 1.4,
            "floor_kid": 0.0, "class_tv": 0.5 * sum(abs(f - 0.25) for f in fractions),
            "class_fractions": fractions, "reference_class_fractions": [0.25] * 4,
            "min_class": int(np.argmin(fractions)), "min_class_fraction": min(fractions),
            "final_loss": 0.1, "samples": 64, "bytes_total": 0 if kind == "central" else 1000,
            "wall_s": 1.0, "ended": 0.0, "eval_samples": 1000, "eval_reference": 180,
            "eval_feature": "digits", "curve": [(32, 2 * fid + seed), (64, fid)], "params_bytes": 400,
            "steps": 16}


def test_report_of_a_matrix_grid_has_a_table_per_partition_and_the_figures(tmp_path):
    grid = load_text(tmp_path, MATRIX_GRID)
    grid.bytes_plot = False
    fids = {"central": 5.0, "iid-fedavg": 10.0, "iid-fedavgm": 10.1, "iid-fedavgm2": 11.0,
            "dir0.1-fedavg": 15.0, "dir0.1-fedavgm": 12.0, "dir0.1-fedavgm2": 11.0}
    skewed = {0: [0.4, 0.3, 0.3, 0.0], 1: [0.4, 0.2, 0.3, 0.1]}
    results = [fake_result(name, seed, fid + 0.1 * seed,
                           skewed[seed] if name.startswith("dir") else [0.25] * 4,
                           "central" if name == "central" else "train")
               for name, fid in fids.items() for seed in (0, 1)]
    summary = compare.summarise(results, [r["name"] for r in grid.runs])
    s = summary["dir0.1-fedavg"]
    assert s["min_class_fraction"] == pytest.approx((0.05, math.sqrt(0.005)))
    assert s["min_class"] == [3, 3]
    assert s["class_fractions"][3] == pytest.approx((0.05, math.sqrt(0.005)))
    report = compare.write_report(grid, summary, results, tmp_path / "report", "cmd", 60.0, "abc")
    text = report.read_text()
    assert "### Partition: iid" in text and "### Partition: Dirichlet 0.1" in text
    # rows named by method; ΔFID = -3 ± sqrt((0.0707^2 * 2) / 2) = 0.0707 -> better; iid: +0.1 within
    assert "| fedavgm | 12.1 ± 0.0707 | -3 ± 0.071 (**better**) |" in text
    assert "| fedavgm | 10.1 ± 0.0707 | +0.1 ± 0.071 (within spread) |" in text
    assert "| central | 5.05 ± 0.0707 | -10 ± 0.071 (**better**) |" in text  # vs dir0.1-fedavg
    assert "| fedavgm2 | 11.1 ± 0.0707 | -1 ± 0.071 (**better**) vs fedavgm |" in text  # its own baseline
    # TV: (0.15 + 0.05 + 0.05 + 0.25) / 2 = 0.25 and (0.15 + 0.05 + 0.05 + 0.15) / 2 = 0.2
    assert "| fedavg | 15.1 ± 0.0707 | – | 0.23 ± 0.035 | 0.05 ± 0.071 [3, 3] |" in text
    assert "**momentum helps under skew**: holds" in text
    for png in ("panels.png", "mix.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000
    assert not (tmp_path / "report" / "bytes_vs_fid.png").exists()


def test_noniid_quick_grid_runs_and_reports(tmp_path, monkeypatch):
    """The whole non-IID matrix at toy size, in this process (~2 s a run: about 1-2 min)."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # base_config is relative to the repository root
    report = compare.compare(str(root / "configs" / "grids" / "noniid.yaml"), quick=True,
                             output_dir=str(tmp_path / "noniid"), say=lambda *_: None)
    text = report.read_text()
    assert "### Partition: shards, 1 per client" in text
    for png in ("fid_vs_samples_partitions.png", "class_mix_shard1.png"):
        assert (report.parent / png).stat().st_size > 5000
    results = json.loads((report.parent / "results.json").read_text())
    assert len(results["runs"]) == 35 and {r["samples"] for r in results["runs"]} == {256}
    assert all(0.0 <= r["min_class_fraction"] <= 0.1 for r in results["runs"])
