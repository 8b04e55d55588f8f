"""Comparison grids without training: every shipped grid file loads and plans; typed loading
names the file and the key of a bad value; the matrix of runs; the statistics (differences,
findings) against hand-made summaries; the report's tables and figures from made-up results,
with a failed run marked."""

import math

import numpy as np
import pytest

from conftest import REPO
from fedrun.errors import ConfigError
from fedrun.experiments import plots, stats, tables, tuning
from fedrun.experiments.compare import write_report
from fedrun.experiments.grid import Finding, Grid, GridRun, load_grid, plan

GRIDS = sorted((REPO / "configs" / "grids").glob("*.yaml"))


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_every_grid_file_loads_and_plans(path, quick, monkeypatch):
    monkeypatch.chdir(REPO)  # base_config is relative to the repository root
    grid = load_grid(str(path), quick=quick)
    specs = plan(grid)
    assert len(specs) == len(grid.runs) * len(grid.seeds)
    assert len({spec.run_dir for spec in specs}) == len(specs) == len({spec.id for spec in specs})
    for spec in specs:
        derived = dict(o.split("=", 1) for o in spec.overrides if "=" in o)
        rounds = int(derived["rounds"])
        assert rounds * spec.round_samples == grid.samples  # the same budget for every run
        if grid.eval_every_samples:
            assert int(derived["eval.every"]) * spec.round_samples == grid.eval_every_samples
        else:  # evaluated at the budgets only
            at = [int(r) for r in derived["eval.at"].strip("[]").split(",")]
            assert [r * spec.round_samples for r in at] == grid.budget_list
        decay = float(derived["ema.decay"])  # the EMA's mean age, d / (1 - d) rounds, is H
        assert decay / (1 - decay) * spec.round_samples == pytest.approx(grid.ema_horizon_samples, rel=1e-4)
        assert (spec.kind == "central") == (f"central.samples={grid.samples}" in spec.overrides)
        assert derived["seed"] == str(spec.seed)
        assert spec.outputs == ("final",) and spec.metric == "fid"  # what "finished" means here
    if grid.tuning is not None:  # every tuning point makes a valid config (load_config checks it)
        groups = tuning.build_groups(grid)
        runs = [s for g in groups for s in tuning.group_specs(grid, g, g.points)]
        assert len(runs) == len(groups) * len(groups[0].points) * len(grid.tuning.seeds)
        assert not {s.seed for s in runs} & set(grid.seeds)


@pytest.mark.parametrize("study", ["compare_paper", "communication", "noniid", "optimizer_reset", "privacy"])
def test_committed_results_are_reported_again_by_the_current_code(study, tmp_path, monkeypatch):
    """The committed reports' raw results (some collected before the confident-sample rate, the
    evaluations by budget and the tuning existed) render with today's tables against their grid;
    a tuned study (noniid, optimizer_reset) with its committed tuning choices."""
    import json

    monkeypatch.chdir(REPO)
    data = json.loads((REPO / "docs" / "results" / study / "results.json").read_text())
    grid = load_grid(data["grid"])
    saved = REPO / "docs" / "results" / study / "tuning.json"  # a tuned study: its choices
    sweep = tuning.Sweep.from_json(json.loads(saved.read_text())) if saved.is_file() else None
    text = write_report(grid, data["runs"], tmp_path / "report", data["command"], data["wall_s"],
                        sweep=sweep).read_text()
    # the privacy study: the digits 5-9 only (its own floor and anchor), audited, with epsilons
    floor, untrained = ("2.67", "49.9") if study == "privacy" else ("1.4", "39.5")
    if sweep is not None:
        assert "## Tuning" in text and f"| untrained model (anchor) | {untrained} |" in text
    assert f"| real vs real (floor) | {floor} |" in text
    if study == "privacy":
        assert "## Leakage" in text and "| in classes |" in text
        for line in ("| scratch-clip | ∞ (clip only, σ = 0) |", "| scratch-nodp | ∞ (no DP) |",
                     "| lora-eps4 | 4 ± 0 |"):  # the three privacy levels (leakage.privacy_level)
            assert line in text
        assert (tmp_path / "report" / "privacy_utility_leakage.png").stat().st_size > 5000
    assert "| configuration | FID | KID ×100 | confident |" in text
    if grid.tables:
        assert "Holm interval" in text


def test_the_committed_reset_gap_is_what_the_script_computes_from_the_committed_results():
    """docs/results/optimizer_reset: the gap's split (scripts.reset_gap) from results.json, and
    its paired differences add up (fresh - central = (fresh - stateful) + (stateful - central))."""
    import json

    from scripts.reset_gap import split_gap

    folder = REPO / "docs" / "results" / "optimizer_reset"
    split = split_gap(json.loads((folder / "results.json").read_text()))
    committed = json.loads((folder / "reset_gap.json").read_text())
    assert split["seeds"] == committed["seeds"] == [0, 1, 2, 3, 4]
    for key in ("gap", "closed_by_state", "federation", "share_closed"):
        assert split[key] == pytest.approx(committed[key])
    assert split["gap"]["mean"] == pytest.approx(split["closed_by_state"]["mean"] + split["federation"]["mean"])
    share = split["share_closed"]
    assert share["bounded"] and share["low"] < share["ratio"] < share["high"]


def grid_with(findings, seeds=(0, 1)):
    names = sorted({n for item in findings for n in item["runs"]})
    return Grid(seeds=list(seeds), samples=1, eval_every_samples=1, ema_horizon_samples=1,
                runs=[GridRun(name=n) for n in names], findings=[Finding(**f) for f in findings])


def verdicts(findings, fids, seeds=(0, 1)):
    summary = {name: {"fid": mean_std} for name, mean_std in fids.items()}
    return [f["verdict"] for f in stats.check_findings(grid_with(findings, seeds), summary)]


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
    detail = stats.check_findings(grid_with(close), {"a": {"fid": (11.1, 0.1)}, "b": {"fid": (10.0, 0.1)}})
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


def per_seed_summary(values):
    """Summaries of configurations from their FIDs seed by seed (seeds 0, 1, ...)."""
    return {name: {"fid": stats.mean_std(fids), "per_seed": {"fid": dict(enumerate(fids))}}
            for name, fids in values.items()}


def test_better_finding_is_a_paired_test_holm_corrected_over_the_better_claims():
    """a - b = (-1, -2, 0, -2, -1): mean -1.2, s_d^2 = 0.7, t = -1.2 / sqrt(0.7 / 5) = -3.207,
    p = 0.0327 (df 4; tests/unit/test_stats.py checks paired_t by hand): alone it holds; two
    such claims are tested at 0.05 / 2 first, so neither is shown; the reverse claim alone is
    refuted (the opposite holds)."""
    better = [{"claim": "a better than b", "kind": "better", "runs": ["a", "b"]}]
    a, b = [10.0, 12.0, 12.0, 13.0, 14.0], [11.0, 14.0, 12.0, 15.0, 15.0]
    found = stats.check_findings(grid_with(better, seeds=range(5)), per_seed_summary({"a": a, "b": b}))
    assert found[0]["verdict"] == "holds"
    assert "difference -1.2 [-2.24, -0.161] over 5 paired seeds, p 0.033" in found[0]["detail"]
    reverse = [{"claim": "b better than a", "kind": "better", "runs": ["b", "a"]}]
    assert stats.check_findings(grid_with(reverse, seeds=range(5)),
                                per_seed_summary({"a": a, "b": b}))[0]["verdict"] == "the opposite holds"
    twice = better + [{"claim": "c better than d", "kind": "better", "runs": ["c", "d"]}]
    found = stats.check_findings(grid_with(twice, seeds=range(5)),
                                 per_seed_summary({"a": a, "b": b, "c": a, "d": b}))
    assert [f["verdict"] for f in found] == ["not shown"] * 2  # not significant: not refuted
    assert "Holm-adjusted over the 2 'better' claims 0.065" in found[0]["detail"]
    one_seed = stats.check_findings(grid_with(better, seeds=(0,)), per_seed_summary({"a": [9.0], "b": [10.0]}))
    assert one_seed[0]["verdict"] == "not shown" and "no test" in one_seed[0]["detail"]


def test_a_claim_on_a_configuration_without_results_is_not_decided():
    better = [{"claim": "a better than b", "kind": "better", "runs": ["a", "b"]}]
    found = stats.check_findings(grid_with(better), {"a": {"fid": (10.0, 0.2)}})
    assert found[0]["verdict"] == "not decided" and "no results for b" in found[0]["detail"]


@pytest.mark.parametrize("value, digits, scale, text", [
    ((12.345, 0.0707), 3, 1.0, "12.3 ± 0.0707"), ((0.0123, math.nan), 3, 0.01, "1.23"),
    ((math.nan, math.nan), 3, 1.0, "–"), (None, 3, 1.0, "–"), (math.inf, 3, 1.0, "∞"),
    (0.12345, 2, 1.0, "0.12"), (16, 3, 1.0, "16"), ("n/a", 3, 1.0, "n/a"),
])
def test_one_number_formatter_for_every_report(value, digits, scale, text):
    assert tables.fmt(value, digits, scale) == text


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
    return load_grid(str(path))


def test_matrix_expands_to_named_runs_with_overrides_in_axis_order(tmp_path):
    grid = load_text(tmp_path, MATRIX_GRID)
    assert [r.name for r in grid.runs] == ["central", "iid-fedavg", "iid-fedavgm", "iid-fedavgm2",
                                           "dir0.1-fedavg", "dir0.1-fedavgm", "dir0.1-fedavgm2"]
    run = grid.runs[-2]
    assert run.overrides == ["partition.method=dirichlet", "partition.alpha=0.1",
                             "server.strategy=fedavgm", "server.momentum=0.5"]
    assert run.axes == {"partition": "dir0.1", "method": "fedavgm"}
    assert grid.select({"method": "fedavg"}) == ["iid-fedavg", "dir0.1-fedavg"]
    assert grid.select({"partition": ["iid"], "method": "fedavgm"}) == ["iid-fedavgm"]
    assert grid.series_runs(grid.series[1]) == ["central", "dir0.1-fedavg", "dir0.1-fedavgm",
                                                "dir0.1-fedavgm2"]
    assert grid.tables[0].with_ == ["central"]  # YAML 'with'
    specs = plan(grid)
    assert len(specs) == 7 * 2
    assert "server.momentum=0.9" in specs[-1].overrides and specs[-1].run_dir.name == "seed1"


def test_without_eval_every_samples_runs_are_evaluated_at_the_budgets_only(tmp_path):
    """Every run gets the rounds of the budgets (16 samples a round: K 2 x E 2 x B 4); the
    budgets need not be multiples of one evaluation step."""
    text = MATRIX_GRID.replace("samples: 64\neval_every_samples: 32\n", "samples: 96\nbudgets: [16, 48]\n")
    grid = load_text(tmp_path, text)
    assert grid.eval_every_samples is None and grid.budget_list == [16, 48, 96]
    for spec in plan(grid):
        derived = dict(o.split("=", 1) for o in spec.overrides if "=" in o)
        assert "eval.every" not in derived
        at = [int(r) for r in derived["eval.at"].strip("[]").split(",")]
        assert [r * spec.round_samples for r in at] == [16, 48, 96]
    with pytest.raises(ConfigError, match="eval_every_samples' must be > 0"):
        load_text(tmp_path, MATRIX_GRID.replace("eval_every_samples: 32", "eval_every_samples: 0"))


@pytest.mark.parametrize("edit, message", [
    (("panels: partition", "panels: color"), "key 'series\\[0\\].panels': unknown matrix axis 'color'"),
    (("select: {partition: dir0.1}", "select: {partition: dir9}"), "axis 'partition' has no values \\['dir9'\\]"),
    (("kind: class_mix", "kind: pie"), "key 'series\\[1\\].kind': series kind must be 'fid', 'class_mix' or"),
    (("kind: class_mix", "kind: privacy"), "key 'series\\[1\\].lines': a 'privacy' series needs it"),
    (("baseline: {method: fedavg}", "baseline: {method: sgd}"), "axis 'method' has no values \\['sgd'\\]"),
    (("kind: better", "kind: best"), "key 'findings\\[0\\].kind': finding kind must be one of"),
    (("runs: [dir0.1-fedavgm, dir0.1-fedavg]", "runs: [dir0.1-fedavgm]"), "compares 2 runs"),
    (("{name: fedavgm, overrides", "{name: fedavg, overrides"), "unique names"),
    (("baseline: fedavgm,", "baseline: sgd,"), "baseline \\['sgd'\\] is not one of its values"),
    # typed loading: the key of a wrong type or an unknown key, with the file
    (("samples: 64", "samples: many"), "grid file '.*grid.yaml': key 'samples' must be int, got 'many'"),
    (("seeds: [0, 1]", "seeds: [0, one]"), "key 'seeds\\[1\\]' must be int"),
    (("seeds: [0, 1]", "seeds: 0"), "key 'seeds' must be List\\[int\\], got 0"),
    (("select: {partition: dir0.1}", "select: {partition: 3}"), "key 'series\\[1\\].select.partition' "
                                                                "must be str or List\\[str\\]"),
    (("file: mix.png,", "file: mix.png, colour: red,"), "unknown keys \\['series\\[1\\].colour'\\]"),
    (("{claim: momentum helps under skew, ", "{"), "missing key 'findings\\[0\\].claim'"),
    (("seeds: [0, 1]\n", ""), "missing key 'seeds'"),
    (("with: [central]", "with: [centre]"), "key 'tables\\[0\\]' names unknown runs \\['centre'\\]"),
])
def test_bad_grids_are_clear_errors_naming_the_file_and_key(tmp_path, edit, message):
    assert edit[0] in MATRIX_GRID
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, MATRIX_GRID.replace(*edit))


def test_quick_variant_replaces_keys_and_appends_overrides(tmp_path):
    grid = load_text(tmp_path, MATRIX_GRID + "quick: {seeds: [0], overrides: [eval.steps=2]}\n")
    assert grid.seeds == [0, 1] and "eval.steps=2" not in grid.overrides
    quick = load_grid(str(tmp_path / "grid.yaml"), quick=True, extra_overrides=["threads=1"])
    assert quick.seeds == [0] and quick.overrides[-2:] == ["eval.steps=2", "threads=1"]
    assert quick.output_dir == "runs/compare_quick"


def fake_result(name, seed, fid, fractions, kind="train"):
    """What collect.collect returns for a run, made up."""
    return {"name": name, "seed": seed, "kind": kind, "fid": fid, "kid": fid / 100, "floor_fid": 1.4,
            "floor_kid": 0.0, "kid_std": 0.001, "confident_fraction": 0.8, "class_coverage": 4,
            "floor_confident_fraction": 0.97, "floor_class_coverage": 4,
            "class_tv": 0.5 * sum(abs(f - 0.25) for f in fractions),
            "class_fractions": fractions, "reference_class_fractions": [0.25] * 4,
            "min_class": int(np.argmin(fractions)), "min_class_fraction": min(fractions),
            "final_loss": 0.1, "samples": 64, "bytes_total": 0 if kind == "central" else 1000,
            "wall_s": 1.0, "ended": 0.0, "eval_samples": 1000, "eval_reference": 180,
            "eval_feature": "digits", "curve": [(32, 2 * fid + seed), (64, fid)], "params_bytes": 400,
            "steps": 16, "commit": "abc"}


def cauchy_p(t):
    """Two-sided p of Student's t with 1 degree of freedom (2 seeds): 1 - (2 / pi) atan(|t|)."""
    return 1 - 2 / math.pi * math.atan(abs(t))


# FIDs of seeds 0 and 1; the paired differences (hand-computed in the test below)
MATRIX_FIDS = {"central": [5.0, 5.1], "iid-fedavg": [10.0, 10.4], "iid-fedavgm": [10.1, 10.3],
               "iid-fedavgm2": [11.0, 11.6], "dir0.1-fedavg": [15.0, 15.4],
               "dir0.1-fedavgm": [12.0, 12.2], "dir0.1-fedavgm2": [11.0, 11.3]}


def test_report_of_a_matrix_grid_has_a_table_per_partition_and_the_figures(tmp_path):
    grid = load_text(tmp_path, MATRIX_GRID)
    grid.bytes_plot = False
    grid.untrained = {"fid": 11.5, "confident_fraction": 0.02, "class_coverage": 0}
    skewed = {0: [0.4, 0.3, 0.3, 0.0], 1: [0.4, 0.2, 0.3, 0.1]}
    results = [fake_result(name, seed, fids[seed],
                           skewed[seed] if name.startswith("dir") else [0.25] * 4,
                           "central" if name == "central" else "train")
               for name, fids in MATRIX_FIDS.items() for seed in (0, 1)]
    summary = stats.summarise(results, [r.name for r in grid.runs])
    s = summary["dir0.1-fedavg"]
    assert s["min_class_fraction"] == pytest.approx((0.05, math.sqrt(0.005)))
    assert s["min_class"] == [3, 3]
    assert s["class_fractions"][3] == pytest.approx((0.05, math.sqrt(0.005)))
    assert s["per_seed"]["fid"] == {0: 15.0, 1: 15.4}
    report = write_report(grid, results, tmp_path / "report", "cmd", 60.0)
    text = report.read_text()
    assert "### Partition: iid" in text and "### Partition: Dirichlet 0.1" in text
    # Dirichlet: fedavgm - fedavg = (-3.0, -3.2): mean -3.1, se 0.1, t -31; 95 %: ± t(0.975, 1)
    # 0.1 = ± 1.27062. central - fedavg = (-10, -10.3): t -67.7; fedavgm2 - fedavgm (its own
    # baseline) = (-1.0, -0.9): t -19. Holm over m = 3: p sorted central, fedavgm, fedavgm2.
    p = [cauchy_p(-10.15 / 0.15), cauchy_p(-31), cauchy_p(-19)]
    adjusted = [3 * p[0], max(3 * p[0], 2 * p[1]), max(3 * p[0], 2 * p[1], p[2])]
    assert adjusted == pytest.approx([0.02822, 0.04106, 0.04106], abs=1e-5)  # all <= 0.05
    # fedavgm (rank 2, tested at 0.025): its Holm interval is -3.1 ± tan(0.4875 pi) 0.1 = ± 2.545;
    # both its FID (12.1) and its baseline's (15.2) are beyond the anchor 11.5: not informative
    assert "| fedavgm | 12.1 ± 0.141 † | -3.1 [-4.37, -1.83] | [-5.65, -0.555] at 97.5 % | 0.041 " \
           "| not informative (both †) |" in text
    assert "| fedavgm2 | 11.2 ± 0.212 | -0.95 [-1.59, -0.315] vs fedavgm | " in text  # ± 12.706 x 0.05
    assert "| 0.041 | **better** | 0.8 ± 0 | 4 ± 0 |" in text  # fedavgm2's verdict, then scores
    assert "| central | 5.05 ± 0.0707 | -10.2 [-12.1, -8.24] | " in text
    # IID: central - fedavg = (-5, -5.3), p 0.0185 < 0.05 alone, but the smallest of m = 3
    # is tested at 0.05 / 3: adjusted 3 x 0.0185 = 0.056, no verdict; fedavgm - fedavg = (0.1,
    # -0.1): no difference at all. central's Holm interval, at 1 - 0.05 / 3: -5.15 ± 0.15 x
    # tan(pi (1 - 0.05 / 6 - 0.5)) = ± 0.15 x 38.19, holds 0
    assert 3 * cauchy_p(-5.15 / 0.15) == pytest.approx(0.0556, abs=1e-4)
    assert "| central | 5.05 ± 0.0707 | -5.15 [-7.06, -3.24] | [-10.9, +0.578] at 98.3 % | 0.056 " \
           "| no detected difference |" in text
    assert "| fedavgm | 10.2 ± 0.141 | +0 [-1.27, +1.27] | [-1.27, +1.27] at 95 % | 1 |" in text
    # the range of the metric in every table: floor and anchor rows, the dagger's legend
    assert text.count("| real vs real (floor) | 1.4 | – | – | – | – | 0.97 | 4 | – | – | 0 |") == 2
    assert text.count("| untrained model (anchor) | 11.5 | – | – | – | – | 0.02 | 0 | – | – | – |") == 2
    assert "| untrained model (anchor) | 11.5 | – | 0.02 | 0 |" in text  # the main table's
    assert "† marks a mean FID or KID at or beyond it" in text
    # TV: (0.15 + 0.05 + 0.05 + 0.25) / 2 = 0.25 and (0.15 + 0.05 + 0.05 + 0.15) / 2 = 0.2
    assert "| fedavg | 15.2 ± 0.283 † | – | – | – | – | 0.8 ± 0 | 4 ± 0 | 0.23 ± 0.035 | 0.05 ± 0.071 [3, 3] |" in text
    assert "Holm's step-down procedure" in text
    # more anchors (grid key anchors, e.g. a public model) and the TSTR column when it is scored
    grid.anchors = {"public model": {"fid": 14.0, "class_tv": 0.9, "tstr_accuracy": 0.21}}
    for r in results:
        r["tstr_accuracy"] = 0.5 + 0.1 * r["seed"]
    text = write_report(grid, results, tmp_path / "with_anchors", "cmd", 60.0).read_text()
    assert text.count("| public model (anchor) | 14 | – | – | – | – | – | – | 0.9 | – | – | 0.21 |") == 2
    assert "| public model (anchor) | 14 | – | – | – |" in text  # the main table's
    assert "| KID ×100 | TSTR acc. |" in text and "| 0.55 ± 0.071 |" in text
    assert "| in classes |" not in text  # the held-out images hold every class
    # held-out images of only some classes (data.classes): the samples' share in those classes
    grid.anchors = {"public model": {"fid": 14.0, "class_tv": 0.9, "tstr_accuracy": 0.21, "in_classes": 0.05}}
    for r in results:
        r["in_classes"] = 0.6 + 0.2 * r["seed"]
    text = write_report(grid, results, tmp_path / "in_classes", "cmd", 60.0).read_text()
    assert "| KID ×100 | TSTR acc. | in classes |" in text and "| 0.55 ± 0.071 | 0.7 ± 0.14 |" in text
    assert "| public model (anchor) | 14 | – | – | – | – | – | – | 0.9 | – | – | 0.21 | 0.05 |" in text
    assert "| real vs real (floor) | 1.4 | – | – | – | – | 0.97 | 4 | – | – | 0 | – | 1 |" in text
    grid.anchors = {}
    assert "**momentum helps under skew**: holds" in text  # one 'better' claim: p = cauchy_p(-31)
    assert "code of commit `abc`" in text
    for png in ("panels.png", "mix.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000
    assert not (tmp_path / "report" / "bytes_vs_fid.png").exists()


def test_report_marks_failed_runs_and_leaves_their_claims_undecided(tmp_path):
    grid = load_text(tmp_path, MATRIX_GRID)
    results = [fake_result(name, seed, 10.0 + seed, [0.25] * 4, "central" if name == "central" else "train")
               for name in [r.name for r in grid.runs] if name != "dir0.1-fedavgm" for seed in (0, 1)]
    failures = [{"name": "dir0.1-fedavgm", "seed": s, "kind": "train", "status": "failed",
                 "error": "exit code 2: boom", "log": f"/runs/seed{s}.train.log"} for s in (0, 1)]
    text = write_report(grid, results, tmp_path / "report", "cmd", 60.0, failures=failures).read_text()
    assert "| dir0.1-fedavgm (**failed: seed 0, 1**) | no results |" in text
    assert "| fedavgm (**failed: seed 0, 1**) | no results |" in text  # its row of the Dirichlet table
    assert "**momentum helps under skew**: not decided" in text
    assert "- dir0.1-fedavgm seed 1: failed: exit code 2: boom (log: `/runs/seed1.train.log`)" in text
    assert (tmp_path / "report" / "panels.png").is_file()


def test_rows_name_their_seeds_without_results_and_compare_on_the_rest(tmp_path):
    """A run that diverged on one of 3 seeds: its rows say so, its difference to the baseline
    pairs the 2 seeds both have (n shown); a run never run says 'not run', not 'failed'. The
    time column is the rounds' time (pauses left out) where a result has it."""
    grid = load_text(tmp_path, MATRIX_GRID.replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    results = [fake_result(name, seed, 10.0 + seed + (name == "dir0.1-fedavgm"), [0.25] * 4,
                           "central" if name == "central" else "train")
               for name in [r.name for r in grid.runs] if name != "iid-fedavgm2" for seed in (0, 1, 2)
               if (name, seed) != ("dir0.1-fedavgm", 2)]
    for r in results:
        r["rounds_s"] = 0.5
    failures = [{"name": "dir0.1-fedavgm", "seed": 2, "kind": "train", "status": "diverged",
                 "error": "every client update was rejected", "log": None},
                *[{"name": "iid-fedavgm2", "seed": s, "kind": "train", "status": "not run",
                   "error": "unfinished", "log": None} for s in (0, 1, 2)]]
    text = write_report(grid, results, tmp_path / "report", "cmd", None, failures=failures).read_text()
    assert "| dir0.1-fedavgm (**diverged: seed 2**) | 11.5 ± 0.707 |" in text
    assert "| fedavgm (**diverged: seed 2**) | 11.5 ± 0.707 | +1 [+1, +1] (n = 2) |" in text
    assert "| fedavgm2 (**not run: seed 0, 1, 2**) | no results |" in text
    assert "| fedavgm | 11 ± 1 | +0 [+0, +0] |" in text  # IID: all 3 seeds, no n shown
    assert "| time of rounds (s) |" in text and "| 1,000 | 0.5 ± 0 |" in text
    assert "- dir0.1-fedavgm seed 2: diverged: every client update was rejected" in text
    # the verdicts at a glance: a row per method, a column per partition, the same tests
    glance = text[text.index("## Verdicts at a glance"):text.index("### Partition")]
    assert "| run | iid | Dirichlet 0.1 |" in glance
    assert "| fedavg | FID 11 | FID 11 |" in glance
    assert "| fedavgm | +0 | +1 **worse** (n = 2; 1 diverged) |" in glance
    assert "| fedavgm2 (vs fedavgm) | not run | -1 **better** (n = 2) |" in glance
    # the same tests drawn: each row's difference with its Holm interval, per partition
    assert (tmp_path / "report" / "delta_fid_partition.png").stat().st_size > 5000
    assert "![delta_fid_partition](delta_fid_partition.png)" in text
    grid.tables = []
    assert plots.plot_differences(grid, {1000: {}}, tmp_path) == []


def test_pareto_front_and_the_bytes_report(tmp_path):
    """Final FID against bytes: the front holds the configurations no other beats on both; the
    report lists bytes each way with the front in bold and plots FID against cumulative bytes."""
    grid = load_text(tmp_path, MATRIX_GRID)
    points = {"central": (0, 5.0), "iid-fedavg": (4000, 10.0), "iid-fedavgm": (1000, 10.1),
              "iid-fedavgm2": (2000, 11.0), "dir0.1-fedavg": (500, 15.0),
              "dir0.1-fedavgm": (4000, 9.0), "dir0.1-fedavgm2": (4000, 9.0)}
    results = []
    for name, (total, fid) in points.items():
        for seed in (0, 1):
            r = fake_result(name, seed, fid + 0.1 * seed, [0.25] * 4,
                            "central" if name == "central" else "train")
            r.update(bytes_total=total, bytes_up_total=total // 4, bytes_down_total=total - total // 4,
                     bytes_curve=[(total // 2, 2 * fid), (total, fid + 0.1 * seed)])
            results.append(r)
    summary = stats.summarise(results, list(points))
    # central (0 bytes) beats every federated run on FID: it is the whole front
    assert stats.pareto_front(summary) == ["central"]
    federated = {n: s for n, s in summary.items() if n != "central"}
    assert stats.pareto_front(federated) == ["dir0.1-fedavg", "iid-fedavgm", "dir0.1-fedavgm",
                                             "dir0.1-fedavgm2"]
    assert summary["iid-fedavg"]["bytes_curve"] == [(2000.0, 20.0, 0.0), (4000.0, 10.05, pytest.approx(0.0707, abs=1e-4))]
    grid.untrained["fid"] = 39.5
    text = write_report(grid, results, tmp_path / "report", "cmd", 60.0).read_text()
    assert "## Quality against communication" in text
    assert "The FID floor (real vs real) is 1.4; an untrained model scores 39.5." in text
    # one table per partition (the grid's table axis), the reference row in each, its own front
    assert text.count("| **central** | 0 | 0 | 0 | 5.05 ± 0.0707 |") == 2
    assert "| iid-fedavg | 0.001 | 0.003 | 0.004 | 10.1 ± 0.0707 |" in text
    assert (tmp_path / "report" / "bytes_vs_fid.png").stat().st_size > 10_000


def test_chance_band_of_the_membership_auc():
    """A no-signal attack's AUC: Mann-Whitney U / (m n) has null variance (m + n + 1) / (12 m n);
    761 members and 135 non-members (the privacy study): 1.96 x sqrt(897 / 1,232,820) = 0.0529."""
    from fedrun.experiments.plots import chance_auc_halfwidth

    summary = {"a": {}, "b": {"mia_members": (761.0, 0.0), "mia_nonmembers": (135.0, 0.0)}}
    assert chance_auc_halfwidth(summary, ["a", "b"]) == pytest.approx(0.05287, abs=1e-5)
    assert chance_auc_halfwidth(summary, ["a"]) is None  # no audit
