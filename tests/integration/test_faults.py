"""Faults of a real federation: client dropout, non-finite updates, a killed worker, a hung rank.

Pure dropout and rejection arithmetic against hand-computed values; in-process runs for the
round loop's handling of dropped and corrupt clients; real torchrun jobs for the elastic restart
(a worker is SIGKILLed mid-round and the job resumes from its last checkpoint) and for the
process-group timeout (a hung rank makes the job fail with an error naming the round).
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DIGITS_CONFIG, FAULT_SHAPE, REPO, run_cli, tiny
from fedrun.engine import simulator
from fedrun.engine.cohort import dropped_clients
from fedrun.engine.metrics import read_metrics


def _weights(run_dir, round_, group="model"):
    return load_file(str(Path(run_dir) / "checkpoints" / f"round_{round_:05d}" / f"{group}.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and bool(a) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- pure arithmetic


# ---------------------------------------------------------------- the round loop, in process

def test_dropout_in_the_round_loop_matches_hand_computed_fedavg(tiny_config, tmp_path, capsys):
    """C=2, FedAvg with server lr 1: the new model is the data-weighted mean of the client models.

    Run A drops client 1 in round 1 (w_A = client 0's model) and both clients in round 2; run B
    drops client 0 in round 1 (w_B = client 1's model); run C drops nobody. Then
    w_C = (n0 w_A + n1 w_B) / (n0 + n1), and round 2 of run A leaves the model unchanged.
    """
    shape = ["num_clients=2", "partition.method=unbalanced", "checkpoint.every=1", "sample.every=0"]
    run_a = tiny_config(*shape, "rounds=2", "faults.dropout_schedule=[[1,1],[2,0],[2,1]]",
                        output_dir=tmp_path / "a")
    simulator.run(run_a)
    assert "round 2: no client update arrived; the global model is unchanged" in capsys.readouterr().err
    simulator.run(tiny_config(*shape, "rounds=1", "faults.dropout_schedule=[[1,0]]", output_dir=tmp_path / "b"))
    simulator.run(tiny_config(*shape, "rounds=1", output_dir=tmp_path / "c"))

    n0, n1 = json.loads((tmp_path / "c" / "partition.json").read_text())["sizes"]
    assert n0 != n1  # unbalanced: the weighting matters
    w_a, w_b, w_c = (_weights(tmp_path / name, 1) for name in "abc")
    for key in w_c:
        expected = (n0 * w_a[key].double() + n1 * w_b[key].double()) / (n0 + n1)
        assert torch.allclose(w_c[key].double(), expected, atol=1e-6), key
    assert not _same(w_a, w_c)

    # Round 2 of run A: every client dropped, the model and its EMA are unchanged.
    assert _same(_weights(tmp_path / "a", 2), w_a)
    assert _same(_weights(tmp_path / "a", 2, "ema"), _weights(tmp_path / "a", 1, "ema"))
    first, second = read_metrics(tmp_path / "a")
    assert first["dropped"] == [1] and first["clients"] == [0] and first["model_updated"] is True
    assert first["round_samples"] == 2 * 4  # E=2 steps of batch 4, client 0 only
    assert second["dropped"] == [0, 1] and second["clients"] == [] and second["model_updated"] is False
    assert second["train_loss"] is None and second["bytes_round"] == 0 and second["round_samples"] == 0


def test_random_dropout_is_logged_per_round(tiny_config, tmp_path):
    cfg = tiny_config("num_clients=4", "rounds=4", "local_steps=1", "faults.dropout=0.5", "sample.every=0")
    simulator.run(cfg)
    records = read_metrics(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    for r in records:
        expected = dropped_clients([0, 1, 2, 3], 0.5, [], cfg.seed, r["round"] - 1)
        assert r["dropped"] == expected
        assert r["clients"] == [c for c in range(4) if c not in expected]
    assert 0 < sum(len(r["dropped"]) for r in records) < 16


def test_nan_update_is_rejected_logged_and_the_model_stays_finite(tiny_config, tmp_path, capsys):
    shape = ["num_clients=3", "rounds=2", "checkpoint.every=1", "sample.every=0"]
    simulator.run(tiny_config(*shape, "faults.nonfinite_schedule=[[1,1]]", output_dir=tmp_path / "nan"))
    assert "round 1: rejected the update of client 1 (nonfinite_guard)" in capsys.readouterr().err
    # Rejecting client 1 must give exactly the model of a round in which client 1 dropped out.
    simulator.run(tiny_config(*shape, "faults.dropout_schedule=[[1,1]]", output_dir=tmp_path / "drop"))
    for round_ in (1, 2):
        for group in ("model", "ema"):
            weights = _weights(tmp_path / "nan", round_, group)
            assert all(torch.isfinite(t).all() for t in weights.values())
            assert _same(weights, _weights(tmp_path / "drop", round_, group)), (round_, group)
    first, second = read_metrics(tmp_path / "nan")
    assert first["rejected_nonfinite"] == [1] and first["clients"] == [0, 2]
    assert first["train_loss"] is not None and math.isfinite(first["train_loss"])
    assert second["rejected_nonfinite"] == [] and second["clients"] == [0, 1, 2]


def test_metrics_line_lost_after_a_checkpoint_is_restored_on_resume(tiny_config, tmp_path):
    """A worker killed between writing round 2's checkpoint and its metrics line."""
    simulator.run(tiny_config("rounds=2", "checkpoint.every=1", "sample.every=0"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # torn last line
    simulator.run(tiny_config("rounds=3", "checkpoint.every=1", "sample.every=0", "resume=auto"))
    records = read_metrics(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2, 3]
    assert records[1]["samples"] == json.loads(lines[1])["samples"]


# ---------------------------------------------------------------- real torchrun jobs

def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _worker_with_rank(agent_pid, rank):
    for pid in _children(agent_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc (Linux)")
@pytest.mark.slow
def test_killed_worker_restarts_and_resumes_to_the_uninterrupted_weights(torchrun_reference, tmp_path):
    """torchrun --max-restarts=1 ... resume=auto; SIGKILL rank 1 in the middle of round 3 of 4."""
    out = tmp_path / "elastic"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "-m", "fedrun", "train", "--config", DIGITS_CONFIG,
           *tiny(out, *FAULT_SHAPE, "resume=auto")]
    # As the launchers do: restarted workers must not read the dead workers' addresses from the
    # agent's store (pytorch/pytorch#135712; without it the restart fails about one time in three).
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    log = tmp_path / "torchrun.log"
    with open(log, "w") as sink:
        agent = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not (out / "checkpoints" / "round_00002" / "state.json").is_file():
                assert agent.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "round 2 was never checkpointed"
                time.sleep(0.01)
            victim = _worker_with_rank(agent.pid, 1)
            assert victim is not None, "rank 1 worker not found"
            os.kill(victim, signal.SIGKILL)
            assert agent.wait(timeout=300) == 0, log.read_text()[-3000:]
        finally:
            if agent.poll() is None:
                agent.kill()
    text = log.read_text()
    # The kill lands in round 3 (or, on a slow machine, just after its checkpoint).
    resumed = re.findall(r"resuming after round (\d+)", text)
    assert resumed in (["2"], ["3"]), text[-3000:]
    print(f"SIGKILLed rank 1 (pid {victim}); the restarted workers resumed after round {resumed[0]}")
    for group in ("model", "ema"):
        assert _same(_weights(out, 4, group), _weights(torchrun_reference, 4, group)), group
    assert _weights(out, 4, "server").keys() == _weights(torchrun_reference, 4, "server").keys()
    records, reference = read_metrics(out), read_metrics(torchrun_reference)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    for mine, ref in zip(records, reference):
        assert (mine["samples"], mine["clients"], mine["train_loss"]) == \
            (ref["samples"], ref["clients"], ref["train_loss"])
    assert (out / "final" / "model_index.json").is_file()


@pytest.mark.slow
def test_hung_rank_fails_the_job_with_an_error_naming_the_round(tmp_path):
    started = time.monotonic()
    proc = run_cli([*tiny(tmp_path / "hung", "num_clients=2", "rounds=3", "local_steps=1",
                          "dist_timeout_s=10")],
                   torchrun_nproc=2, module="tests/hang_check.py", timeout=300)
    elapsed = time.monotonic() - started
    print(f"hung rank detected; job failed after {elapsed:.1f} s (timeout 10 s)")
    assert proc.returncode != 0
    assert "[rank 0] fedrun train: error: round 2: all_reduce on rank 0 of 2 failed" in proc.stderr, \
        proc.stderr[-3000:]
    assert "dist_timeout_s=10" in proc.stderr
    assert [r["round"] for r in read_metrics(tmp_path / "hung")] == [1]


# ---------------------------------------------------------------- runs that cannot learn

def test_a_run_whose_every_update_is_rejected_stops_with_an_error(tmp_path, capsys):
    """optim.lr=1000: every client update leaves the exact grid's range, every round. At
    9dcece4 such a run ended with exit 0 and "done"; now it stops after
    faults.max_rejected_rounds rounds (default 3) with exit code 2 and an error naming the rounds
    and the reasons, and the metrics of those rounds say that no update was applied."""
    from fedrun.cli import main

    run_dir = tmp_path / "diverged"
    code = main(["train", "--config", DIGITS_CONFIG, *tiny(run_dir, "optim.lr=1000", "rounds=10",
                                                           "sample.every=0")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "every client update was rejected in 3 consecutive rounds (1-3" in err, err
    # AdamW at lr 1000 overflows the grid's range or reaches inf/NaN (which one depends on the
    # last bits of the arithmetic); either way all 4 clients are rejected in each of the 3 rounds
    assert re.search(r"rejections: (exact_range|nonfinite_guard) x12\)", err), err
    assert "faults.max_rejected_rounds=3" in err and "lower optim.lr" in err
    assert "done:" not in err
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["updates_applied"] == 0 and r["model_updated"] is False
        assert len(set(r["rejected"].values())) == 1 and len(r["rejected"]) == 4
    assert not (run_dir / "final").exists()
    # its verdict for the experiment runner, which does not start such a run again
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped["reason"] == "cannot learn" and stopped["round"] == 3
    assert stopped["error"].startswith("every client update was rejected in 3 consecutive rounds")


@pytest.mark.slow
def test_rejection_streaks_reset_on_an_accepted_round_and_the_limit_can_be_lifted(tiny_config, tmp_path):
    """Clients 0..3, all sampled; the toy transform rejects odd clients, the NaN schedule
    corrupts the even ones in rounds 2 and 3: rounds 2 and 3 reject everything, round 4 does
    not, so a limit of 3 never triggers; a limit of 2 stops after round 3; 0 never stops."""
    import toy_algorithms  # noqa: F401  (registers toy_reject_odd)

    schedule = "faults.nonfinite_schedule=[[2,0],[2,2],[3,0],[3,2]]"
    shape = ["aggregation.update_transforms=[nonfinite_guard,toy_reject_odd]", schedule,
             "rounds=5", "sample.every=0"]
    simulator.run(tiny_config(*shape, output_dir=tmp_path / "a"))
    applied = [r["updates_applied"] for r in read_metrics(tmp_path / "a")]
    assert applied == [2, 0, 0, 2, 2]
    from fedrun.errors import TrainingError

    with pytest.raises(TrainingError, match=r"2 consecutive rounds \(2-3; rejections: "
                                            r"nonfinite_guard x4, toy_reject_odd x4\)"):
        simulator.run(tiny_config(*shape, "faults.max_rejected_rounds=2", output_dir=tmp_path / "b"))
    simulator.run(tiny_config(*shape, "optim.lr=1000", "faults.max_rejected_rounds=0",
                              output_dir=tmp_path / "c"))
    assert len(read_metrics(tmp_path / "c")) == 5


# ---------------------------------------------------------------- client state files

STATEFUL = ["client.algorithm=toy_visits", "num_clients=2", "checkpoint.every=1", "sample.every=0"]


def _corrupt_header(path):
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])


def _corrupt_data(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55  # inside the last tensor's bytes; the header still parses
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (_corrupt_header, "cannot be read"),
    (_corrupt_data, "is corrupt: its SHA-256 differs"),
    (lambda path: path.unlink(), "is missing"),
])
def test_a_damaged_client_state_file_is_an_error_naming_client_round_and_file(
        tiny_config, tmp_path, damage, message):
    """At 9dcece4 a corrupt state file ended in a SafetensorError traceback on resume, and a
    missing one silently restarted the client from scratch."""
    import toy_algorithms  # noqa: F401  (registers toy_visits)
    from fedrun.errors import CheckpointError

    run_dir = tmp_path / "run"
    simulator.run(tiny_config(*STATEFUL, "rounds=2", output_dir=run_dir))
    path = run_dir / "client_state" / "client_000000" / "round_00002.safetensors"
    damage(path)
    with pytest.raises(CheckpointError) as error:
        simulator.run(tiny_config(*STATEFUL, "rounds=3", "resume=auto", output_dir=run_dir))
    text = str(error.value)
    assert "client 0 after round 2" in text and str(path) in text and message in text, text
