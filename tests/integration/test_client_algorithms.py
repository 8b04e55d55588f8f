"""The federated optimisation algorithms: adaptive server optimizers (FedAdam, FedYogi,
FedAdagrad), FedProx, SCAFFOLD, the SGD client optimizer and stateful client optimizers.

The strategies are checked against the paper's update rules evaluated scalar by scalar; FedProx
and SCAFFOLD against a hand-written reference (plain loops over the same data, noise and
timesteps, SGD written out as p -= lr * g) on a tiny model with 2 clients and 2 rounds;
resumes against uninterrupted runs (==). World-size invariance of these algorithms is in
tests/test_multiprocess.py (1, 2, 3, 4 processes, ==).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedrun.engine import simulator
from fedrun.fl.local import batch_indices, client_generator
from fedrun.config import load_config

from conftest import tiny


# ---------------------------------------------------------------- FedProx and SCAFFOLD

SHAPE = ["num_clients=2", "local_steps=2", "optim.name=sgd", "optim.momentum=0",
         "optim.grad_clip=null", "optim.lr=0.05", "checkpoint.every=1", "sample.every=0",
         "partition.method=dirichlet", "partition.alpha=0.5"]


def _views(vector, params):
    return [part.view_as(p) for part, p in zip(vector.split([p.numel() for p in params]), params)]


def _hand_reference(cfg, algorithm, rounds=2, mu=0.0):
    """FedAvg / FedProx / SCAFFOLD (option II) with SGD written out by hand: returns the global
    vector after ``rounds`` rounds, the server variate and the client variates."""
    fed = simulator.setup(cfg)
    model, params, task = fed.run.model, fed.run.params.params, fed.run.task
    w = fed.run.global_weights.clone()
    c = torch.zeros_like(w)
    c_i = {k: torch.zeros_like(w) for k in range(cfg.num_clients)}
    lr, steps = cfg.optim.lr, cfg.local_steps
    for r in range(rounds):
        deltas, weights, new_controls = [], [], {}
        for k in range(cfg.num_clients):
            fed.run.params.load_(w)
            gen = client_generator(cfg.seed, k, r)
            batches = batch_indices(fed.run.client_indices[k], steps, cfg.optim.batch_size, gen)
            for indices in batches:
                model.zero_grad(set_to_none=True)
                task.loss(model, indices, gen).backward()
                with torch.no_grad():
                    for p, anchor, ck, cs in zip(params, _views(w, params), _views(c_i[k], params),
                                                 _views(c, params)):
                        g = p.grad
                        if algorithm == "fedprox":
                            g = g + mu * (p - anchor)
                        if algorithm == "scaffold":
                            g = g - ck + cs
                        p -= lr * g
            y = fed.run.params.flat.clone()
            deltas.append(y - w)
            weights.append(len(fed.run.client_indices[k]))
            new_controls[k] = c_i[k] - c + (w - y) / (steps * lr)
        w = w + sum(n * d for n, d in zip(weights, deltas)) / sum(weights)
        if algorithm == "scaffold":
            c = c + sum(new_controls[k] - c_i[k] for k in new_controls) / cfg.num_clients
            c_i.update(new_controls)
    return fed, w, c, c_i


def _final(run_dir, done, group="model"):
    return load_file(str(run_dir / "checkpoints" / f"round_{done:05d}" / f"{group}.safetensors"))


def _vector(fed, state):
    return fed.run.params.vector_from(state)


@pytest.mark.parametrize("algorithm, extra", [("scaffold", []), ("fedprox", ["client.prox_mu=0.5"])])
def test_client_algorithm_matches_a_hand_written_reference(tmp_path, algorithm, extra):
    cfg = load_config(None, tiny(tmp_path / "run", *SHAPE, "rounds=2", f"client.algorithm={algorithm}",
                                 *extra))
    simulator.run(cfg)
    ref_cfg = load_config(None, tiny(tmp_path / "ref", *SHAPE, "rounds=2"))
    fed, w, c, c_i = _hand_reference(ref_cfg, algorithm, mu=0.5)
    got = _vector(fed, _final(tmp_path / "run", 2))
    init = fed.run.params.vector_from(fed.run.params.state_dict(fed.run.global_weights))
    assert float((w - init).abs().max()) > 1e-3  # the reference trained
    torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)
    if algorithm == "scaffold":
        torch.testing.assert_close(_final(tmp_path / "run", 2, "client_algorithm")["control"], c,
                                   rtol=1e-5, atol=1e-6)
        assert float(c.abs().max()) > 1e-3
        for k in range(2):
            stored = load_file(str(tmp_path / "run" / "client_state" / f"client_{k:06d}" / "round_00002.safetensors"))
            torch.testing.assert_close(stored["control"], c_i[k], rtol=1e-5, atol=1e-6)
        record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        # the control-variate delta travels with the update: 2P floats each way
        assert record["bytes_sent_per_client"] == 2 * 4 * fed.run.params.numel


def test_fedprox_with_mu_zero_is_fedavg(tiny_config, tmp_path):
    simulator.run(tiny_config(*SHAPE, "rounds=2", "client.algorithm=fedprox", "client.prox_mu=0",
                              output_dir=tmp_path / "prox"))
    simulator.run(tiny_config(*SHAPE, "rounds=2", output_dir=tmp_path / "avg"))
    a, b = _final(tmp_path / "prox", 2), _final(tmp_path / "avg", 2)
    assert all(torch.equal(a[k], b[k]) for k in a)


RESUMABLE = {
    "scaffold+fedadam": (["client.algorithm=scaffold", "server.strategy=fedadam"], {"control"}),
    "stateful sgd+fedadam": (["client.stateful_optimizer=true", "optim.momentum=0.9",
                              "server.strategy=fedadam"], {"optim.momentum_buffer"}),
}


@pytest.mark.parametrize("name", RESUMABLE)
def test_stateful_algorithms_with_fedadam_resume_exactly(tiny_config, tmp_path, name):
    extra, state_keys = RESUMABLE[name]
    shape = [*SHAPE, *extra, "num_clients=4", "clients_per_round=2", "checkpoint.keep_last=3"]
    simulator.run(tiny_config(*shape, "rounds=4", output_dir=tmp_path / "full"))
    simulator.run(tiny_config(*shape, "rounds=3", output_dir=tmp_path / "cut"))
    resume_from = tmp_path / "cut" / "checkpoints" / "round_00002"
    simulator.run(tiny_config(*shape, "rounds=4", f"resume={resume_from}", output_dir=tmp_path / "cut"))
    for group in ("model", "ema", "server", "client_algorithm"):
        a, b = _final(tmp_path / "full", 4, group), _final(tmp_path / "cut", 4, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group
    assert set(_final(tmp_path / "full", 4, "server")) == {"m", "v"}
    for client in range(4):
        a = sorted((tmp_path / "full" / "client_state" / f"client_{client:06d}").iterdir())[-1]
        b = sorted((tmp_path / "cut" / "client_state" / f"client_{client:06d}").iterdir())[-1]
        sa, sb = load_file(str(a)), load_file(str(b))
        assert a.name == b.name and sa.keys() == sb.keys() == state_keys
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_stateful_adamw_keeps_each_clients_moments(tiny_config, tmp_path):
    shape = ["num_clients=2", "local_steps=3", "rounds=3", "checkpoint.every=1", "sample.every=0"]
    simulator.run(tiny_config(*shape, "client.stateful_optimizer=true", output_dir=tmp_path / "kept"))
    simulator.run(tiny_config(*shape, output_dir=tmp_path / "fresh"))
    for client in range(2):
        state = load_file(str(tmp_path / "kept" / "client_state" / f"client_{client:06d}" / "round_00003.safetensors"))
        assert state["optim.step"].item() == 9.0  # 3 rounds x 3 steps: AdamW's bias correction continues
        assert state["optim.exp_avg"].numel() == state["optim.exp_avg_sq"].numel() > 1000
    assert not (tmp_path / "fresh" / "client_state").exists()
    a, b = _final(tmp_path / "kept", 3), _final(tmp_path / "fresh", 3)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # round 1 is identical (no state yet), later rounds differ
    a1, b1 = _final(tmp_path / "kept", 1), _final(tmp_path / "fresh", 1)
    assert all(torch.equal(a1[k], b1[k]) for k in a1)


def test_without_checkpoints_the_store_keeps_one_version_per_client(tiny_config, tmp_path):
    """No kept checkpoint can need an old version: the disk holds C x state, not rounds x K x state."""
    simulator.run(tiny_config("num_clients=3", "clients_per_round=2", "rounds=4", "checkpoint.every=0",
                              "sample.every=0", "client.stateful_optimizer=true",
                              output_dir=tmp_path / "run"))
    folders = sorted((tmp_path / "run" / "client_state").iterdir())
    assert len(folders) == 3 and all(len(list(f.iterdir())) == 1 for f in folders)
