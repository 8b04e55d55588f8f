"""Federated runs with partial exchange (aggregation.shared): personal parts, split uploads."""

import json

import torch
from safetensors.torch import load_file

from fedrun.config import load_config
from fedrun.engine import simulator
from fedrun.engine.flat import FlatParameters
from fedrun.fl.aggregation.partial import build_exchange
from fedrun.tasks.ddpm.model import build_unet

from conftest import tiny

SHAPE = ["num_clients=4", "clients_per_round=2", "local_steps=2", "checkpoint.every=1",
         "checkpoint.keep_last=5", "sample.every=0", "eval.every=0"]


def _vector(run_dir, done, group="model"):
    tensors = load_file(str(run_dir / "checkpoints" / f"round_{done:05d}" / f"{group}.safetensors"))
    return tensors


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _exchange(run_dir, *extra):
    cfg = load_config(None, tiny(run_dir, *SHAPE, *extra))
    params = FlatParameters(build_unet(cfg.model, 8, 1, cfg.seed))
    return build_exchange(cfg, params, params.flat.detach().clone()), params


def test_udec_keeps_encoders_personal_and_shows_one_clients_model(tiny_config, tmp_path):
    run_dir = tmp_path / "udec"
    simulator.run(tiny_config(*SHAPE, "rounds=4", "aggregation.shared=udec",
                              "aggregation.personal_client=2", output_dir=run_dir))
    exchange, params = _exchange(run_dir, "aggregation.shared=udec")
    records = _records(run_dir)
    # bytes: the decoder only, both ways
    assert all(v == 4 * exchange.shared.numel() for r in records
               for v in [*r["bytes_up_per_client"].values(), *r["bytes_down_per_client"].values()])
    # every client that trained keeps its own encoder; they differ from each other
    personal = {}
    for folder in sorted((run_dir / "client_state").iterdir()):
        newest = sorted(folder.iterdir())[-1]
        personal[int(folder.name.split("_")[1])] = load_file(str(newest))["personal"]
    assert len(personal) >= 2
    values = list(personal.values())
    assert not torch.equal(values[0], values[1])
    assert all(not torch.equal(v, exchange.initial_personal) for v in values)
    # the model shown (global, EMA, export) holds client 2's personal parts from the round it
    # last trained; the shared parts moved for everyone
    last_round_of_2 = max(r["round"] for r in records if "2" in r["bytes_up_per_client"])
    model = params.vector_from(_vector(run_dir, 4))
    state2 = load_file(str(run_dir / "client_state" / "client_000002" / f"round_{last_round_of_2:05d}.safetensors"))
    assert torch.equal(model[exchange.personal], state2["personal"])
    ema = params.vector_from(_vector(run_dir, 4, "ema"))
    assert torch.equal(ema[exchange.personal], state2["personal"])
    assert float((model[exchange.shared] - params.flat[exchange.shared]).abs().max()) > 0


def test_udec_resumes_exactly(tiny_config, tmp_path):
    shape = [*SHAPE, "aggregation.shared=ulatdec", "aggregation.personal_client=1"]
    simulator.run(tiny_config(*shape, "rounds=4", output_dir=tmp_path / "full"))
    simulator.run(tiny_config(*shape, "rounds=3", output_dir=tmp_path / "cut"))
    resume_from = tmp_path / "cut" / "checkpoints" / "round_00002"
    simulator.run(tiny_config(*shape, "rounds=4", f"resume={resume_from}", output_dir=tmp_path / "cut"))
    for group in ("model", "ema"):
        a, b = _vector(tmp_path / "full", 4, group), _vector(tmp_path / "cut", 4, group)
        assert all(torch.equal(a[k], b[k]) for k in a), group


def test_usplit_sends_half_and_receives_the_whole_model(tiny_config, tmp_path):
    run_dir = tmp_path / "usplit"
    simulator.run(tiny_config(*SHAPE, "rounds=3", "clients_per_round=3", "aggregation.shared=usplit",
                              output_dir=run_dir))
    exchange, params = _exchange(run_dir, "aggregation.shared=usplit")
    sizes = {g: 4 * c.numel() for g, c in exchange.groups.items()}
    for round_, record in enumerate(_records(run_dir)):
        parts = exchange.assignment(sorted(int(c) for c in record["bytes_up_per_client"]), 0, round_)
        for client, sent in record["bytes_up_per_client"].items():
            assert sent == sum(sizes[g] for g in parts[int(client)])
        assert set(record["bytes_down_per_client"].values()) == {4 * params.numel}
    assert not (run_dir / "client_state").exists()  # nothing stays with a client
