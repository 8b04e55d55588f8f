"""``fedrun compare`` training real (tiny) runs: a re-run trains only what is unfinished; a
failing run is recorded with its error and marked in the report while the others finish;
every run records its commit; the processes backend runs a grid with --jobs 2; and the non-IID
grid's quick variant end to end."""

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
    assert [(f["name"], f["status"]) for f in collected.failures] == [("broken", "not run")]
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


@pytest.mark.slow
def test_noniid_quick_grid_runs_and_reports(tmp_path, monkeypatch):
    """The whole non-IID matrix at toy size, in this process (~2 s a run: about 1-2 min)."""
    monkeypatch.chdir(REPO)  # base_config is relative to the repository root
    report = compare(str(REPO / "configs" / "grids" / "noniid.yaml"), quick=True,
                     output_dir=str(tmp_path / "noniid"), say=lambda *_: None).readme
    text = report.read_text()
    assert "### Partition: shards, 1 per client" in text
    for png in ("fid_vs_samples_partitions.png", "class_mix_shard1.png"):
        assert (report.parent / png).stat().st_size > 5000
    results = json.loads((report.parent / "results.json").read_text())
    assert len(results["runs"]) == 35 and {r["samples"] for r in results["runs"]} == {256}
    assert all(0.0 <= r["min_class_fraction"] <= 0.1 for r in results["runs"])
