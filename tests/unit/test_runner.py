"""The experiment runner without training: custom steps (functions of this module) run inline
and as subprocesses; dependencies order them; finished steps are skipped and stale ones rerun;
a failing step is recorded with its error (and log) while the others go on; every step records
its commit and wall time; the Slurm backend's sweep lines and waves, tuning runs among them."""

import json
from pathlib import Path

import pytest

from fedrun.errors import ConfigError, DataError, TrainingError
from fedrun.experiments import slurm, tuning
from fedrun.experiments.grid import load_grid

# The processes backend's subprocesses import this module (for write_output) with this folder
# on their path only: no import from the tests' conftest here.
REPO = Path(__file__).resolve().parents[2]
from fedrun.experiments.runner import dependency_order, execute
from fedrun.experiments.steps import BLOCKED, DIVERGED, FAILED, FINISHED_EARLIER, RAN, RunSpec


def write_output(spec):
    """A custom step: notes its call in ``params['calls']`` (to count runs), fails when asked,
    else writes its output."""
    with open(spec.params["calls"], "a") as handle:
        handle.write(spec.id + "\n")
    if spec.params.get("fail"):
        raise DataError(spec.params["fail"])
    if spec.params.get("diverge"):  # what a training run that cannot learn leaves and raises
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        (spec.run_dir / "stopped.json").write_text(json.dumps({"reason": "cannot learn"}))
        raise TrainingError("every client update was rejected: the model cannot learn")
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    (spec.run_dir / "out.txt").write_text("done")


def step(tmp_path, name, depends_on=(), fail=None, diverge=False):
    return RunSpec(name, f"{__name__}:write_output", tmp_path / name, outputs=("out.txt",),
                   params={"calls": str(tmp_path / "calls.txt"), "fail": fail,
                           **({"diverge": True} if diverge else {})},
                   depends_on=[d.id for d in depends_on])


def calls(tmp_path):
    path = tmp_path / "calls.txt"
    calls = path.read_text().split() if path.is_file() else []
    path.unlink(missing_ok=True)
    return calls


def statuses(outcomes):
    return {spec_id.split("/")[0]: o.status for spec_id, o in outcomes.items()}


def test_dependencies_come_first_and_bad_plans_are_refused(tmp_path):
    a = step(tmp_path, "a")
    b = step(tmp_path, "b", [a])
    c = step(tmp_path, "c", [b, a])
    assert [s.name for s in dependency_order([c, b, a])] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="depends on 'x/seed0/write_output', which is not in the plan"):
        dependency_order([a, RunSpec("d", "train", tmp_path, depends_on=["x/seed0/write_output"])])
    a.depends_on = [c.id]
    with pytest.raises(ConfigError, match="cycle"):
        dependency_order([a, b, c])
    with pytest.raises(ConfigError, match="two steps of the plan have the id"):
        dependency_order([b, step(tmp_path, "b")])


def test_a_rerun_skips_finished_steps_and_reruns_what_follows_an_unfinished_one(tmp_path):
    a = step(tmp_path, "a")
    b = step(tmp_path, "b", [a])
    c = step(tmp_path, "c")
    quiet = dict(say=lambda *_: None)
    assert set(statuses(execute([b, a, c], **quiet)).values()) == {RAN}
    assert calls(tmp_path) == [a.id, b.id, c.id]  # dependency order
    assert set(statuses(execute([a, b, c], **quiet)).values()) == {FINISHED_EARLIER}
    assert calls(tmp_path) == []  # nothing ran again
    (tmp_path / "a" / "out.txt").unlink()
    assert statuses(execute([a, b, c], **quiet)) == {"a": RAN, "b": RAN, "c": FINISHED_EARLIER}
    assert calls(tmp_path) == [a.id, b.id]  # b is stale: what it was made from ran again
    execute([a, b, c], rerun=True, **quiet)
    assert len(calls(tmp_path)) == 3
    c.params["size"] = 2  # made from other inputs: not the step asked for
    assert statuses(execute([a, b, c], **quiet)) == {"a": FINISHED_EARLIER, "b": FINISHED_EARLIER, "c": RAN}
    assert calls(tmp_path) == [c.id]


@pytest.mark.parametrize("backend", ["inline", "processes"])
def test_a_failing_step_is_recorded_and_the_others_go_on(tmp_path, backend, monkeypatch):
    from fedrun.engine.metrics import code_commit

    # the processes backend's subprocesses import this module
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    bad = step(tmp_path, "bad", fail="no such data set")
    after_bad = step(tmp_path, "after_bad", [bad])
    good = step(tmp_path, "good")
    outcomes = execute([bad, after_bad, good], jobs=2, backend=backend, say=lambda *_: None)
    assert statuses(outcomes) == {"bad": FAILED, "after_bad": BLOCKED, "good": RAN}
    assert sorted(calls(tmp_path)) == sorted([bad.id, good.id])
    failed = outcomes[bad.id]
    assert "no such data set" in failed.error
    assert "'bad/seed0/write_output' failed" == outcomes[after_bad.id].error
    record = json.loads(bad.record_path.read_text())
    assert record["status"] == FAILED and "no such data set" in record["error"]
    good_record = json.loads(good.record_path.read_text())
    assert good_record["commit"] == code_commit() and good_record["wall_s"] > 0
    assert good_record["status"] == RAN and good_record["error"] is None
    if backend == "processes":  # the exit code and fedrun's last line, and the log beside the run
        assert failed.error.startswith("exit code 2: bad/seed0/write_output: error: no such data set")
        assert failed.log == tmp_path / "bad.write_output.log" and record["log"] == str(failed.log)
        assert (tmp_path / "good.write_output.log").is_file()


@pytest.mark.parametrize("backend", ["inline", "processes"])
def test_a_diverged_step_is_a_result_not_run_again_while_a_failed_one_is(tmp_path, backend, monkeypatch):
    """A run that stopped itself because it cannot learn (it left stopped.json) is settled:
    the next execution and --collect report it diverged, with its error, without running it;
    with other inputs it runs again. A failed step (a crash, a missing file) runs again."""
    from fedrun.experiments.compare import as_found

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    diverging, bad, after = step(tmp_path, "div", diverge=True), step(tmp_path, "bad", fail="boom"), None
    after = step(tmp_path, "after", [diverging])
    quiet = dict(say=lambda *_: None, backend=backend, jobs=2)
    first = execute([diverging, bad, after], **quiet)
    assert statuses(first) == {"div": DIVERGED, "bad": FAILED, "after": BLOCKED}
    assert "cannot learn" in first[diverging.id].error and not first[diverging.id].ok
    assert json.loads(diverging.record_path.read_text())["status"] == DIVERGED
    assert sorted(calls(tmp_path)) == sorted([diverging.id, bad.id])
    said = []
    again = execute([diverging, bad, after], say=said.append, backend=backend, jobs=2)
    assert statuses(again) == {"div": DIVERGED, "bad": FAILED, "after": BLOCKED}
    assert calls(tmp_path) == [bad.id]  # the diverged run is not started again
    assert "cannot learn" in again[diverging.id].error and "(0 already finished, 1 diverged earlier)" in said[0]
    found = as_found(diverging)
    assert found.status == DIVERGED and "cannot learn" in found.error
    found = as_found(bad)  # --collect tells a run that failed from one never run
    assert found.status == FAILED and "boom" in found.error
    assert as_found(after).status == "not run"
    diverging.params["size"] = 2  # other inputs: not the run that diverged
    assert not diverging.settled
    execute([diverging], **quiet)
    assert calls(tmp_path) == [diverging.id]


def test_a_step_that_returns_without_its_outputs_failed(tmp_path):
    spec = step(tmp_path, "a")
    spec.outputs = ("out.txt", "final")
    outcome = execute([spec], say=lambda *_: None)[spec.id]
    assert outcome.status == FAILED and "ended without its outputs ['out.txt', 'final']" in outcome.error


def test_slurm_sweep_lines_waves_and_run_times(tmp_path):
    central = RunSpec("central", "central", tmp_path / "c", config="configs/digits_fedavg.yaml",
                      overrides=["seed=0", "model.block_out_channels=[8,16]"])
    train = RunSpec("a", "train", tmp_path / "a", config="x.yaml", depends_on=[central.id])
    assert slurm.sweep_line(central) == (f"central seed=0 model.block_out_channels=[8,16] "
                                         f"output_dir={tmp_path / 'c'} resume=never overwrite=true")
    assert slurm.sweep_line(train) == f"output_dir={tmp_path / 'a'} resume=never overwrite=true"  # train: no verb
    assert [[s.name for s in wave] for wave in slurm.waves([central, train])] == [["central"], ["a"]]
    assert slurm.run_seconds("00:01:05") == 65 and slurm.run_seconds("1-00:00:02") == 86402
    with pytest.raises(ConfigError, match="the slurm backend runs the fedrun verbs"):
        slurm.check_step(step(tmp_path, "custom"))
    with pytest.raises(ConfigError, match="overrides with spaces"):
        slurm.check_step(RunSpec("s", "train", tmp_path, config="x.yaml", overrides=["a=b c"]))


def test_tuning_runs_are_ordinary_steps_for_every_backend(tmp_path):
    """A tuning run (``fedrun.experiments.tuning``) is a training verb with a config: the Slurm
    backend takes it as an array line with its point's overrides, its log lies beside its run
    directory, and its id names the sweep, the point and the seed."""
    path = tmp_path / "grid.yaml"
    path.write_text(f"base_config: {REPO / 'configs' / 'digits_fedavg.yaml'}\nseeds: [0]\nsamples: 32\n"
                    "eval_every_samples: 16\noverrides: [num_clients=2, local_steps=1, optim.batch_size=4]\n"
                    "runs:\n  - {name: fedavg}\n"
                    "tuning:\n  seeds: [5]\n  methods:\n    fedavg: [{key: optim.lr, values: [1.0e-3, 4.0e-3]}]\n")
    grid = load_grid(str(path))
    grid.output_dir = str(tmp_path / "out")
    group = tuning.build_groups(grid)[0]
    first, second = tuning.group_specs(grid, group, group.points)
    slurm.check_step(first)  # accepted by the Slurm backend
    assert first.id == "tuning/fedavg@p00/seed5/train"
    assert slurm.sweep_line(second).startswith("num_clients=2 local_steps=1 optim.batch_size=4 optim.lr=0.004 "
                                               "rounds=4 eval.every=2 ")
    assert slurm.sweep_line(second).endswith(f"seed=5 output_dir={second.run_dir} resume=never overwrite=true")
    assert second.log_path == tmp_path / "out" / "tuning" / "fedavg" / "p01" / "seed5.train.log"
    assert [[s.id for s in wave] for wave in slurm.waves([first, second])] == [[first.id, second.id]]
