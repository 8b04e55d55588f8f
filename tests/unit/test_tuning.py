"""The tuning protocol without training: a grid's tuning section loads and is checked (the same
number of points for every method, seeds disjoint from the reporting seeds, every other axis
fixed or tuned per value); its sweeps and their runs; the choice per budget (mean over the
tuning seeds, a point missing a seed left out, edges flagged); one extension beyond an edge;
the reporting plan with the chosen points; the results seen at each budget; tuning.json reused
only for the same tuning runs. ``tune`` runs here on run directories written by a stand-in for
the runner (a made-up FID per point), so which point wins is known."""

import json
import math

import pytest

from conftest import REPO
from fedrun.errors import ConfigError, FedrunError
from fedrun.experiments import tuning
from fedrun.experiments.collect import at_budget, budget_view
from fedrun.experiments.grid import load_grid, plan
from fedrun.experiments.steps import DIVERGED, FAILED, RAN, Outcome

TUNING_GRID = f"""
base_config: {REPO / "configs" / "digits_fedavg.yaml"}
seeds: [0, 1]
samples: 64
budgets: [32]
eval_every_samples: 32
overrides: [num_clients=4, local_steps=2, optim.batch_size=4, clients_per_round=2]
runs:
  - {{name: central, kind: central}}
matrix:
  - axis: partition
    values:
      - {{name: iid, overrides: [partition.method=iid]}}
      - {{name: dir0.1, overrides: [partition.method=dirichlet, partition.alpha=0.1]}}
  - axis: method
    values:
      - {{name: fedavg, overrides: []}}
      - {{name: fedavgm, overrides: [server.strategy=fedavgm]}}
tuning:
  axis: method
  at: {{partition: dir0.1}}
  seeds: [7, 8]
  methods:
    fedavg:
      - {{key: optim.lr, values: [1e-3, 2e-3, 4e-3]}}
      - {{key: server.lr, values: [0.5, 1.0]}}
    fedavgm:
      - {{key: server.momentum, values: [0.5, 0.7, 0.9], extend: [0.3, 0.95]}}
      - {{key: server.lr, values: [0.5, 1.0]}}
    central:
      - {{key: optim.lr, values: [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]}}
"""


def load_text(tmp_path, text=TUNING_GRID):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    grid = load_grid(str(path))
    grid.output_dir = str(tmp_path / "out")
    return grid


def test_groups_and_their_tuning_runs(tmp_path):
    grid = load_text(tmp_path)
    assert grid.budget_list == [32, 64]
    groups = tuning.build_groups(grid)
    assert [(g.name, g.run, g.serves) for g in groups] == [
        ("fedavg", "dir0.1-fedavg", ["iid-fedavg", "dir0.1-fedavg"]),
        ("fedavgm", "dir0.1-fedavgm", ["iid-fedavgm", "dir0.1-fedavgm"]),
        ("central", "central", ["central"])]
    fedavg = groups[0]
    assert [p.label for p in fedavg.points] == ["p00", "p01", "p02", "p03", "p04", "p05"]
    assert fedavg.points[3].values == {"optim.lr": 0.002, "server.lr": 1.0}  # YAML's '2e-3' a number
    assert fedavg.points[3].overrides == ["optim.lr=0.002", "server.lr=1.0"]
    specs = tuning.group_specs(grid, fedavg, fedavg.points[3:4])
    assert [s.id for s in specs] == ["tuning/fedavg@p03/seed7/train", "tuning/fedavg@p03/seed8/train"]
    assert specs[0].run_dir == tmp_path / "out" / "tuning" / "fedavg" / "p03" / "seed7"
    # the dir0.1 run's overrides, the point's, then the budget of the whole grid
    assert specs[0].overrides[4:9] == ["partition.method=dirichlet", "partition.alpha=0.1",
                                       "optim.lr=0.002", "server.lr=1.0", "rounds=4"]
    assert specs[0].overrides[-1] == "seed=7"


def test_per_axis_tunes_each_value_apart(tmp_path):
    grid = load_text(tmp_path, TUNING_GRID.replace("at: {partition: dir0.1}", "per: [partition]"))
    assert [(g.name, g.run, g.serves) for g in tuning.build_groups(grid)][:2] == [
        ("iid-fedavg", "iid-fedavg", ["iid-fedavg"]), ("dir0.1-fedavg", "dir0.1-fedavg", ["dir0.1-fedavg"])]


def test_values_tuned_separately_get_their_own_groups(tmp_path):
    """separately: {partition: [iid]}: the iid runs take the choice of a sweep trained at iid;
    the rest keep the one trained at the 'at' value."""
    grid = load_text(tmp_path, TUNING_GRID.replace("at: {partition: dir0.1}",
                                                   "at: {partition: dir0.1}\n  separately: {partition: [iid]}"))
    assert [(g.name, g.run, g.serves) for g in tuning.build_groups(grid)] == [
        ("fedavg", "dir0.1-fedavg", ["dir0.1-fedavg"]), ("iid-fedavg", "iid-fedavg", ["iid-fedavg"]),
        ("fedavgm", "dir0.1-fedavgm", ["dir0.1-fedavgm"]), ("iid-fedavgm", "iid-fedavgm", ["iid-fedavgm"]),
        ("central", "central", ["central"])]
    own = TUNING_GRID.replace("at: {partition: dir0.1}", "at: {partition: dir0.1}\n  separately: {partition: [iid]}")
    own = own.replace("    central:\n", "    iid-fedavg:\n      - {key: optim.lr, values: [1, 2, 3, 4, 5, 6]}\n    central:\n")
    groups = {g.name: g for g in tuning.build_groups(load_text(tmp_path, own))}
    assert [p.values["optim.lr"] for p in groups["iid-fedavg"].points] == [1, 2, 3, 4, 5, 6]
    assert groups["iid-fedavgm"].points == groups["fedavgm"].points  # its method's axes
    with pytest.raises(ConfigError, match="or a sweep tuned separately"):
        load_text(tmp_path, own.replace("    iid-fedavg:", "    dir0.1-fedavg:"))
    for bad in ("[dir0.1]", "[dir9]", "[iid, iid]"):
        with pytest.raises(ConfigError, match="separately.partition': needs distinct values"):
            load_text(tmp_path, TUNING_GRID.replace("at: {partition: dir0.1}",
                                                    f"at: {{partition: dir0.1}}\n  separately: {{partition: {bad}}}"))


@pytest.mark.parametrize("edit, message", [
    (("values: [0.5, 0.7, 0.9], extend", "values: [0.5, 0.9], extend"),
     "every method needs the same number of points; 'fedavgm' has 4 \\(server.momentum 2 x server.lr 2\\), "
     "'fedavg' has 6 \\(optim.lr 3 x server.lr 2\\)"),
    (("seeds: [7, 8]", "seeds: [7, 1]"), "key 'tuning.seeds': tuning seeds must be given and disjoint "
                                          "from the reporting seeds \\[0, 1\\]; shared: \\[1\\]"),
    (("    central:\n", "    fedprox:\n"), "key 'tuning.methods': \\['fedprox'\\]: a method is a value of"),
    (("    fedavgm:\n      - {key: server.momentum, values: [0.5, 0.7, 0.9], extend: [0.3, 0.95]}\n"
      "      - {key: server.lr, values: [0.5, 1.0]}\n", ""),
     "every value of the axis 'method' is tuned; missing \\['fedavgm'\\]"),
    (("at: {partition: dir0.1}", "per: []"), "in neither: \\['partition'\\]"),
    (("at: {partition: dir0.1}", "at: {partition: dir0.1}\n  per: [partition]"),
     "in both: \\['partition'\\]"),
    (("at: {partition: dir0.1}", "at: {partition: dir9}"), "axis 'partition' has no values \\['dir9'\\]"),
    (("seeds: [7, 8]", "seeds: [7, 8]\n  metric: loss"), "key 'tuning.metric': must be one of"),
    (("extend: [0.3, 0.95]", "extend: [0.3]"), "'extend' is \\[below, above\\]"),
    (("values: [0.5, 1.0]}\n    central", "values: [0.5, 0.5]}\n    central"), "needs distinct values"),
    (("budgets: [32]", "budgets: [48]"), "key 'budgets': 48 must be an evaluation point"),
    (("seeds: [0, 1]\n", "seeds: [0, 1]\nuntrained: {fid: 39.5, is: 1}\n"),
     "key 'untrained' has unknown metrics"),
])
def test_bad_tuning_sections_are_clear_errors(tmp_path, edit, message):
    assert edit[0] in TUNING_GRID
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, TUNING_GRID.replace(*edit))


def sweep_of(grid, scores):
    """A Sweep whose groups hold ``scores``: group -> point label -> budget -> {seed: metric}."""
    groups = tuning.build_groups(grid)
    for group in groups:
        group.scores = {label: {str(b): {str(s): v for s, v in seeds.items()}
                                for b, seeds in by_budget.items()}
                        for label, by_budget in scores.get(group.name, {}).items()}
        tuning.choose(group, grid.budget_list, grid.tuning.seeds, lower_is_better=True)
    return tuning.Sweep("sig", "fid", True, grid.tuning.seeds, grid.budget_list, groups)


def test_the_choice_per_budget_is_the_best_mean_over_complete_points(tmp_path):
    grid = load_text(tmp_path)
    sweep = sweep_of(grid, {"fedavg": {
        "p00": {32: {7: 10.0, 8: 12.0}, 64: {7: 9.0, 8: 9.0}},   # mean 11 at 32, 9 at 64
        "p03": {32: {7: 11.0, 8: 10.0}, 64: {7: 7.0, 8: 9.0}},   # 10.5 at 32, 8 at 64
        "p04": {32: {7: 1.0}, 64: {7: 1.0}},                      # a seed missing: no candidate
        "p05": {32: {7: 10.0, 8: 11.0}, 64: {7: 9.0, 8: 7.0}}}})  # ties with p03 at 32 and 64
    fedavg = sweep.groups[0]
    assert fedavg.choice["32"] == {"point": "p03", "mean": 10.5, "extended": [],
                                   "edges": [["server.lr", "high"]]}  # optim.lr 2e-3: inside
    assert fedavg.choice["64"]["point"] == "p03" and fedavg.choice["64"]["mean"] == 8.0
    assert sweep.groups[1].choice == {"32": None, "64": None}  # no results at all
    assert sweep.tuned()["iid-fedavg"] == {"p03": (["optim.lr=0.002", "server.lr=1.0"], 64)}
    assert sweep.tuned()["dir0.1-fedavgm"] == {}
    assert sweep.chosen()["dir0.1-fedavg"] == {32: "p03", 64: "p03"}
    highest = sweep_of(grid, {})
    highest.groups[0].scores = fedavg.scores
    tuning.choose(highest.groups[0], [64], [7, 8], lower_is_better=False)  # e.g. coverage
    assert highest.groups[0].choice["64"]["point"] == "p00"


def test_edges_and_the_point_beyond_them(tmp_path):
    grid = load_text(tmp_path)
    sweep = sweep_of(grid, {"fedavg": {"p05": {32: {7: 5.0, 8: 5.0}}},
                            "fedavgm": {"p00": {32: {7: 5.0, 8: 5.0}, 64: {7: 5.0, 8: 5.0}},
                                        "p05": {64: {7: 4.0, 8: 4.0}}}})
    fedavg, fedavgm = sweep.groups[:2]
    # p05 = (4e-3, 1.0): the top of both axes
    assert fedavg.choice["32"]["edges"] == [["optim.lr", "high"], ["server.lr", "high"]]
    assert tuning.beyond(fedavg.axes[0], "high") == pytest.approx(8e-3)  # geometric: 4e-3^2 / 2e-3
    assert tuning.beyond(fedavg.axes[0], "low") == pytest.approx(5e-4)
    assert tuning.beyond(fedavgm.axes[0], "low") == 0.3  # its 'extend'
    assert tuning.beyond({"values": [0.0, 0.01], "extend": None}, "high") is None  # not all positive
    new = tuning.extension_points(fedavg, [32, 64])
    assert [(p.label, p.values, p.extension) for p in new] == [
        ("x00", {"optim.lr": pytest.approx(8e-3), "server.lr": 1.0}, True),
        ("x01", {"optim.lr": 4e-3, "server.lr": 2.0}, True)]
    assert fedavg.choice["32"]["extended"] == [["optim.lr", "high", "x00"], ["server.lr", "high", "x01"]]
    # p00 = (momentum 0.5, lr 0.5) at 32: low edges; p05 = (0.9, 1.0) at 64: high edges
    assert [p.values for p in tuning.extension_points(fedavgm, [32, 64])] == [
        {"server.momentum": 0.3, "server.lr": 0.5}, {"server.momentum": 0.5, "server.lr": 0.25},
        {"server.momentum": 0.95, "server.lr": 1.0}, {"server.momentum": 0.9, "server.lr": 2.0}]
    # choosing again: the extension x00 wins at 32, still on the (new) high edge of optim.lr
    fedavg.scores["x00"] = {"32": {"7": 4.0, "8": 4.0}}
    fedavg.scores["x01"] = {"32": {"7": 6.0, "8": 6.0}}
    tuning.choose(fedavg, [32], [7, 8], True)
    assert fedavg.choice["32"]["point"] == "x00"
    assert fedavg.choice["32"]["edges"] == [["optim.lr", "high"]]  # server.lr 1.0: now inside
    assert fedavg.choice["32"]["extended"][0] == ["optim.lr", "high", "x00"]  # kept


def test_reporting_runs_train_the_chosen_points_to_the_largest_budget_choosing_them(tmp_path):
    grid = load_text(tmp_path)
    sweep = sweep_of(grid, {"fedavg": {"p00": {32: {7: 1.0, 8: 1.0}, 64: {7: 9.0, 8: 9.0}},
                                       "p01": {32: {7: 5.0, 8: 5.0}, 64: {7: 2.0, 8: 2.0}}}})
    specs = plan(grid, sweep.tuned())
    by_id = {s.id: s for s in specs}
    assert not [i for i in by_id if i.startswith(("central", "iid-fedavgm"))]  # tuned, no choice
    short, long = by_id["iid-fedavg@p00/seed1/train"], by_id["iid-fedavg@p01/seed1/train"]
    assert short.run_dir == tmp_path / "out" / "runs" / "iid-fedavg" / "p00" / "seed1"
    assert "rounds=2" in short.overrides and "rounds=4" in long.overrides  # 32 and 64 samples
    assert "optim.lr=0.001" in short.overrides and "server.lr=1.0" in long.overrides
    assert len(specs) == 2 * 2 * 2  # {iid, dir0.1}-fedavg at 2 points, 2 seeds


def made_up(name, seed, fids, samples=64):
    """A collected result with an evaluation at each of ``fids`` (samples -> FID)."""
    at = {str(s): {"fid": f, "kid": f / 100, "final_loss": 0.1} for s, f in fids.items()}
    return {"name": name, "seed": seed, "kind": "train", "samples": samples, "fid": fids[samples],
            "kid": fids[samples] / 100, "final_loss": 0.1, "at": at}


def test_results_at_each_budget():
    results = [made_up("central", 0, {32: 8.0, 64: 6.0}), made_up("a@p00", 0, {32: 5.0}, samples=32),
               made_up("a@p01", 0, {32: 7.0, 64: 3.0}), made_up("old", 0, {64: 4.0})]
    results[-1].pop("at")  # collected before evaluations were kept by budget
    assert at_budget(results[0], 32)["fid"] == 8.0 and at_budget(results[0], 32)["samples"] == 32
    assert at_budget(results[-1], 64)["fid"] == 4.0
    with pytest.raises(FedrunError, match="run 'old' seed 0 has no evaluation at 32 samples seen"):
        at_budget(results[-1], 32)
    chosen = {"a": {32: "p00", 64: "p01"}}
    early = budget_view(results[:3], 32, chosen)
    assert [(r["name"], r["point"], r["fid"]) for r in early] == [("central", None, 8.0), ("a", "p00", 5.0)]
    assert [(r["name"], r["fid"]) for r in budget_view(results, 64, chosen)] == [
        ("central", 6.0), ("a", 3.0), ("old", 4.0)]


def test_the_per_seed_table_shows_each_budget_a_run_reached():
    from fedrun.experiments.tables import per_seed_table

    results = [made_up("a@p00", 0, {32: 5.0}, samples=32), made_up("a@p01", 0, {32: 7.0, 64: 3.0})]
    for r in results:
        r["rounds_s"] = 10.0
    lines = per_seed_table(results, [32, 64])
    assert lines[0].startswith("FID at each budget the run reached; the other columns at the run's end")
    assert "| configuration | seed | FID at 32 | FID at 64 | KID ×100 (± subset std) |" in lines[2]
    assert lines[4].startswith("| a@p00 | 0 | 5 | – | 5 |") and lines[5].startswith("| a@p01 | 0 | 7 | 3 | 3 |")
    assert per_seed_table(results[:1], [32])[0].startswith("| configuration | seed | FID |")  # one budget


def test_a_paused_round_counts_at_its_runs_median_round_of_its_kind():
    """A run stopped (kill -STOP) mid-round for an hour: that round counts at the median round,
    the hour is reported apart; evaluated rounds (slower) are compared with each other only."""
    from fedrun.experiments.collect import round_times

    rounds = [{"round_time_s": 1.0} for _ in range(9)] + [{"round_time_s": 7.0, "fid": 30.0}]
    assert round_times(rounds) == (pytest.approx(16.0), 0.0)  # 7 s is an evaluation, not a pause
    rounds[3] = {"round_time_s": 3601.0}
    rounds += [{"round_time_s": 8.0, "fid": 20.0}, {"round_time_s": 9.0, "fid": 10.0}]
    assert round_times(rounds) == (pytest.approx(33.0), pytest.approx(3600.0))
    rounds[-1] = {"round_time_s": 600.0, "fid": 10.0}  # an evaluation paused too
    assert round_times(rounds) == (pytest.approx(32.0), pytest.approx(3600.0 + 592.0))
    assert round_times([{"round": 1}]) == (0.0, 0.0)  # records from before round_time_s


def test_an_earlier_budget_reads_the_time_of_the_rounds_until_it():
    """A budget read from a longer run (its choice is the same at both) costs the rounds until
    that budget, evaluations included and pauses left out, not the whole run's time."""
    from fedrun.experiments.collect import rounds_until

    rounds = [{"round": r, "round_time_s": 1.0} for r in range(1, 11)]
    rounds[1]["round_time_s"] = 500.0  # paused: counts at the median round, 1 s
    rounds[4].update(round_time_s=6.0, fid=20.0)
    rounds[9].update(round_time_s=8.0, fid=10.0)
    assert rounds_until(rounds) == {5: pytest.approx(10.0), 10: pytest.approx(22.0)}


def test_failures_count_at_the_budgets_where_their_point_is_chosen():
    """A tuned run's failure ('<run>@<point>') leaves a row without that seed only at the
    budgets whose choice is that point; an untuned run's at every budget."""
    from fedrun.experiments.collect import budget_failures

    failures = [{"name": "iid-sgd@p02", "seed": 0, "status": "diverged"},
                {"name": "central", "seed": 1, "status": "failed"}]
    chosen = {"iid-sgd": {10: "x01", 40: "p02", 100: "p02"}}
    assert [(f["name"], f["seed"]) for f in budget_failures(failures, 10, chosen)] == [("central", 1)]
    assert [(f["name"], f["seed"]) for f in budget_failures(failures, 40, chosen)] == [
        ("iid-sgd", 0), ("central", 1)]


def test_an_earlier_budget_reads_its_own_class_mix(tmp_path):
    """collect keeps each evaluation's class mix and what is read of it (rarest class, share in
    the held-out images' classes) by budget: an earlier budget does not show the final one's."""
    from fedrun.experiments.collect import collect
    from fedrun.experiments.steps import RunSpec

    spec = RunSpec("a", "train", tmp_path / "a", round_samples=16)
    (spec.run_dir / "final").mkdir(parents=True)
    reference = [0.0, 0.5, 0.5]  # data.classes a subset: class 0 left out
    mixes = {1: [0.5, 0.4, 0.1], 2: [0.1, 0.3, 0.6]}
    (spec.run_dir / "metrics.jsonl").write_text("".join(json.dumps(
        {"round": r, "samples": 16 * r, "train_loss": 0.1, "bytes_total": 8 * r, "fid": 10.0 / r,
         "eval_samples": 24, "eval_reference": 180, "eval_feature": "digits",
         "class_fractions": mix, "reference_class_fractions": reference}) + "\n"
        for r, mix in mixes.items()))
    result = collect(spec)
    assert (result["min_class"], result["min_class_fraction"]) == (1, 0.3)
    assert result["in_classes"] == pytest.approx(0.9)
    early = at_budget(result, 16)
    assert (early["min_class"], early["min_class_fraction"]) == (2, 0.1)
    assert early["in_classes"] == pytest.approx(0.5) and early["class_fractions"] == mixes[1]


def test_an_earlier_budget_reads_what_was_spent_until_it(tmp_path):
    """A budget read from a longer run (the same point chosen at both) shows the bytes, steps and
    samples seen until that budget, not the whole run's; records from before the directions
    were counted apart split their bytes half each way."""
    from fedrun.experiments.collect import collect
    from fedrun.experiments.steps import RunSpec

    spec = RunSpec("a", "train", tmp_path / "a", round_samples=16)
    (spec.run_dir / "final").mkdir(parents=True)
    records = [{"round": r, "samples": 16 * r, "train_loss": 0.1, "bytes_total": 10 * r,
                "bytes_up_total": 4 * r, "bytes_down_total": 6 * r, "steps": 3 * r,
                "fid": 10.0 / r, "eval_samples": 24, "eval_reference": 180, "eval_feature": "digits"}
               for r in (1, 4)]
    del records[0]["bytes_up_total"], records[0]["bytes_down_total"]  # an older record
    (spec.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = collect(spec)
    spent = ("samples_seen", "bytes_total", "bytes_up_total", "bytes_down_total", "steps")
    assert [result[k] for k in spent] == [64, 40, 16, 24, 12]
    assert [at_budget(result, 16)[k] for k in spent] == [16, 10, 5, 5, 3]
    assert at_budget(result, 64) is result


def write_run(spec, fid_of):
    """What a finished grid run leaves: final/ and its evaluations in metrics.jsonl, with the
    FID ``fid_of(spec, samples)`` at each evaluation point."""
    rounds = int(next(o for o in spec.overrides if o.startswith("rounds="))[7:])
    every = int(next(o for o in spec.overrides if o.startswith("eval.every="))[11:])
    (spec.run_dir / "final").mkdir(parents=True, exist_ok=True)
    records = []
    for done in range(1, rounds + 1):
        samples = done * spec.round_samples
        record = {"round": done, "samples": samples, "train_loss": 0.1, "bytes_total": 8 * done}
        if done % every == 0 or done == rounds:
            record.update(fid=fid_of(spec, samples), kid=0.01, floor_fid=1.4, floor_kid=0.0,
                          eval_samples=24, eval_reference=180, eval_feature="digits")
        records.append(json.dumps(record))
    (spec.run_dir / "metrics.jsonl").write_text("\n".join(records) + "\n")


def test_tune_chooses_extends_once_saves_and_reuses(tmp_path):
    """A made-up FID: (log2(lr / 4e-3))^2 + |server lr - 1| + samples / 64, lowest at lr 4e-3
    and server lr 1, the top of fedavg's axes: flagged, extended once to 8e-3 and to 2 (both
    worse), chosen again, inside now."""
    grid = load_text(tmp_path)
    grid.tuning.extend_edges = True
    ran = []

    def fid_of(spec, samples):
        values = dict(o.split("=", 1) for o in spec.overrides)
        lr = float(values.get("optim.lr", 2e-3))
        return math.log2(lr / 4e-3) ** 2 + abs(float(values.get("server.lr", 1.0)) - 1) + samples / 64

    def run(specs):
        for spec in specs:
            write_run(spec, fid_of)
        ran.append(len(specs))
        return {spec.id: Outcome(spec, RAN, wall_s=2.0) for spec in specs}

    sweep = tuning.tune(grid, run, tmp_path / "report" / "tuning.json", say=lambda *_: None)
    fedavg = sweep.groups[0]
    assert fedavg.choice["64"]["point"] == "p05" and fedavg.choice["64"]["mean"] == pytest.approx(1.0)
    assert fedavg.choice["64"]["extended"] == [["optim.lr", "high", "x00"], ["server.lr", "high", "x01"]]
    assert fedavg.choice["64"]["edges"] == []  # inside once 8e-3 and 2 were tried
    assert fedavg.scores["x00"]["64"] == {"7": pytest.approx(2.0), "8": pytest.approx(2.0)}
    # 3 groups x 6 points x 2 seeds, then the points beyond: fedavg 2; fedavgm 2 (the momentum
    # makes no difference: the first of the tied points, p01 = (0.5, 1.0), is on the low edge of
    # the momentum and the high edge of the server lr); central none (4e-3 is inside)
    assert ran == [36, 2 * (2 + 2)]
    assert sweep.groups[1].choice["64"]["point"] == "p01" and sweep.groups[1].choice["64"]["edges"] == []
    assert sweep.complete and sweep.cost["runs"] == 44 and sweep.cost["wall_s"] == pytest.approx(0.0)
    saved = json.loads((tmp_path / "report" / "tuning.json").read_text())
    assert saved["signature"] == sweep.signature and saved["groups"][0]["choice"]["64"]["point"] == "p05"
    # again: the same tuning runs, reused from the file without running anything
    again = tuning.tune(grid, run, tmp_path / "report" / "tuning.json", say=lambda *_: None)
    assert again.reused and len(ran) == 2 and again.groups[0].choice == fedavg.choice
    assert again.tuned() == sweep.tuned()
    # other tuning runs (another seed): not the same sweep, tuned again
    grid.tuning.seeds = [7, 9]
    tuning.tune(grid, run, tmp_path / "report" / "tuning.json", say=lambda *_: None)
    assert len(ran) == 4


def test_a_tuning_with_failed_runs_chooses_among_the_rest_and_is_tuned_again(tmp_path):
    grid = load_text(tmp_path)
    calls = []

    failing = [FAILED]

    def run(specs):
        calls.append(len(specs))
        outcomes = {}
        for spec in specs:
            if spec.name == "tuning/fedavg@p00" and spec.seed == 8:
                outcomes[spec.id] = Outcome(spec, failing[0], wall_s=1.0, error="boom")
                continue
            write_run(spec, lambda spec, samples: 1.0 if "optim.lr=0.001" in spec.overrides else 2.0)
            outcomes[spec.id] = Outcome(spec, RAN)
        return outcomes

    sweep = tuning.tune(grid, run, tmp_path / "tuning.json", say=lambda *_: None)
    assert not sweep.complete
    assert [(f["name"], f["seed"]) for f in sweep.failures] == [("tuning/fedavg@p00", 8)]
    assert sweep.groups[0].choice["64"]["point"] == "p01"  # p00 (lower FID) lacks seed 8
    assert sweep.cost["wall_s"] == 1.0  # the failed run's time; the others wrote no record
    tuning.tune(grid, run, tmp_path / "tuning.json", say=lambda *_: None)
    assert calls == [36, 36]  # incomplete: not reused (the runner skips what is finished)
    collected = tuning.tune(grid, run, tmp_path / "tuning.json", say=lambda *_: None, collect_only=True)
    assert collected.reused and calls == [36, 36]  # collecting: the saved sweep as it is
    failing[0] = DIVERGED  # the run stopped itself, unable to learn: a result, the sweep complete
    diverged = tuning.tune(grid, run, tmp_path / "tuning.json", say=lambda *_: None)
    assert diverged.complete and [f["status"] for f in diverged.failures] == [DIVERGED]
    assert tuning.tune(grid, run, tmp_path / "tuning.json", say=lambda *_: None).reused
    assert calls == [36, 36, 36]


def test_the_sweep_tables_of_the_report(tmp_path):
    from fedrun.experiments.tables import sweep_tables

    grid = load_text(tmp_path)
    sweep = sweep_of(grid, {"fedavg": {"p00": {32: {7: 50.0, 8: 52.0}, 64: {7: 9.0, 8: 11.0}},
                                       "p03": {32: {7: 30.0, 8: 32.0}, 64: {7: 20.0, 8: 22.0}}}})
    sweep.cost = {"runs": 36, "wall_s": 7200.0, "rounds_s": 5400.0, "paused_s": 600.0}
    stopped = ("exit code 2: fedrun train: error: every client update was rejected in 3 consecutive "
               "rounds (1-3), so the model cannot learn (faults.max_rejected_rounds=3).")
    sweep.failures = [{"name": "tuning/fedavg@p01", "seed": 8, "status": "failed", "error": stopped,
                       "log": "out/tuning/fedavg/p01/seed8.train.log"},
                      {"name": "tuning/fedavg@p05", "seed": 7, "status": "failed", "error": "killed",
                       "log": "out/tuning/fedavg/p05/seed7.train.log"},
                      {"name": "tuning/fedavgm@p00", "seed": 7, "status": "failed", "error": stopped}]
    text = "\n".join(sweep_tables(sweep, anchor=40.0))
    assert ("Cost of the tuning: 36 runs, 2.00 h of run time (summed over the runs); 90.0 min of "
            "rounds alone (evaluations included; not the start-up, nor the pauses: 10.0 min left out); "
            "3 tuning runs without results.") in text
    # a run that stopped itself (every update rejected) is 'diverged', any other failure 'failed'
    assert "| p01 | 0.001 | 1 | –, diverged | – | –, diverged | – |" in text
    assert "| p05 | 0.004 | 1 | failed, – | – | failed, – | – |" in text
    assert ("- diverged, no results: p01 (seed 8); the run stopped: every client update was rejected "
            "round after round (non-finite), so the point is not a candidate "
            "(log: `out/tuning/fedavg/p01/seed8.train.log`)") in text
    assert "- failed, no results: p05 (seed 7); killed (log: `out/tuning/fedavg/p05/seed7.train.log`)" in text
    assert text.count("no results: p00 (seed 7)") == 1  # fedavgm's, under fedavgm only
    assert "The untrained model scores fid 40; †: a mean at or beyond it." in text
    assert "| point | optim.lr | server.lr | fid at 32: per seed | mean | fid at 64: per seed | mean |" in text
    assert "| p00 | 0.001 | 0.5 | 50, 52 | 51 † | 9, 11 | **10** ✓ |" in text
    assert "| p03 | 0.002 | 1 | 30, 32 | **31** ✓ | 20, 22 | 21 |" in text
    assert "| p04 | 0.004 | 0.5 | –, – | – | –, – | – |" in text  # not run
    assert "- 64 samples: **chosen p00 is on the low edge of `optim.lr`**" in text
    assert "### fedavgm" in text and "- 32 samples: **no point has results for every tuning seed**" in text
