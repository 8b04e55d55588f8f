"""Federated runs with codecs (aggregation.uplink / downlink): bytes, consistency, resume."""

import json

import torch
from safetensors.torch import load_file

from fedrun.engine import simulator

SHAPE = ["num_clients=4", "clients_per_round=4", "local_steps=2", "checkpoint.every=1",
         "checkpoint.keep_last=5", "sample.every=0", "eval.every=0"]
QSGD_EF = ["aggregation.uplink.name=qsgd", "aggregation.uplink.bits=4",
           "aggregation.uplink.error_feedback=true"]
TOPK_DOWN_EF = ["aggregation.downlink.name=topk", "aggregation.downlink.fraction=0.1",
                "aggregation.downlink.error_feedback=true"]


def _weights(run_dir, done, group="model"):
    return load_file(str(run_dir / "checkpoints" / f"round_{done:05d}" / f"{group}.safetensors"))


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _flat(tensors):
    return torch.cat([tensors[k].flatten() for k in sorted(tensors)])


def test_qsgd_uplink_sends_under_015_of_fp32_and_learns(tiny_config, tmp_path):
    simulator.run(tiny_config(*SHAPE, "rounds=3", output_dir=tmp_path / "fp32"))
    simulator.run(tiny_config(*SHAPE, "rounds=3", *QSGD_EF, output_dir=tmp_path / "qsgd"))
    fp32, qsgd = _records(tmp_path / "fp32"), _records(tmp_path / "qsgd")
    params = _flat(_weights(tmp_path / "fp32", 3)).numel()
    for a, b in zip(fp32, qsgd):
        assert set(a["bytes_up_per_client"]) == set(b["bytes_up_per_client"]) == {"0", "1", "2", "3"}
        assert all(v == 4 * params for v in a["bytes_up_per_client"].values())
        assert all(v <= 0.15 * 4 * params for v in b["bytes_up_per_client"].values())
        assert b["bytes_up"] == sum(b["bytes_up_per_client"].values())
        assert b["bytes_down_per_client"] == a["bytes_down_per_client"]  # fp32 downlink
        assert b["bytes_total"] == b["bytes_up_total"] + b["bytes_down_total"]
    assert qsgd[-1]["bytes_up_total"] == sum(r["bytes_up"] for r in qsgd)
    # the quantized run learned (the loss fell) and differs from fp32 (the codec is not skipped)
    assert qsgd[-1]["train_loss"] < qsgd[0]["train_loss"]
    assert not torch.equal(_flat(_weights(tmp_path / "fp32", 3)), _flat(_weights(tmp_path / "qsgd", 3)))
    # each client's residual is in the client state store
    state = load_file(str(sorted((tmp_path / "qsgd" / "client_state" / "client_000000").iterdir())[-1]))
    assert set(state) == {"uplink_residual"} and state["uplink_residual"].abs().sum() > 0


def test_downlink_change_is_what_the_clients_decode(tiny_config, tmp_path):
    """topk downlink without error feedback: every round moves the server's model on exactly the
    k coordinates the message carries; the clients' bytes are one message a round after the
    first (everyone takes part every round), the whole model in round 1."""
    simulator.run(tiny_config(*SHAPE, "rounds=3", "aggregation.downlink.name=topk",
                              "aggregation.downlink.fraction=0.1", output_dir=tmp_path / "run"))
    numel = _flat(_weights(tmp_path / "run", 1)).numel()
    k = round(0.1 * numel)
    for done in (2, 3):
        change = _flat(_weights(tmp_path / "run", done)) - _flat(_weights(tmp_path / "run", done - 1))
        assert 0 < int((change != 0).sum()) <= k
    records = _records(tmp_path / "run")
    assert set(records[0]["bytes_down_per_client"].values()) == {4 * numel}
    assert set(records[1]["bytes_down_per_client"].values()) == {8 * k}  # k values + k indices


def test_downlink_counts_the_rounds_a_client_missed(tiny_config, tmp_path):
    """2 clients of 4 per round: a returning client receives one message per round since it
    last took part, never more than the whole model."""
    simulator.run(tiny_config(*SHAPE, "clients_per_round=2", "rounds=8", "aggregation.downlink=bf16",
                              "checkpoint.every=0", output_dir=tmp_path / "run"))
    numel = _flat(load_file(str(next((tmp_path / "run" / "final").rglob("*.safetensors"))))).numel()
    last, seen = {}, set()
    for done, record in enumerate(_records(tmp_path / "run")):
        for client, got in record["bytes_down_per_client"].items():
            expected = 4 * numel if client not in last else min(4 * numel, (done - last[client]) * 2 * numel)
            assert got == expected
            last[client] = done
            seen.add(got)
    assert seen == {4 * numel, 2 * numel}  # both cases occurred


def test_error_feedback_both_ways_resumes_exactly(tiny_config, tmp_path):
    shape = [*SHAPE, "clients_per_round=3", *QSGD_EF, *TOPK_DOWN_EF]
    simulator.run(tiny_config(*shape, "rounds=4", output_dir=tmp_path / "full"))
    simulator.run(tiny_config(*shape, "rounds=3", output_dir=tmp_path / "cut"))
    resume_from = tmp_path / "cut" / "checkpoints" / "round_00002"
    simulator.run(tiny_config(*shape, "rounds=4", f"resume={resume_from}", output_dir=tmp_path / "cut"))
    for group in ("model", "ema", "downlink"):
        a, b = _weights(tmp_path / "full", 4, group), _weights(tmp_path / "cut", 4, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group
    assert _weights(tmp_path / "full", 4, "downlink")["residual"].abs().sum() > 0
    full, cut = _records(tmp_path / "full"), _records(tmp_path / "cut")
    assert [r["bytes_down_per_client"] for r in full] == [r["bytes_down_per_client"] for r in cut]
    assert full[-1]["bytes_total"] == cut[-1]["bytes_total"]


def test_dp_clips_what_the_server_decodes(tiny_config, tmp_path):
    """Under DP the update transforms act on the decoded message (so clipping bounds what is
    summed): the run works with a lossy codec and its guarantee is the fp32 run's."""
    dp = ["rounds=2", "privacy.enabled=true", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.01"]
    simulator.run(tiny_config(*SHAPE, *dp, "aggregation.uplink.name=qsgd", "aggregation.uplink.bits=2",
                              output_dir=tmp_path / "dp"))
    simulator.run(tiny_config(*SHAPE, *dp, output_dir=tmp_path / "dp32"))
    assert _records(tmp_path / "dp")[-1]["updates_applied"] == 4
    guarantee = [json.loads((tmp_path / d / "final" / "privacy.json").read_text())["epsilon"]
                 for d in ("dp", "dp32")]
    assert guarantee[0] == guarantee[1] and guarantee[0] > 0
    assert not torch.equal(_flat(_weights(tmp_path / "dp", 2)), _flat(_weights(tmp_path / "dp32", 2)))
