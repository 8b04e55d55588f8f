"""The GPU path's logic, tested on CPU: rank -> device and backend, precision, and the centralized
baseline through accelerate. The staged (gloo via CPU memory) all-reduce runs under torchrun in
tests/test_multiprocess.py (world size 3 sets FEDRUN_STAGE_COLLECTIVES=1)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedrun.engine import simulator
from fedrun.engine.dist import plan_devices
from fedrun.errors import ConfigError


def test_every_rank_owns_a_gpu_nccl():
    plans = [plan_devices(k, 4, 4, use_cuda=True) for k in range(4)]
    assert [p.device for p in plans] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert {p.backend for p in plans} == {"nccl"} and not any(p.staged for p in plans)


def test_ranks_sharing_gpus_use_gloo_staged_through_cpu():
    plans = [plan_devices(k, 4, 1, use_cuda=True) for k in range(4)]
    assert [p.device for p in plans] == ["cuda:0"] * 4
    assert {p.backend for p in plans} == {"gloo"} and all(p.staged for p in plans)
    assert "NCCL refuses two ranks on one GPU" in plans[0].reason
    two = [plan_devices(k, 5, 2, use_cuda=True) for k in range(5)]
    assert [p.device for p in two] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert "up to 3 per GPU" in two[0].reason


def test_cpu_ranks_use_gloo_and_cuda_without_gpus_is_an_error():
    plan = plan_devices(1, 2, 0, use_cuda=False)
    assert (plan.device, plan.backend, plan.staged) == ("cpu", "gloo", False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        plan_devices(0, 1, 0, use_cuda=True)


def _final(run_dir, group="model"):
    return load_file(str(run_dir / "checkpoints" / "round_00002" / f"{group}.safetensors"))


def test_bf16_autocast_trains_and_keeps_the_federated_state_fp32(tiny_config, tmp_path):
    shape = ["rounds=2", "local_steps=3", "checkpoint.every=1", "sample.every=0"]
    simulator.run(tiny_config(*shape, output_dir=tmp_path / "fp32"))
    simulator.run(tiny_config(*shape, "precision=bf16", output_dir=tmp_path / "bf16"))
    fp32, bf16 = _final(tmp_path / "fp32"), _final(tmp_path / "bf16")
    assert all(t.dtype == torch.float32 for t in bf16.values())
    assert all(t.dtype == torch.float32 for t in _final(tmp_path / "bf16", "ema").values())
    assert not all(torch.equal(fp32[k], bf16[k]) for k in fp32)  # autocast really ran
    losses = {name: [json.loads(x)["train_loss"] for x in
                     (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("fp32", "bf16")}
    # the same trajectory up to bf16 rounding: round losses within 5 %
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_fp16_needs_a_gpu_and_bad_precision_is_refused(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="'precision': fp16 needs a GPU"):
        simulator.run(tiny_config("rounds=1", "precision=fp16", output_dir=tmp_path / "fp16"))
    with pytest.raises(ConfigError, match="'precision': must be 'fp32', 'bf16' or 'fp16'"):
        tiny_config("precision=tf32")


def test_central_runs_through_accelerate_with_bf16(tiny_config, tmp_path):
    from fedrun.engine.central import run_central

    shape = ["num_clients=2", "local_steps=2", "rounds=2", "checkpoint.every=1", "sample.every=0",
             "central.micro_batch=2"]
    run_central(tiny_config(*shape, output_dir=tmp_path / "fp32"))
    run_central(tiny_config(*shape, "precision=bf16", output_dir=tmp_path / "bf16"))
    fp32, bf16 = _final(tmp_path / "fp32"), _final(tmp_path / "bf16")
    assert all(t.dtype == torch.float32 for t in bf16.values())
    assert not all(torch.equal(fp32[k], bf16[k]) for k in fp32)
    optimizer = _final(tmp_path / "bf16", "optimizer")
    assert optimizer["exp_avg"].dtype == torch.float32 and float(optimizer["step"][0]) == 8.0


@pytest.mark.slow
def test_prepared_device_check_dry_run(tmp_path):
    """`python -m bench.gpu --dry-run` runs every part of the device check at toy size on CPU."""
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(step["exit"] == 0 for step in results["steps"].values())
    assert "skipped" in results["cuda_tests_summary"][0]  # no CUDA here: marked tests skip
    for ranks in ("ranks1", "ranks2"):
        pretrain = results[ranks]["pretrain"]
        assert set(pretrain) == {"fp32", "bf16"}, pretrain
        assert all(row["local_steps_per_s"] > 0 and row["world_size"] == int(ranks[-1])
                   for row in pretrain.values())
    assert "staged" in results["ranks2"]["pretrain"]["fp32"]["backend"]
    assert all(row["central_over_bare"] > 0 for row in results["ranks1"]["central"].values())
    assert results["ranks1"]["lora"]["bf16"]["lora_parameters"] > 0
    assert "| 2 | bf16 |" in (tmp_path / "README.md").read_text()
