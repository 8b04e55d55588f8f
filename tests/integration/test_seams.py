"""The algorithm layer's seams, each exercised by a toy piece defined outside fedrun
(tests/toy_algorithms.py): registries and their errors, a server strategy, a stateful client
algorithm with a buffer segment and the client state store, update and server transforms."""

import json

import pytest
import torch
from safetensors.torch import load_file

import toy_algorithms
from fedrun.engine import simulator
from fedrun.engine.cohort import sample_cohort
from fedrun.config import load_config
from fedrun.errors import ConfigError

SHAPE = ["num_clients=4", "clients_per_round=2", "local_steps=2", "checkpoint.every=1",
         "checkpoint.keep_last=2", "sample.every=0"]


def _weights(run_dir, done, group="model"):
    return load_file(str(run_dir / "checkpoints" / f"round_{done:05d}" / f"{group}.safetensors"))


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("key, value, registered", [
    ("server.strategy", "fedbogus", "fedadagrad, fedadam, fedavg, fedavgm, fedyogi, toy_half_step"),
    ("client.algorithm", "bogus", "fedavg, fedprox, scaffold, toy_visits"),
    ("aggregation.update_transforms", "[nonfinite_guard,clipz]", "dp_clip, nonfinite_guard, toy_jitter"),
    ("aggregation.server_transforms", "[dp]", "dp_noise, toy_server_noise"),
    ("partition.method", "zipf", "dirichlet, iid, shards, unbalanced"),
    ("eval.feature", "clip", "digits, inception"),
])
def test_unknown_names_list_the_registered_ones(key, value, registered):
    with pytest.raises(ConfigError, match="registered: " + registered) as info:
        load_config(None, [f"{key}={value}"])
    assert key in str(info.value)


def test_registered_strategy_runs_and_its_state_is_checkpointed(tiny_config, tmp_path):
    """A strategy is one class + one registry entry: toy_half_step == fedavg with server.lr=0.5."""
    simulator.run(tiny_config(*SHAPE, "rounds=2", "server.strategy=toy_half_step",
                              output_dir=tmp_path / "toy"))
    simulator.run(tiny_config(*SHAPE, "rounds=2", "server.lr=0.5", output_dir=tmp_path / "lr"))
    assert _equal(_weights(tmp_path / "toy", 2), _weights(tmp_path / "lr", 2))
    assert _weights(tmp_path / "toy", 2, "server")["steps"].item() == 2.0


def test_stateful_client_algorithm_segments_and_state_store(tiny_config, tmp_path):
    run_dir = tmp_path / "visits"
    simulator.run(tiny_config(*SHAPE, "rounds=4", "client.algorithm=toy_visits", output_dir=run_dir))
    cohorts = [sample_cohort(4, 2, 0, r) for r in range(4)]
    # Each client's stored state counts the rounds it was sampled in, written in the round after
    # which it holds (version = round); the segment's running total is the server-side state.
    for client in range(4):
        rounds = [r + 1 for r in range(4) if client in cohorts[r]]
        versions = sorted(p.name for p in (run_dir / "client_state" / f"client_{client:06d}").iterdir())
        # keep_last=2 checkpoints (rounds 3, 4): versions older than the newest one <= 3 pruned
        needed = [r for r in rounds if r > 3] + [r for r in rounds if r <= 3][-1:]
        assert versions == [f"round_{r:05d}.safetensors" for r in sorted(needed)], client
        last = load_file(str(run_dir / "client_state" / f"client_{client:06d}" / versions[-1]))
        assert last["visits"].item() == len(rounds)
    total = _weights(run_dir, 4, "client_algorithm")["total_visits"].item()
    # round k adds, for each of its clients, the number of rounds <= k that client trained in
    assert total == sum(len([r for r in range(k + 1) if c in cohorts[r]])
                        for k in range(4) for c in cohorts[k])
    record = _records(run_dir)[-1]
    assert record["bytes_sent_per_client"] == 4 * (sum(t.numel() for t in _weights(run_dir, 4).values()) + 1)


def test_stateful_run_resumes_exactly(tiny_config, tmp_path):
    """Resuming from round 2 (after later rounds wrote client states) equals an uninterrupted run."""
    shape = [*SHAPE, *toy_algorithms.STATEFUL_OVERRIDES]
    simulator.run(tiny_config(*shape, "rounds=4", output_dir=tmp_path / "full"))
    simulator.run(tiny_config(*shape, "rounds=3", "checkpoint.keep_last=3", output_dir=tmp_path / "cut"))
    resume_from = tmp_path / "cut" / "checkpoints" / "round_00002"
    simulator.run(tiny_config(*shape, "rounds=4", "checkpoint.keep_last=3", f"resume={resume_from}",
                              output_dir=tmp_path / "cut"))
    for group in ("model", "ema", "server", "client_algorithm"):
        assert _equal(_weights(tmp_path / "full", 4, group), _weights(tmp_path / "cut", 4, group)), group
    for client in range(4):
        a = sorted((tmp_path / "full" / "client_state" / f"client_{client:06d}").iterdir())[-1]
        b = sorted((tmp_path / "cut" / "client_state" / f"client_{client:06d}").iterdir())[-1]
        assert a.name == b.name and _equal(load_file(str(a)), load_file(str(b)))
    assert [r["round"] for r in _records(tmp_path / "cut")] == [1, 2, 3, 4]


def test_update_transform_rejects_and_names_itself(tiny_config, tmp_path, capsys):
    """A rejecting transform removes exactly those updates: the same model as dropping them."""
    shape = [*SHAPE, "clients_per_round=4", "rounds=2"]
    simulator.run(tiny_config(*shape, "aggregation.update_transforms=[nonfinite_guard,toy_reject_odd]",
                              output_dir=tmp_path / "reject"))
    assert "rejected the update of client 1 (toy_reject_odd), client 3 (toy_reject_odd)" in capsys.readouterr().err
    simulator.run(tiny_config(*shape, "faults.dropout_schedule=[[1,1],[1,3],[2,1],[2,3]]",
                              output_dir=tmp_path / "drop"))
    assert _equal(_weights(tmp_path / "reject", 2), _weights(tmp_path / "drop", 2))
    record = _records(tmp_path / "reject")[0]
    assert record["rejected"] == {"1": "toy_reject_odd", "3": "toy_reject_odd"}
    assert record["clients"] == [0, 2]


def test_server_transform_is_seeded_and_reports(tiny_config, tmp_path):
    shape = [*SHAPE, "rounds=2"]
    for name in ("a", "b"):
        simulator.run(tiny_config(*shape, "aggregation.server_transforms=[toy_server_noise]",
                                  output_dir=tmp_path / name))
    simulator.run(tiny_config(*shape, output_dir=tmp_path / "plain"))
    assert _equal(_weights(tmp_path / "a", 2), _weights(tmp_path / "b", 2))
    assert not _equal(_weights(tmp_path / "a", 2), _weights(tmp_path / "plain", 2))
    noise = [r["toy_noise_norm"] for r in _records(tmp_path / "a")]
    assert len(noise) == 2 and noise[0] != noise[1] and all(n > 0 for n in noise)
