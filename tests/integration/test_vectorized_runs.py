"""Runs with vectorized clients (client.vectorize): a vectorized run against the same run with one
client after another (in-process, a few seconds each), and 1, 2 and 3 torchrun processes giving
bit-identical weights (slow: three launches).

The runs use the tests' tiny U-Net and an unbalanced partition trained for local_epochs, so the
clients take 1 to 4 local steps and a round holds groups of several step counts."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny

SHAPE = ["num_clients=7", "clients_per_round=6", "partition.method=unbalanced", "local_epochs=0.25",
         "rounds=2", "checkpoint.every=2", "sample.every=0"]

# name -> overrides run with client.vectorize=0 and =3, and the relative tolerance on the
# difference of the two runs' model changes
VARIANTS = {
    "adamw": (["optim.name=adamw"], 2e-3),
    "sgd": (["optim.name=sgd", "optim.lr=0.05"], 2e-5),
    # each client continues its own AdamW state (its own step count) from the state store
    "stateful": (["optim.name=adamw", "client.stateful_optimizer=true"], 2e-3),
    # FedProx's proximal gradient (a large mu, so that it matters within a few steps) and
    # SCAFFOLD's correction (round 2: the clients' and the server's variates from round 1)
    "fedprox": (["client.algorithm=fedprox", "client.prox_mu=5.0", "optim.name=sgd",
                 "optim.lr=0.05"], 2e-5),
    "scaffold": (["client.algorithm=scaffold", "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0",
                  "optim.grad_clip=null"], 2e-5),
    # DP-FedAvg: each client's update clipped to 0.02 (binding) in the buffer, noise on the sum
    "dp": (["privacy.enabled=true", "privacy.clip_norm=0.02", "privacy.noise_multiplier=0.1",
            "privacy.sampling=fixed"], 5e-4),
    # personal encoders (their starting values per client from the state store) and a lossy
    # uplink with error feedback (the residual in the state store)
    "udec_qsgd": (["aggregation.shared=udec", "aggregation.uplink.name=qsgd",
                   "aggregation.uplink.bits=8", "aggregation.uplink.error_feedback=true",
                   "optim.name=sgd", "optim.lr=0.05"], 1e-3),
}


def _final(run_dir, group="model"):
    return load_file(str(run_dir / "checkpoints" / "round_00002" / f"{group}.safetensors"))


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _flat(tensors):
    return torch.cat([tensors[k].reshape(-1) for k in sorted(tensors)])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_vectorized_run_equals_the_sequential_run(tmp_path, variant):
    """Same clients, samples and (to fp32 rounding) losses and weights as one client after
    another: the update transforms, DP, codecs and client state see each client as before."""
    from fedrun.config import load_config
    from fedrun.engine import simulator
    from fedrun.tasks.ddpm.model import build_unet

    overrides, tolerance = VARIANTS[variant]
    dirs = {v: tmp_path / f"vectorize{v}" for v in (0, 3)}
    for v, out in dirs.items():
        simulator.run(load_config(None, tiny(out, *SHAPE, *overrides, f"client.vectorize={v}")))
    cfg = load_config(None, tiny(dirs[0], *SHAPE))
    initial = _flat(build_unet(cfg.model, 8, 1, cfg.seed).state_dict())
    sequential, vectorized = (_flat(_final(dirs[v])) for v in (0, 3))
    change = sequential - initial
    assert change.abs().max() > 1e-4
    relative = float((vectorized - sequential).norm() / change.norm())
    print(f"{variant}: |w_vectorized - w_sequential| / |w_sequential - w_initial| = {relative:.2e}")
    assert relative < tolerance
    for seq, vec in zip(_records(dirs[0]), _records(dirs[3])):
        assert vec["clients"] == seq["clients"] and vec["client_samples"] == seq["client_samples"]
        assert vec["bytes_up"] == seq["bytes_up"] and vec["rejected"] == seq["rejected"]
        for client, loss in seq["client_loss"].items():
            assert vec["client_loss"][client] == pytest.approx(loss, rel=1e-3)


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """The same vectorized job (groups of 2, qsgd uplink with error feedback) at 1, 2 and 3
    processes."""
    root = tmp_path_factory.mktemp("vectorized_worlds")
    extra = ["client.vectorize=2", "aggregation.uplink.name=qsgd", "aggregation.uplink.bits=4",
             "aggregation.uplink.error_feedback=true"]
    for world in (1, 2, 3):
        proc = run_cli(["train", *tiny(root / f"ws{world}", *SHAPE, *extra)],
                       torchrun_nproc=world if world > 1 else None)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow  # three launches (world sizes 1, 2, 3)
@pytest.mark.parametrize("world", [2, 3])
def test_vectorized_runs_are_bit_identical_at_every_world_size(launches, world):
    one, many = launches / "ws1", launches / f"ws{world}"
    for group in ("model", "ema"):
        a, b = _final(one, group), _final(many, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group
    states = sorted(p.relative_to(one) for p in (one / "client_state").rglob("*.safetensors"))
    assert states == sorted(p.relative_to(many) for p in (many / "client_state").rglob("*.safetensors"))
    for path in states:
        a, b = load_file(str(one / path)), load_file(str(many / path))
        assert all(torch.equal(a[k], b[k]) for k in a), path
    for mine, ref in zip(_records(many), _records(one)):
        assert mine["client_loss"] == ref["client_loss"] and mine["train_loss"] == ref["train_loss"]
        assert len(mine["local_compute_s_per_rank"]) == world
