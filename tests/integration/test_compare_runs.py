"""``fedrun compare`` training real (tiny) runs: a re-run trains only what is unfinished; a
failing run is recorded with its error and marked in the report while the others finish;
every run records its commit; the processes backend runs a grid with --jobs 2; a grid with a
tuning section runs its tuning first, reports the sweeps and the paired statistics at each
budget, and reuses both on a re-run; and the non-IID grid's quick variant end to end."""

import json

import pytest

from conftest import REPO, tiny
from fedrun.cli import main as fedrun_main
from fedrun.engine.metrics import code_commit
from fedrun.experiments.compare import compare
from fedrun.experiments.grid import load_grid, plan
from fedrun.experiments.runner import execute
from fedrun.experiments.steps import FAILED, FINISHED_EARLIER

# Two federated runs of 32 samples (a: 4 rounds of 2 clients x 1 step x batch 4; b: 2 rounds
# of 4 clients), one FID at the end from 24 samples: ~2-3 s a run in process.
TINY_GRID = """
base_config: {config}
seeds: [0]
samples: 32
eval_every_samples: 32
ema_horizon_samples: 16
overrides: {overrides}
runs:
  - {{name: a, overrides: [num_clients=2, local_steps=1]}}
  - {{name: b, overrides: [num_clients=4, local_steps=1]}}
{extra}"""

# fails when it starts (no such data folder), after the plan accepted its config
BROKEN = """  - {name: broken, overrides: [num_clients=2, local_steps=1, data.name=image_folder, data.root=/no/such/folder]}
findings:
  - {claim: a close to broken, kind: close, runs: [a, broken]}
  - {claim: a close to b, kind: close, runs: [a, b]}
"""


def tiny_grid(tmp_path, extra=""):
    overrides = [o for o in tiny(tmp_path) if not o.startswith("output_dir")] + [
        "eval.num_samples=24", "eval.steps=2", "eval.kid_subset_size=8", "sample.every=0",
        "checkpoint.every=0", "threads=1"]
    path = tmp_path / "grid.yaml"
    path.write_text(TINY_GRID.format(config=REPO / "configs" / "digits_fedavg.yaml",
                                     overrides=json.dumps(overrides), extra=extra))
    return path


@pytest.mark.slow
def test_failed_run_is_recorded_the_others_finish_and_a_rerun_trains_nothing_finished(tmp_path):
    grid_file, out = tiny_grid(tmp_path, BROKEN), tmp_path / "grid"
    assert fedrun_main(["compare", "--grid", str(grid_file), "--out", str(out)]) == 1  # a run failed
    text = (out / "report" / "README.md").read_text()
    assert "| broken (**failed: seed 0**) | no results |" in text
    assert "**a close to broken**: not decided" in text and "**a close to b**: holds" in text
    assert "- broken seed 0: failed: data.root '/no/such/folder' does not exist" in text
    results = json.loads((out / "report" / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["a", "b"] and results["commit"] == code_commit()
    assert [f["name"] for f in results["failures"]] == ["broken"]
    for name in ("a", "b"):  # every run records the code it trained with and its wall time
        record = json.loads((out / "runs" / name / "seed0" / "runner_train.json").read_text())
        assert record["commit"] == code_commit() and record["wall_s"] > 0 and record["status"] == "ran"
    failed = json.loads((out / "runs" / "broken" / "seed0" / "runner_train.json").read_text())
    assert failed["status"] == FAILED and "does not exist" in failed["error"]

    # Again: the finished runs are skipped (no training), the failed one is tried again.
    metrics = out / "runs" / "a" / "seed0" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    grid = load_grid(str(grid_file))
    grid.output_dir = str(out)
    outcomes = execute(plan(grid), say=lambda *_: None)
    assert [o.status for o in outcomes.values()] == [FINISHED_EARLIER, FINISHED_EARLIER, FAILED]
    assert metrics.stat().st_mtime_ns == before
    # --collect reads the same numbers without running anything
    collected = compare(str(grid_file), collect_only=True, output_dir=str(out), say=lambda *_: None)
    assert [(f["name"], f["status"]) for f in collected.failures] == [("broken", FAILED)]
    assert "does not exist" in collected.failures[0]["error"]  # from its record
    assert json.loads((out / "report" / "results.json").read_text())["runs"] == results["runs"]


@pytest.mark.slow
def test_processes_backend_runs_a_grid_with_two_jobs(tmp_path, capsys):
    grid_file, out = tiny_grid(tmp_path), tmp_path / "grid"
    assert fedrun_main(["compare", "--grid", str(grid_file), "--out", str(out), "--jobs", "2"]) == 0
    assert "backend processes, 2 at once" in capsys.readouterr().err
    for name in ("a", "b"):
        run = out / "runs" / name / "seed0"
        assert (run / "final").is_dir()
        assert "done" in (out / "runs" / name / "seed0.train.log").read_text()  # its own log file
        assert json.loads((run / "runner_train.json").read_text())["commit"] == code_commit()
    results = json.loads((out / "report" / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["a", "b"] and not results["failures"]


# Two methods of one partition, each tuned over 2 points on 1 tuning seed, then reported on 2
# seeds at 2 budgets (16 and 32 samples: 2 and 4 rounds of 2 clients x 1 step x batch 4).
TUNED = """  - {{name: central, kind: central, overrides: [num_clients=2, local_steps=1]}}
budgets: [16]
eval_every_samples: 16
untrained: {{fid: 400.0, confident_fraction: 0.4, class_coverage: 2}}
matrix:
  - axis: partition
    values: [{{name: iid, overrides: [partition.method=iid]}}]
  - axis: method
    values:
      - {{name: fedavg, overrides: [num_clients=2, local_steps=1]}}
      - {{name: fedavgm, overrides: [num_clients=2, local_steps=1, server.strategy=fedavgm]}}
tuning:
  axis: method
  at: {{partition: iid}}
  seeds: [{tuning_seed}]
  methods:
    fedavg: [{{key: optim.lr, values: [1.0e-3, 4.0e-3]}}]
    fedavgm: [{{key: server.momentum, values: [0.5, 0.9]}}]
tables:
  - {{name: Partition, by: partition, baseline: {{method: fedavg}}, with: [central]}}
findings:
  - {{claim: momentum helps, kind: better, runs: [iid-fedavgm, iid-fedavg]}}
"""


@pytest.mark.slow
def test_a_tuned_grid_tunes_first_reports_every_sweep_and_reuses_its_choice(tmp_path, capsys):
    """The --quick path of the tuning protocol: 4 tuning runs, then the reporting runs with the
    chosen points (inline, ~2 s a run: well under a minute). With --records the runs keep
    their records (no weights): with the run folder gone (another machine), --collect makes
    the same report from them alone and running the grid again trains nothing."""
    import shutil

    grid_file, out, kept = tiny_grid(tmp_path, TUNED.format(tuning_seed=7)), tmp_path / "grid", tmp_path / "kept"
    text = grid_file.read_text().replace("eval_every_samples: 32\n", "").replace(
        "seeds: [0]\n", "seeds: [0, 1]\n").replace(
        "runs:\n  - {name: a, overrides: [num_clients=2, local_steps=1]}\n"
        "  - {name: b, overrides: [num_clients=4, local_steps=1]}\n", "runs:\n")
    grid_file.write_text(text)
    args = ["compare", "--grid", str(grid_file), "--out", str(out), "--records", str(kept)]
    assert fedrun_main(args) == 0
    assert len(list(kept.rglob("runner_*.json"))) == 14  # kept as each run ended
    report = out / "report"
    sweep = json.loads((report / "tuning.json").read_text())
    assert sweep["complete"] and sweep["cost"]["runs"] == 4 and sweep["cost"]["wall_s"] > 0
    chosen = {g["name"]: {b: c["point"] for b, c in g["choice"].items()} for g in sweep["groups"]}
    assert set(chosen) == {"fedavg", "fedavgm"} and set(chosen["fedavg"]) == {"16", "32"}
    for group in sweep["groups"]:  # every point scored on the tuning seed at both budgets
        assert {p: set(by_budget) for p, by_budget in group["scores"].items()} == {
            "p00": {"16", "32"}, "p01": {"16", "32"}}
        assert all(list(seeds) == ["7"] for by_budget in group["scores"].values()
                   for seeds in by_budget.values())
    for budget, point in chosen["fedavg"].items():  # the reporting runs train the chosen points
        assert (out / "runs" / "iid-fedavg" / point / "seed1" / "final").is_dir()
        record = json.loads((out / "runs" / "iid-fedavg" / point / "seed1" / "runner_train.json").read_text())
        lr = {"p00": "optim.lr=0.001", "p01": "optim.lr=0.004"}[point]
        assert lr in record["overrides"]
    readme = (report / "README.md").read_text()
    assert "## Tuning" in readme and "### fedavg" in readme and "### fedavgm" in readme
    assert "Cost of the tuning: 4 runs" in readme and readme.count(" ✓ |") >= 4
    assert "## At 16 samples seen" in readme and "## At 32 samples seen" in readme
    assert readme.count("| untrained model (anchor) | 400 |") == 4  # main and partition table x 2 budgets
    assert "Holm's step-down procedure" in readme and "[95 % CI]" in readme
    assert "for 4 tuning runs" in readme  # the study's wall time counts the tuning
    results = json.loads((report / "results.json").read_text())
    assert results["study"]["tuning_runs"] == 4 and results["study"]["span_s"] > 0
    assert results["chosen"]["iid-fedavg"] == chosen["fedavg"]
    assert {r["seed"] for r in results["runs"]} == {0, 1}
    assert all("confident_fraction" in r and "at" in r for r in results["runs"])
    capsys.readouterr()
    # again: the tuning is reused and every reporting run is finished; nothing trains
    metrics = next((out / "runs" / "iid-fedavgm").rglob("metrics.jsonl"))
    before = metrics.stat().st_mtime_ns
    assert fedrun_main(args) == 0
    err = capsys.readouterr().err
    assert "tuning: reusing" in err and "already finished" in err and "started" not in err
    assert metrics.stat().st_mtime_ns == before
    shutil.rmtree(kept / "tuning")  # a reused sweep's runs are kept too
    assert fedrun_main(args + ["--collect"]) == 0
    assert len(list((kept / "tuning").rglob("runner_*.json"))) == 4
    collected = json.loads((report / "results.json").read_text())
    # collected: no invocation to time; the study's span (tuning included) says it
    assert collected["wall_s"] is None and collected["study"]["span_s"] > 0
    text = (report / "README.md").read_text()
    assert "Wall time" not in text and "The study, from its first run's start to its last run's end (any " in text

    # another machine: only the kept records (no weights), not the runs nor the report
    assert not list(kept.rglob("*.safetensors")) and len(list(kept.rglob("metrics.jsonl.gz"))) == 14
    shutil.rmtree(out)
    assert fedrun_main(args + ["--collect", "--report", str(tmp_path / "again")]) == 0
    err = capsys.readouterr().err
    assert "records: 4 runs restored from" in err and "records: 10 runs restored from" in err, err
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    keys = ("name", "seed", "fid", "kid", "confident_fraction", "at", "wall_s", "rounds_s", "commit")
    assert [{k: r[k] for k in keys} for r in again["runs"]] == [{k: r[k] for k in keys} for r in collected["runs"]]
    assert again["chosen"] == collected["chosen"] and again["study"] == collected["study"]
    import subprocess  # the records in a work tree whose .gitignore hides their runs/ folder

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("runs/\n")
    assert fedrun_main(args) == 0  # the study goes on: nothing is left to train
    err = capsys.readouterr().err
    assert "started" not in err and "10 steps (10 already finished)" in err, err
    assert err.count("records: warning: git ignores") == 1 and f"'{kept / 'runs'}'" in err, err
    assert not (out / "runs" / "central" / "seed0" / "final").exists()


@pytest.mark.slow
def test_noniid_quick_grid_runs_and_reports(tmp_path, monkeypatch):
    """The non-IID study at toy size, in this process (~2 s a run): one tuning run per method,
    then 25 configurations (3 of the 5 partitions, every method) compared at 2 budgets."""
    monkeypatch.chdir(REPO)  # base_config is relative to the repository root
    report = compare(str(REPO / "configs" / "grids" / "noniid.yaml"), quick=True,
                     output_dir=str(tmp_path / "noniid"), say=lambda *_: None).readme
    text = report.read_text()
    assert "### Partition: shards, 1 per client" in text and "## Tuning" in text
    for png in ("fid_vs_samples_partitions.png", "class_mix_shard1.png"):
        assert (report.parent / png).stat().st_size > 5000
    results = json.loads((report.parent / "results.json").read_text())
    assert len(results["runs"]) == 25 and {r["samples"] for r in results["runs"]} == {64}
    assert results["study"]["tuning_runs"] == 8 and not results["failures"]
    assert all(0.0 <= r["min_class_fraction"] <= 0.1 for r in results["runs"])


# Run b under DP-FedAvg (epsilon 8 over its 2 rounds), and every run audited after it trains.
AUDITED = """audit: {num_samples: 16, max_members: 40, noise_draws: 1, batch_size: 16}
"""


@pytest.mark.slow
def test_an_audited_grid_audits_every_run_and_reports_its_leakage(tmp_path, capsys):
    grid_file = tiny_grid(tmp_path, AUDITED)
    text = grid_file.read_text().replace(
        "{name: b, overrides: [num_clients=4, local_steps=1]}",
        "{name: b, overrides: [num_clients=4, local_steps=1, privacy.enabled=true, "
        "privacy.target_epsilon=8, privacy.clip_norm=1.0, privacy.sampling=fixed]}")
    grid_file.write_text(text)
    out = tmp_path / "grid"
    args = ["compare", "--grid", str(grid_file), "--out", str(out)]
    assert fedrun_main(args) == 0
    results = json.loads((out / "report" / "results.json").read_text())
    assert not results["failures"]
    by_name = {r["name"]: r for r in results["runs"]}
    for name in ("a", "b"):
        audit = json.loads((out / "runs" / name / "seed0" / "audit" / "audit.json").read_text())
        run = by_name[name]
        assert run["mia_auc"] == audit["membership_inference"]["auc"] and 0.0 <= run["mia_auc"] <= 1.0
        assert run["memorised_fraction"] == audit["memorised"]["fraction"]
        assert audit["num_samples"] == 16
    assert "epsilon" not in by_name["a"] and 0 < by_name["b"]["epsilon"] <= 8.0 + 1e-6
    readme = (out / "report" / "README.md").read_text()
    assert "## Leakage" in readme and "| a | ∞ (no DP) |" in readme
    capsys.readouterr()
    assert fedrun_main(args) == 0  # again: training and audits finished, nothing runs
    err = capsys.readouterr().err
    assert "4 steps (4 already finished)" in err and "started" not in err


def test_an_unknown_audit_option_is_refused_naming_the_key(tmp_path):
    from fedrun.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown keys \['audit.samples_count'\]"):
        load_grid(str(tiny_grid(tmp_path, "audit: {samples_count: 3}\n")))
    with pytest.raises(ConfigError, match="key 'audit': audit --num-samples: must be >= 2"):
        load_grid(str(tiny_grid(tmp_path, "audit: {num_samples: 1}\n")))
