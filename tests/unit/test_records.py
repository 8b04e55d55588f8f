"""A study's kept records (``fedrun compare --records``) without training: the settled steps'
small files are kept (metrics gzipped, no weights), saving again writes nothing, a lost run
directory comes back from them settled (the runner starts nothing, a diverged step stays
diverged), a kept record of other inputs is not restored, a restored step that runs again is
no longer marked restored, and a kept file that does not read back is an error naming it."""

import gzip
import json
from pathlib import Path

import pytest

from fedrun.errors import FedrunError, TrainingError
from fedrun.experiments import records
from fedrun.experiments.runner import execute
from fedrun.experiments.steps import DIVERGED, FINISHED_EARLIER, RAN, RunSpec
from test_runner import calls  # the steps' calls noted in calls.txt


def make_run(spec):
    """A custom step leaving what a training run leaves: metrics, weights, a privacy file."""
    with open(spec.params["calls"], "a") as handle:
        handle.write(spec.id + "\n")
    run_dir = spec.run_dir
    expect = spec.params.get("expect_kept")
    if expect and not Path(expect).is_file():
        raise TrainingError(f"'{expect}' was not kept before this step started")
    (run_dir / "final").mkdir(parents=True, exist_ok=True)
    (run_dir / "final" / "model.safetensors").write_bytes(b"\0" * 1000)
    if spec.params.get("diverge"):  # (a DP run: its accounting is kept)
        (run_dir / "final" / "privacy.json").write_text(json.dumps({"epsilon": 8.0}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "fid": 10.0 / r}) + "\n"
                                                   for r in range(1, 4)))
    (run_dir / "samples.png").write_bytes(b"png")
    if spec.params.get("diverge"):
        (run_dir / "stopped.json").write_text(json.dumps({"reason": "cannot learn"}))
        raise TrainingError("every client update was rejected: the model cannot learn")
    (run_dir / "out.txt").write_text("done")


def step(out, name, diverge=False):
    return RunSpec(name, f"{__name__}:make_run", out / name / "seed0", outputs=("final", "out.txt"),
                   params={"calls": str(out.parent / "calls.txt"), "diverge": diverge})


def test_settled_runs_are_kept_without_weights_and_come_back_settled(tmp_path):
    import shutil

    out, kept = tmp_path / "runs", tmp_path / "kept"
    good, bad = step(out, "good"), step(out, "bad", diverge=True)
    quiet = dict(say=lambda *_: None)
    first = execute([good, bad], **quiet)
    assert {o.status for o in first.values()} == {RAN, DIVERGED} and len(calls(tmp_path)) == 2
    assert records.save([good, bad], out, kept) == (2, 2)
    entry = kept / "good" / "seed0"
    assert sorted(str(p.relative_to(entry)) for p in entry.rglob("*") if p.is_file()) == [
        "metrics.jsonl.gz", "out.txt", "runner_make_run.json"]
    assert sorted(str(p.relative_to(kept / "bad" / "seed0")) for p in (kept / "bad").rglob("*")
                  if p.is_file()) == ["final/privacy.json", "metrics.jsonl.gz", "runner_make_run.json",
                                      "stopped.json"]
    assert records.save([good, bad], out, kept) == (2, 0)  # the same runs: nothing written
    metrics = (good.run_dir / "metrics.jsonl").read_text()

    shutil.rmtree(out)  # the machine is gone; the kept records are not
    said = []
    assert records.restore([good, bad], out, kept, said.append) == [good, bad]
    assert said == [f"records: 2 runs restored from {kept}"]
    assert good.finished and good.not_kept == ["final"] and bad.diverged
    assert (good.run_dir / "metrics.jsonl").read_text() == metrics
    assert (bad.run_dir / "final" / "privacy.json").is_file()
    assert not (bad.run_dir / "final" / "model.safetensors").exists()
    again = execute([good, bad], **quiet)
    assert {o.status for o in again.values()} == {FINISHED_EARLIER, DIVERGED} and calls(tmp_path) == []
    assert "cannot learn" in again[bad.id].error

    # the grid changed: the kept record is of other inputs, the run trains (and is no longer
    # marked restored)
    shutil.rmtree(out)
    good.params["size"] = 2
    said.clear()
    assert records.restore([good], out, kept, said.append) == []
    assert said == [f"records: 0 runs restored from {kept}; 1 kept with other inputs than the "
                    "grid's now (they train)"]
    assert execute([good], **quiet)[good.id].status == RAN and calls(tmp_path) == [good.id]
    records.save([good], out, kept)  # replaced by the new run
    assert json.loads((entry / "runner_make_run.json").read_text())["params"]["size"] == 2
    # a restored run made to run again (its dependency ran, or rerun=True) drops its mark
    shutil.rmtree(out)
    records.restore([good], out, kept, said.append)
    assert good.not_kept == ["final"]
    execute([good], rerun=True, **quiet)
    assert good.not_kept == [] and (good.run_dir / "final" / "model.safetensors").is_file()


def test_a_kept_file_that_does_not_read_back_is_an_error_naming_it(tmp_path):
    out, kept = tmp_path / "runs", tmp_path / "kept"
    good = step(out, "good")
    execute([good], say=lambda *_: None)
    records.save([good], out, kept)
    import shutil

    shutil.rmtree(out)
    gz = kept / "good" / "seed0" / "metrics.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"round": 1}\n')[:-6])  # truncated
    with pytest.raises(FedrunError, match=r"kept record '.*metrics.jsonl.gz' does not read back"):
        records.restore([good], out, kept, lambda *_: None)
    assert not good.run_dir.exists()  # nothing half restored


@pytest.mark.parametrize("backend", ["inline", "processes"])
def test_a_run_is_kept_as_soon_as_it_settles(tmp_path, backend, monkeypatch):
    """The runner hands each outcome over as its step ends (compare --records keeps it then):
    a step after another finds the first one's records kept when it starts."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    out, kept = tmp_path / "runs", tmp_path / "kept"
    first = step(out, "first")
    second = step(out, "second")
    second.depends_on = [first.id]
    second.params["expect_kept"] = str(kept / "first" / "seed0" / "runner_make_run.json")
    ended = []

    def keep(outcome):
        ended.append(outcome.spec.name)
        records.save([outcome.spec], out, kept)

    outcomes = execute([first, second], backend=backend, jobs=2, say=lambda *_: None, on_outcome=keep)
    assert {o.status for o in outcomes.values()} == {RAN}, [o.error for o in outcomes.values()]
    assert ended == ["first", "second"] and (kept / "second" / "seed0" / "metrics.jsonl.gz").is_file()


def test_a_records_folder_git_ignores_is_named(tmp_path):
    """Records kept where a .gitignore rule hides them (a `runs/` rule for the grid's runs/
    folder) would stay out of a commit without a word: ``ignored_by_git`` names those folders
    (a real git work tree), and none outside a work tree."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_text("runs/\n")
    out = tmp_path / "out"
    specs = [step(out / "runs", "a"), step(out / "tuning", "b")]
    kept = repo / "docs" / "records"
    assert records.ignored_by_git(specs, out, kept) == [kept / "runs"]
    (repo / ".gitignore").write_text("/runs/\n")  # the top level only: nothing under docs/
    assert records.ignored_by_git(specs, out, kept) == []
    assert records.ignored_by_git(specs, out, tmp_path / "elsewhere") == []
